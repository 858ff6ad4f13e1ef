"""Turn a manifest dict into the typed pulumi-kubernetes resource of its kind.

Typed resources (not `yaml.ConfigGroup`) so each object is one resource in the graph, with
its own diff, `depends_on` and await logic. Kinds without a typed class (LLMService,
ServiceMonitor, PrometheusRule) become `apiextensions.CustomResource`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

_CLASSES: dict[tuple[str, str], Callable[..., pulumi.CustomResource]] = {
    ("v1", "Namespace"): k8s.core.v1.Namespace,
    ("v1", "ServiceAccount"): k8s.core.v1.ServiceAccount,
    ("v1", "Service"): k8s.core.v1.Service,
    ("v1", "ConfigMap"): k8s.core.v1.ConfigMap,
    ("v1", "Secret"): k8s.core.v1.Secret,
    ("apps/v1", "Deployment"): k8s.apps.v1.Deployment,
    ("batch/v1", "Job"): k8s.batch.v1.Job,
    ("networking.k8s.io/v1", "NetworkPolicy"): k8s.networking.v1.NetworkPolicy,
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): k8s.rbac.v1.ClusterRole,
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): k8s.rbac.v1.ClusterRoleBinding,
    ("rbac.authorization.k8s.io/v1", "Role"): k8s.rbac.v1.Role,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): k8s.rbac.v1.RoleBinding,
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): k8s.apiextensions.v1.CustomResourceDefinition,
}


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def resource_name(manifest: dict[str, Any]) -> str:
    """A stable Pulumi name: kind, namespace and name (names repeat across namespaces)."""
    meta = manifest["metadata"]
    parts = [manifest["kind"].lower(), meta.get("namespace"), meta["name"]]
    return "-".join(p for p in parts if p)


def apply(manifest: dict[str, Any], opts: pulumi.ResourceOptions, **overrides: Any) -> pulumi.CustomResource:
    """Register `manifest`; `overrides` replace top-level fields (e.g. Output-valued stringData).

    Top-level keys become the class's snake_case arguments; nested keys stay camelCase, which
    the SDK passes through unchanged (as the provider expects them).
    """
    api_version, kind = manifest["apiVersion"], manifest["kind"]
    fields = {_snake(k): v for k, v in manifest.items() if k not in ("apiVersion", "kind")}
    fields.update(overrides)
    cls = _CLASSES.get((api_version, kind))
    if cls is None:
        custom: pulumi.CustomResource = k8s.apiextensions.CustomResource(
            resource_name(manifest), api_version=api_version, kind=kind, opts=opts, **fields
        )
        return custom
    return cls(resource_name(manifest), opts=opts, **fields)
