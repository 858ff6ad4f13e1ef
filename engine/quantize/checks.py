"""Can this device run this technique on this model? Decided before any work, from config.json.

The rules are vLLM 0.32's kernel constraints (docs/adr/0010-quantization.md):
- CPU W4A16 runs on CPUWNA16: 4-bit unsigned weights, group size even (or per channel), and every
  Linear's input and output size a multiple of 32; the group size must also divide the input size.
- CPU INT8 W8A8 runs on oneDNN everywhere.
- CPU FP8 needs AMX (Sapphire Rapids or newer); there is no CPU kernel for W8A16.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenfleet.engine.quantize.techniques import Device, Technique

SUPPORTED_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)
CPU_W4A16_MULTIPLE = 32
GROUP_SIZE_CANDIDATES = (128, 64, 32)


@dataclass(frozen=True, slots=True)
class LinearShape:
    name: str  # e.g. "mlp.down_proj" (the same in every decoder layer)
    in_features: int
    out_features: int


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor in /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_amx(flags: Iterable[str]) -> bool:
    # vLLM's CPU FP8 and AMX paths need the tile and bf16 instructions.
    flag_set = set(flags)
    return {"amx_tile", "amx_bf16"} <= flag_set


def read_cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        return cpu_flags(path.read_text())
    except OSError:
        return frozenset()


def linear_shapes(config: Mapping[str, Any]) -> list[LinearShape]:
    """The quantized Linear layers of one decoder layer of a Llama/Mistral/Qwen config.

    Raises ValueError for an architecture the pipeline does not know (its layer names and sizes
    would be guesses). lm_head is never quantized (it is on the ignore list).
    """
    architectures = list(config.get("architectures") or [])
    if not architectures or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {architectures or 'unknown'} is not supported; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    hidden = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    return [
        LinearShape("self_attn.q_proj", hidden, heads * head_dim),
        LinearShape("self_attn.k_proj", hidden, kv_heads * head_dim),
        LinearShape("self_attn.v_proj", hidden, kv_heads * head_dim),
        LinearShape("self_attn.o_proj", heads * head_dim, hidden),
        LinearShape("mlp.gate_proj", hidden, inter),
        LinearShape("mlp.up_proj", hidden, inter),
        LinearShape("mlp.down_proj", inter, hidden),
    ]


def auto_group_size(shapes: Iterable[LinearShape]) -> int:
    """The largest usual group size that divides every Linear's input size; -1 (per channel) if none."""
    inputs = {s.in_features for s in shapes}
    for size in GROUP_SIZE_CANDIDATES:
        if all(n % size == 0 for n in inputs):
            return size
    return -1


def technique_problems(
    technique: Technique,
    device: Device,
    shapes: Iterable[LinearShape],
    *,
    group_size: int,
    cpu_flag_set: Iterable[str] = (),
    tensor_parallel_size: int = 1,
) -> list[str]:
    """Why `device` cannot run `technique` on a model with these layers; [] when it can."""
    shapes = list(shapes)
    problems: list[str] = []
    scheme = technique.scheme
    if device == "cpu":
        if scheme == "W8A16":
            problems.append("vLLM's CPU backend has no W8A16 kernel (int8 weight-only needs a GPU)")
        if scheme == "FP8_DYNAMIC" and not has_amx(cpu_flag_set):
            problems.append("FP8 on CPU needs AMX (amx_tile, amx_bf16 in /proc/cpuinfo); this CPU has none")
    if scheme in ("W4A16", "W8A16"):  # the weight-only schemes use groups
        if group_size != -1 and (group_size <= 0 or group_size % 2):
            problems.append(f"group size {group_size} must be even (or -1, per channel)")
        for shape in shapes:
            if group_size > 0 and shape.in_features % group_size:
                problems.append(
                    f"{shape.name}: input size {shape.in_features} is not a multiple of "
                    f"group size {group_size}"
                )
            if device == "cpu" and scheme == "W4A16":
                in_part = shape.in_features
                out_part = shape.out_features
                # Row-parallel layers split the input, column-parallel ones the output.
                if shape.name.endswith(("o_proj", "down_proj")):
                    in_part //= tensor_parallel_size
                else:
                    out_part //= tensor_parallel_size
                for label, size in (("input", in_part), ("output", out_part)):
                    if size % CPU_W4A16_MULTIPLE:
                        problems.append(
                            f"{shape.name}: {label} size {size} is not a multiple of {CPU_W4A16_MULTIPLE}, "
                            "which the CPU 4-bit kernel (CPUWNA16) requires"
                        )
    return problems
