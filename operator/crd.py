"""The `LLMService` CustomResourceDefinition, generated from the pydantic spec model.

Kubernetes wants a *structural* OpenAPI v3 schema: no `$ref`, no `anyOf` over differing types,
`exclusiveMinimum` as a boolean, no `additionalProperties: false` next to `properties`. This
module turns `tokenfleet.spec.json_schema()` into that shape, so the CRD cannot drift from the
model that `tokenfleet up` and the operator validate with.
"""

from __future__ import annotations

import copy
from typing import Any

from tokenfleet.spec import API_GROUP, KIND, json_schema

PLURAL = "llmservices"
SINGULAR = "llmservice"
VERSION = "v1alpha1"
SHORT_NAMES = ["llmsvc"]
CRD_NAME = f"{PLURAL}.{API_GROUP}"

# Where `kubectl scale` / an HPA read and write: the replica floor (see ADR 0007).
SPEC_REPLICAS_PATH = ".spec.replicas.min"
STATUS_REPLICAS_PATH = ".status.replicas"
LABEL_SELECTOR_PATH = ".status.selector"

# Cross-field rules the API server can check itself (CEL); the operator re-checks every rule of
# the pydantic model and reports the rest in status (they need more than one object's fields).
_CEL_RULES: dict[tuple[str, ...], list[dict[str, str]]] = {
    ("spec", "replicas"): [
        {"rule": "self.min <= self.max", "message": "min must not exceed max"},
    ],
    ("spec", "engine"): [
        {
            "rule": "self.device != 'cpu' || self.gpusPerReplica == 0",
            "message": "gpusPerReplica must be 0 when device is cpu",
        },
        {
            "rule": "self.device != 'gpu' || self.gpusPerReplica >= 1",
            "message": "gpusPerReplica must be at least 1 when device is gpu",
        },
    ],
    ("spec", "rollout"): [
        {
            "rule": "self.maxSurge > 0 || self.maxUnavailable > 0",
            "message": "maxSurge and maxUnavailable cannot both be 0",
        },
    ],
}

_DROP_KEYS = {"title", "additionalProperties", "const", "$defs"}

STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    # kopf keeps its own progress under status.kopf; unknown keys must survive.
    "x-kubernetes-preserve-unknown-fields": True,
    "properties": {
        "observedGeneration": {"type": "integer", "format": "int64"},
        "replicas": {"type": "integer", "description": "Ready engine replicas (scale subresource)."},
        "desiredReplicas": {"type": "integer", "description": "Engine replicas the control loop wants."},
        "selector": {"type": "string", "description": "Label selector of the engine pods."},
        "phase": {"type": "string"},
        "conditions": {
            "type": "array",
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
            "items": {
                "type": "object",
                "required": ["type", "status"],
                "properties": {
                    "type": {"type": "string"},
                    "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                    "reason": {"type": "string"},
                    "message": {"type": "string"},
                    "lastTransitionTime": {"type": "string", "format": "date-time"},
                    "observedGeneration": {"type": "integer", "format": "int64"},
                },
            },
        },
    },
}

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
    {"name": "Device", "type": "string", "jsonPath": ".spec.engine.device"},
    {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.replicas"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {
        "name": "Status",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline `$ref`s recursively (the spec model has no recursive types)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            merged = {**_resolve(target, defs), **{k: v for k, v in node.items() if k != "$ref"}}
            return _resolve(merged, defs)
        return {key: _resolve(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    return node


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """One JSON-schema node → one structural OpenAPI v3 node."""
    node = dict(node)
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        # pydantic writes `X | None` as anyOf[X, null]: Kubernetes spells that `nullable`.
        non_null = [branch for branch in any_of if branch.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot make a structural schema of anyOf {any_of}")
        node = {**non_null[0], **node}
        if len(non_null) != len(any_of):
            node["nullable"] = True
    if "const" in node:
        node["enum"] = [node["const"]]
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
            node["minimum" if bound == "exclusiveMinimum" else "maximum"] = node[bound]
            node[bound] = True
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = _structural(value)
        else:
            out[key] = value
    if "default" in out and out["default"] is None:
        # A null default would only write `null` into stored objects; absent means the same.
        del out["default"]
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        # A free-form map (labels, nodeSelector): typed values, no fixed keys.
        out["additionalProperties"] = _structural(extra)
    if out.get("type") == "object" and "properties" in out and "default" not in out:
        # An object whose every field has a default defaults to {} itself, so the API server
        # fills in the same values pydantic would (an empty `spec: {}` becomes complete).
        required = set(out.get("required", []))
        if not required:
            out["default"] = {}
    return out


def _put_rules(schema: dict[str, Any]) -> None:
    for path, rules in _CEL_RULES.items():
        node = schema
        for part in path:
            node = node["properties"][part]
        node["x-kubernetes-validations"] = copy.deepcopy(rules)


def spec_schema() -> dict[str, Any]:
    """The structural schema of `.spec`, from the pydantic model."""
    raw = json_schema()
    resolved = _resolve(raw, raw.get("$defs", {}))
    return _structural(resolved["properties"]["spec"])


def open_api_schema() -> dict[str, Any]:
    """The whole resource's `openAPIV3Schema`."""
    schema: dict[str, Any] = {
        "type": "object",
        "description": "An LLM served inside its SLAs: engines, gateway, autoscaling, rollouts.",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # Only name/generateName may be constrained at the root; the API server owns the rest.
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": copy.deepcopy(STATUS_SCHEMA),
        },
    }
    _put_rules(schema)
    return schema


def crd_manifest() -> dict[str, Any]:
    """The CustomResourceDefinition object (apiextensions.k8s.io/v1) for `LLMService`."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/part-of": "tokenfleet"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["tokenfleet"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": SPEC_REPLICAS_PATH,
                            "statusReplicasPath": STATUS_REPLICAS_PATH,
                            "labelSelectorPath": LABEL_SELECTOR_PATH,
                        },
                    },
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                }
            ],
        },
    }
