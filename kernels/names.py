"""Kernel names as the spec spells them, and what each needs on the vLLM command line.

Pure (no torch, no vLLM): engine/launch.py imports it to build the engine's flags.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

KERNELS_ENV = "TOKENFLEET_KERNELS"

# vLLM enables a CustomOp subclass registered out of tree by its *class* name; the in-tree
# name is listed too, so a process where the plugin registered nothing (no GPU) still runs
# vLLM's own op for that layer rather than its forward_native.
CUSTOM_OPS: Mapping[str, tuple[str, ...]] = {
    "rms_norm": ("+RMSNorm", "+rms_norm"),
    "silu_and_mul": ("+SiluAndMul", "+silu_and_mul"),
    # Chosen by vLLM's mixed-precision kernel selection for W4A16 checkpoints, not a CustomOp.
    "w4a16_gemm": (),
}
KNOWN = tuple(CUSTOM_OPS)


def parse_enabled(value: str | None) -> list[str]:
    """`rms_norm,silu_and_mul` -> the names; unknown names raise (a typo must not pass silently)."""
    names = [part.strip() for part in (value or "").split(",") if part.strip()]
    unknown = [name for name in names if name not in CUSTOM_OPS]
    if unknown:
        raise ValueError(f"unknown tokenfleet kernels {unknown}; known: {list(KNOWN)}")
    return list(dict.fromkeys(names))


def custom_ops_for(kernels: Iterable[str]) -> list[str]:
    return [op for kernel in kernels for op in CUSTOM_OPS[kernel]]
