"""Weight-only quantized linear weights: the layout the GEMM kernels read, packing, conversion.

Layout (`QuantizedWeight`, weight W of shape [N, K] = [out_features, in_features], as in
`torch.nn.Linear`):

- `bits == 4`: `qweight` int32 [N, K/8]. Eight 4-bit values along the *input* dimension per
  int32, element k at bits 4·(k mod 8), low bits first, each stored unsigned as q + 8 where
  q ∈ [-8, 7] is the signed quantized value. This is exactly compressed-tensors'
  `pack-quantized` `weight_packed` (pack_to_int32, packed_dim=1), so a checkpoint's tensor is
  used as is. K must be a multiple of 8 (no padding nibbles).
- `bits == 8`: `qweight` int8 [N, K], signed q (compressed-tensors packs 8-bit values four per
  int32; `from_compressed_tensors` unpacks them once at load).
- `scales` [N, K/group_size] in the activation dtype; per-channel is group_size == K.
- `zeros` int8 [N, K/group_size], signed zero points (asymmetric), or None (symmetric).
  compressed-tensors packs zero points along the *output* dimension ([N/8, groups] int32 for
  4-bit); they are unpacked at load because they are tiny next to the weight.

Dequantisation: W[n, k] = (q[n, k] − zero[n, k / G]) · scale[n, k / G].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tokenfleet.kernels._runtime import KernelInputError


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]  # (N, K)

    def __post_init__(self) -> None:
        n, k = self.shape
        if self.bits not in (4, 8):
            raise KernelInputError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size <= 0 or k % self.group_size:
            raise KernelInputError(f"group_size {self.group_size} must divide K={k}")
        expected_q = (n, k // 8) if self.bits == 4 else (n, k)
        expected_dtype = torch.int32 if self.bits == 4 else torch.int8
        if self.bits == 4 and k % 8:
            raise KernelInputError(f"4-bit weights need K % 8 == 0 (8 values per int32), got K={k}")
        if tuple(self.qweight.shape) != expected_q or self.qweight.dtype != expected_dtype:
            raise KernelInputError(
                f"qweight must be {expected_dtype} {expected_q}, "
                f"got {self.qweight.dtype} {tuple(self.qweight.shape)}"
            )
        groups = (n, k // self.group_size)
        if tuple(self.scales.shape) != groups:
            raise KernelInputError(f"scales must have shape {groups}, got {tuple(self.scales.shape)}")
        if self.zeros is not None and (tuple(self.zeros.shape) != groups or self.zeros.dtype != torch.int8):
            raise KernelInputError(
                f"zeros must be int8 {groups}, got {self.zeros.dtype} {tuple(self.zeros.shape)}"
            )

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def nbytes(self) -> int:
        """Bytes a GEMM must read for the weight (values, scales, zero points)."""
        total = self.qweight.numel() * self.qweight.element_size()
        total += self.scales.numel() * self.scales.element_size()
        return int(total + (self.zeros.numel() if self.zeros is not None else 0))

    def to(self, device: torch.device | str) -> QuantizedWeight:
        zeros = self.zeros.to(device) if self.zeros is not None else None
        return QuantizedWeight(
            self.qweight.to(device), self.scales.to(device), zeros, self.bits, self.group_size, self.shape
        )


# --- int4 packing (compressed-tensors' pack_to_int32 along dim 1) -------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed int8 [N, K] values in [-8, 7] -> int32 [N, K/8], 8 nibbles along K, low first."""
    if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] % 8:
        raise KernelInputError(f"pack_int4 takes int8 [N, K] with K % 8 == 0, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise KernelInputError("pack_int4 values must be in [-8, 7]")
    unsigned = (q.to(torch.int32) + 8).view(q.shape[0], -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    # Sum of disjoint bit fields == OR; int32 wraps for the top nibble exactly as the C layout does.
    return (unsigned << shifts).sum(dim=2, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] -> signed int8 [N, K]."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise KernelInputError(f"unpack_int4 takes int32 [N, K/8], got {packed.dtype} {tuple(packed.shape)}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    return (nibbles - 8).to(torch.int8).reshape(packed.shape[0], -1)


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int) -> torch.Tensor:
    """compressed-tensors' unpack_from_int32: unsigned fields along `dim`, back to signed int8."""
    per_word = 32 // bits
    src = packed if dim == 1 else packed.t()
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    fields = (src.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    values = (fields - (1 << (bits - 1))).reshape(src.shape[0], src.shape[1] * per_word)[:, :length]
    out = values.to(torch.int8)
    return out if dim == 1 else out.t().contiguous()


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """compressed-tensors' pack_to_int32: signed int8 -> unsigned fields packed along `dim` (padded)."""
    per_word = 32 // bits
    src = values if dim == 1 else values.t()
    pad = (-src.shape[1]) % per_word
    unsigned = src.to(torch.int32) + (1 << (bits - 1))
    if pad:
        unsigned = torch.nn.functional.pad(unsigned, (0, pad))
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=values.device)
    packed = (unsigned.view(src.shape[0], -1, per_word) << shifts).sum(dim=2, dtype=torch.int32)
    return packed if dim == 1 else packed.t().contiguous()


# --- compressed-tensors `pack-quantized` ---------------------------------------------------------


def from_compressed_tensors(tensors: Mapping[str, torch.Tensor], num_bits: int) -> QuantizedWeight:
    """One Linear's tensors from a `pack-quantized` checkpoint (names without the module prefix:
    weight_packed, weight_scale, weight_shape, optional weight_zero_point)."""
    missing = {"weight_packed", "weight_scale", "weight_shape"} - tensors.keys()
    if missing:
        raise KernelInputError(f"compressed-tensors weight is missing {sorted(missing)}")
    n, k = (int(v) for v in tensors["weight_shape"].tolist())
    scales = tensors["weight_scale"]
    if scales.dim() != 2 or scales.shape[0] != n or k % scales.shape[1]:
        raise KernelInputError(f"weight_scale {tuple(scales.shape)} does not fit weight_shape ({n}, {k})")
    group_size = k // scales.shape[1]
    packed = tensors["weight_packed"]
    if num_bits == 4:
        if k % 8:
            raise KernelInputError(f"4-bit weights need in_features % 8 == 0, got {k}")
        qweight = packed.contiguous()
    elif num_bits == 8:
        qweight = unpack_int32(packed, 8, k, dim=1)
    else:
        raise KernelInputError(f"num_bits must be 4 or 8, got {num_bits}")
    zeros = None
    if "weight_zero_point" in tensors:
        zeros = unpack_int32(tensors["weight_zero_point"], num_bits, n, dim=0)
    return QuantizedWeight(qweight, scales.contiguous(), zeros, num_bits, group_size, (n, k))


def to_compressed_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The inverse of `from_compressed_tensors` (what compressed-tensors' compressor writes)."""
    n, k = qw.shape
    q = unpack_int4(qw.qweight) if qw.bits == 4 else qw.qweight
    out = {
        "weight_packed": pack_int32(q, qw.bits, dim=1),
        "weight_scale": qw.scales,
        "weight_shape": torch.tensor([n, k]),
    }
    if qw.zeros is not None:
        out["weight_zero_point"] = pack_int32(qw.zeros, qw.bits, dim=0)
    return out


# --- reference quantiser, dequantiser and GEMM ---------------------------------------------------


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True) -> QuantizedWeight:
    """Round-to-nearest group-wise quantisation of W [N, K] (for tests and the benchmark)."""
    n, k = w.shape
    if group_size <= 0 or k % group_size:
        raise KernelInputError(f"group_size {group_size} must divide K={k}")
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    groups = w.float().reshape(n, k // group_size, group_size)
    zeros = None
    if symmetric:
        scale = groups.abs().amax(dim=-1).clamp(min=1e-8) / qmax
        q = torch.round(groups / scale[..., None]).clamp(qmin, qmax)
    else:
        lo, hi = groups.amin(dim=-1).clamp(max=0), groups.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)
        zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
        q = (torch.round(groups / scale[..., None]) + zp[..., None]).clamp(qmin, qmax)
        zeros = zp.to(torch.int8)
    q8 = q.reshape(n, k).to(torch.int8)
    qweight = pack_int4(q8) if bits == 4 else q8
    return QuantizedWeight(qweight, scale.to(w.dtype), zeros, bits, group_size, (n, k))


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W [N, K] in fp32 (or `dtype`)."""
    n, k = qw.shape
    q = (unpack_int4(qw.qweight) if qw.bits == 4 else qw.qweight).float()
    groups = q.reshape(n, k // qw.group_size, qw.group_size)
    if qw.zeros is not None:
        groups = groups - qw.zeros.float()[..., None]
    w = (groups * qw.scales.float()[..., None]).reshape(n, k)
    return w if dtype is None else w.to(dtype)


def weight_only_gemm_reference(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """y = x @ dequantize(W).T, accumulated in fp32, returned in x's dtype."""
    return (x.float() @ dequantize(qw).t()).to(x.dtype)
