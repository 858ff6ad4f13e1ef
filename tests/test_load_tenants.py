"""Workload tenants send their own API keys (from an environment variable or the gateway's keys
file); the end-to-end run through an authenticated gateway is in test_sla_scheduler_e2e.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tokenfleet.engine.sla_contract import CLASS_HEADER
from tokenfleet.load.bench import BenchError, run_workload
from tokenfleet.load.client import LLMRequest, build_http_request
from tokenfleet.load.keys import TenantKeyError, resolve_tenant_keys, tenant_keys
from tokenfleet.load.traffic import RequestFactory
from tokenfleet.load.workload import parse_workload


def workload(tenants: list[dict[str, Any]], **extra: Any) -> Any:
    return parse_workload({"name": "t", "tenants": tenants, **extra})


def test_keys_from_environment_and_keys_file() -> None:
    w = workload([{"name": "a"}, {"name": "b", "apiKeyEnv": "B_KEY"}], apiKeysFile="unused")
    keys = tenant_keys(w, {"B_KEY": "kb"}, {"ka": "a", "kc": "c"})
    assert keys == {"a": "ka", "b": "kb"}


def test_no_key_source_means_no_keys() -> None:
    assert tenant_keys(workload([{"name": "a"}]), {}, None) == {}


@pytest.mark.parametrize(
    ("tenants", "environ", "key_file", "message"),
    [
        (
            [{"name": "b", "apiKeyEnv": "B_KEY"}],
            {},
            None,
            "tenant 'b': environment variable B_KEY is not set",
        ),
        ([{"name": "b", "apiKeyEnv": "B_KEY"}], {"B_KEY": ""}, None, "B_KEY is not set"),
        ([{"name": "a"}], {}, {"k": "other"}, "tenant 'a': the keys file has no key for it"),
        ([{"name": "a"}], {}, {"k1": "a", "k2": "a"}, "tenant 'a': the keys file has 2 keys for it"),
    ],
)
def test_missing_or_ambiguous_keys_name_the_tenant(
    tenants: list[dict[str, Any]], environ: dict[str, str], key_file: dict[str, str] | None, message: str
) -> None:
    with pytest.raises(TenantKeyError, match=message):
        tenant_keys(workload(tenants), environ, key_file)


def test_keys_file_is_read_in_the_gateways_format(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("- {key: k-a, tenant: a}\n")
    assert resolve_tenant_keys(workload([{"name": "a"}], apiKeysFile=str(keys)), {}) == {"a": "k-a"}
    with pytest.raises(TenantKeyError, match=r"apiKeysFile .*missing\.yaml"):
        resolve_tenant_keys(workload([{"name": "a"}], apiKeysFile=str(tmp_path / "missing.yaml")), {})
    keys.write_text("[unclosed")
    with pytest.raises(TenantKeyError, match="apiKeysFile"):
        resolve_tenant_keys(workload([{"name": "a"}], apiKeysFile=str(keys)), {})


def test_a_request_carries_its_tenants_key_and_no_tenant_header() -> None:
    _, body, headers = build_http_request(
        LLMRequest(id="r1", prompt="x", max_tokens=2, tenant="a", api_key="k"), "m"
    )
    assert headers["authorization"] == "Bearer k"
    assert headers[CLASS_HEADER] == "standard"
    assert not any("tenant" in name for name in headers)  # a gateway attributes by key alone
    assert body["vllm_xargs"]["tenant"] == "a"  # what an engine's scheduler reads when hit directly
    _, _, keyless = build_http_request(LLMRequest(id="r2", prompt="x", max_tokens=2), "m")
    assert "authorization" not in keyless


def test_request_factory_attaches_each_tenants_key() -> None:
    w = workload([{"name": "a", "share": 1}, {"name": "b", "share": 1}], seed=4)
    factory = RequestFactory(w, keys={"a": "ka", "b": "kb"})
    requests = [factory.next(0.0) for _ in range(40)]
    assert {r.tenant for r in requests} == {"a", "b"}
    assert all(r.api_key == {"a": "ka", "b": "kb"}[r.tenant] for r in requests)


def test_run_stops_before_sending_when_a_key_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    w = workload([{"name": "a", "apiKeyEnv": "NOT_SET_KEY"}])
    with pytest.raises(BenchError, match="NOT_SET_KEY"):
        run_workload(w, "http://127.0.0.1:9", 1.0, tmp_path / "run")
    assert not (tmp_path / "run").exists()
