"""The pipeline's typed configuration (pipeline.yaml), validated up front with field-level errors.

Everything that can be checked without the model is checked here (technique names, ranges);
what needs the model's config.json or the CPU (layer sizes, AMX) is `pipeline.preflight`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from tokenfleet.engine.quantize.techniques import (
    DEFAULT_CPU_TECHNIQUES,
    DEFAULT_GPU_TECHNIQUES,
    lookup,
    technique_for,
)
from tokenfleet.engine.quantize.venv import DEFAULT_REQUIREMENTS


class PipelineConfigError(ValueError):
    """An invalid pipeline config; `errors` holds (field path, reason) pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        lines = [f"{source}: invalid pipeline config ({len(errors)} error(s))"]
        lines += [f"  {path}: {reason}" for path, reason in errors]
        super().__init__("\n".join(lines))


class _Cfg(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, validate_default=True
    )


class CalibrationConfig(_Cfg):
    """Calibration windows, drawn from the model corpus's train split (never its validation split)."""

    samples: int = Field(64, ge=1, le=4096, description="Number of calibration windows.")
    seq_len: int = Field(256, ge=16, le=8192, description="Tokens per calibration window.")
    seed: int = 0


class EvaluationConfig(_Cfg):
    """Perplexity on the held-out split and a fixed short load, each model served by vLLM."""

    ppl_windows: int = Field(64, ge=1, le=4096, description="Held-out windows scored for perplexity.")
    seq_len: int = Field(256, ge=16, le=8192, description="Tokens per perplexity window.")
    bench_duration_s: float = Field(20.0, ge=0, le=3600, description="Seconds of load per model; 0 skips.")
    bench_users: int = Field(4, ge=1, le=256, description="Closed-loop users (concurrent requests).")
    input_tokens: int = Field(64, ge=1, le=8192)
    output_tokens: int = Field(32, ge=1, le=8192)
    max_model_len: int = Field(512, ge=32, le=1_048_576)
    kv_cache_gib: float = Field(1.0, gt=0, le=1024)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    start_timeout_s: float = Field(600.0, gt=0, description="How long a vLLM server may take to start.")
    sample_prompt: str = Field(
        "class Config:\n    def __init__(self, path):\n        self.",
        min_length=1,
        description="Prompt of the greedy sample each model completes (shown in the report).",
    )
    sample_tokens: int = Field(32, ge=1, le=1024)

    @model_validator(mode="after")
    def _fits(self) -> EvaluationConfig:
        if self.seq_len + 1 > self.max_model_len:
            raise ValueError(
                f"seqLen {self.seq_len} + 1 generated token exceeds maxModelLen {self.max_model_len}"
            )
        if self.input_tokens + self.output_tokens > self.max_model_len:
            raise ValueError("inputTokens + outputTokens exceed maxModelLen")
        return self


class ConstraintConfig(_Cfg):
    """The user's constraint the recommendation is derived from."""

    max_recovery_loss: float = Field(
        0.05, ge=0, le=1, description="Largest acceptable 1 - recovery (0.05: keep ≥ 95% of baseline)."
    )
    optimize: Literal["size", "throughput"] = Field(
        "size", description="Among techniques within the constraint, prefer the smallest or the fastest."
    )


class QuantEnvConfig(_Cfg):
    """The llm-compressor virtual environment (created on first use, cached by its requirements)."""

    requirements: list[str] = Field(default_factory=lambda: list(DEFAULT_REQUIREMENTS), min_length=1)
    extra_index_urls: list[str] = Field(default_factory=list)


class PipelineConfig(_Cfg):
    model: str = Field(
        "builtin://tiny-code",
        description="builtin://<name> or a local Llama/Qwen/Mistral checkpoint directory.",
    )
    output_dir: str | None = Field(
        None, description="Where checkpoints go (default: the cache, where model.quantization finds them)."
    )
    device: Literal["cpu", "gpu"] = "cpu"
    techniques: list[str] = Field(
        default_factory=list, description="Technique names, or {method, scheme}; empty = all the device runs."
    )
    group_size: int | None = Field(
        None,
        description="Weight-only (W4A16, W8A16) group size; default: the largest of 128/64/32 "
        "dividing every layer.",
    )
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    constraint: ConstraintConfig = Field(default_factory=ConstraintConfig)
    quant_env: QuantEnvConfig = Field(default_factory=QuantEnvConfig)
    report: str | None = Field(None, description="Write the markdown report here (plots and JSON beside it).")
    report_notes: list[str] = Field(default_factory=list, description="Paragraphs added to the report.")
    quant_threads: int = Field(2, ge=1, le=256, description="torch threads for quantization.")

    @field_validator("techniques", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        names: list[str] = []
        for entry in value:
            if isinstance(entry, dict):
                extra = set(entry) - {"method", "scheme"}
                if extra or not {"method", "scheme"} <= set(entry):
                    raise ValueError(
                        f"an entry as a mapping needs exactly method and scheme, got {sorted(entry)}"
                    )
                names.append(technique_for(str(entry["method"]), str(entry["scheme"])).name)
            elif isinstance(entry, str):
                names.append(lookup(entry).name)
            else:
                raise ValueError(f"expected a technique name or {{method, scheme}}, got {entry!r}")
        if len(set(names)) != len(names):
            raise ValueError("a technique is listed twice")
        return names

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if value.startswith("hf://") or ("://" in value and not value.startswith("builtin://")):
            raise ValueError("must be builtin://<name> or a local directory (no model hub on these machines)")
        return value

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and (value <= 0 or value % 2):
            raise ValueError("must be a positive even number, or -1 for per-channel scales")
        return value

    def technique_names(self) -> list[str]:
        if self.techniques:
            return list(self.techniques)
        return list(DEFAULT_GPU_TECHNIQUES if self.device == "gpu" else DEFAULT_CPU_TECHNIQUES)


def parse_config(data: Any, source: str = "<config>") -> PipelineConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PipelineConfigError(source, [("(root)", "expected a mapping")])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            path = ".".join(str(p) for p in err["loc"]) or "(root)"
            reason = str(err["msg"]).removeprefix("Value error, ")
            errors.append((path, reason))
        raise PipelineConfigError(source, errors) from None


def load_config(path: str | Path) -> PipelineConfig:
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PipelineConfigError(str(path), [("(root)", f"not valid YAML: {exc}")]) from None
    return parse_config(data, str(path))
