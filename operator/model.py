"""Typed inputs of the pure reconcile: what the control loop decided, what the cluster shows.

The kopf handlers build these from API objects; `reconcile.desired_objects` and
`reconcile.desired_status` read nothing else, so every decision is testable without a cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from tokenfleet.observability.otlp_endpoint import endpoint_from_env

# One revision id in both places: the local fleet and the operator hash the same sections.
from tokenfleet.operator.control import revision_of as revision_of
from tokenfleet.spec import LLMService, LLMServiceSpec

# The control loop's rollout phase as the operator reports it.
RolloutPhase = Literal["Stable", "Progressing", "RolledBack", "Failed"]
Track = Literal["stable", "canary"]

ENGINE_PORT = 8000
GROUP_LABEL = "tokenfleet.dev"
SERVICE_LABEL = f"{GROUP_LABEL}/service"
COMPONENT_LABEL = f"{GROUP_LABEL}/component"
TRACK_LABEL = f"{GROUP_LABEL}/track"
REVISION_LABEL = f"{GROUP_LABEL}/revision"
POOL_LABEL = f"{GROUP_LABEL}/gpu-pool"
MANAGED_BY = "tokenfleet-operator"


@dataclass(frozen=True, slots=True)
class ControlDecision:
    """What the control loop wants this tick: replica counts, traffic split, phase and why.

    Counts are per track: `stable` runs `stable_revision`'s spec, `canary` the spec's current
    revision while a canary rollout runs. The canary's traffic share is `canary_weight_percent`.
    """

    stable_replicas: int
    canary_replicas: int = 0
    canary_weight_percent: int = 0
    phase: RolloutPhase = "Stable"
    gpu_pool: int = 0  # index into engine.gpuPools (failover moves it when a pool has no capacity)
    reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.stable_replicas < 0 or self.canary_replicas < 0:
            raise ValueError("replica counts must not be negative")
        if not 0 <= self.canary_weight_percent <= 100:
            raise ValueError("canary weight is a percentage")


@dataclass(frozen=True, slots=True)
class DeploymentView:
    """The part of a Deployment's status the operator looks at."""

    replicas: int = 0
    ready_replicas: int = 0
    updated_replicas: int = 0
    generation: int = 0
    observed_generation: int = 0

    @classmethod
    def of(cls, obj: Mapping[str, object] | None) -> DeploymentView | None:
        if not obj:
            return None
        meta = obj.get("metadata")
        status = obj.get("status")
        meta = meta if isinstance(meta, Mapping) else {}
        status = status if isinstance(status, Mapping) else {}

        def num(source: Mapping[str, object], key: str) -> int:
            value = source.get(key, 0)
            return value if isinstance(value, int) else 0

        return cls(
            replicas=num(status, "replicas"),
            ready_replicas=num(status, "readyReplicas"),
            updated_replicas=num(status, "updatedReplicas"),
            generation=num(meta, "generation"),
            observed_generation=num(status, "observedGeneration"),
        )

    @property
    def settled(self) -> bool:
        """The Deployment controller has seen its latest spec and every replica is updated."""
        return self.observed_generation >= self.generation and self.updated_replicas >= self.replicas


@dataclass(frozen=True, slots=True)
class ApiKeysView:
    """The Secret named by gateway.apiKeysSecret, as the operator read it."""

    name: str
    found: bool
    digest: str = ""  # changes when the keys change: rolls the gateway
    tenants: frozenset[str] = frozenset()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PodView:
    """An engine pod that has not been scheduled: what GPU-pool fallback looks at."""

    name: str
    pending_since: float  # creation time on the operator's clock (seconds)
    pool: int = 0


@dataclass(frozen=True, slots=True)
class Observed:
    """What the operator read from the cluster for one LLMService."""

    uid: str
    generation: int = 1
    deployments: Mapping[str, DeploymentView] = field(default_factory=dict)
    # The spec of the revision that serves outside a rollout; None: the current spec.
    stable_spec: LLMServiceSpec | None = None
    api_keys: ApiKeysView | None = None
    pending_pods: tuple[PodView, ...] = ()


@dataclass(frozen=True, slots=True)
class Conventions:
    """Cluster-wide settings of one operator installation (not per service)."""

    gateway_image: str = "ghcr.io/tokenfleet/tokenfleet:0.1.0"
    builtin_models_dir: str = "/opt/tokenfleet/models"
    prometheus_namespace: str = "monitoring"
    prometheus_pod_labels: Mapping[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "prometheus"}
    )
    cluster_domain: str = "cluster.local"
    drain_s: int = 10  # preStop: time for endpoint removal to reach every proxy before SIGTERM
    hf_token_secret: str | None = None  # "<secret>/<key>" in each service's namespace
    # Where gateways may reach the API server (endpoint discovery); narrow it to the control plane's.
    api_server_cidr: str = "0.0.0.0/0"
    # The OpenTelemetry collector's OTLP/HTTP endpoint (base URL or .../v1/traces): gateways and
    # engines export their spans there. None: no export (spans stay in the gateway's memory).
    otlp_endpoint: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Conventions:
        """The installation's settings as infra/ passes them to the operator's container."""
        base = cls()
        return cls(
            gateway_image=environ.get("TOKENFLEET_GATEWAY_IMAGE") or base.gateway_image,
            prometheus_namespace=environ.get("TOKENFLEET_PROMETHEUS_NAMESPACE") or base.prometheus_namespace,
            hf_token_secret=environ.get("TOKENFLEET_HF_TOKEN_SECRET") or None,
            api_server_cidr=environ.get("TOKENFLEET_API_SERVER_CIDR") or base.api_server_cidr,
            # Read as every tokenfleet process reads it (infra sets OTEL_EXPORTER_OTLP_ENDPOINT).
            otlp_endpoint=endpoint_from_env(environ),
        )


def engine_selector(service: LLMService) -> dict[str, str]:
    return {SERVICE_LABEL: service.metadata.name, COMPONENT_LABEL: "engine"}


def engine_tracks_selector(service: LLMService) -> str:
    """The EndpointSlices of the per-track engine Services (what the gateway watches)."""
    return f"{selector_string(engine_selector(service))},{TRACK_LABEL}"


def selector_string(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))
