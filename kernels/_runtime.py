"""Shared by every kernel module: whether Triton runs interpreted, and the input checks.

`INTERPRET` is read once, when this module is imported: `triton.jit` decides between a compiled
and an interpreted kernel at decoration time, so the kernel modules (which import this one
first) and this flag always agree. Tests that want the interpreter set `TRITON_INTERPRET=1`
*before* importing any `tokenfleet.kernels` module that defines kernels.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import triton

INTERPRET: bool = bool(triton.knobs.runtime.interpret)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelInputError(ValueError):
    """A kernel was called with inputs it does not support (shape, dtype, layout or device)."""


def check_device(*tensors: torch.Tensor) -> None:
    """All tensors on one device, and that device can run Triton (CUDA, or CPU when interpreted)."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise KernelInputError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cuda":
        return
    if device.type == "cpu" and INTERPRET:
        return
    raise KernelInputError(
        f"tensors are on {device}; Triton kernels need a CUDA device "
        "(or TRITON_INTERPRET=1 for CPU tensors, for tests only)"
    )


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if t.dtype == torch.bfloat16 and INTERPRET:
        # The interpreter computes bf16 with the wrong numpy type and returns garbage silently
        # (triton#4972, #11584); refuse rather than return wrong numbers.
        raise KernelInputError("bfloat16 is not supported under TRITON_INTERPRET (wrong results); use a GPU")


def check_same_dtype(names: Iterable[str], tensors: Iterable[torch.Tensor]) -> None:
    pairs = list(zip(names, tensors, strict=True))
    first_name, first = pairs[0]
    for name, t in pairs[1:]:
        if t.dtype != first.dtype:
            raise KernelInputError(f"{name} ({t.dtype}) must have the dtype of {first_name} ({first.dtype})")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise KernelInputError(f"{name} must be contiguous (call .contiguous() first)")


def check_ndim(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise KernelInputError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
