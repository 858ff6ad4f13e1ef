"""The LLMService spec: examples load, bad specs are rejected with the right field path."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tokenfleet.cli import main
from tokenfleet.spec import LLMService, SpecError, json_schema, load_service, parse_service

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def _base() -> dict[str, Any]:
    return yaml.safe_load((Path(__file__).parent.parent / "examples" / "default.yaml").read_text())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    service = load_service(path)
    assert service.kind == "LLMService"
    assert service.metadata.name


def test_defaults_fill_an_almost_empty_service() -> None:
    service = parse_service(
        {"apiVersion": "tokenfleet.dev/v1alpha1", "kind": "LLMService", "metadata": {"name": "x"}}
    )
    assert service.spec.model.source == "builtin://tiny-code"
    assert service.spec.engine.device == "cpu"
    assert [c.name for c in service.spec.scheduler.classes] == ["interactive", "standard", "batch"]
    assert service.spec.replicas.min == 1


def test_camel_case_round_trip() -> None:
    service = load_service(EXAMPLES[0])
    dumped = service.model_dump(by_alias=True)
    assert "maxModelLen" in dumped["spec"]["model"]
    assert LLMService.model_validate(dumped) == service


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    node = doc
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


# (mutation path, value, expected error field path, a word the reason must contain)
BAD_SPECS: list[tuple[str, Any, str, str]] = [
    ("kind", "Deployment", "kind", "LLMService"),
    ("apiVersion", "v1", "apiVersion", "tokenfleet.dev"),
    ("metadata.name", "Bad_Name", "metadata.name", "pattern"),
    ("spec.model.source", "s3://bucket/model", "spec.model.source", "scheme"),
    ("spec.model.source", "builtin://gpt-5", "spec.model.source", "unknown builtin"),
    ("spec.model.source", "hf://only-org", "spec.model.source", "hf://"),
    ("spec.model.maxModelLen", 4, "spec.model.maxModelLen", "greater than or equal"),
    ("spec.model.quantization", "int3", "spec.model.quantization", "none"),
    ("spec.model.maxModelLen", "long", "spec.model.maxModelLen", "integer"),
    ("spec.engine.device", "tpu", "spec.engine.device", "cpu"),
    ("spec.engine.gpusPerReplica", 2, "spec.engine", "gpusPerReplica must be 0"),
    ("spec.engine.extraArgs", ["--port=9"], "spec.engine.extraArgs", "set by tokenfleet"),
    ("spec.engine.kernels", ["flash_magic"], "spec.engine.kernels[0]", "rms_norm"),
    ("spec.engine.image", "vllm/vllm-openai:latest", "spec.engine.image", "pin"),
    ("spec.engine.gpuMemoryUtilization", 1.5, "spec.engine.gpuMemoryUtilization", "less than"),
    ("spec.engine.maxNumSeq", 4, "spec.engine.maxNumSeq", "Extra inputs"),
    ("spec.scheduler.policy", "lottery", "spec.scheduler.policy", "sla"),
    ("spec.scheduler.defaultClass", "gold", "spec.scheduler", "defaultClass"),
    ("spec.scheduler.classes.1.priority", 0, "spec.scheduler", "priorities must be unique"),
    ("spec.scheduler.classes.0.ttftMs", -5, "spec.scheduler.classes[0].ttftMs", "greater than"),
    ("spec.scheduler.tenants", [{"name": "a", "defaultClass": "vip"}], "spec.scheduler", "unknown class"),
    ("spec.scheduler.tenants", [{"name": "a", "weight": 0}], "spec.scheduler.tenants[0].weight", "greater"),
    ("spec.replicas", {"min": 3, "max": 2}, "spec.replicas", "must not exceed"),
    ("spec.routing.policy", "random", "spec.routing.policy", "round_robin"),
    ("spec.routing.retries", 9, "spec.routing.retries", "less than"),
    ("spec.rollout", {"maxSurge": 0, "maxUnavailable": 0}, "spec.rollout", "cannot both be 0"),
    ("spec.rollout.canarySteps", [50, 10, 100], "spec.rollout", "strictly increasing"),
    ("spec.gateway.auth", True, "spec.gateway", "apiKeysSecret"),
    ("spec.gateway.port", 70000, "spec.gateway.port", "less than"),
]


@pytest.mark.parametrize(
    ("path", "value", "field", "reason"), BAD_SPECS, ids=[b[0] + "=" + str(b[1]) for b in BAD_SPECS]
)
def test_bad_spec_is_rejected_with_field_path(path: str, value: Any, field: str, reason: str) -> None:
    doc = copy.deepcopy(_base())
    _set(doc, path, value)
    with pytest.raises(SpecError) as caught:
        parse_service(doc)
    fields = {f: r for f, r in caught.value.errors}
    assert field in fields, caught.value.errors
    assert reason.lower() in fields[field].lower(), caught.value.errors


def test_all_errors_are_reported_at_once() -> None:
    doc = _base()
    doc["spec"]["model"]["maxModelLen"] = 1
    doc["spec"]["engine"]["device"] = "tpu"
    with pytest.raises(SpecError) as caught:
        parse_service(doc)
    assert {f for f, _ in caught.value.errors} >= {"spec.model.maxModelLen", "spec.engine.device"}


def test_non_mapping_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="expected a mapping"):
        parse_service(["not", "a", "mapping"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError) as caught:
        load_service(broken)
    assert caught.value.errors[0][0] == "(yaml)"


def test_json_schema_has_aliases_and_descriptions() -> None:
    schema = json_schema()
    model = schema["$defs"]["ModelSpec"]["properties"]
    assert "maxModelLen" in model
    assert model["source"]["description"]


def test_cli_validate_reports_field_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _base()
    doc["spec"]["replicas"] = {"min": 5, "max": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert main(["validate", "-f", str(EXAMPLES[0]), "-f", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert "valid LLMService" in out
    assert "spec.replicas: min (5) must not exceed max (1)" in err
    assert main(["validate", "-f", str(tmp_path / "missing.yaml")]) == 1


def test_cli_schema_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["spec", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "LLMService"


def test_spec_reference_doc_is_up_to_date() -> None:
    from tokenfleet.specdoc import render

    committed = (Path(__file__).parent.parent / "docs" / "spec-reference.md").read_text()
    assert committed == render(), "run: tokenfleet spec docs -o docs/spec-reference.md"


def test_cli_spec_docs(tmp_path: Path) -> None:
    out = tmp_path / "ref.md"
    assert main(["spec", "docs", "-o", str(out)]) == 0
    text = out.read_text()
    assert "## `spec.scheduler.classes` (SLOClass)" in text
    assert "`maxModelLen`" in text
