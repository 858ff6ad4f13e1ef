"""Least-privilege RBAC for the operator, and for each service's gateway.

The operator gets exactly the resources and verbs it calls. `tests/test_operator_kmock.py`
records every request the running operator makes against kmock and checks each (group, resource,
verb) is granted here, so a new API call without a rule fails a test instead of a production
rollout. Each gateway gets a Role of its own (`gateway_rbac_manifests`), applied by the operator:
read the engine EndpointSlices and its own ConfigMap, nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenfleet.operator.workloads import common_labels, gateway_name
from tokenfleet.spec import API_GROUP, LLMService

SERVICE_ACCOUNT = "tokenfleet-operator"
CHILD_VERBS = ("get", "create", "patch", "delete")  # server-side apply needs create + patch


@dataclass(frozen=True, slots=True)
class Rule:
    api_group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    resource_names: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "apiGroups": [self.api_group],
            "resources": list(self.resources),
            "verbs": list(self.verbs),
        }
        if self.resource_names:
            out["resourceNames"] = list(self.resource_names)
        return out


# Rules on namespaced resources: a Role per watched namespace when the operator is namespaced.
NAMESPACED_RULES: tuple[Rule, ...] = (
    # kopf lists and watches the resource and patches finalizers/annotations; the operator
    # re-reads one before each reconcile and patches its status.
    Rule(API_GROUP, ("llmservices",), ("get", "list", "watch", "patch")),
    Rule(API_GROUP, ("llmservices/status",), ("patch",)),
    Rule("apps", ("deployments",), CHILD_VERBS),
    Rule("", ("services", "serviceaccounts"), CHILD_VERBS),
    # `watch` only because the gateways' Roles grant it: RBAC lets nobody grant more than it holds.
    Rule("", ("configmaps",), (*CHILD_VERBS, "watch")),
    Rule("discovery.k8s.io", ("endpointslices",), ("get", "list", "watch")),
    Rule("rbac.authorization.k8s.io", ("roles", "rolebindings"), CHILD_VERBS),
    Rule("policy", ("poddisruptionbudgets",), CHILD_VERBS),
    Rule("networking.k8s.io", ("networkpolicies",), CHILD_VERBS),
    Rule("monitoring.coreos.com", ("servicemonitors",), CHILD_VERBS),
    # GPU-pool fallback: which engine pods are still unscheduled (only with two pools or more).
    Rule("", ("pods",), ("list",)),
    # gateway.apiKeysSecret: read to check it and to roll the gateway when the keys change.
    Rule("", ("secrets",), ("get",)),
    # One Kubernetes event per decision (kopf posts them).
    Rule("", ("events",), ("create",)),
)

# Cluster-scoped reads kopf needs to discover its resource and the namespaces it serves.
CLUSTER_RULES: tuple[Rule, ...] = (
    Rule("apiextensions.k8s.io", ("customresourcedefinitions",), ("list", "watch")),
    Rule("", ("namespaces",), ("list", "watch")),
)


def _labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": "tokenfleet-operator", "app.kubernetes.io/part-of": "tokenfleet"}


def _binding(kind: str, name: str, namespace: str, role_kind: str, binding_ns: str | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": _labels()}
    if binding_ns is not None:
        metadata["namespace"] = binding_ns
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": metadata,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}],
    }


def rbac_manifests(namespace: str, watch_namespaces: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """ServiceAccount, roles and bindings for an operator running in `namespace`.

    With `watch_namespaces` (the operator started with `--namespace` for each), every namespaced
    permission is a Role in those namespaces and only discovery stays cluster-wide; without it the
    operator serves LLMServices in every namespace, which needs one ClusterRole.
    """
    name = SERVICE_ACCOUNT
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace, "labels": _labels()},
            "automountServiceAccountToken": True,
        }
    ]
    cluster_rules = list(CLUSTER_RULES) if watch_namespaces else [*CLUSTER_RULES, *NAMESPACED_RULES]
    objects.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name, "labels": _labels()},
            "rules": [rule.as_dict() for rule in cluster_rules],
        }
    )
    objects.append(_binding("ClusterRoleBinding", name, namespace, "ClusterRole", None))
    for watched in watch_namespaces or ():
        objects.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": name, "namespace": watched, "labels": _labels()},
                "rules": [rule.as_dict() for rule in NAMESPACED_RULES],
            }
        )
        objects.append(_binding("RoleBinding", name, namespace, "Role", watched))
    return objects


def gateway_rules(service: LLMService) -> tuple[Rule, ...]:
    """What a gateway with endpoint discovery reads: the engine slices (their names are the
    EndpointSlice controller's, so no resourceNames) and its own ConfigMap (get, then watch)."""
    return (
        Rule("discovery.k8s.io", ("endpointslices",), ("get", "list", "watch")),
        Rule("", ("configmaps",), ("get", "watch"), (gateway_name(service),)),
    )


def gateway_rbac_manifests(service: LLMService) -> list[dict[str, Any]]:
    """The gateway's ServiceAccount, its Role in the service's namespace, and the binding."""
    name, namespace = gateway_name(service), service.metadata.namespace

    def meta() -> dict[str, Any]:
        return {"name": name, "namespace": namespace, "labels": common_labels(service, "gateway")}

    return [
        # Only the gateway's pod template mounts the token (automountServiceAccountToken there).
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": meta(),
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(),
            "rules": [rule.as_dict() for rule in gateway_rules(service)],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta(),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
    ]


def granted(objects: Sequence[dict[str, Any]]) -> set[tuple[str, str, str, str | None]]:
    """Every (apiGroup, resource, verb, namespace or None for cluster-wide) the objects grant."""
    out: set[tuple[str, str, str, str | None]] = set()
    for obj in objects:
        if obj["kind"] not in ("ClusterRole", "Role"):
            continue
        scope = obj["metadata"].get("namespace") if obj["kind"] == "Role" else None
        for rule in obj["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        out.add((group, resource, verb, scope))
    return out
