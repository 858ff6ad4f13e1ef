"""The catalogue of quantization techniques: what each one is, and which schemes a device can run.

Pure data, imported by the LLMService spec (to validate `model.quantization`) as well as by the
pipeline, so it must not import anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scheme = Literal["W4A16", "W8A8", "W8A16", "FP8_DYNAMIC"]
Method = Literal["rtn", "gptq", "awq", "smoothquant+gptq"]
Device = Literal["cpu", "gpu"]

SCHEMES: tuple[Scheme, ...] = ("W4A16", "W8A8", "W8A16", "FP8_DYNAMIC")
METHODS: tuple[Method, ...] = ("rtn", "gptq", "awq", "smoothquant+gptq")


@dataclass(frozen=True, slots=True)
class Technique:
    """One way to produce a compressed-tensors checkpoint with llm-compressor."""

    name: str
    method: Method
    scheme: Scheme
    description: str

    @property
    def needs_calibration(self) -> bool:
        # RTN computes scales from the weights alone; dynamic activation scales need no data either.
        return self.method != "rtn"

    @property
    def weight_bits(self) -> int:
        return 4 if self.scheme == "W4A16" else 8


_ALL = (
    Technique("rtn-w4a16", "rtn", "W4A16", "round-to-nearest 4-bit weights (baseline)"),
    Technique("rtn-w8a8", "rtn", "W8A8", "round-to-nearest int8 weights, dynamic per-token int8 activations"),
    Technique("gptq-w4a16", "gptq", "W4A16", "GPTQ 4-bit weights (Hessian-corrected rounding)"),
    Technique("awq-w4a16", "awq", "W4A16", "AWQ 4-bit weights (activation-aware scaling, then rounding)"),
    Technique(
        "smoothquant-gptq-w8a8",
        "smoothquant+gptq",
        "W8A8",
        "SmoothQuant migrates activation outliers into weights, then GPTQ int8 weights",
    ),
    Technique("gptq-w8a16", "gptq", "W8A16", "GPTQ int8 weights, 16-bit activations (GPU only)"),
    Technique("rtn-fp8", "rtn", "FP8_DYNAMIC", "FP8 weights, dynamic per-token FP8 activations (GPU/AMX)"),
)
TECHNIQUES: dict[str, Technique] = {t.name: t for t in _ALL}
TECHNIQUE_NAMES: tuple[str, ...] = tuple(TECHNIQUES)
# What the pipeline runs when the config lists no techniques: everything the device can run.
DEFAULT_CPU_TECHNIQUES = ("rtn-w4a16", "rtn-w8a8", "gptq-w4a16", "awq-w4a16", "smoothquant-gptq-w8a8")
DEFAULT_GPU_TECHNIQUES = (*DEFAULT_CPU_TECHNIQUES, "gptq-w8a16", "rtn-fp8")


def technique_for(method: str, scheme: str) -> Technique:
    """The catalogue entry for a method and scheme; ValueError naming the valid ones otherwise."""
    scheme_up = scheme.upper()
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; known: {', '.join(METHODS)}")
    if scheme_up not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    for technique in _ALL:
        if technique.method == method and technique.scheme == scheme_up:
            return technique
    offered = ", ".join(t.scheme for t in _ALL if t.method == method)
    raise ValueError(f"method {method!r} is not offered with scheme {scheme_up} (it is with: {offered})")


def lookup(name: str) -> Technique:
    try:
        return TECHNIQUES[name]
    except KeyError:
        raise ValueError(f"unknown technique {name!r}; known: {', '.join(TECHNIQUE_NAMES)}") from None


def is_checkpoint_path(value: str) -> bool:
    return "/" in value or value.startswith(("~", "."))


def quantization_problem(value: str) -> str | None:
    """Why `value` is not a valid `model.quantization` (none, a technique, a path); None if it is."""
    if value == "none" or value in TECHNIQUES or is_checkpoint_path(value):
        return None
    same_scheme = [t.name for t in _ALL if t.scheme.lower() == value.lower()]
    if same_scheme:
        return (
            f"{value!r} is a scheme, not a technique: name how the checkpoint was made "
            f"({', '.join(same_scheme)}) or give a checkpoint directory path"
        )
    return (
        f"unknown technique {value!r}; expected none, one of {', '.join(TECHNIQUE_NAMES)}, "
        "or a checkpoint directory path"
    )
