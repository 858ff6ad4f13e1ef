"""Weight-only GEMM: y[M, N] = x[M, K] @ dequant(W)[N, K]^T, W in int8 (W8A16) or packed int4 (W4A16).

Weights use the `QuantizedWeight` layout (kernels/quant.py): W [N, K] packed along K, group-wise
scales and optional zero points. Decode (small M) is memory-bound: the win is reading 4-bit
weights instead of 16-bit ones, so every step is about moving fewer bytes, or the same bytes
with more of the GPU busy.

W4A16 steps, each a separate function:

0. `dequant_matmul` — a Triton kernel writes the dequantised fp16 weight, then torch.matmul:
                      the weight crosses HBM three times (int4 read, fp16 write, fp16 read).
1. `fused_naive`    — dequantise inside the GEMM tile loop (tl.dot), one small fixed tile;
                      every element gathers its own int32 word and its own scale.
2. `fused_tuned`    — load each packed word once and expand it in registers; one scale/zero row
                      per K block when the group is a multiple of BLOCK_K; tiles, warps and
                      pipeline stages picked by M.
3. `splitk`         — for small M the N tiles alone leave most SMs idle: split K over programs,
                      fp32 partial sums reduced afterwards.
4. `autotuned`      — `triton.autotune` over tiles, warps, stages and split-K, keyed on the
                      power-of-two bucket of M (not M itself: decode batch sizes change every
                      step) and N, K, group size.

After the steps, decode has its own kernel (kernels/gemv.py, over a repacked layout) and
`weight_only_gemm` dispatches: the GEMV for M <= 16, this GEMM (reading the same repacked
words, `PLANAR_W`) above.
"""

from __future__ import annotations

from collections.abc import Callable
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
from tokenfleet.kernels.gemv import GemvWeight, gemv, supports
from tokenfleet.kernels.quant import QuantizedWeight

WeightOnlyGemm = Callable[[torch.Tensor, QuantizedWeight], torch.Tensor]
MAX_SPLIT_K = 4
SPLIT_K_MAX_M = 64  # beyond this the M x N tiles fill the GPU on their own


def _check_gemm_inputs(
    x: torch.Tensor, qw: QuantizedWeight | GemvWeight, bits: int | None = None
) -> tuple[int, int, int]:
    check_device(x, qw.qweight, qw.scales)
    check_float_dtype("x", x)
    check_contiguous("x", x)
    if bits is not None and qw.bits != bits:
        raise KernelInputError(f"this GEMM takes {bits}-bit weights, got {qw.bits}-bit")
    if x.dim() != 2:
        raise KernelInputError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    n, k = qw.shape
    if x.shape[1] != k:
        raise KernelInputError(f"x has K={x.shape[1]} but the weight has K={k}")
    if qw.scales.dtype != x.dtype:
        raise KernelInputError(f"scales ({qw.scales.dtype}) must have x's dtype ({x.dtype})")
    check_contiguous("qweight", qw.qweight)
    check_contiguous("scales", qw.scales)
    if qw.zeros is not None:
        check_device(x, qw.zeros)
        check_contiguous("zeros", qw.zeros)
    return x.shape[0], n, k


# --- step 0: dequantise, then torch.matmul -------------------------------------------------------


@triton.jit
def _dequant_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    s_ptr,
    z_ptr,
    w_ptr,
    N,
    K,
    group_size,
    HAS_ZP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    packed = tl.load(q_ptr + offs_n[:, None] * (K // 8) + offs_k[None, :] // 8, mask=mask, other=0)
    q = ((packed >> ((offs_k[None, :] % 8) * 4)) & 0xF) - 8
    groups = K // group_size
    g = offs_n[:, None] * groups + offs_k[None, :] // group_size
    s = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZP:
        q = q - tl.load(z_ptr + g, mask=mask, other=0).to(tl.int32)
    tl.store(
        w_ptr + offs_n[:, None] * K + offs_k[None, :],
        (q.to(tl.float32) * s).to(w_ptr.dtype.element_ty),
        mask=mask,
    )


def dequantize_triton(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit weight dequantised to a dense [N, K] tensor by a Triton kernel."""
    n, k = qw.shape
    w = torch.empty((n, k), dtype=dtype, device=qw.qweight.device)
    zeros = qw.zeros if qw.zeros is not None else qw.scales
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 64))
    _dequant_kernel[grid](
        qw.qweight,
        qw.scales,
        zeros,
        w,
        n,
        k,
        qw.group_size,
        HAS_ZP=qw.zeros is not None,
        BLOCK_N=32,
        BLOCK_K=64,
    )
    return w


def w4a16_dequant_matmul(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """Step 0: unfused."""
    _check_gemm_inputs(x, qw, bits=4)
    return x @ dequantize_triton(qw, x.dtype).t()


# --- step 1: fused, naive ------------------------------------------------------------------------


@triton.jit
def _w4a16_naive_kernel(  # type: ignore[no-untyped-def]
    x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, group_size,
    HAS_ZP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    groups = K // group_size
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            x_ptr + offs_m[:, None] * K + offs_k[None, :],
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        )
        mask_w = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        packed = tl.load(q_ptr + offs_n[None, :] * (K // 8) + offs_k[:, None] // 8, mask=mask_w, other=0)
        q = ((packed >> ((offs_k[:, None] % 8) * 4)) & 0xF) - 8
        g = offs_n[None, :] * groups + offs_k[:, None] // group_size
        if HAS_ZP:
            q = q - tl.load(z_ptr + g, mask=mask_w, other=0).to(tl.int32)
        s = tl.load(s_ptr + g, mask=mask_w, other=0.0).to(tl.float32)
        acc = tl.dot(a, (q.to(tl.float32) * s).to(a.dtype), acc)
    mask_out = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_out)


def w4a16_fused_naive(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """Step 1: fused dequant + tl.dot, fixed 16x32x32 tile, default launch."""
    m, n, k = _check_gemm_inputs(x, qw, bits=4)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    zeros = qw.zeros if qw.zeros is not None else qw.scales
    grid = (triton.cdiv(m, 16), triton.cdiv(n, 32))
    _w4a16_naive_kernel[grid](
        x, qw.qweight, qw.scales, zeros, out, m, n, k, qw.group_size,
        HAS_ZP=qw.zeros is not None, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32,
    )  # fmt: skip
    return out


# --- steps 2-4 and W8A16: one kernel, launched with chosen or measured configs ---------------------


@triton.jit
def _wgemm_kernel(  # type: ignore[no-untyped-def]
    x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, part_ptr, M, N, K, group_size, m_bucket,
    BITS: tl.constexpr, HAS_ZP: tl.constexpr, GROUP_ALIGNED: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PLANAR_W: tl.constexpr,
):  # fmt: skip
    # Only core builtins here (tl.full, integer //), not triton.language's @jit helpers such as
    # tl.zeros/tl.cdiv: those are compiled-only objects when triton was imported before
    # TRITON_INTERPRET was set, and the interpreter cannot call them.
    # m_bucket is only an autotuning key. Programs sharing a weight tile are adjacent (pid_m
    # fastest) so the tile is served from L2 for every M block.
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_n = pid // num_m
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    groups = K // group_size
    k_per_split = (K + SPLIT_K * BLOCK_K - 1) // (SPLIT_K * BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            x_ptr + offs_m[:, None] * K + offs_k[None, :],
            mask=(offs_m[:, None] < M) & mask_k[None, :],
            other=0.0,
        )
        mask_w = mask_k[:, None] & mask_n[None, :]
        if PLANAR_W > 0:
            # The GEMV layout (kernels/gemv.py): the K block lies inside one chunk and covers whole
            # slices of PLANAR_W words, so load the chunk's words once and repeat them per slice.
            chunk_k = (32 // BITS) * PLANAR_W
            offs_pw = tl.arange(0, PLANAR_W)
            words = tl.load(
                q_ptr + offs_n[None, :] * (K // (32 // BITS)) + (k0 // chunk_k) * PLANAR_W + offs_pw[:, None],
                mask=mask_n[None, :],
                other=0,
            )
            words = tl.reshape(
                tl.broadcast_to(words[None, :, :], (BLOCK_K // PLANAR_W, PLANAR_W, BLOCK_N)),
                (BLOCK_K, BLOCK_N),
            )
            shifts = ((k0 % chunk_k + tl.arange(0, BLOCK_K)) // PLANAR_W) * BITS
            q = ((words >> shifts[:, None]) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
        elif BITS == 4:
            # One load per packed word, [BLOCK_K/8, BLOCK_N], then each word repeated for its 8
            # nibbles: 8x fewer memory instructions than gathering per element.
            offs_kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            words = tl.load(
                q_ptr + offs_n[None, :] * (K // 8) + offs_kw[:, None],
                mask=(offs_kw[:, None] < K // 8) & mask_n[None, :],
                other=0,
            )
            words = tl.reshape(
                tl.broadcast_to(words[:, None, :], (BLOCK_K // 8, 8, BLOCK_N)), (BLOCK_K, BLOCK_N)
            )
            q = ((words >> ((tl.arange(0, BLOCK_K) % 8) * 4)[:, None]) & 0xF) - 8
        else:
            q = tl.load(q_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask_w, other=0).to(tl.int32)
        if GROUP_ALIGNED:
            # The whole K block is one group: one [BLOCK_N] row of scales (and zeros).
            g = offs_n * groups + k0 // group_size
            s = tl.load(s_ptr + g, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if HAS_ZP:
                q = q - tl.load(z_ptr + g, mask=mask_n, other=0).to(tl.int32)[None, :]
        else:
            g2 = offs_n[None, :] * groups + offs_k[:, None] // group_size
            s = tl.load(s_ptr + g2, mask=mask_w, other=0.0).to(tl.float32)
            if HAS_ZP:
                q = q - tl.load(z_ptr + g2, mask=mask_w, other=0).to(tl.int32)
        acc = tl.dot(a, (q.to(tl.float32) * s).to(a.dtype), acc)
    mask_out = (offs_m[:, None] < M) & mask_n[None, :]
    offs_out = offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_out, acc.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        tl.store(part_ptr + pid_k * M * N + offs_out, acc, mask=mask_out)


def _group_aligned(group_size: int, k: int, block_k: int) -> bool:
    return group_size % block_k == 0 or group_size == k


def _tile_for(m: int) -> dict[str, int]:
    # Decode: one 16-row M tile, wide K blocks to keep loads in flight. Prefill: square-ish tiles
    # for tensor-core reuse.
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    if m <= 64:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 4  # interpreter: any small number exercises the split path


def _launch_wgemm(x: torch.Tensor, qw: QuantizedWeight, tile: dict[str, int], split_k: int) -> torch.Tensor:
    m, n, k = x.shape[0], *qw.shape
    block_k = tile["BLOCK_K"]
    if qw.group_size < k:
        block_k = min(block_k, next_power_of_2(qw.group_size)) if qw.group_size >= 16 else block_k
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    part = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    zeros = qw.zeros if qw.zeros is not None else qw.scales
    grid = (triton.cdiv(m, tile["BLOCK_M"]) * triton.cdiv(n, tile["BLOCK_N"]), split_k)
    _wgemm_kernel[grid](
        x, qw.qweight, qw.scales, zeros, out, part, m, n, k, qw.group_size, next_power_of_2(m),
        BITS=qw.bits, HAS_ZP=qw.zeros is not None, GROUP_ALIGNED=_group_aligned(qw.group_size, k, block_k),
        SPLIT_K=split_k, BLOCK_M=tile["BLOCK_M"], BLOCK_N=tile["BLOCK_N"], BLOCK_K=block_k, PLANAR_W=0,
        num_warps=tile["num_warps"], num_stages=tile["num_stages"],
    )  # fmt: skip
    if split_k > 1:
        out.copy_(part.sum(dim=0))
    return out


def w4a16_fused_tuned(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """Step 2: packed words loaded once, per-block scales, tiles chosen by M."""
    m, _, _ = _check_gemm_inputs(x, qw, bits=4)
    return _launch_wgemm(x, qw, _tile_for(m), split_k=1)


def _split_k_for(x: torch.Tensor, qw: QuantizedWeight, tile: dict[str, int]) -> int:
    m, (n, k) = x.shape[0], qw.shape
    if m > SPLIT_K_MAX_M:
        return 1
    tiles = triton.cdiv(m, tile["BLOCK_M"]) * triton.cdiv(n, tile["BLOCK_N"])
    want = triton.cdiv(2 * _sm_count(x.device), tiles)  # about two waves of programs
    most = max(1, k // tile["BLOCK_K"])
    return int(max(1, min(MAX_SPLIT_K, want, most)))


def w4a16_splitk(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """Step 3: step 2 plus split-K for small M."""
    m, _, _ = _check_gemm_inputs(x, qw, bits=4)
    tile = _tile_for(m)
    return _launch_wgemm(x, qw, tile, _split_k_for(x, qw, tile))


# --- step 4: autotuned ----------------------------------------------------------------------------


def _gemm_configs(interpret: bool = INTERPRET) -> list[triton.Config]:
    if interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}, num_warps=4)]
    configs = []
    # Small-M tiles also try split-K; prefill-sized tiles fill the GPU without it. Kept short:
    # every config is compiled and timed once per (M bucket, N, K, group), and the whole
    # benchmark must fit in 4 minutes.
    for bm, bn, bk, warps, stages in (
        (16, 64, 128, 4, 3),
        (16, 128, 128, 4, 3),
        (32, 64, 128, 4, 3),
        (64, 128, 64, 8, 3),
        (128, 128, 64, 8, 3),
    ):
        for split in (1, 2, 4) if bm <= 32 else (1,):
            configs.append(
                triton.Config(
                    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split},
                    num_warps=warps,
                    num_stages=stages,
                )
            )
    return configs


def _prune_configs(
    configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
) -> list[triton.Config]:
    # The autotuner passes positional arguments as named_args and keyword ones (BITS, PLANAR_W) apart.
    args = {**named_args, **kwargs}
    m_bucket, k, group = int(args["m_bucket"]), int(args["K"]), int(args["group_size"])
    kept = []
    for c in configs:
        bm, bk, split = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        if split > 1 and m_bucket > SPLIT_K_MAX_M:
            continue
        if bm > max(16, 2 * m_bucket) or (group < k and group % bk) or bk * split > k:
            continue
        if not _planar_block_ok(bk, int(args["PLANAR_W"]), int(args["BITS"])):
            continue
        kept.append(c)
    return kept or configs[:1]


def _planar_block_ok(block_k: int, width: int, bits: int) -> bool:
    """A K block over the GEMV layout must lie inside one chunk and cover whole slices."""
    chunk = (32 // bits) * width
    return width == 0 or (block_k % width == 0 and chunk % block_k == 0)


def planar_gemm_supported(gw: GemvWeight) -> bool:
    """Whether the GEMM (M > 16) can read this GEMV layout with some configuration."""
    return any(_planar_block_ok(c.kwargs["BLOCK_K"], gw.width, gw.bits) for c in _gemm_configs())


_wgemm_autotuned = triton.autotune(
    configs=_gemm_configs(),
    key=["m_bucket", "N", "K", "group_size", "BITS", "HAS_ZP", "PLANAR_W"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(
    triton.heuristics({"GROUP_ALIGNED": lambda a: _group_aligned(a["group_size"], a["K"], a["BLOCK_K"])})(
        _wgemm_kernel
    )
)


def _weight_only_autotuned(x: torch.Tensor, qw: QuantizedWeight | GemvWeight) -> torch.Tensor:
    m, n, k = x.shape[0], *qw.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # Sized for the largest split any config may pick; which one won is known only after the launch.
    splits = MAX_SPLIT_K if next_power_of_2(m) <= SPLIT_K_MAX_M else 1
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    zeros = qw.zeros if qw.zeros is not None else qw.scales

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    _wgemm_autotuned[grid](
        x, qw.qweight, qw.scales, zeros, out, part, m, n, k, qw.group_size, next_power_of_2(m),
        BITS=qw.bits, HAS_ZP=qw.zeros is not None, PLANAR_W=qw.width if isinstance(qw, GemvWeight) else 0,
    )  # fmt: skip
    split = int(_wgemm_autotuned.best_config.kwargs["SPLIT_K"])
    if split > 1:
        out.copy_(part[:split].sum(dim=0))
    return out


def w4a16_autotuned(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """Step 4: tiles, warps, stages and split-K measured per (M bucket, N, K, group)."""
    _check_gemm_inputs(x, qw, bits=4)
    return _weight_only_autotuned(x, qw)


def w8a16_gemm(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """int8 weights, group-wise or per-channel scales, optional zero points; autotuned."""
    _check_gemm_inputs(x, qw, bits=8)
    return _weight_only_autotuned(x, qw)


W4A16_STEPS: dict[str, WeightOnlyGemm] = {
    "0-dequant-matmul": w4a16_dequant_matmul,
    "1-fused-naive": w4a16_fused_naive,
    "2-fused-tuned": w4a16_fused_tuned,
    "3-splitk": w4a16_splitk,
    "4-autotuned": w4a16_autotuned,
}


# --- dispatch: the decode GEMV for small M, the tiled GEMM otherwise --------------------------------


def weight_only_gemm(x: torch.Tensor, w: QuantizedWeight | GemvWeight) -> torch.Tensor:
    """y = x @ dequant(W).T for int4 or int8 W. A weight repacked for the GEMV
    (`gemv.repack_for_gemv`) takes the GEMV for 1 <= M <= 16 and the autotuned GEMM (reading the
    same repacked words) above that; a `QuantizedWeight` always takes the GEMM."""
    _check_gemm_inputs(x, w)
    if isinstance(w, GemvWeight):
        if supports(x.shape[0], w):
            return gemv(x, w)
        if not planar_gemm_supported(w):
            raise KernelInputError(
                f"the GEMM cannot read this GEMV layout (width {w.width}, {w.bits}-bit) at M={x.shape[0]}"
            )
    return _weight_only_autotuned(x, w)


def w4a16_gemm(x: torch.Tensor, w: QuantizedWeight | GemvWeight) -> torch.Tensor:
    """The W4A16 entry the vLLM plugin uses (`weight_only_gemm` for 4-bit weights)."""
    _check_gemm_inputs(x, w, bits=4)
    return weight_only_gemm(x, w)
