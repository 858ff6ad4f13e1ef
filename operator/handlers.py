"""kopf wiring: thin handlers around the pure reconcile and the shared control core.

Every handler and the control timer run `Operator.reconcile` under one lock per resource. It
re-reads the resource (a timer's snapshot can be older than the last status write), observes the
children, runs one control tick, applies the desired objects with server-side apply, deletes
stale ones, writes the status and posts one event per decision. Because everything it needs is
in the spec, the status and the cluster, a restarted operator picks up exactly where it was.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import kopf
from prometheus_client import CollectorRegistry, Counter, Histogram

from tokenfleet.engine.gateway.tenancy import KeyFileError, parse_keys
from tokenfleet.operator.crd import PLURAL, VERSION
from tokenfleet.operator.kube import Kube
from tokenfleet.operator.loop import ControlState, Metrics, MetricsSource, control_tick, stable_spec_of
from tokenfleet.operator.model import (
    POOL_LABEL,
    ApiKeysView,
    ControlDecision,
    Conventions,
    DeploymentView,
    Observed,
    PodView,
    engine_selector,
    selector_string,
)
from tokenfleet.operator.reconcile import desired_objects, desired_status, invalid_status, owned_names
from tokenfleet.operator.workloads import KEYS_FILE, engine_name, gateway_name
from tokenfleet.spec import API_GROUP, LLMService, Metadata, SpecError, parse_service

logger = logging.getLogger(__name__)
FINALIZER = f"{API_GROUP}/cleanup"
REAPPLY_S = 300.0


class OperatorMetrics:
    """The operator's own metrics (served by `tokenfleet operator run --metrics-port`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reconciles = Counter(
            "tokenfleet_operator_reconciles",
            "Reconciles by trigger and outcome.",
            ["trigger", "outcome"],
            registry=r,
        )
        self.decisions = Counter(
            "tokenfleet_operator_decisions", "Control decisions posted as events.", ["reason"], registry=r
        )
        self.applied = Counter(
            "tokenfleet_operator_applied_objects", "Objects applied.", ["kind"], registry=r
        )
        self.duration = Histogram(
            "tokenfleet_operator_reconcile_duration_seconds", "Reconcile wall time.", registry=r
        )


@dataclass
class OperatorConfig:
    conventions: Conventions = field(default_factory=Conventions)
    server: str | None = None  # a fixed API URL without auth (tests); None: kopf's own login
    metrics_source: MetricsSource | None = None
    control_interval_s: float = 15.0
    clock: Callable[[], float] = time.time  # persisted timestamps (rollout steps) use this clock
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)


def _as_body(obj: dict[str, Any]) -> kopf.Body:
    # kopf's event helpers read only apiVersion, kind and metadata: a plain dict works the same.
    return cast(kopf.Body, obj)


def _ns(namespace: str | None) -> str:
    if not namespace:
        raise kopf.PermanentError("LLMService is namespaced; got no namespace")
    return namespace


def _now_iso() -> str:
    return datetime.datetime.now(tz=datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def read_api_keys(name: str, secret: dict[str, Any] | None) -> ApiKeysView:
    """The Secret's `keys.yaml` entry parsed the way the gateway will parse it."""
    if secret is None:
        return ApiKeysView(name=name, found=False)
    data = secret.get("data") or {}
    raw = data.get(KEYS_FILE)
    if raw is None:
        return ApiKeysView(name=name, found=True, error=f"has no {KEYS_FILE!r} entry")
    digest = hashlib.sha256(str(raw).encode()).hexdigest()[:16]
    try:
        keys = parse_keys(base64.b64decode(raw).decode())
    except (KeyFileError, ValueError) as exc:
        return ApiKeysView(name=name, found=True, digest=digest, error=f"{KEYS_FILE}: {exc}")
    return ApiKeysView(name=name, found=True, digest=digest, tenants=frozenset(keys.values()))


def pending_pods(pods: list[dict[str, Any]]) -> tuple[PodView, ...]:
    """Engine pods the scheduler could not place yet (no capacity), with when they were made."""
    out = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if status.get("phase") != "Pending" or status.get("hostIP"):
            continue
        created = meta.get("creationTimestamp")
        if not created:
            continue
        since = datetime.datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp()
        pool = str((meta.get("labels") or {}).get(POOL_LABEL, "0"))
        out.append(PodView(str(meta.get("name")), since, int(pool) if pool.isdigit() else 0))
    return tuple(out)


class Operator:
    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.kube: Kube | None = None
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._applied: dict[tuple[str, str], tuple[str, float]] = {}  # objects hash, when

    def login(self, **kwargs: Any) -> kopf.ConnectionInfo:
        if self.config.server is not None:
            info = kopf.ConnectionInfo(server=self.config.server, default_namespace="default")
        else:
            found = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
            if found is None:
                raise kopf.LoginError("no in-cluster service account and no kubeconfig")
            info = found
        self.kube = Kube(info)
        return info

    def _client(self) -> Kube:
        if self.kube is None:
            raise kopf.TemporaryError("not logged in yet", delay=1)
        return self.kube

    async def reconcile(self, namespace: str, name: str, trigger: str) -> None:
        lock = self._locks.setdefault((namespace, name), asyncio.Lock())
        with self.config.metrics.duration.time():
            async with lock:
                outcome = await self._reconcile(namespace, name, trigger)
        self.config.metrics.reconciles.labels(trigger, outcome).inc()

    async def _reconcile(self, namespace: str, name: str, trigger: str) -> str:
        kube = self._client()
        body = await kube.get("LLMService", namespace, name)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            return "gone"
        meta = body["metadata"]
        status = body.get("status") or {}
        generation = int(meta.get("generation", 1))
        previous = status.get("conditions") or []
        try:
            service = parse_service(
                {
                    "apiVersion": body.get("apiVersion"),
                    "kind": body.get("kind"),
                    "metadata": {"name": name, "namespace": namespace, "labels": meta.get("labels") or {}},
                    "spec": body.get("spec") or {},
                },
                f"{namespace}/{name}",
            )
        except SpecError as exc:
            new_status = invalid_status(exc.errors, generation, previous, _now_iso())
            if any(status.get(key) != value for key, value in new_status.items()):
                await kube.patch_status("LLMService", namespace, name, new_status)
            if status.get("observedGeneration") != generation or status.get("phase") != "Invalid":
                message = new_status["conditions"][2]["message"]
                kopf.warn(_as_body(body), reason="InvalidSpec", message=message[:1000])
                self.config.metrics.decisions.labels("InvalidSpec").inc()
            return "invalid"

        observed = await self._observe(kube, service, str(meta.get("uid", "")), generation)
        state = ControlState.from_status(status.get("control"), service.spec)
        metrics: Metrics | None = None
        if trigger == "timer" and self.config.metrics_source is not None:
            metrics = await self.config.metrics_source(service, state.rollout.step_started_at)
        decision, new_state, messages = control_tick(service, observed, state, metrics, self.config.clock())
        observed = replace(observed, stable_spec=stable_spec_of(new_state, service.spec))

        objects = desired_objects(service, observed, decision, self.config.conventions)
        await self._apply(kube, service, objects, force=trigger != "timer")
        canary = engine_name(service, "canary")
        if decision.canary_replicas == 0 and canary in observed.deployments:
            await kube.delete("Deployment", namespace, canary)
            messages.append(f"deleted {canary}: no canary wanted")

        new_status = desired_status(service, observed, decision, previous, _now_iso())
        new_status["control"] = new_state.to_status()
        if status.get("errors") is not None:
            new_status["errors"] = None  # clears the list left by an earlier invalid spec
        if any(status.get(key) != value for key, value in new_status.items()):
            await kube.patch_status("LLMService", namespace, name, new_status)

        if status.get("observedGeneration") != generation:
            messages.insert(0, f"applied {len(objects)} objects for generation {generation}")
        self._post(body, messages, new_status, status)
        return "ok"

    async def _observe(self, kube: Kube, service: LLMService, uid: str, generation: int) -> Observed:
        """The service's Deployments, its API-keys Secret and (with 2+ GPU pools) unscheduled pods."""
        namespace = service.metadata.namespace
        deployments = {}
        for dep in (engine_name(service, "stable"), engine_name(service, "canary"), gateway_name(service)):
            view = DeploymentView.of(await kube.get("Deployment", namespace, dep))
            if view is not None:
                deployments[dep] = view
        keys: ApiKeysView | None = None
        secret_name = service.spec.gateway.api_keys_secret
        if secret_name:
            keys = read_api_keys(secret_name, await kube.get("Secret", namespace, secret_name))
        pending: tuple[PodView, ...] = ()
        if len(service.spec.engine.gpu_pools) > 1:
            # Only pool fallback needs pods: a service without a second pool never lists them.
            selector = selector_string(engine_selector(service))
            pending = pending_pods(await kube.list("Pod", namespace, selector))
        return Observed(
            uid=uid, generation=generation, deployments=deployments, api_keys=keys, pending_pods=pending
        )

    async def _apply(
        self, kube: Kube, service: LLMService, objects: list[dict[str, Any]], force: bool
    ) -> None:
        """Server-side apply every object, unless a timer tick wants exactly what was last applied."""
        key = (service.metadata.namespace, service.metadata.name)
        fingerprint = hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()
        now = self.config.clock()
        last = self._applied.get(key)
        # A full re-apply still runs every REAPPLY_S, to undo hand edits of the children.
        if force or last is None or last[0] != fingerprint or now - last[1] >= REAPPLY_S:
            for obj in objects:
                await kube.apply(obj)
                self.config.metrics.applied.labels(obj["kind"]).inc()
            self._applied[key] = (fingerprint, now)

    def _post(
        self, body: dict[str, Any], messages: list[str], new: dict[str, Any], old: dict[str, Any]
    ) -> None:
        for message in messages:
            kopf.info(_as_body(body), reason="Decision", message=message[:1000])
            self.config.metrics.decisions.labels("Decision").inc()
        old_reasons = {c.get("type"): c.get("reason") for c in old.get("conditions") or []}
        for condition in new["conditions"]:
            degraded = condition["type"] == "Degraded" and condition["status"] == "True"
            if degraded and old_reasons.get("Degraded") != condition["reason"]:
                kopf.warn(_as_body(body), reason=condition["reason"], message=condition["message"][:1000])
                self.config.metrics.decisions.labels(condition["reason"]).inc()

    async def cleanup(self, namespace: str, name: str) -> list[str]:
        """Delete every child (ownerReferences would too, but only where a garbage collector runs)."""
        kube = self._client()
        service = LLMService(metadata=Metadata(name=name, namespace=namespace))
        every = ControlDecision(stable_replicas=1, canary_replicas=1)
        deleted = []
        for kind, child in sorted(owned_names(desired_objects(service, Observed(uid=""), every))):
            if await kube.delete(kind, namespace, child):
                deleted.append(f"{kind}/{child}")
        return deleted

    async def close(self) -> None:
        if self.kube is not None:
            await self.kube.close()


def build_registry(config: OperatorConfig) -> tuple[kopf.OperatorRegistry, Operator]:
    """A fresh kopf registry with every handler bound to one `Operator` (one per test or process)."""
    registry = kopf.OperatorRegistry()
    op = Operator(config)
    resource = (API_GROUP, VERSION, PLURAL)

    @kopf.on.startup(registry=registry)
    def configure_fn(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.posting.level = logging.INFO
        # The operator writes its own status; kopf's progress goes to annotations, not status.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
        settings.execution.max_workers = 4

    @kopf.on.login(registry=registry)
    def login_fn(**kwargs: Any) -> kopf.ConnectionInfo:
        return op.login(**kwargs)

    @kopf.on.create(*resource, registry=registry)
    async def create_fn(name: str, namespace: str | None, **_: Any) -> None:
        await op.reconcile(_ns(namespace), name, "create")

    @kopf.on.update(*resource, field="spec", registry=registry)
    async def update_fn(name: str, namespace: str | None, **_: Any) -> None:
        await op.reconcile(_ns(namespace), name, "update")

    @kopf.on.resume(*resource, registry=registry)
    async def resume_fn(name: str, namespace: str | None, **_: Any) -> None:
        await op.reconcile(_ns(namespace), name, "resume")

    @kopf.timer(*resource, interval=config.control_interval_s, registry=registry)
    async def control_fn(name: str, namespace: str | None, **_: Any) -> None:
        await op.reconcile(_ns(namespace), name, "timer")

    @kopf.on.delete(*resource, registry=registry)
    async def delete_fn(name: str, namespace: str | None, body: kopf.Body, **_: Any) -> None:
        deleted = await op.cleanup(_ns(namespace), name)
        kopf.info(body, reason="Deleted", message=f"deleted {len(deleted)} objects")

    @kopf.on.cleanup(registry=registry)
    async def close_fn(**_: Any) -> None:
        await op.close()

    return registry, op
