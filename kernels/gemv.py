"""Decode GEMV for weight-only int4/int8: y[M, N] = x[M, K] @ dequant(W)[N, K]^T for M <= 16.

At decode the GEMM is a matrix-vector product: every weight is read once and used for 1-16
rows, so the kernel is a streaming reduction over K and everything is about moving packed
bytes with few instructions per element. Three choices make that cheap:

1. **A layout for the kernel** (`GemvWeight`, repacked once at load by `repack_for_gemv`):
   "planar" words. K is cut into chunks of P·W elements (P = 32 / bits values per int32 word,
   W words per row per chunk, W = 32 for Llama shapes). Within chunk c, word j of a row holds
   the elements k = c·P·W + i·W + j at bits `bits·i` (i = 0..P-1), unsigned (q + 2^(bits-1)):

       qweight[n, c·W + j]  =  Σ_i  (q[n, c·P·W + i·W + j] + 2^(bits-1)) << (bits·i)

   One shift-and-mask of a [BLOCK_N, W] word tile then gives a *contiguous* slice of W values
   of K (slice i), so the matching activations are one contiguous load, a slice never straddles
   a quantisation group (W divides the group), and no interleave/reshape is needed in registers.
   The tensor has the same shape and size as the compressed-tensors `pack-quantized` one
   ([N, K·bits/32] int32); only the order of fields inside each chunk differs.
2. **No int→float conversion instructions** on the M=1 path: a field f < 2^23 ORed into the
   mantissa of 2^23 (0x4B000000) reads as the float 2^23 + f, so one subtraction gives it
   exactly. Fields are masked in place (not shifted down); the power of two they carry is
   divided out of the activations instead, once per slice, not once per weight.
3. **Group scales applied once per group** (not per weight): the kernel sums (q − zero)·x over
   a group in fp32 and multiplies that partial sum by the group's scale.

Parallelism: programs tile N (BLOCK_N rows each) and split K (SPLIT_K ranges of chunks). Split
partials are reduced in the same launch: each program atomically adds its fp32 partial into a
workspace and takes a ticket; the last program of an N tile writes the output and zeroes the
workspace and ticket for the next call, so there is no memset and no second kernel.
M = 1 autotunes between elementwise FMAs and tensor-core tiles; 2 <= M <= 16 pads M to 16 and
uses tensor cores (tl.dot).

4. **int4 on the GPU: inline PTX** (`_I4_ASM`, constexpr `ASM`, chosen by `use_asm`: compiled
   CUDA, int4, fp16/bf16 activations). On the tensor-core tiles one PTX call turns two words into
   eight pairs of 16-bit floats: PRMT, SHR, then LOP3 `(t & 0x000F000F) | magic` puts two nibbles
   into the mantissas of 128.0 (bf16) / 1024.0 (fp16) and one packed FMA removes the magic and the
   bias 8 together. ~1.5 SASS instructions per weight for the conversion, ~3.0 for the whole K
   loop (sm_90a, `compile_check.py`) against 5.2 for the portable M = 1 FMA loop. The interpreter
   cannot run PTX, so it (and non-CUDA devices, fp32 activations, int8) takes the portable unpack
   above; the PTX path's numerics are checked on the GPU (the bench's max-error column) and, bit
   for bit, by a model of its PTX in tests/test_kernels_quant.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from tokenfleet.kernels._runtime import (
    INTERPRET,
    KernelInputError,
    check_contiguous,
    check_device,
    check_float_dtype,
    next_power_of_2,
)
from tokenfleet.kernels.quant import QuantizedWeight, unpack_int4

GEMV_MAX_M = 16
_MAGIC = 0x4B000000  # the bits of the float 2^23
DOT_MIN_WIDTH = 16  # tl.dot needs K >= 16 per slice


# --- layout ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GemvWeight:
    """A `QuantizedWeight` repacked into planar words (module docstring) for the GEMV kernel."""

    qweight: torch.Tensor  # int32 [N, K·bits/32]
    scales: torch.Tensor  # [N, K/G], activation dtype
    zeros: torch.Tensor | None  # int8 [N, K/G] signed zero points, or None (symmetric)
    bits: int
    group_size: int
    shape: tuple[int, int]  # (N, K)
    width: int  # W: words per row per chunk

    @property
    def chunk(self) -> int:
        return (32 // self.bits) * self.width

    def nbytes(self) -> int:
        total = self.qweight.numel() * 4 + self.scales.numel() * self.scales.element_size()
        return int(total + (self.zeros.numel() if self.zeros is not None else 0))


def gemv_width(k: int, group_size: int, bits: int) -> int | None:
    """The widest W (<= 32) whose chunk divides K and nests with the group, or None."""
    per_word = 32 // bits
    for width in (32, 16, 8, 4, 2, 1):
        chunk = per_word * width
        if k % chunk:
            continue
        if group_size % chunk == 0 or (chunk % group_size == 0 and group_size % width == 0):
            return width
    return None


def pack_planar(q: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """Signed int8 [N, K] -> planar int32 [N, K·bits/32] (module docstring)."""
    n, k = q.shape
    per_word = 32 // bits
    if k % (per_word * width):
        raise KernelInputError(f"K={k} is not a multiple of the chunk {per_word * width}")
    unsigned = (q.to(torch.int32) + (1 << (bits - 1))).view(n, k // (per_word * width), per_word, width)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=q.device).view(1, 1, per_word, 1)
    # Disjoint bit fields: the sum is an OR; int32 wraps for the top field as the C layout does.
    return (unsigned << shifts).sum(dim=2, dtype=torch.int32).reshape(n, k // per_word)


def unpack_planar(packed: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """Planar int32 [N, K·bits/32] -> signed int8 [N, K]."""
    n, words = packed.shape
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device).view(1, 1, per_word, 1)
    fields = (packed.view(n, words // width, 1, width) >> shifts) & ((1 << bits) - 1)
    return (fields - (1 << (bits - 1))).to(torch.int8).reshape(n, words * per_word)


def repack_for_gemv(qw: QuantizedWeight) -> GemvWeight:
    """Offline repack of a `QuantizedWeight` (compressed-tensors order) into the GEMV layout."""
    k = qw.shape[1]
    width = gemv_width(k, qw.group_size, qw.bits)
    if width is None:
        raise KernelInputError(
            f"no GEMV layout for K={k}, group {qw.group_size}, {qw.bits}-bit: "
            f"K must be a multiple of {32 // qw.bits} and the group must nest with the chunk"
        )
    q = unpack_int4(qw.qweight) if qw.bits == 4 else qw.qweight
    packed = pack_planar(q, qw.bits, width)
    return GemvWeight(packed, qw.scales, qw.zeros, qw.bits, qw.group_size, qw.shape, width)


def unpack_gemv(gw: GemvWeight) -> QuantizedWeight:
    """The inverse of `repack_for_gemv` (tests, and reading a repacked weight back)."""
    from tokenfleet.kernels.quant import pack_int4

    q = unpack_planar(gw.qweight, gw.bits, gw.width)
    qweight = pack_int4(q) if gw.bits == 4 else q
    return QuantizedWeight(qweight, gw.scales, gw.zeros, gw.bits, gw.group_size, gw.shape)


# --- kernel ------------------------------------------------------------------------------------


@triton.jit
def _add(a, b):  # type: ignore[no-untyped-def]
    # tl.sum spelled with tl.reduce: see kernels/rmsnorm.py (interpreter and compiled helpers).
    return a + b


# int4 -> 16-bit floats in PTX (the Marlin/FasterTransformer magic-number conversion), for the
# tensor-core path on CUDA. One call takes two neighbouring words a, b of a thread (pack=2: the
# same row, consecutive j) and returns, for each nibble position i = 0..7, one 32-bit register
# holding the pair (field i of a, field i of b) as two 16-bit floats: consecutive K of slice i,
# already in the order a dot operand packs them. Per 16 weights: 2 PRMT (low halves of a and b
# into one word, high halves into another), 6 SHR, 8 LOP3 ((t & 0x000F000F) | magic: the nibble
# into the mantissa of 128.0 (bf16) / 1024.0 (fp16), giving 128 + u exactly) and 8 packed FMAs
# (x·1 − (magic + 8)) that remove the magic and the 2^(bits−1) bias together: (q) exactly.
_I4_ASM = """{
.reg .b32 lo, hi, t, one, neg;
mov.b32 one, ONE;
mov.b32 neg, NEG;
prmt.b32 lo, $8, $9, 0x5410;
prmt.b32 hi, $8, $9, 0x7632;
lop3.b32 $0, lo, 0x000f000f, MAGIC, 0xea;
shr.u32 t, lo, 4;
lop3.b32 $1, t, 0x000f000f, MAGIC, 0xea;
shr.u32 t, lo, 8;
lop3.b32 $2, t, 0x000f000f, MAGIC, 0xea;
shr.u32 t, lo, 12;
lop3.b32 $3, t, 0x000f000f, MAGIC, 0xea;
lop3.b32 $4, hi, 0x000f000f, MAGIC, 0xea;
shr.u32 t, hi, 4;
lop3.b32 $5, t, 0x000f000f, MAGIC, 0xea;
shr.u32 t, hi, 8;
lop3.b32 $6, t, 0x000f000f, MAGIC, 0xea;
shr.u32 t, hi, 12;
lop3.b32 $7, t, 0x000f000f, MAGIC, 0xea;
fma.rn.TY $0, $0, one, neg;
fma.rn.TY $1, $1, one, neg;
fma.rn.TY $2, $2, one, neg;
fma.rn.TY $3, $3, one, neg;
fma.rn.TY $4, $4, one, neg;
fma.rn.TY $5, $5, one, neg;
fma.rn.TY $6, $6, one, neg;
fma.rn.TY $7, $7, one, neg;
}"""
# (type, magic = 128.0 / 1024.0, one, −(magic + 8)) per activation dtype, as 16-bit pairs.
_I4_ASM_BF16 = tl.constexpr(
    _I4_ASM.replace("TY", "bf16x2").replace("MAGIC", "0x43004300").replace("ONE", "0x3f803f80")
    .replace("NEG", "0xc308c308")
)  # fmt: skip
_I4_ASM_FP16 = tl.constexpr(
    _I4_ASM.replace("TY", "f16x2").replace("MAGIC", "0x64006400").replace("ONE", "0x3c003c00")
    .replace("NEG", "0xe408e408")
)  # fmt: skip
_I4_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r,=r,=r,=r,=r,r,r")


@triton.jit
def _gemv_kernel(  # type: ignore[no-untyped-def]
    x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, words_per_row, m_bucket, magic,
    GROUP: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr, SLICES_PER_GROUP: tl.constexpr,
    HAS_ZP: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # words_per_row (= K·bits/32) is an argument, not computed here: Triton then knows its
    # divisibility (by 16 when it is) and can load each thread's words as one 16-byte vector.
    # GROUP is a compile-time constant so that the per-slice group index is a shift, not an
    # integer division. m_bucket is only an autotuning key. magic is 0x4B000000 (the bits of
    # 2^23) passed at run time: in a register, mask-and-OR compiles to one LOP3 instead of two.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = tl.arange(0, W)
    groups = K // GROUP
    chunks = K // ((32 // BITS) * W)
    per_split = (chunks + SPLIT_K - 1) // SPLIT_K
    c_begin = pid_k * per_split
    c_end = tl.minimum(c_begin + per_split, chunks)
    offs_m = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:
        acc = tl.full((BLOCK_N, W), 0.0, dtype=tl.float32)
        acc_g = tl.full((BLOCK_N, W), 0.0, dtype=tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    q_rows = q_ptr + offs_n[:, None] * words_per_row + offs_w[None, :]
    # STAGES: how many chunks the loop prefetches (software pipelining through shared memory).
    for c in tl.range(c_begin, c_end, num_stages=STAGES):
        k_chunk = c * (32 // BITS) * W
        words = tl.load(q_rows + c * W, mask=mask_n[:, None], other=0)
        # Fields 0..P/2-1 are masked in place from the low half; the high half is shifted down
        # once per word so that no field reaches bit 23 (the exponent of the 2^23 trick).
        high = words >> 16
        # ASM (int4, 16-bit activations, tensor-core tiles, CUDA only): every field of the
        # chunk's words becomes an exact 16-bit float (q) in one inline-PTX call (_I4_ASM).
        if ASM and BLOCK_M > 1:
            if x_ptr.dtype.element_ty == tl.bfloat16:
                qs = tl.inline_asm_elementwise(
                    _I4_ASM_BF16, _I4_CONSTRAINTS, [words], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2
                )
            else:
                qs = tl.inline_asm_elementwise(
                    _I4_ASM_FP16, _I4_CONSTRAINTS, [words], dtype=(tl.float16,) * 8, is_pure=True, pack=2
                )
        for i in tl.static_range(32 // BITS):
            k_slice = k_chunk + i * W
            g = k_slice // GROUP
            # offset: the stored unsigned field of q = zero (the bias 2^(bits-1) plus the zero point).
            if HAS_ZP:
                zero = tl.load(z_ptr + offs_n * groups + g, mask=mask_n, other=0).to(tl.int32)
                offset = zero + (1 << (BITS - 1))
            else:
                offset = tl.full((BLOCK_N,), (1 << (BITS - 1)), dtype=tl.int32)
            src = words if i < 16 // BITS else high
            shift = BITS * (i % (16 // BITS))
            field = (src & (((1 << BITS) - 1) << shift)) | magic
            # (2^23 + u·2^shift) − (2^23 + offset·2^shift) = (q − zero)·2^shift, exactly.
            d = field.to(tl.float32, bitcast=True) - (8388608.0 + (offset << shift).to(tl.float32))[:, None]
            if BLOCK_M == 1:
                xv = tl.load(x_ptr + k_slice + offs_w).to(tl.float32) * (1.0 / (1 << shift))
                acc_g += d * xv[None, :]
            else:
                # Exact small integers in the activation dtype (|q − zero| < 2^bits) for tl.dot.
                if ASM:
                    d = qs[i]
                    if HAS_ZP:
                        d = d - zero.to(x_ptr.dtype.element_ty)[:, None]
                else:
                    d = (d * (1.0 / (1 << shift))).to(x_ptr.dtype.element_ty)
                xv = tl.load(
                    x_ptr + offs_m[:, None] * K + k_slice + offs_w[None, :],
                    mask=offs_m[:, None] < M,
                    other=0.0,
                )
                acc_g = tl.dot(xv, tl.trans(d), acc_g)
            if (i + 1) % SLICES_PER_GROUP == 0:
                s = tl.load(s_ptr + offs_n * groups + g, mask=mask_n, other=0.0).to(tl.float32)
                if BLOCK_M == 1:
                    acc += acc_g * s[:, None]
                    acc_g = tl.full((BLOCK_N, W), 0.0, dtype=tl.float32)
                else:
                    acc += acc_g * s[None, :]
                    acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    if BLOCK_M == 1:
        y = tl.reduce(acc, 1, _add)
        offs_out = offs_n
        mask_out = mask_n
    else:
        y = acc
        offs_out = offs_m[:, None] * N + offs_n[None, :]
        mask_out = (offs_m[:, None] < M) & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_out, y.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        tl.atomic_add(ws_ptr + offs_out, y, mask=mask_out, sem="relaxed")
        # Every thread's partial is in before one thread takes the ticket (release, GPU scope).
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + pid_n, 1)
        if ticket == SPLIT_K - 1:
            # An L2-only load (.cg, not L1) sees the other programs' adds, which land in L2.
            total = tl.load(ws_ptr + offs_out, mask=mask_out, other=0.0, cache_modifier=".cg")
            tl.store(ws_ptr + offs_out, y * 0.0, mask=mask_out)
            tl.store(out_ptr + offs_out, total.to(out_ptr.dtype.element_ty), mask=mask_out)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


# Elementwise-FMA tiles (BLOCK_M = 1, M = 1 only) and tensor-core tiles (BLOCK_M = 16, M padded
# to 16), told apart in pruning: M = 1 tries the FMA tiles and a few tensor-core ones (which
# int4 needs: with the PTX dequantisation a word costs ~1.5 instructions per weight there,
# against ~5 on the FMA path); 2 <= M <= 16 tries the tensor-core tiles.
# Kept short: each is compiled once and timed once per (M bucket, N, K, group, bits, dtype).
# (BLOCK_N, SPLIT_K, warps, stages). Wide tiles give each thread several 16-byte loads at once,
# split-K multiplies the programs and the stages prefetch chunks (cp.async into shared memory):
# HBM needs tens of KB in flight per SM.
_FMA_TILES = ((16, 4, 4, 4), (32, 2, 4, 3), (32, 4, 4, 4), (64, 1, 4, 4), (64, 2, 4, 3), (64, 4, 4, 3),
              (64, 8, 4, 3), (128, 4, 8, 3))  # fmt: skip
_DOT_TILES = ((32, 2, 4, 3), (32, 4, 4, 3), (64, 1, 4, 4), (64, 2, 4, 3), (64, 4, 4, 3), (64, 8, 4, 3),
              (128, 4, 8, 3), (64, 16, 4, 2), (128, 8, 8, 3))  # fmt: skip
# The tensor-core tiles M = 1 also tries (many programs: 4096x4096 has only 64 N tiles of 64).
_DOT_M1_TILES = ((32, 4, 4, 3), (64, 4, 4, 3), (64, 8, 4, 3), (64, 16, 4, 2), (128, 8, 8, 3))


def _config(bm: int, bn: int, split: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": split, "STAGES": stages}, num_warps=warps, num_stages=stages
    )


_FMA_CONFIGS = [_config(1, *t) for t in _FMA_TILES]
_DOT_CONFIGS = [_config(16, *t) for t in _DOT_TILES]
_DOT_M1_CONFIGS = [c for c, t in zip(_DOT_CONFIGS, _DOT_TILES, strict=True) if t in _DOT_M1_TILES]


def _gemv_configs() -> list[triton.Config]:
    if INTERPRET:
        return [_config(1, 16, 2, 4, 1), _config(16, 16, 2, 4, 1)]
    return _FMA_CONFIGS + _DOT_CONFIGS


def _m1_pool(w: int) -> list[triton.Config]:
    """The configs M = 1 may take: the FMA tiles, and tensor-core ones when a slice is >= 16 wide."""
    return _FMA_CONFIGS + (_DOT_M1_CONFIGS if w >= DOT_MIN_WIDTH else [])


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    # The autotuner passes positional arguments as named_args and keyword ones (BITS, W) apart.
    args = {**named_args, **kwargs}
    dot = int(args["m_bucket"]) > 1
    chunks = int(args["K"]) // ((32 // int(args["BITS"])) * int(args["W"]))
    pool = _DOT_CONFIGS if dot else _m1_pool(int(args["W"]))
    kept = [c for c in configs if any(c is p for p in pool) and c.kwargs["SPLIT_K"] <= max(1, chunks)]
    # The interpreter's two configs are in no pool: M = 1 takes the FMA one, M > 1 the other.
    return kept or [c for c in configs if (c.kwargs["BLOCK_M"] > 1) == dot][:1]


def _bench_quick(fn: Any, quantiles: Any = None) -> Any:
    # Short timing per config: autotuning every shape must stay within the benchmark's budget.
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


_gemv_autotuned = triton.autotune(
    configs=_gemv_configs(),
    key=["m_bucket", "N", "K", "GROUP", "BITS", "W", "HAS_ZP", "ASM"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=None if INTERPRET else _bench_quick,
)(_gemv_kernel)


# The split-K workspace and tickets: zero between calls (the last program of a tile resets
# them), so they are allocated once per (device, N).
_WORKSPACES: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device, n)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (
            torch.zeros(GEMV_MAX_M * n, dtype=torch.float32, device=device),
            torch.zeros(triton.cdiv(n, 16), dtype=torch.int32, device=device),
        )
    return _WORKSPACES[key]


def use_asm(x: torch.Tensor, gw: GemvWeight) -> bool:
    """Whether the launch takes the inline-PTX int4 dequantisation (`_I4_ASM`) on its tensor-core
    tiles: compiled CUDA (not the interpreter, which cannot run PTX, and not ROCm), int4 and fp16
    or bf16 activations. Otherwise every path uses the portable shift/mask/2^23 unpack."""
    return (
        not INTERPRET
        and x.is_cuda
        and torch.version.hip is None
        and gw.bits == 4
        and x.dtype in (torch.float16, torch.bfloat16)
    )


def supports(m: int, gw: GemvWeight) -> bool:
    """Whether `gemv` takes this batch size for this weight."""
    return 1 <= m <= GEMV_MAX_M and (m == 1 or gw.width >= DOT_MIN_WIDTH)


def gemv(x: torch.Tensor, gw: GemvWeight) -> torch.Tensor:
    """y = x @ dequant(W).T for 1 <= M <= 16, W in the GEMV layout; int4 or int8."""
    check_device(x, gw.qweight, gw.scales)
    check_float_dtype("x", x)
    check_contiguous("x", x)
    check_contiguous("qweight", gw.qweight)
    check_contiguous("scales", gw.scales)
    if x.dim() != 2:
        raise KernelInputError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    m, (n, k) = x.shape[0], gw.shape
    if x.shape[1] != k:
        raise KernelInputError(f"x has K={x.shape[1]} but the weight has K={k}")
    if gw.scales.dtype != x.dtype:
        raise KernelInputError(f"scales ({gw.scales.dtype}) must have x's dtype ({x.dtype})")
    if not 1 <= m <= GEMV_MAX_M:
        raise KernelInputError(f"the GEMV takes 1 <= M <= {GEMV_MAX_M} rows, got M={m} (use the GEMM)")
    if not supports(m, gw):
        raise KernelInputError(
            f"M={m} > 1 needs a layout width >= {DOT_MIN_WIDTH}, this weight has {gw.width}"
        )
    if gw.zeros is not None:
        check_device(x, gw.zeros)
        check_contiguous("zeros", gw.zeros)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws, tickets = _workspace(x.device, n)
    zeros = gw.zeros if gw.zeros is not None else gw.scales
    slices_per_group = min(gw.group_size, gw.chunk) // gw.width

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    _gemv_autotuned[grid](
        x, gw.qweight, gw.scales, zeros, out, ws, tickets, m, n, k, gw.qweight.shape[1], next_power_of_2(m),
        _MAGIC,
        GROUP=gw.group_size, BITS=gw.bits, W=gw.width, SLICES_PER_GROUP=slices_per_group,
        HAS_ZP=gw.zeros is not None, ASM=use_asm(x, gw),
    )  # fmt: skip
    return out
