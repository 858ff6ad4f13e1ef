"""SiLU-and-mul (SwiGLU): out[t, i] = silu(x[t, i]) * x[t, I + i] over the [tokens, 2·I] gate/up output.

Eager torch makes three passes (silu, slice, multiply) and materialises silu(gate); this kernel
reads the gate and up halves once and writes the [tokens, I] result once, computing in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenfleet.kernels._runtime import (
    INTERPRET,
    KernelInputError,
    check_contiguous,
    check_device,
    check_float_dtype,
)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """vLLM's `SiluAndMul.forward_native`."""
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK": 1024}, num_warps=4)]
    return [
        triton.Config({"BLOCK": block}, num_warps=warps)
        for block in (512, 1024, 2048, 4096)
        for warps in (2, 4, 8)
        if block // (warps * 32) >= 4  # at least one 8-byte vector per thread
    ]


@triton.autotune(configs=_configs(), key=["inter"])
@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * 2 * inter + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * inter + inter + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * inter + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., 2·I] contiguous -> [..., I]. `out`, if given, must be contiguous [..., I] of x's dtype."""
    check_device(x)
    check_float_dtype("x", x)
    check_contiguous("x", x)
    if x.dim() < 1 or x.shape[-1] % 2 or x.shape[-1] == 0:
        raise KernelInputError(
            f"x's last dimension must be even and non-zero (gate|up), got {tuple(x.shape)}"
        )
    inter = x.shape[-1] // 2
    out_shape = (*x.shape[:-1], inter)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    else:
        check_device(x, out)
        check_contiguous("out", out)
        if tuple(out.shape) != out_shape or out.dtype != x.dtype:
            raise KernelInputError(f"out must be {out_shape} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    rows = x.numel() // x.shape[-1]
    if rows:

        def grid(meta: dict[str, int]) -> tuple[int, int]:
            return (rows, triton.cdiv(inter, meta["BLOCK"]))

        _silu_and_mul_kernel[grid](x, out, inter)
    return out
