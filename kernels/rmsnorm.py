"""Fused residual-add + RMSNorm, and plain RMSNorm, with every optimisation step kept.

Semantics follow vLLM's `fused_add_rms_norm` (vllm/ir/ops/layernorm.py): the sum x + residual
is formed in fp32, written back to `residual` in the input dtype, and the *fp32* sum is
normalised; the result goes to `x`. Both updates are in place, as in vLLM's C++ op.

The steps, each a separate function so the benchmark can time what each technique bought:

0. `unfused`     — an add kernel, then a norm kernel: the residual makes an extra HBM round trip.
1. `fused`       — one kernel, one row per program; sizes passed as plain runtime ints, so
                   Triton cannot prove alignment and every load is masked and scalar.
2. `vectorised`  — sizes specialised (divisibility by 16 lets Triton emit 128-bit loads), no mask
                   when the row fills the block, eviction hints (the weight is reused by every
                   row, activations are streamed once).
3. `tuned`       — warps sized to the row, so each thread issues a few vector loads.
4. `autotuned`   — `triton.autotune` over warps, keyed on the hidden size and dtype.

Rows live in registers whole, so the hidden size is limited to `MAX_HIDDEN`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from tokenfleet.kernels._runtime import (
    INTERPRET,
    KernelInputError,
    check_contiguous,
    check_device,
    check_float_dtype,
    check_same_dtype,
    next_power_of_2,
)

MAX_HIDDEN = 65536

FusedAddRMSNorm = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
]


# --- references ---------------------------------------------------------------------------------


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, out of place: (normalised output, new residual). vLLM's native semantics."""
    orig_dtype = x.dtype
    summed = x.float() + residual.float()
    variance = summed.pow(2).mean(dim=-1, keepdim=True)
    normed = (summed * torch.rsqrt(variance + eps)).to(weight.dtype) * weight
    return normed.to(orig_dtype), summed.to(orig_dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(dim=-1, keepdim=True)
    return ((x.float() * torch.rsqrt(variance + eps)).to(weight.dtype) * weight).to(x.dtype)


# --- input checks -------------------------------------------------------------------------------


def _check_norm_inputs(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> int:
    tensors = [x, weight] if residual is None else [x, residual, weight]
    check_device(*tensors)
    check_float_dtype("x", x)
    if x.dim() < 1:
        raise KernelInputError("x must have at least one dimension (the hidden size last)")
    hidden = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != hidden:
        raise KernelInputError(f"weight must have shape ({hidden},), got {tuple(weight.shape)}")
    if hidden == 0 or hidden > MAX_HIDDEN:
        raise KernelInputError(f"hidden size must be in 1..{MAX_HIDDEN}, got {hidden}")
    names = ["x", "weight"] if residual is None else ["x", "residual", "weight"]
    check_same_dtype(names, tensors)
    if residual is not None and residual.shape != x.shape:
        raise KernelInputError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    for name, t in zip(names, tensors, strict=True):
        check_contiguous(name, t)
    return int(hidden)


# --- step 0: unfused ----------------------------------------------------------------------------


@triton.jit
def _add(a, b):  # type: ignore[no-untyped-def]
    # tl.sum, spelled with tl.reduce: triton.language's own @jit helpers are compiled-only objects
    # when triton was imported before TRITON_INTERPRET was set, and the interpreter cannot call them.
    return a + b


@triton.jit
def _add_inplace_kernel(x_ptr, res_ptr, n_elements, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(res_ptr + offs, (x + r).to(res_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_row_kernel(x_ptr, w_ptr, out_ptr, hidden, eps, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * hidden + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.reduce(x * x, 0, _add) / hidden + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + offs, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def fused_add_rms_norm_unfused(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 0: residual += x (one kernel), then x = rmsnorm(residual) (another)."""
    hidden = _check_norm_inputs(x, weight, residual)
    rows = x.numel() // hidden
    if rows == 0:
        return x, residual
    block = 1024
    _add_inplace_kernel[(triton.cdiv(x.numel(), block),)](x, residual, x.numel(), BLOCK=block)
    _rms_norm_row_kernel[(rows,)](residual, weight, x, hidden, eps, BLOCK=next_power_of_2(hidden))
    return x, residual


# --- step 1: fused, naive -----------------------------------------------------------------------


@triton.jit(do_not_specialize=["hidden"])
def _fused_naive_kernel(x_ptr, res_ptr, w_ptr, hidden, eps, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    base = row * hidden
    s = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    s += tl.load(res_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(res_ptr + base + offs, s.to(res_ptr.dtype.element_ty), mask=mask)
    rstd = tl.rsqrt(tl.reduce(s * s, 0, _add) / hidden + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + base + offs, (s * rstd * w).to(x_ptr.dtype.element_ty), mask=mask)


def fused_add_rms_norm_fused(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: one kernel, one row per program, default launch (4 warps)."""
    hidden = _check_norm_inputs(x, weight, residual)
    rows = x.numel() // hidden
    if rows:
        _fused_naive_kernel[(rows,)](x, residual, weight, hidden, eps, BLOCK=next_power_of_2(hidden))
    return x, residual


# --- steps 2-4: vectorised kernel, launched three ways ------------------------------------------


@triton.jit
def _fused_vec_kernel(x_ptr, res_ptr, w_ptr, hidden, eps, BLOCK: tl.constexpr, EVEN: tl.constexpr):  # type: ignore[no-untyped-def]
    row = tl.program_id(0).to(tl.int64)
    offs = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK), BLOCK), BLOCK)
    base = row * hidden
    if EVEN:
        s = tl.load(x_ptr + base + offs, eviction_policy="evict_first").to(tl.float32)
        s += tl.load(res_ptr + base + offs, eviction_policy="evict_first").to(tl.float32)
        tl.store(res_ptr + base + offs, s.to(res_ptr.dtype.element_ty))
        w = tl.load(w_ptr + offs, eviction_policy="evict_last").to(tl.float32)
    else:
        mask = offs < hidden
        s = tl.load(x_ptr + base + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        s += tl.load(res_ptr + base + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(
            tl.float32
        )
        tl.store(res_ptr + base + offs, s.to(res_ptr.dtype.element_ty), mask=mask)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
    rstd = tl.rsqrt(tl.reduce(s * s, 0, _add) / hidden + eps)
    out = (s * rstd * w).to(x_ptr.dtype.element_ty)
    if EVEN:
        tl.store(x_ptr + base + offs, out)
    else:
        tl.store(x_ptr + base + offs, out, mask=offs < hidden)


def fused_add_rms_norm_vectorised(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: specialised sizes and unmasked full rows -> 128-bit loads; default 4 warps."""
    hidden = _check_norm_inputs(x, weight, residual)
    rows = x.numel() // hidden
    if rows:
        block = next_power_of_2(hidden)
        _fused_vec_kernel[(rows,)](x, residual, weight, hidden, eps, BLOCK=block, EVEN=block == hidden)
    return x, residual


def _warps_for(block: int, elem_size: int) -> int:
    # About two 16-byte vectors per thread: enough loads in flight without spilling registers.
    vectors = block * elem_size // 16
    return max(1, min(16, vectors // (32 * 2)))


def fused_add_rms_norm_tuned(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: the vectorised kernel with warps sized to the row."""
    hidden = _check_norm_inputs(x, weight, residual)
    rows = x.numel() // hidden
    if rows:
        block = next_power_of_2(hidden)
        warps = _warps_for(block, x.element_size())
        _fused_vec_kernel[(rows,)](
            x, residual, weight, hidden, eps, BLOCK=block, EVEN=block == hidden, num_warps=warps
        )
    return x, residual


def _autotune_configs() -> list[triton.Config]:
    if INTERPRET:
        # The interpreter ignores warps; one config skips the autotuner's benchmarking.
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16, 32)]


# The autotuner re-runs the kernel while timing it; restore_value keeps the in-place update
# from being applied more than once.
_fused_autotuned_kernel = triton.autotune(
    configs=_autotune_configs(), key=["hidden", "BLOCK"], restore_value=["x_ptr", "res_ptr"]
)(_fused_vec_kernel)


def fused_add_rms_norm_autotuned(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: warps picked by measurement per hidden size (and dtype), cached per process."""
    hidden = _check_norm_inputs(x, weight, residual)
    rows = x.numel() // hidden
    if rows:
        block = next_power_of_2(hidden)
        _fused_autotuned_kernel[(rows,)](x, residual, weight, hidden, eps, BLOCK=block, EVEN=block == hidden)
    return x, residual


STEPS: dict[str, FusedAddRMSNorm] = {
    "0-unfused": fused_add_rms_norm_unfused,
    "1-fused": fused_add_rms_norm_fused,
    "2-vectorised": fused_add_rms_norm_vectorised,
    "3-tuned": fused_add_rms_norm_tuned,
    "4-autotuned": fused_add_rms_norm_autotuned,
}

# The kernel the vLLM plugin uses.
fused_add_rms_norm = fused_add_rms_norm_autotuned


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a residual, out of place (vLLM's `rms_norm`)."""
    hidden = _check_norm_inputs(x, weight, None)
    out = torch.empty_like(x)
    rows = x.numel() // hidden
    if rows:
        block = next_power_of_2(hidden)
        _rms_norm_row_kernel[(rows,)](
            x, weight, out, hidden, eps, BLOCK=block, num_warps=_warps_for(block, x.element_size())
        )
    return out
