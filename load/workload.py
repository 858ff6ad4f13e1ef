"""The workload file: what to send, how fast, and in which mix of classes and tenants.

A YAML document validated strictly (unknown fields are errors, reported with their field path
before any traffic is sent). `tokenfleet.load.traffic` turns a workload into requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from pydantic.alias_generators import to_camel

from tokenfleet.load import shapes
from tokenfleet.spec import SchedulerSpec, SpecError, load_service


class WorkloadError(ValueError):
    """A workload that cannot run: every problem as (field path, reason)."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = [f"{source}: invalid workload ({len(errors)} error(s))"]
        lines += [f"  {path}: {reason}" for path, reason in errors]
        super().__init__("\n".join(lines))


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, strict=False
    )


Positive = Annotated[float, Field(gt=0)]
_DEFER_MIX = "deferMixChecks"  # validation context key: the caller runs mix_errors itself


class Fixed(_Model):
    dist: Literal["fixed"]
    value: int = Field(ge=1)


class Uniform(_Model):
    dist: Literal["uniform"]
    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class LogNormal(_Model):
    """Median `median`, log-space standard deviation `sigma`, clipped to [min, max]."""

    dist: Literal["lognormal"]
    median: Positive
    sigma: float = Field(gt=0, le=5)
    min: int = Field(1, ge=1)
    max: int = Field(4096, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


Length = Annotated[Fixed | Uniform | LogNormal, Field(discriminator="dist")]


class Synthetic(_Model):
    """Random words; `inputTokens` counts words, 1–2 tokens each by tokenizer (usage is the truth)."""

    kind: Literal["synthetic"]
    input_tokens: Length


class ShareGPT(_Model):
    """A ShareGPT-format JSON file: first human turn as prompt, the reply's length as max_tokens."""

    kind: Literal["sharegpt"]
    path: str
    max_input_tokens: int = Field(1024, ge=1)
    max_conversations: int | None = Field(None, ge=1)
    use_reply_length: bool = True


class TokenIds(_Model):
    """Random token ids sent as the prompt itself (the completions API takes a list of ids), so a
    prompt is exactly `inputTokens` tokens long: for benchmarks whose costs count prompt tokens."""

    kind: Literal["tokenIds"]
    input_tokens: Length
    # Past the first hundred ids (where vocabularies keep their special tokens) and below 1000,
    # which every tokenizer's vocabulary reaches.
    min_id: int = Field(100, ge=0)
    max_id: int = Field(999, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min_id > self.max_id:
            raise ValueError(f"minId ({self.min_id}) must not exceed maxId ({self.max_id})")
        return self


class SharedPrefix(_Model):
    """N shared prefixes × M distinct suffixes each, for prefix-cache behaviour."""

    kind: Literal["sharedPrefix"]
    num_prefixes: int = Field(ge=1, le=10_000)
    prefix_tokens: int = Field(ge=1)
    suffixes_per_prefix: int = Field(ge=1, le=100_000)
    suffix_tokens: int = Field(ge=1)


Prompts = Annotated[Synthetic | ShareGPT | SharedPrefix | TokenIds, Field(discriminator="kind")]


class ClassMix(_Model):
    name: str = Field(min_length=1, max_length=63)
    share: Positive = 1.0
    priority: int | None = Field(None, ge=-1000, le=1000)
    ttft_ms: Positive | None = None
    tpot_ms: Positive | None = None
    e2e_ms: Positive | None = None
    input_tokens: Length | None = Field(
        None, description="This class's prompt lengths (synthetic or tokenIds prompts); else the workload's."
    )
    output_tokens: Length | None = Field(
        None, description="This class's output lengths, ahead of a dataset's; else the workload's."
    )
    server_class: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        description="The SLO class these requests ask the server for, when it is not `name`: several "
        "mixes may share one server class, each judged by its own targets, and then each request "
        "carries its mix's `ttftMs` as its own deadline (`vllm_xargs.ttft_ms`, read by the SLA scheduler).",
    )


class TenantBurst(_Model):
    """The tenant sends only during `onS` out of every `onS + offS` seconds (first phase on).

    `mode: shift` keeps the shape's rate: while the tenant is off, its share goes to the tenants
    that are on. `mode: add` makes `share` the tenant's mean share, all of it sent within its on
    phases ((onS + offS) / onS times that rate); the other tenants' rates do not change, so the
    total rate rises and falls with its bursts, as a noisy neighbour's traffic does.
    """

    on_s: Positive
    off_s: Positive
    mode: Literal["shift", "add"] = "shift"


class TenantMix(_Model):
    name: str = Field(min_length=1, max_length=63)
    share: Positive = 1.0
    burst: TenantBurst | None = None
    classes: list[str] | None = Field(
        None, min_length=1, description="The classes this tenant sends (default: every class)."
    )
    api_key_env: str | None = Field(
        None,
        min_length=1,
        description="Environment variable holding this tenant's API key (sent as a Bearer token); "
        "else the key is looked up in the workload's `apiKeysFile`.",
    )


class ConstantShape(_Model):
    kind: Literal["constant"]
    value: float = Field(ge=0)


class Step(_Model):
    value: float = Field(ge=0)
    duration_s: Positive


class StepShape(_Model):
    kind: Literal["step"]
    steps: list[Step] = Field(min_length=1)


class RampShape(_Model):
    kind: Literal["ramp"]
    start: float = Field(ge=0)
    end: float = Field(ge=0)
    duration_s: Positive


class BurstShape(_Model):
    kind: Literal["burst"]
    low: float = Field(ge=0)
    high: float = Field(ge=0)
    on_s: Positive
    off_s: Positive


class DiurnalShape(_Model):
    kind: Literal["diurnal"]
    mean: float = Field(ge=0)
    amplitude: float = Field(ge=0)
    period_s: Positive


class SweepShape(_Model):
    kind: Literal["sweep"]
    rates: list[Positive] = Field(min_length=1)
    step_s: Positive
    min_achieved_ratio: float = Field(0.9, gt=0, le=1)


ShapeSpec = Annotated[
    ConstantShape | StepShape | RampShape | BurstShape | DiurnalShape | SweepShape,
    Field(discriminator="kind"),
]


class Arrival(_Model):
    """Open loop: a pacer at `shape`'s rate, at most `maxConcurrency` in flight. Closed loop: `shape`
    gives the number of users, each sending its next request when the last one ends."""

    mode: Literal["open", "closed"] = "open"
    process: Literal["poisson", "gamma", "constant"] = "poisson"
    burstiness: Positive = 1.0
    max_concurrency: int = Field(64, ge=1, le=100_000)
    shape: ShapeSpec = Field(default_factory=lambda: ConstantShape(kind="constant", value=1.0))

    @model_validator(mode="after")
    def _closed_loop_levels(self) -> Self:
        if self.mode == "closed" and isinstance(self.shape, SweepShape):
            raise ValueError("a sweep is over arrival rates: use mode: open")
        return self


class Workload(_Model):
    name: str = "workload"
    seed: int = Field(0, ge=0)
    model: str | None = Field(None, description="Served model name; default: the first on /v1/models.")
    api: Literal["completions", "chat"] = "completions"
    stream: bool = True
    ignore_eos: bool = True
    temperature: float = Field(0.0, ge=0, le=2)
    timeout_s: Positive = 120.0
    warmup_s: float = Field(0.0, ge=0, description="Requests sent before this are logged, not reported.")
    prompts: Prompts = Field(
        default_factory=lambda: Synthetic(kind="synthetic", input_tokens=Fixed(dist="fixed", value=64))
    )
    output_tokens: Length = Field(default_factory=lambda: Fixed(dist="fixed", value=32))
    arrival: Arrival = Field(default_factory=Arrival)
    classes: list[ClassMix] = Field(default_factory=lambda: [ClassMix(name="standard")], min_length=1)
    tenants: list[TenantMix] = Field(default_factory=lambda: [TenantMix(name="default")], min_length=1)
    classes_from: str | None = Field(
        None,
        description="An LLMService YAML whose scheduler classes replace `classes` (shares kept by name).",
    )
    api_keys_file: str | None = Field(
        None,
        description="The gateway's API-key file (`{key: tenant}`): each tenant without `apiKeyEnv` "
        "sends the key that maps to its name. Without keys, requests carry no Authorization.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        named = {"classes": [c.name for c in self.classes], "tenants": [t.name for t in self.tenants]}
        for label, names in named.items():
            if len(set(names)) != len(names):
                raise ValueError(f"{label} names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _consistent_mix(self, info: ValidationInfo) -> Self:
        # parse_workload reports these itself, with their field paths; with `classesFrom` the
        # class list is only known once load_workload has read the service.
        if (info.context or {}).get(_DEFER_MIX) or self.classes_from is not None:
            return self
        if problems := mix_errors(self):
            raise ValueError("; ".join(f"{path}: {reason}" for path, reason in problems))
        return self

    def class_named(self, name: str) -> ClassMix | None:
        return next((c for c in self.classes if c.name == name), None)


def mix_errors(workload: Workload) -> list[tuple[str, str]]:
    """Rules across fields, as (field path, reason): tenants name existing classes, every class
    has a tenant that sends it, per-class prompt lengths only where prompts are generated, and
    token-id prompts only on the completions API (chat messages are text)."""
    errors: list[tuple[str, str]] = []
    known = [c.name for c in workload.classes]
    for i, tenant in enumerate(workload.tenants):
        for name in tenant.classes or []:
            if name not in known:
                errors.append((f"tenants[{i}].classes", f"unknown class {name!r}; known: {', '.join(known)}"))
    for i, cls in enumerate(workload.classes):
        if not any(t.classes is None or cls.name in t.classes for t in workload.tenants):
            errors.append(
                (f"classes[{i}]", f"no tenant sends class {cls.name!r} (their `classes` leave it out)")
            )
        if cls.input_tokens is not None and not isinstance(workload.prompts, Synthetic | TokenIds):
            kind = workload.prompts.kind
            reason = f"a class's prompt lengths need synthetic or tokenIds prompts, not {kind}"
            errors.append((f"classes[{i}].inputTokens", reason))
    if isinstance(workload.prompts, TokenIds) and workload.api != "completions":
        errors.append(("prompts", "tokenIds prompts need api: completions (chat messages are text)"))
    return errors


def classes_from_scheduler(scheduler: SchedulerSpec, own: Sequence[ClassMix] = ()) -> list[ClassMix]:
    """A service's SLO classes as a class mix: the benchmark sends exactly the classes the
    scheduler knows, with their priorities, and judges them by the same TTFT/TPOT targets. The
    share and lengths of the workload's own class of the same name are kept."""
    mine = {c.name: c for c in own}
    out = []
    for c in scheduler.classes:
        base = mine.get(c.name, ClassMix(name=c.name))
        out.append(
            base.model_copy(update={"priority": c.priority, "ttft_ms": c.ttft_ms, "tpot_ms": c.tpot_ms})
        )
    return out


def shape_of(workload: Workload) -> shapes.Shape:
    """The pure rate/concurrency curve for the workload's shape spec."""
    spec = workload.arrival.shape
    if isinstance(spec, ConstantShape):
        return shapes.Constant(spec.value)
    if isinstance(spec, StepShape):
        return shapes.Steps(tuple((s.value, s.duration_s) for s in spec.steps))
    if isinstance(spec, RampShape):
        return shapes.Ramp(spec.start, spec.end, spec.duration_s)
    if isinstance(spec, BurstShape):
        return shapes.Burst(spec.low, spec.high, spec.on_s, spec.off_s)
    if isinstance(spec, DiurnalShape):
        return shapes.Diurnal(spec.mean, spec.amplitude, spec.period_s)
    return shapes.Sweep(tuple(spec.rates), spec.step_s, spec.min_achieved_ratio)


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "<root>"


def parse_workload(data: object, source: str = "<workload>") -> Workload:
    if not isinstance(data, dict):
        raise WorkloadError(source, [("<root>", "a workload must be a mapping")])
    try:
        workload = Workload.model_validate(data, context={_DEFER_MIX: True})
    except ValidationError as exc:
        errors: list[tuple[str, str]] = []
        for err in exc.errors():
            # Discriminated unions add the tag to the location (e.g. `shape.step.steps`): keep it,
            # it tells the reader which variant was checked.
            errors.append((_field_path(tuple(err["loc"])), err["msg"]))
        raise WorkloadError(source, errors) from None
    if workload.classes_from is None and (problems := mix_errors(workload)):
        raise WorkloadError(source, problems)
    return workload


def load_workload(path: str | Path) -> Workload:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkloadError(source, [("<file>", f"cannot read: {exc.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WorkloadError(source, [("<yaml>", str(exc).replace("\n", " "))]) from None
    workload = parse_workload(data, source)
    prompts = workload.prompts
    if isinstance(prompts, ShareGPT) and not Path(prompts.path).is_absolute():
        # Dataset paths are relative to the workload file, so workloads can ship with their data.
        resolved = (Path(path).parent / prompts.path).resolve()
        workload = workload.model_copy(update={"prompts": prompts.model_copy(update={"path": str(resolved)})})
    if isinstance(workload.prompts, ShareGPT) and not Path(workload.prompts.path).is_file():
        raise WorkloadError(source, [("prompts.path", f"no such file: {workload.prompts.path}")])
    if workload.classes_from is not None:
        service_path = Path(path).parent / workload.classes_from
        try:
            service = load_service(service_path)
        except SpecError as exc:
            raise WorkloadError(source, [(f"classesFrom ({p})", r) for p, r in exc.errors]) from None
        except OSError as exc:
            raise WorkloadError(
                source, [("classesFrom", f"cannot read {service_path}: {exc.strerror}")]
            ) from None
        classes = classes_from_scheduler(service.spec.scheduler, workload.classes)
        workload = workload.model_copy(
            update={"classes": classes, "classes_from": str(service_path.resolve())}
        )
        if problems := mix_errors(workload):
            raise WorkloadError(source, problems)
    return workload
