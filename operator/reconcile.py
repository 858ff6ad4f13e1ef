"""Reconcile, pure: spec + observed state + the control loop's decision → desired objects and status.

Nothing here talks to Kubernetes. The kopf handlers (`handlers.py`) read the cluster into
`Observed`, ask the control loop for a `ControlDecision`, call these functions and apply the
result with server-side apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenfleet.operator.model import (
    ApiKeysView,
    ControlDecision,
    Conventions,
    Observed,
    engine_selector,
    revision_of,
    selector_string,
)
from tokenfleet.operator.network import (
    disruption_budgets,
    engine_service,
    engine_track_service,
    gateway_service,
    network_policies,
    service_monitor,
)
from tokenfleet.operator.rbac import gateway_rbac_manifests
from tokenfleet.operator.workloads import (
    engine_deployment,
    engine_name,
    gateway_configmap,
    gateway_deployment,
    gateway_name,
)
from tokenfleet.spec import API_VERSION, KIND, LLMService

CONDITION_TYPES = ("Ready", "Progressing", "Degraded")
DEFAULT_CONVENTIONS = Conventions()


def owner_reference(service: LLMService, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": service.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def traffic_weights(service: LLMService, observed: Observed, decision: ControlDecision) -> dict[str, int]:
    """Percent of requests per revision for the gateway: explicit while a canary runs (0% until
    its first step starts, so ready canary pods get nothing early), empty otherwise."""
    stable = revision_of(observed.stable_spec or service.spec)
    if decision.canary_replicas == 0:
        # A canary Deployment being deleted still has ready pods for a while: give them nothing.
        leaving = engine_name(service, "canary") in observed.deployments
        return {stable: 100} if leaving else {}
    canary = revision_of(service.spec)
    return {stable: 100 - decision.canary_weight_percent, canary: decision.canary_weight_percent}


def desired_objects(
    service: LLMService,
    observed: Observed,
    decision: ControlDecision,
    conventions: Conventions = DEFAULT_CONVENTIONS,
) -> list[dict[str, Any]]:
    """Every object the service should have, in apply order (config before its readers).

    The canary Deployment exists only while `decision.canary_replicas` > 0; the handler deletes
    objects it owns that are not listed (see `owned_names`).
    """
    stable_spec = observed.stable_spec or service.spec
    objects: list[dict[str, Any]] = [
        gateway_configmap(service, traffic_weights(service, observed, decision)),
        engine_service(service),
        engine_track_service(service, "stable", revision_of(stable_spec)),
        engine_track_service(service, "canary", revision_of(service.spec)),
        gateway_service(service),
        engine_deployment(
            service, stable_spec, "stable", decision.stable_replicas, conventions, decision.gpu_pool
        ),
    ]
    if decision.canary_replicas > 0:
        objects.append(
            engine_deployment(
                service, service.spec, "canary", decision.canary_replicas, conventions, decision.gpu_pool
            )
        )
    objects += gateway_rbac_manifests(service)
    objects.append(gateway_deployment(service, conventions, observed.api_keys))
    objects += disruption_budgets(service)
    objects += network_policies(service, conventions)
    objects.append(service_monitor(service))
    owner = owner_reference(service, observed.uid)
    for obj in objects:
        obj["metadata"]["ownerReferences"] = [dict(owner)]
    return objects


def initial_decision(service: LLMService, desired_replicas: int | None = None) -> ControlDecision:
    """Before the control loop has spoken: the last count it chose, clamped to the spec's bounds."""
    bounds = service.spec.replicas
    count = bounds.min if desired_replicas is None else min(max(desired_replicas, bounds.min), bounds.max)
    return ControlDecision(
        stable_replicas=count, reasons=(f"{count} replica(s) within {bounds.min}..{bounds.max}",)
    )


def api_keys_problem(service: LLMService, keys: ApiKeysView | None) -> str | None:
    """Why the named API-keys Secret cannot serve the gateway, or None when it can."""
    secret = service.spec.gateway.api_keys_secret
    if not secret:
        return None
    if keys is None or not keys.found:
        return f"Secret {secret!r} (gateway.apiKeysSecret) not found"
    if keys.error:
        return f"Secret {secret!r}: {keys.error}"
    unknown = sorted(keys.tenants - {t.name for t in service.spec.scheduler.tenants})
    if unknown:
        return f"Secret {secret!r} maps keys to unknown tenants {unknown}"
    return None


def _condition(
    kind: str, ok: bool, reason: str, message: str, generation: int, previous: Mapping[str, Any], now: str
) -> dict[str, Any]:
    status = "True" if ok else "False"
    # lastTransitionTime moves only when the status flips (Kubernetes convention).
    since = previous.get("lastTransitionTime") if previous.get("status") == status else None
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or now,
        "observedGeneration": generation,
    }


def _previous(conditions: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in conditions if isinstance(c, Mapping)}


def desired_status(
    service: LLMService,
    observed: Observed,
    decision: ControlDecision,
    previous_conditions: Sequence[Mapping[str, Any]] = (),
    now: str = "",
) -> dict[str, Any]:
    """Status: replica counts for the scale subresource, conditions with reasons, rollout state."""
    previous = _previous(previous_conditions)
    generation = observed.generation
    views = observed.deployments
    stable = views.get(engine_name(service, "stable"))
    canary = views.get(engine_name(service, "canary"))
    gateway = views.get(gateway_name(service))
    desired = decision.stable_replicas + decision.canary_replicas
    ready = (stable.ready_replicas if stable else 0) + (canary.ready_replicas if canary else 0)
    gateway_ready = gateway.ready_replicas if gateway else 0

    if desired == 0:
        ready_ok, ready_reason, ready_msg = gateway_ready > 0, "ScaledToZero", "no engine replicas wanted"
    elif ready >= desired and gateway_ready > 0:
        ready_ok, ready_reason, ready_msg = (
            True,
            "AllReplicasReady",
            f"{ready}/{desired} engine replicas ready",
        )
    else:
        ready_ok, ready_reason = False, "ReplicasNotReady"
        ready_msg = f"{ready}/{desired} engine replicas ready, {gateway_ready} gateway ready"

    unsettled = [
        name
        for name, view in ((engine_name(service, "stable"), stable), (gateway_name(service), gateway))
        if view is None or not view.settled
    ]
    if decision.phase == "Progressing":
        prog_ok, prog_reason = True, "CanaryProgressing"
        prog_msg = f"canary at {decision.canary_weight_percent}% ({decision.canary_replicas} replica(s))"
    elif unsettled:
        prog_ok, prog_reason, prog_msg = True, "DeploymentsUpdating", f"waiting for {', '.join(unsettled)}"
    else:
        prog_ok, prog_reason, prog_msg = False, "RolloutComplete", "every Deployment is up to date"

    problem = api_keys_problem(service, observed.api_keys)
    if problem is not None:
        deg_ok, deg_reason, deg_msg = True, "ApiKeysUnavailable", problem
    elif decision.phase in ("RolledBack", "Failed"):
        deg_ok, deg_reason = True, "CanaryRolledBack" if decision.phase == "RolledBack" else "RolloutFailed"
        deg_msg = "; ".join(decision.reasons) or decision.phase
    else:
        deg_ok, deg_reason, deg_msg = False, "AsExpected", "no problem found"

    conditions = [
        _condition("Ready", ready_ok, ready_reason, ready_msg, generation, previous.get("Ready", {}), now),
        _condition(
            "Progressing", prog_ok, prog_reason, prog_msg, generation, previous.get("Progressing", {}), now
        ),
        _condition("Degraded", deg_ok, deg_reason, deg_msg, generation, previous.get("Degraded", {}), now),
    ]
    phase = "Degraded" if deg_ok else "Progressing" if prog_ok else "Ready" if ready_ok else "Pending"
    return {
        "observedGeneration": generation,
        "replicas": ready,
        "desiredReplicas": desired,
        "selector": selector_string(engine_selector(service)),
        "phase": phase,
        "conditions": conditions,
        "rollout": {
            "phase": decision.phase,
            "revision": revision_of(service.spec),
            "stableRevision": revision_of(observed.stable_spec or service.spec),
            "canaryReplicas": decision.canary_replicas,
            "canaryWeightPercent": decision.canary_weight_percent,
            "gpuPool": decision.gpu_pool,
            "reasons": list(decision.reasons),
        },
    }


def invalid_status(
    errors: Sequence[tuple[str, str]],
    generation: int,
    previous_conditions: Sequence[Mapping[str, Any]],
    now: str,
) -> dict[str, Any]:
    """Status of a resource the spec model rejects: every field path and reason, nothing applied."""
    previous = _previous(previous_conditions)
    message = "; ".join(f"{path}: {reason}" for path, reason in errors)
    return {
        "observedGeneration": generation,
        "phase": "Invalid",
        "conditions": [
            _condition("Ready", False, "InvalidSpec", message, generation, previous.get("Ready", {}), now),
            _condition(
                "Progressing",
                False,
                "InvalidSpec",
                "not applied",
                generation,
                previous.get("Progressing", {}),
                now,
            ),
            _condition(
                "Degraded", True, "InvalidSpec", message, generation, previous.get("Degraded", {}), now
            ),
        ],
        "errors": [{"field": path, "reason": reason} for path, reason in errors],
    }


def owned_names(objects: Sequence[Mapping[str, Any]]) -> set[tuple[str, str]]:
    """(kind, name) of every desired object: anything else the service owns is stale."""
    return {(str(obj["kind"]), str(obj["metadata"]["name"])) for obj in objects}
