"""The one typed model of an `LLMService`.

Everything reads this: the CRD's OpenAPI schema is generated from it, the operator validates
custom resources with it, the Pulumi program reads it from stack config, and `tokenfleet up`
runs it locally. Field names are camelCase in YAML (Kubernetes style) and snake_case in Python.
Later components fill in behaviour; this module fixes shape, defaults and validation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

API_GROUP = "tokenfleet.dev"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "LLMService"

# DNS-1123 label: what Kubernetes accepts as a Deployment/Service name.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
BUILTIN_MODELS = ("tiny-code", "tiny-random")
KNOWN_KERNELS = ("rms_norm", "silu_and_mul", "w4a16_gemm")
# Flags that tokenfleet derives from the spec itself; passing them as extra args would fight it.
RESERVED_VLLM_FLAGS = frozenset(
    {
        "--model",
        "--host",
        "--port",
        "--scheduler-cls",
        "--scheduling-policy",
        "--max-model-len",
        "--tensor-parallel-size",
        "--served-model-name",
        # A config file could set any of the above (and anything else) behind the spec's back.
        "--config",
    }
)
# Runs the model repository's own Python: allowed only when the spec says so explicitly.
TRUST_REMOTE_CODE_FLAG = "--trust-remote-code"


def normalised_flag(arg: str) -> str:
    """The flag as vLLM's argument parser sees it: `--max_model_len=9` is `--max-model-len`."""
    flag = arg.split("=", 1)[0]
    return "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag


Name = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]


class _Spec(BaseModel):
    """Base: camelCase aliases, unknown fields rejected (a typo must not pass silently)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )


class ModelSpec(_Spec):
    """Which weights to serve."""

    name: str = Field(
        "tiny-code",
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
        description="Model name served on /v1/models (the `model` field clients send).",
    )
    source: str = Field(
        "builtin://tiny-code",
        description="builtin://<name>, hf://<org>/<repo>[@revision], or a local directory path.",
    )
    quantization: str = Field(
        "none",
        max_length=4096,
        description="none; a technique the quantization pipeline produced for this source "
        "(rtn-w4a16, rtn-w8a8, gptq-w4a16, awq-w4a16, smoothquant-gptq-w8a8, gptq-w8a16, rtn-fp8), "
        "served from its checkpoint; or a compressed-tensors checkpoint directory (a path).",
    )
    max_model_len: int = Field(512, ge=16, le=1_048_576, description="Context length (prompt + output).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @field_validator("quantization")
    @classmethod
    def _check_quantization(cls, value: str) -> str:
        from tokenfleet.engine.quantize.techniques import quantization_problem

        problem = quantization_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("source")
    @classmethod
    def _check_source(cls, source: str) -> str:
        if source.startswith("builtin://"):
            builtin = source.removeprefix("builtin://")
            if builtin not in BUILTIN_MODELS:
                raise ValueError(f"unknown builtin model {builtin!r}; known: {', '.join(BUILTIN_MODELS)}")
        elif source.startswith("hf://"):
            if not re.fullmatch(r"hf://[\w.-]+/[\w.-]+(@[\w./-]+)?", source):
                raise ValueError("expected hf://<org>/<repo>[@revision]")
        elif "://" in source:
            raise ValueError("scheme must be builtin://, hf:// or none (a local path)")
        elif not source.strip():
            raise ValueError("must not be empty")
        return source


class Toleration(_Spec):
    """A Kubernetes toleration for a GPU pool's taint."""

    key: str = Field(min_length=1, max_length=253)
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = Field(None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"


class GpuPool(_Spec):
    """A pool of GPU nodes engine pods may land on; the first listed is preferred."""

    name: Name
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels of the pool.")
    tolerations: list[Toleration] = Field(default_factory=list)
    gpu_resource: str = Field("nvidia.com/gpu", pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$")


class EngineSpec(_Spec):
    """How each engine replica runs vLLM."""

    device: Literal["cpu", "gpu"] = "cpu"
    gpus_per_replica: int = Field(0, ge=0, le=16)
    tensor_parallel_size: int = Field(1, ge=1, le=16)
    max_num_seqs: int = Field(8, ge=1, le=4096, description="Concurrent sequences per replica.")
    kv_cache_gib: float = Field(1.0, gt=0, le=1024, description="CPU only: VLLM_CPU_KVCACHE_SPACE.")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=0.98)
    shutdown_timeout_s: int = Field(30, ge=0, le=3600, description="Drain time on SIGTERM.")
    optimization_level: int = Field(
        0,
        ge=0,
        le=3,
        description="vLLM -O level. 0 skips torch.compile: start-up 38 s instead of 83 s on the CPU "
        "build for the builtin model. Use 2-3 on GPUs, where compiled graphs pay off.",
    )
    extra_args: list[str] = Field(default_factory=list, description="Extra vLLM server flags.")
    trust_remote_code: bool = Field(
        False,
        description="Allow --trust-remote-code in extraArgs (runs the model repository's own code).",
    )
    kernels: list[Literal["rms_norm", "silu_and_mul", "w4a16_gemm"]] = Field(
        default_factory=list, description="tokenfleet Triton kernels to enable through the vLLM plugin."
    )
    image: str = Field("vllm/vllm-openai:v0.32.0", description="Container image on a cluster (cluster only).")
    gpu_pools: list[GpuPool] = Field(
        default_factory=list,
        description="GPU node pools in order of preference; a replica Pending beyond "
        "failover.pendingTimeoutS falls back to the next. Needs device gpu. Cluster only.",
    )

    @field_validator("extra_args")
    @classmethod
    def _check_extra_args(cls, args: list[str]) -> list[str]:
        for arg in args:
            flag = normalised_flag(arg)
            if flag in RESERVED_VLLM_FLAGS:
                raise ValueError(f"{flag} is set by tokenfleet from the spec; use the spec field instead")
        if args and not args[0].startswith("--"):
            raise ValueError(f"extra args must start with a --flag, got {args[0]!r}")
        return args

    @model_validator(mode="after")
    def _check_trust_remote_code(self) -> Self:
        if not self.trust_remote_code and any(
            normalised_flag(a) == TRUST_REMOTE_CODE_FLAG for a in self.extra_args
        ):
            raise ValueError("--trust-remote-code in extraArgs needs engine.trustRemoteCode: true")
        return self

    @field_validator("image")
    @classmethod
    def _check_image(cls, image: str) -> str:
        if image.endswith(":latest") or (":" not in image.rsplit("/", 1)[-1] and "@" not in image):
            raise ValueError("pin the image to a tag or digest (no implicit or explicit :latest)")
        return image

    @model_validator(mode="after")
    def _check_device(self) -> Self:
        if self.device == "cpu" and self.gpus_per_replica:
            raise ValueError("gpusPerReplica must be 0 when device is cpu")
        if self.device == "gpu" and self.gpus_per_replica < 1:
            raise ValueError("gpusPerReplica must be at least 1 when device is gpu")
        if self.device == "gpu" and self.tensor_parallel_size > self.gpus_per_replica:
            raise ValueError("tensorParallelSize cannot exceed gpusPerReplica")
        if self.device == "cpu" and self.tensor_parallel_size != 1:
            raise ValueError("tensorParallelSize must be 1 on cpu")
        if self.device == "cpu" and self.gpu_pools:
            raise ValueError("gpuPools needs device gpu")
        pools = [p.name for p in self.gpu_pools]
        if len(set(pools)) != len(pools):
            raise ValueError(f"gpuPools names must be unique, got {pools}")
        return self


class SLOClass(_Spec):
    """A request class: its scheduling priority (lower runs first, as in vLLM) and its targets."""

    name: Name
    priority: int = Field(ge=-1000, le=1000)
    ttft_ms: float | None = Field(None, gt=0, description="Time-to-first-token target; none = no target.")
    tpot_ms: float | None = Field(None, gt=0, description="Time-per-output-token target.")
    max_wait_s: float | None = Field(None, gt=0, description="Worst-case queue wait once capacity frees.")
    queue_limit: int | None = Field(None, ge=1, description="Waiting requests admitted before rejecting.")


class Tenant(_Spec):
    """Who sends traffic: weight for fair share, default class and limits."""

    name: Name
    weight: float = Field(1.0, gt=0, le=1000)
    default_class: str | None = None
    max_class: str | None = Field(None, description="Highest class this tenant may request.")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(
        None, ge=1, description="Requests of this tenant in the gateway at once (queued or running)."
    )


def _default_classes() -> list[SLOClass]:
    return [
        SLOClass(name="interactive", priority=0, ttft_ms=1000, tpot_ms=200, max_wait_s=5),
        SLOClass(name="standard", priority=1, ttft_ms=4000, tpot_ms=400, max_wait_s=30),
        SLOClass(name="batch", priority=2, max_wait_s=120),
    ]


class SchedulerSpec(_Spec):
    """Scheduling inside each engine: `sla` is tokenfleet's class/deadline/fair-share scheduler."""

    # The SLA scheduler is the product's core, so a spec that says nothing gets it; `fcfs` and
    # `priority` are vLLM's own policies, for comparison runs.
    policy: Literal["sla", "fcfs", "priority"] = "sla"
    classes: list[SLOClass] = Field(default_factory=_default_classes, min_length=1)
    default_class: str = "standard"
    tenants: list[Tenant] = Field(default_factory=lambda: [Tenant(name="default")], min_length=1)

    @model_validator(mode="after")
    def _check_references(self) -> Self:
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"class names must be unique, got {names}")
        priorities = [c.priority for c in self.classes]
        if len(set(priorities)) != len(priorities):
            raise ValueError(f"class priorities must be unique, got {priorities}")
        if self.default_class not in names:
            raise ValueError(f"defaultClass {self.default_class!r} is not one of the classes {names}")
        tenant_names = [t.name for t in self.tenants]
        if len(set(tenant_names)) != len(tenant_names):
            raise ValueError(f"tenant names must be unique, got {tenant_names}")
        for tenant in self.tenants:
            for ref in (tenant.default_class, tenant.max_class):
                if ref is not None and ref not in names:
                    raise ValueError(f"tenant {tenant.name!r} refers to unknown class {ref!r}")
        return self

    def class_named(self, name: str) -> SLOClass:
        for slo_class in self.classes:
            if slo_class.name == name:
                return slo_class
        raise KeyError(name)


class ReplicasSpec(_Spec):
    """Replica bounds; the autoscaler moves within them."""

    min: int = Field(1, ge=0, le=1000)
    max: int = Field(1, ge=1, le=1000)

    @model_validator(mode="after")
    def _check_bounds(self) -> Self:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class AutoscalingSpec(_Spec):
    """Scale replicas on a per-replica engine metric and per-class SLO attainment.

    Fast up, slow down: a scale-up needs the metric above target for `scaleUpStabilizationS`, a
    scale-down needs it below for `scaleDownStabilizationS` (the HPA's recommendation windows).
    """

    enabled: bool = False
    metric: Literal["queue_depth", "in_flight", "kv_cache_usage", "ttft_p90_ms"] = Field(
        "queue_depth",
        description="queue_depth: engine + gateway waiting requests per replica; in_flight: requests "
        "the gateway has sent per replica; kv_cache_usage: 0..1; ttft_p90_ms: the service's P90 time "
        "to first byte over the last minute, as the gateway saw it.",
    )
    target: float = Field(4.0, gt=0, description="Per-replica target of the metric.")
    tolerance: float = Field(0.1, ge=0, le=1, description="Ratio band around the target where nothing moves.")
    min_slo_attainment: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Scale up while any class's TTFT SLO attainment (the SLA scheduler's counters, "
        "last minute) is below this, whatever the metric says.",
    )
    scale_up_stabilization_s: float = Field(15, ge=0)
    scale_down_stabilization_s: float = Field(120, ge=0)
    max_step_up: int = Field(2, ge=1, le=100, description="Replicas added by one decision.")
    max_step_down: int = Field(1, ge=1, le=100, description="Replicas removed by one decision.")
    scale_to_zero: bool = False
    activation_timeout_s: float = Field(
        120,
        gt=0,
        le=3600,
        description="Scaled to zero: how long the gateway holds a request while the first replica "
        "starts before answering 503 with Retry-After.",
    )


class FailoverSpec(_Spec):
    """When a replica is replaced, and where it goes when it cannot get capacity."""

    unhealthy_after_s: float = Field(
        30, gt=0, le=3600, description="Health failing this long while the process lives: replace it."
    )
    startup_timeout_s: float = Field(
        600, gt=0, le=7200, description="Not ready this long after start: replace it (size for model load)."
    )
    pending_timeout_s: float = Field(
        300,
        gt=0,
        le=7200,
        description="On a cluster: Pending (no GPU capacity) this long moves the replicas to the next "
        "pool in engine.gpuPools.",
    )
    backoff_reset_after_s: float = Field(
        300, gt=0, le=86400, description="Ready this long forgives earlier crashes (restart back-off resets)."
    )


class RoutingSpec(_Spec):
    """How the gateway picks a replica, and its retry and timeout rules."""

    policy: Literal["round_robin", "least_outstanding", "prefix_affinity", "session_affinity"] = (
        "least_outstanding"
    )
    session_header: str = Field("x-session-id", pattern=r"^[A-Za-z0-9-]+$")
    prefix_chars: int = Field(256, ge=16, le=65536, description="Prompt prefix hashed by prefix affinity.")
    bounded_load_factor: float = Field(1.25, gt=1.0, le=10.0)
    retries: int = Field(1, ge=0, le=3, description="Retries before the first byte reached the client.")
    connect_timeout_s: float = Field(2.0, gt=0, le=60)
    first_byte_timeout_s: float = Field(120.0, gt=0, le=3600)
    probe_interval_s: float = Field(1.0, gt=0, le=60, description="Active /health probe period.")
    eject_after_failures: int = Field(
        3, ge=1, le=100, description="Consecutive request failures that eject a replica."
    )
    eject_cooldown_s: float = Field(
        5.0, ge=0, le=600, description="Minimum time ejected before a good probe re-admits."
    )
    resume_streams: bool = Field(
        True,
        description="Resume a stream whose replica dies on another replica, from the token ids "
        "already relayed (single-choice streams without logprobs or structured output).",
    )


class RolloutSpec(_Spec):
    """How a spec change reaches the replicas: rolling, canary with analysis, or recreate."""

    strategy: Literal["rolling", "canary", "recreate"] = "rolling"
    max_surge: int = Field(1, ge=0)
    max_unavailable: int = Field(0, ge=0)
    canary_steps: list[int] = Field(default_factory=lambda: [10, 50, 100])
    step_duration_s: float = Field(60, ge=0)
    max_error_rate: float = Field(
        0.02,
        ge=0,
        le=1,
        description=(
            "Roll the canary back when its attempts fail (5xx, reset, timeout) above this rate, or when"
            " its engine refuses (4xx) requests the gateway accepted at a rate this much above the stable's."
        ),
    )
    max_ttft_p99_ratio: float = Field(
        1.5,
        gt=1,
        description=(
            "Roll the canary back when its TTFT p99 is above this multiple of the stable's (plus"
            " ttftP99SlackMs): when more of its answers are slower than that than a revision within"
            " it would give by chance (binomial test, p < 0.01), so one slow answer of a few dozen"
            " does not."
        ),
    )
    ttft_p99_slack_ms: float = Field(
        25, ge=0, le=60_000, description="Absolute TTFT p99 difference ignored as noise."
    )
    min_requests: int = Field(
        20,
        ge=1,
        le=1_000_000,
        description="Canary requests an analysis window needs before it can promote (answered ones after"
        " the warm-up, for the TTFT comparison).",
    )
    warmup_s: float = Field(
        20,
        ge=0,
        le=3600,
        description="Seconds from the start of a canary step in which the canary's TTFT is not compared: a"
        " fresh engine's first answers are slow. Its errors and refusals count from the first request.",
    )

    @model_validator(mode="after")
    def _check_steps(self) -> Self:
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("maxSurge and maxUnavailable cannot both be 0: the rollout could never progress")
        steps = self.canary_steps
        if not steps or any(not 1 <= s <= 100 for s in steps) or steps != sorted(set(steps)):
            raise ValueError("canarySteps must be strictly increasing percentages in 1..100")
        if steps[-1] != 100:
            raise ValueError("canarySteps must end at 100")
        return self


class RateLimit(_Spec):
    """Token-bucket limits per tenant (post-paid for tokens: the crossing request completes)."""

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(
        None, ge=1, description="Requests of one tenant in the gateway at once (queued or running)."
    )


class GatewaySpec(_Spec):
    """The gateway in front of the replicas: port, auth, limits, overload queues."""

    port: int = Field(8000, ge=1, le=65535)
    auth: bool = Field(False, description="Require an API key (Authorization: Bearer).")
    api_keys_secret: str | None = Field(None, description="Kubernetes Secret with key -> tenant entries.")
    api_keys_file: str | None = Field(None, description="Local YAML/JSON file mapping key -> tenant.")
    default_limits: RateLimit = Field(default_factory=RateLimit)
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    max_queue_per_class: int = Field(64, ge=1)
    max_queue_total: int | None = Field(
        None, ge=1, description="Bound on all gateway queues together; default: per class x classes."
    )
    max_in_flight_per_replica: int | None = Field(
        None, ge=1, description="Requests sent to one replica at once; default: 2 x engine.maxNumSeqs."
    )
    expose_endpoints: list[Literal["/tokenize", "/detokenize", "/version"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_keys(self) -> Self:
        if self.auth and not (self.api_keys_secret or self.api_keys_file):
            raise ValueError("auth needs apiKeysSecret or apiKeysFile")
        return self


class LLMServiceSpec(_Spec):
    """What to serve, how to run, schedule, scale, route and roll it out."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    replicas: ReplicasSpec = Field(default_factory=ReplicasSpec)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    failover: FailoverSpec = Field(default_factory=FailoverSpec)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Self:
        if self.autoscaling.scale_to_zero and self.replicas.min != 0:
            raise ValueError("autoscaling.scaleToZero needs replicas.min = 0")
        if not self.autoscaling.enabled and self.replicas.min == 0:
            raise ValueError("replicas.min = 0 without autoscaling would never serve")
        return self


class Metadata(_Spec):
    """Kubernetes object metadata (name and namespace are DNS-1123 labels)."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    name: Name
    namespace: Name = "default"
    labels: dict[str, str] = Field(default_factory=dict)


class LLMService(_Spec):
    """The custom resource: `apiVersion`, `kind`, `metadata`, `spec`."""

    api_version: Literal["tokenfleet.dev/v1alpha1"] = "tokenfleet.dev/v1alpha1"
    kind: Literal["LLMService"] = "LLMService"
    metadata: Metadata
    spec: LLMServiceSpec = Field(default_factory=LLMServiceSpec)


def local_problems(service: LLMService) -> list[tuple[str, str]]:
    """Fields `tokenfleet up` cannot honour, as `(field path, reason)`: run before starting.

    Every field is consumed somewhere or refused here: a local run that silently ignored one would
    differ from what the spec says (apiKeysSecret alone answered 401 to every request). Fields
    that are cluster-only by nature (engine.image, engine.gpuPools, failover.pendingTimeoutS)
    are documented as such and harmless locally, so they are not refused.
    """
    problems: list[tuple[str, str]] = []
    gateway = service.spec.gateway
    if gateway.api_keys_secret and not gateway.api_keys_file:
        problems.append(
            (
                "spec.gateway.apiKeysSecret",
                "not supported by tokenfleet up (it is read by the operator on Kubernetes); set apiKeysFile",
            )
        )
    return problems


class SpecError(Exception):
    """A spec that failed validation: one `(field path, reason)` per problem."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {path}: {reason}" for path, reason in errors)
        super().__init__(f"{source}: {len(errors)} error(s)\n{lines}")


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(root)"


def errors_of(exc: ValidationError) -> list[tuple[str, str]]:
    """Flatten pydantic errors into `(spec.model.maxModelLen, reason)` pairs."""
    return [(_field_path(err["loc"]), err["msg"].removeprefix("Value error, ")) for err in exc.errors()]


def parse_service(document: Any, source: str = "<spec>") -> LLMService:
    if not isinstance(document, dict):
        raise SpecError(source, [("(root)", "expected a mapping with apiVersion, kind, metadata, spec")])
    try:
        return LLMService.model_validate(document)
    except ValidationError as exc:
        raise SpecError(source, errors_of(exc)) from None


def load_service(path: str | Path) -> LLMService:
    """Read and validate one LLMService YAML file."""
    text = Path(path).read_text()
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [("(yaml)", str(exc).replace("\n", " "))]) from None
    return parse_service(document, str(path))


def default_service(name: str = "tiny-code") -> LLMService:
    return LLMService(metadata=Metadata(name=name))


def json_schema() -> dict[str, Any]:
    """JSON schema of the whole resource, by alias (what users write)."""
    return LLMService.model_json_schema(by_alias=True)
