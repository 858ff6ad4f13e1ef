"""Issue 12 (hardening), the gateway-side items: each test fails on the code before the fix.

Fake replicas (fake_engine.py) and raw sockets; real vLLM only where vLLM's own behaviour is
the point (test_gateway_compat.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_service

from tokenfleet.cli import main
from tokenfleet.spec import SpecError, local_problems

# -- item 10: engine.extraArgs reserved flags -------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--served_model_name", "evil"],
        ["--max_model_len=99999"],
        ["--config", "file.yaml"],
        ["--config=file.yaml"],
        ["--trust-remote-code"],
        ["--trust_remote_code"],
    ],
)
def test_extra_args_reserved_flags_are_normalised(args: list[str]) -> None:
    with pytest.raises(SpecError):
        tiny_service(engine={"extraArgs": args})


def test_trust_remote_code_only_with_the_spec_field() -> None:
    service = tiny_service(engine={"extraArgs": ["--trust_remote_code"], "trustRemoteCode": True})
    assert service.spec.engine.trust_remote_code


# -- item 11: every field consumed or refused -------------------------------------------------


SECRET_ONLY = """apiVersion: tokenfleet.dev/v1alpha1
kind: LLMService
metadata: {name: s}
spec:
  gateway: {auth: true, apiKeysSecret: keys}
"""


def test_api_keys_secret_is_refused_for_local_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SECRET_ONLY)
    assert main(["validate", "-f", str(path)]) == 0  # valid for a cluster: the operator reads it
    assert main(["validate", "--local", "-f", str(path)]) == 1
    err = capsys.readouterr().err
    assert "spec.gateway.apiKeysSecret: not supported by tokenfleet up" in err
    assert "set apiKeysFile" in err
    assert main(["up", "-f", str(path)]) == 2  # refused before anything starts
    cluster_only = tiny_service(engine={"image": "vllm/vllm-openai:v0.32.0"})
    assert local_problems(cluster_only) == []
