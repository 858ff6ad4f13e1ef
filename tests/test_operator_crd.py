"""The CRD: generated from the spec model, structural, valid for Kubernetes 1.33, committed as is.

Custom-kind instances are not checked by kubernetes-validate, so examples and bad objects are
validated against the CRD's own openAPIV3Schema with jsonschema (OpenAPI v3.0 ≈ draft 4, with
`nullable` spelled as a null type); rules the schema cannot express are the operator's, and
`parse_service` is what the operator reports in status.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from tokenfleet.operator.crd import (
    LABEL_SELECTOR_PATH,
    SPEC_REPLICAS_PATH,
    STATUS_REPLICAS_PATH,
    crd_manifest,
)
from tokenfleet.spec import LLMServiceSpec, SpecError, parse_service

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.33"


def schema() -> dict[str, Any]:
    version = crd_manifest()["spec"]["versions"][0]
    result: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return result


def as_json_schema(node: Any) -> Any:
    """OpenAPI v3.0 `nullable: true` → a null type, for jsonschema's draft-4 validator."""
    if isinstance(node, dict):
        out = {k: as_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
        if out.pop("nullable", False) and "type" in out:
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(node, list):
        return [as_json_schema(item) for item in node]
    return node


VALIDATOR = jsonschema.Draft4Validator(as_json_schema(schema()))


def schema_errors(document: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for error in VALIDATOR.iter_errors(document):
        path = ""
        for part in error.absolute_path:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        out.append((path, error.message))
    return out


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}" if path else name)
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def model_paths(model: type[BaseModel], prefix: str) -> Iterator[str]:
    """Every field of the pydantic model, by alias, as a schema path."""
    for name, field in model.model_fields.items():
        alias = field.alias or name
        path = f"{prefix}.{alias}"
        yield path
        annotation = field.annotation
        # X, X | None, list[X]: recurse into X when it is a model.
        origin = getattr(annotation, "__origin__", None)
        candidates = [annotation] if origin is list else [annotation, *getattr(annotation, "__args__", ())]
        for candidate in candidates:
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                yield from model_paths(candidate, path)
            elif getattr(candidate, "__origin__", None) is list:
                (item,) = candidate.__args__
                if isinstance(item, type) and issubclass(item, BaseModel):
                    yield from model_paths(item, f"{path}[]")


def test_committed_crd_equals_the_generated_one() -> None:
    committed = yaml.safe_load((ROOT / "operator" / "manifests" / "crd.yaml").read_text())
    assert committed == crd_manifest(), "run `tokenfleet spec crd > operator/manifests/crd.yaml`"


def test_every_spec_field_is_in_the_schema() -> None:
    paths = {path for path, _ in walk(schema())}
    fields = list(model_paths(LLMServiceSpec, "spec"))
    assert len(fields) > 60
    missing = [path for path in fields if path not in paths]
    assert not missing


def test_schema_is_structural() -> None:
    for path, node in walk(schema()):
        assert "$ref" not in node, path
        assert "anyOf" not in node, path
        assert "oneOf" not in node, path
        assert "const" not in node, path
        preserved = node.get("x-kubernetes-preserve-unknown-fields")
        assert "type" in node or preserved, f"{path} has no type"
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(bound, True), bool), (
                f"{path}.{bound} must be a boolean in OpenAPI v3.0"
            )
        if "properties" in node:
            assert "additionalProperties" not in node, path
        if node.get("default") is None:
            assert "default" not in node, f"{path}: null default"


def test_defaults_match_the_model() -> None:
    nodes = dict(walk(schema()))
    assert nodes["spec.engine.maxNumSeqs"]["default"] == 8
    assert nodes["spec.routing.policy"]["default"] == "least_outstanding"
    assert nodes["spec.engine"]["default"] == {}
    assert nodes["spec.scheduler.classes[].ttftMs"]["nullable"] is True
    assert nodes["spec.engine.kvCacheGib"]["exclusiveMinimum"] is True


def test_crd_is_valid_kubernetes() -> None:
    assert kubernetes_validate.validate(crd_manifest(), K8S_VERSION, strict=True) == K8S_VERSION


def test_subresources_and_columns() -> None:
    version = crd_manifest()["spec"]["versions"][0]
    scale = version["subresources"]["scale"]
    assert version["subresources"]["status"] == {}
    assert scale == {
        "specReplicasPath": SPEC_REPLICAS_PATH,
        "statusReplicasPath": STATUS_REPLICAS_PATH,
        "labelSelectorPath": LABEL_SELECTOR_PATH,
    }
    nodes = dict(walk(schema()))
    # The scale paths point at integer fields of the schema (the API server requires it).
    assert nodes[SPEC_REPLICAS_PATH.strip(".")]["type"] == "integer"
    assert nodes[STATUS_REPLICAS_PATH.strip(".")]["type"] == "integer"
    assert nodes[LABEL_SELECTOR_PATH.strip(".")]["type"] == "string"
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == ".status.replicas"
    assert columns["Status"] == '.status.conditions[?(@.type=="Ready")].status'
    rules = nodes["spec.replicas"]["x-kubernetes-validations"]
    assert rules == [{"rule": "self.min <= self.max", "message": "min must not exceed max"}]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate_against_the_crd_schema(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    assert schema_errors(document) == []
    parse_service(document, str(path))  # and the operator accepts them


def good() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / "gpu.yaml").read_text())  # type: ignore[no-any-return]


def put(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(document)
    node = doc
    parts = path.replace("]", "").replace("[", ".").split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = parts[-1]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return doc


# (path to set, value, expected error path, expected reason, who rejects it)
BAD: list[tuple[str, Any, str, str, str]] = [
    ("spec.model.maxModelLen", 8, "spec.model.maxModelLen", "less than the minimum of 16", "schema"),
    ("spec.model.quantization", "int3", "spec.model.quantization", "unknown technique 'int3'", "operator"),
    ("spec.model.dtype", "fp8", "spec.model.dtype", "is not one of", "schema"),
    ("spec.engine.device", "tpu", "spec.engine.device", "is not one of", "schema"),
    ("spec.engine.maxNumSeqs", 0, "spec.engine.maxNumSeqs", "less than the minimum of 1", "schema"),
    ("spec.engine.gpuMemoryUtilization", 0, "spec.engine.gpuMemoryUtilization", "minimum of 0", "schema"),
    ("spec.engine.kernels", ["flash"], "spec.engine.kernels[0]", "is not one of", "schema"),
    ("spec.replicas.max", 0, "spec.replicas.max", "less than the minimum of 1", "schema"),
    ("spec.replicas.min", "two", "spec.replicas.min", "is not of type 'integer'", "schema"),
    ("spec.autoscaling.metric", "cpu", "spec.autoscaling.metric", "is not one of", "schema"),
    ("spec.routing.policy", "random", "spec.routing.policy", "is not one of", "schema"),
    ("spec.routing.retries", 9, "spec.routing.retries", "greater than the maximum of 3", "schema"),
    ("spec.routing.sessionHeader", "x session", "spec.routing.sessionHeader", "does not match", "schema"),
    ("spec.rollout.strategy", "bluegreen", "spec.rollout.strategy", "is not one of", "schema"),
    ("spec.scheduler.classes", [], "spec.scheduler.classes", "should be non-empty", "schema"),
    (
        "spec.scheduler.classes[0].name",
        "Interactive!",
        "spec.scheduler.classes[0].name",
        "does not match",
        "schema",
    ),
    ("spec.gateway.port", 70000, "spec.gateway.port", "greater than the maximum of 65535", "schema"),
    ("spec.gateway.maxBodyBytes", 10, "spec.gateway.maxBodyBytes", "less than the minimum of 1024", "schema"),
    ("spec.scheduler.tenants[0].weight", -1, "spec.scheduler.tenants[0].weight", "minimum of 0", "schema"),
    ("spec.engine.tensorParallelSize", 32, "spec.engine.tensorParallelSize", "maximum of 16", "schema"),
    ("spec.replicas.min", 9, "spec.replicas", "min (9) must not exceed max (8)", "operator"),
    ("spec.engine.gpusPerReplica", 0, "spec.engine", "gpusPerReplica must be at least 1", "operator"),
    ("spec.rollout.canarySteps", [50, 20], "spec.rollout", "strictly increasing", "operator"),
    (
        "spec.gateway.apiKeysSecret",
        None,
        "spec.gateway",
        "auth needs apiKeysSecret or apiKeysFile",
        "operator",
    ),
    ("spec.engine.image", "vllm/vllm-openai:latest", "spec.engine.image", "pin the image", "operator"),
    (
        "spec.engine.extraArgs",
        ["--port=1"],
        "spec.engine.extraArgs",
        "--port is set by tokenfleet",
        "operator",
    ),
    (
        "spec.scheduler.defaultClass",
        "gold",
        "spec.scheduler",
        "defaultClass 'gold' is not one of",
        "operator",
    ),
    ("spec.model.source", "s3://bucket/m", "spec.model.source", "scheme must be builtin://", "operator"),
    ("spec.enigne", {"device": "gpu"}, "spec.enigne", "Extra inputs are not permitted", "operator"),
]


def test_at_least_twenty_distinct_bad_objects() -> None:
    assert len({case[0] + repr(case[1]) for case in BAD}) >= 20


@pytest.mark.parametrize(("where", "value", "path", "reason", "who"), BAD, ids=[c[0] for c in BAD])
def test_bad_object_rejected_with_field_and_reason(
    where: str, value: Any, path: str, reason: str, who: str
) -> None:
    document = put(good(), where, value)
    # The operator rejects every bad object at the same field (status.errors carries the pairs).
    with pytest.raises(SpecError) as exc:
        parse_service(document)
    operator_errors = exc.value.errors
    if who == "schema":
        assert any(p == path for p, _ in operator_errors), operator_errors
        # ...and the API server rejects it first, by the CRD schema, with this reason.
        errors = schema_errors(document)
        assert any(p == path and reason in r for p, r in errors), errors
    else:
        assert any(p == path and reason in r for p, r in operator_errors), operator_errors


def test_cli_prints_the_crd() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tokenfleet.cli", "spec", "crd"], capture_output=True, text=True, check=True
    ).stdout
    assert yaml.safe_load(out) == crd_manifest()
