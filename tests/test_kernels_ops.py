"""Every Triton kernel (and every optimisation step) against its torch reference, on CPU under
TRITON_INTERPRET, plus the documented input errors. bf16 is checked only on a GPU (the bench).

`triton.jit` chooses interpreter or compiler when a kernel module is imported, so the fixture
sets TRITON_INTERPRET, imports fresh copies of the kernel modules, and on teardown restores the
environment and the module objects that were there before: nothing leaks into other test
modules or the vLLM servers they start.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from types import ModuleType, SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.timeout(120)

MODULES = ("_runtime", "quant", "rmsnorm", "activation", "gemv", "wgemm")
PREFIX = "tokenfleet.kernels."


def _swap_modules(modules: dict[str, ModuleType]) -> None:
    """Make `modules` the only tokenfleet.kernels.* entries, in sys.modules and on the package."""
    import tokenfleet.kernels as package

    for name in [n for n in sys.modules if n.startswith(PREFIX)]:
        del sys.modules[name]
        if hasattr(package, name.removeprefix(PREFIX)):
            delattr(package, name.removeprefix(PREFIX))
    for name, module in modules.items():
        sys.modules[name] = module
        setattr(package, name.removeprefix(PREFIX), module)


@pytest.fixture(scope="module")
def k() -> Iterator[SimpleNamespace]:
    # Other test modules keep the compiled-mode modules they imported: put them back afterwards.
    saved_env = os.environ.get("TRITON_INTERPRET")
    saved = {n: m for n, m in sys.modules.items() if n.startswith(PREFIX)}
    os.environ["TRITON_INTERPRET"] = "1"
    _swap_modules({})
    try:
        mods = {m.lstrip("_"): importlib.import_module(f"{PREFIX}{m}") for m in MODULES}
        assert mods["runtime"].INTERPRET
        yield SimpleNamespace(**mods)
    finally:
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        _swap_modules(saved)


DTYPES = [torch.float32, torch.float16]
# vLLM's tolerances (vllm/ir/tolerances.py; fp16 relaxed for norms in ir/ops/layernorm.py).
NORM_TOL = {torch.float32: {"atol": 1e-5, "rtol": 1.3e-6}, torch.float16: {"atol": 1e-2, "rtol": 2e-3}}
ACT_TOL = {torch.float32: {"atol": 1e-5, "rtol": 1.3e-6}, torch.float16: {"atol": 1e-3, "rtol": 1e-3}}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- fused add + RMSNorm -----------------------------------------------------------------------

# One row, odd sizes, hidden not a multiple of the block (100, 1000), a power of two, 3-D input.
NORM_SHAPES = [(1, 7), (3, 100), (4, 64), (2, 1000), (2, 3, 48)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_fused_add_rms_norm_steps_match_reference(
    k: SimpleNamespace, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    g = _gen(sum(shape))
    x0 = torch.randn(shape, generator=g).to(dtype)
    r0 = torch.randn(shape, generator=g).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    ref_out, ref_res = k.rmsnorm.fused_add_rms_norm_reference(x0, r0, w, 1e-6)
    assert set(k.rmsnorm.STEPS) == {"0-unfused", "1-fused", "2-vectorised", "3-tuned", "4-autotuned"}
    for name, step in k.rmsnorm.STEPS.items():
        x, res = x0.clone(), r0.clone()
        out, new_res = step(x, res, w, 1e-6)
        # In place, like vLLM's op: the returned tensors are the inputs.
        assert out.data_ptr() == x.data_ptr(), name
        assert new_res.data_ptr() == res.data_ptr(), name
        torch.testing.assert_close(new_res, ref_res, **NORM_TOL[dtype], msg=name)
        torch.testing.assert_close(out, ref_out, **NORM_TOL[dtype], msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(k: SimpleNamespace, dtype: torch.dtype) -> None:
    g = _gen(1)
    x, w = torch.randn(5, 300, generator=g).to(dtype), torch.randn(300, generator=g).to(dtype)
    before = x.clone()
    out = k.rmsnorm.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(out, k.rmsnorm.rms_norm_reference(x, w, 1e-5), **NORM_TOL[dtype])
    assert torch.equal(x, before), "rms_norm must not touch its input"


def test_fused_add_rms_norm_empty_batch(k: SimpleNamespace) -> None:
    x, r, w = torch.empty(0, 16), torch.empty(0, 16), torch.ones(16)
    out, res = k.rmsnorm.fused_add_rms_norm(x, r, w, 1e-6)
    assert out.shape == (0, 16)
    assert res.shape == (0, 16)


def test_norm_bad_inputs_raise(k: SimpleNamespace) -> None:
    err, f = k.runtime.KernelInputError, k.rmsnorm.fused_add_rms_norm
    x, r, w = torch.randn(2, 8), torch.randn(2, 8), torch.randn(8)
    cases = {
        "weight must have shape": (x, r, torch.randn(9)),
        "residual shape": (x, torch.randn(2, 4), w),
        "must have the dtype of x": (x, r.half(), w),
        "must be contiguous": (torch.randn(8, 2).t(), r, w),
        "float16, bfloat16 or float32": (x.int(), r.int(), w.int()),
        "bfloat16 is not supported under TRITON_INTERPRET": (x.bfloat16(), r.bfloat16(), w.bfloat16()),
        "one device": (x, r, w.to("meta")),
        "hidden size must be": (torch.randn(1, 70000), torch.randn(1, 70000), torch.randn(70000)),
    }
    for message, args in cases.items():
        with pytest.raises(err, match=message):
            f(*args, 1e-6)
    with pytest.raises(err, match="need a CUDA device"):
        k.rmsnorm.rms_norm(x.to("meta"), w.to("meta"), 1e-6)


# --- SiLU-and-mul --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 14), (3, 200), (2, 3000), (2, 2, 10)])
def test_silu_and_mul_matches_reference(
    k: SimpleNamespace, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    x = (torch.randn(shape, generator=_gen(shape[-1])) * 3).to(dtype)
    out = k.activation.silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(out, k.activation.silu_and_mul_reference(x), **ACT_TOL[dtype])
    given = torch.empty_like(out)
    assert k.activation.silu_and_mul(x, out=given) is given
    torch.testing.assert_close(given, out)


def test_silu_and_mul_bad_inputs_raise(k: SimpleNamespace) -> None:
    err = k.runtime.KernelInputError
    with pytest.raises(err, match="must be even"):
        k.activation.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(err, match="out must be"):
        k.activation.silu_and_mul(torch.randn(2, 8), out=torch.empty(2, 8))
    with pytest.raises(err, match="contiguous"):
        k.activation.silu_and_mul(torch.randn(8, 2).t())


# --- weight-only GEMM ----------------------------------------------------------------------------

# (M, N, K, group, symmetric): one row, M past one 16-row tile, N not a multiple of the tile,
# a group that is not a power of two (48 = per-channel), per-channel, asymmetric zero points.
GEMM_CASES = [
    (1, 40, 64, 32, True),
    (3, 24, 96, 32, False),
    (17, 64, 128, 128, True),
    (5, 72, 256, 64, False),
    (2, 48, 48, 48, True),
]


def _gemm_tol(ref: torch.Tensor, dtype: torch.dtype) -> dict[str, float]:
    scale = float(ref.abs().max())
    if dtype == torch.float32:
        return {"atol": 1e-5 * scale, "rtol": 1e-5}
    return {"atol": 5e-3 * scale, "rtol": 1e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "kk", "group", "symmetric"), GEMM_CASES)
def test_w4a16_steps_match_reference(
    k: SimpleNamespace, m: int, n: int, kk: int, group: int, symmetric: bool, dtype: torch.dtype
) -> None:
    g = _gen(m * n + kk)
    qw = k.quant.quantize_rtn(torch.randn(n, kk, generator=g).to(dtype), 4, group, symmetric)
    x = torch.randn(m, kk, generator=g).to(dtype)
    ref = k.quant.weight_only_gemm_reference(x, qw)
    assert list(k.wgemm.W4A16_STEPS) == [
        "0-dequant-matmul",
        "1-fused-naive",
        "2-fused-tuned",
        "3-splitk",
        "4-autotuned",
    ]
    for name, step in k.wgemm.W4A16_STEPS.items():
        y = step(x, qw)
        assert y.shape == (m, n), name
        assert y.dtype == dtype, name
        torch.testing.assert_close(y, ref, **_gemm_tol(ref, dtype), msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "kk", "group", "symmetric"), GEMM_CASES)
def test_w8a16_matches_reference(
    k: SimpleNamespace, m: int, n: int, kk: int, group: int, symmetric: bool, dtype: torch.dtype
) -> None:
    g = _gen(m + n + kk)
    qw = k.quant.quantize_rtn(torch.randn(n, kk, generator=g).to(dtype), 8, group, symmetric)
    x = torch.randn(m, kk, generator=g).to(dtype)
    ref = k.quant.weight_only_gemm_reference(x, qw)
    torch.testing.assert_close(k.wgemm.w8a16_gemm(x, qw), ref, **_gemm_tol(ref, dtype))


def test_split_k_is_used_for_small_m_only(k: SimpleNamespace) -> None:
    qw = k.quant.quantize_rtn(torch.randn(72, 256), 4, 64)
    tile = k.wgemm._tile_for(5)
    assert k.wgemm._split_k_for(torch.randn(5, 256), qw, tile) > 1
    assert k.wgemm._split_k_for(torch.randn(65, 256), qw, k.wgemm._tile_for(65)) == 1


def test_gemm_bad_inputs_raise(k: SimpleNamespace) -> None:
    err = k.runtime.KernelInputError
    q4 = k.quant.quantize_rtn(torch.randn(16, 64), 4, 32)
    q8 = k.quant.quantize_rtn(torch.randn(16, 64), 8, 32)
    with pytest.raises(err, match="K=32 but the weight has K=64"):
        k.wgemm.w4a16_gemm(torch.randn(2, 32), q4)
    with pytest.raises(err, match="scales"):
        k.wgemm.w4a16_gemm(torch.randn(2, 64).half(), q4)
    with pytest.raises(err, match="2-D"):
        k.wgemm.w4a16_gemm(torch.randn(1, 2, 64), q4)
    with pytest.raises(err, match="takes 4-bit weights"):
        k.wgemm.w4a16_gemm(torch.randn(2, 64), q8)
    with pytest.raises(err, match="takes 8-bit weights"):
        k.wgemm.w8a16_gemm(torch.randn(2, 64), q4)
    with pytest.raises(err, match="contiguous"):
        k.wgemm.w4a16_fused_naive(torch.randn(64, 2).t(), q4)


# --- decode GEMV (M <= 16) over the repacked layout, and the dispatch --------------------------

# (M, N, K, group, symmetric): M = 1 (FMA path), 3 and 16 (tensor-core path, M padded to 16);
# groups smaller than, equal to and larger than one chunk; per-channel; a width-2 layout (K=48).
GEMV_CASES = [
    (1, 40, 256, 32, True),
    (1, 24, 256, 128, False),
    (1, 8, 48, 48, True),
    (3, 24, 256, 64, True),
    (16, 40, 256, 256, False),
    (3, 20, 512, 128, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("m", "n", "kk", "group", "symmetric"), GEMV_CASES)
def test_gemv_matches_reference(
    k: SimpleNamespace, m: int, n: int, kk: int, group: int, symmetric: bool, bits: int, dtype: torch.dtype
) -> None:
    g = _gen(m * n + kk + bits)
    qw = k.quant.quantize_rtn(torch.randn(n, kk, generator=g).to(dtype), bits, group, symmetric)
    x = torch.randn(m, kk, generator=g).to(dtype)
    gw = k.gemv.repack_for_gemv(qw)
    assert k.gemv.supports(m, gw)
    y = k.gemv.gemv(x, gw)
    ref = k.quant.weight_only_gemm_reference(x, qw)
    assert y.shape == (m, n)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref, **_gemm_tol(ref, dtype))
    # A second call reuses the split-K workspace and tickets: they must have been reset.
    torch.testing.assert_close(k.gemv.gemv(x, gw), y, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 16, 17, 40])
def test_weight_only_gemm_dispatch(k: SimpleNamespace, bits: int, m: int) -> None:
    """GEMV weights: the GEMV up to M=16, the tiled GEMM over the same words above; both match."""
    g = _gen(m + bits)
    qw = k.quant.quantize_rtn(torch.randn(24, 256, generator=g).half(), bits, 64, symmetric=m % 2 == 0)
    x = torch.randn(m, 256, generator=g).half()
    gw = k.gemv.repack_for_gemv(qw)
    ref = k.quant.weight_only_gemm_reference(x, qw)
    assert k.gemv.supports(m, gw) == (m <= 16)
    assert k.wgemm.planar_gemm_supported(gw)
    for weight in (gw, qw):
        torch.testing.assert_close(k.wgemm.weight_only_gemm(x, weight), ref, **_gemm_tol(ref, torch.float16))
    if bits == 4:
        torch.testing.assert_close(k.wgemm.w4a16_gemm(x, gw), ref, **_gemm_tol(ref, torch.float16))


def _cpu_bench(fn: Callable[[], object], quantiles: object = None) -> list[float]:
    fn()
    return [1.0, 1.0, 1.0]


def test_gpu_autotune_configs_prune_and_run(k: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU config lists through a real autotuner (one CPU timing per config): the pruning
    reads the arguments the way Triton passes them (constexprs as keywords) and every kept
    config computes the right answer."""
    import triton

    gemv_tuner = triton.autotune(
        configs=k.gemv._FMA_CONFIGS + k.gemv._DOT_CONFIGS,
        key=["m_bucket", "N", "K", "GROUP", "BITS", "W", "HAS_ZP"],
        prune_configs_by={"early_config_prune": k.gemv._prune},
        do_bench=_cpu_bench,
    )(k.gemv._gemv_kernel)
    gemm_tuner = triton.autotune(
        configs=k.wgemm._gemm_configs(interpret=False),
        key=["m_bucket", "N", "K", "group_size", "BITS", "HAS_ZP", "PLANAR_W"],
        prune_configs_by={"early_config_prune": k.wgemm._prune_configs},
        do_bench=_cpu_bench,
    )(
        triton.heuristics(
            {"GROUP_ALIGNED": lambda a: k.wgemm._group_aligned(a["group_size"], a["K"], a["BLOCK_K"])}
        )(k.wgemm._wgemm_kernel)
    )
    monkeypatch.setattr(k.gemv, "_gemv_autotuned", gemv_tuner)
    monkeypatch.setattr(k.wgemm, "_wgemm_autotuned", gemm_tuner)
    g = _gen(3)
    # K = 1024: four chunks, so split-K configs are kept and timed too.
    qw = k.quant.quantize_rtn(torch.randn(24, 1024, generator=g).half(), 4, 128)
    gw = k.gemv.repack_for_gemv(qw)
    # M = 1 may take an FMA tile or one of the tensor-core tiles (which the GPU runs with the PTX
    # int4 dequantisation; the interpreter with the portable unpack checked here).
    assert not k.gemv.use_asm(torch.zeros(1, 1024).half(), gw)
    m1_pool = k.gemv._m1_pool(gw.width)
    assert any(c.kwargs["BLOCK_M"] == 16 for c in m1_pool)
    for m, pool in ((1, m1_pool), (3, k.gemv._DOT_CONFIGS), (20, None)):
        x = torch.randn(m, 1024, generator=g).half()
        ref = k.quant.weight_only_gemm_reference(x, qw)
        torch.testing.assert_close(k.wgemm.weight_only_gemm(x, gw), ref, **_gemm_tol(ref, torch.float16))
        if pool is not None:
            assert any(gemv_tuner.best_config is c for c in pool)
    assert gemm_tuner.best_config.kwargs["BLOCK_K"] <= gw.chunk


def test_gemv_bad_inputs_raise(k: SimpleNamespace) -> None:
    err = k.runtime.KernelInputError
    gw = k.gemv.repack_for_gemv(k.quant.quantize_rtn(torch.randn(16, 256), 4, 64))
    narrow = k.gemv.repack_for_gemv(k.quant.quantize_rtn(torch.randn(16, 48), 4, 48))
    assert narrow.width < k.gemv.DOT_MIN_WIDTH
    cases = {
        "1 <= M <= 16": (torch.randn(17, 256), gw),
        "K=128 but the weight has K=256": (torch.randn(1, 128), gw),
        "scales": (torch.randn(1, 256).half(), gw),
        "2-D": (torch.randn(1, 1, 256), gw),
        "contiguous": (torch.randn(256, 2).t(), gw),
        "layout width": (torch.randn(3, 48), narrow),
        # The interpreter computes bf16 wrongly without an error (kernels-quantization notes);
        # bf16 numerics are checked by the GPU benchmark instead.
        "bfloat16 is not supported under TRITON_INTERPRET": (torch.randn(1, 256).bfloat16(), gw),
        "need a CUDA device": (
            torch.randn(1, 256, device="meta"),
            k.gemv.GemvWeight(gw.qweight.to("meta"), gw.scales.to("meta"), None, 4, 64, (16, 256), gw.width),
        ),
    }
    for message, (x, w) in cases.items():
        with pytest.raises(err, match=message):
            k.gemv.gemv(x, w)
    with pytest.raises(err, match="no GEMV layout"):
        k.gemv.repack_for_gemv(k.quant.quantize_rtn(torch.randn(4, 12), 8, 6))


# --- the vLLM layers the plugin installs, run on CPU through the interpreter ---------------------


def test_vllm_layers_run_our_kernels(k: SimpleNamespace) -> None:
    """What vLLM calls on a GPU (forward_cuda, the W4A16 linear kernel), checked on CPU tensors."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    from vllm.scalar_type import scalar_types

    layers = importlib.import_module("tokenfleet.kernels.vllm_layers")
    layers.define_torch_ops()
    g = _gen(7)
    with set_current_vllm_config(VllmConfig()):
        norm = layers.TritonRMSNorm(48, eps=1e-6, dtype=torch.float16)
        act = layers.TritonSiluAndMul()
    norm.weight.data.copy_(torch.randn(48, generator=g))
    x, res = torch.randn(3, 48, generator=g).half(), torch.randn(3, 48, generator=g).half()
    ref_out, ref_res = k.rmsnorm.fused_add_rms_norm_reference(x, res, norm.weight.data, 1e-6)
    out, new_res = norm.forward_cuda(x.clone(), res.clone())
    torch.testing.assert_close(out, ref_out, **NORM_TOL[torch.float16])
    torch.testing.assert_close(new_res, ref_res, **NORM_TOL[torch.float16])
    plain = norm.forward_cuda(x)
    torch.testing.assert_close(
        plain, k.rmsnorm.rms_norm_reference(x, norm.weight.data, 1e-6), **NORM_TOL[torch.float16]
    )
    gate_up = torch.randn(3, 20, generator=g).half()
    torch.testing.assert_close(
        act.forward_cuda(gate_up), k.activation.silu_and_mul_reference(gate_up), **ACT_TOL[torch.float16]
    )

    # compressed-tensors W4A16 asymmetric (uint4 + zero points), as vLLM hands it to the kernel.
    config = MPLinearLayerConfig((64, 40), (64, 40), scalar_types.uint4, torch.float16, 32, True)
    assert layers.TokenfleetW4A16LinearKernel.can_implement(config) == (True, None)
    fp32_config = MPLinearLayerConfig((64, 40), (64, 40), scalar_types.uint4, torch.float32, 32, True)
    assert layers.TokenfleetW4A16LinearKernel.can_implement(fp32_config)[0] is False
    kernel = layers.TokenfleetW4A16LinearKernel(config, "weight_packed", "weight_scale", "weight_zero_point")
    qw = k.quant.quantize_rtn(torch.randn(40, 64, generator=g).half(), 4, 32, symmetric=False)
    layer = torch.nn.Module()
    for name, tensor in k.quant.to_compressed_tensors(qw).items():
        if name != "weight_shape":
            layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    kernel.process_weights_after_loading(layer)
    x3 = torch.randn(2, 3, 64, generator=g).half()
    bias = torch.randn(40, generator=g).half()
    assert layer.tokenfleet_width > 0, "repacked into the GEMV layout at load"
    y = kernel.apply_weights(layer, x3, bias)
    ref = k.quant.weight_only_gemm_reference(x3.reshape(6, 64), qw).reshape(2, 3, 40) + bias
    torch.testing.assert_close(y, ref, **_gemm_tol(ref, torch.float16))
    x1 = torch.randn(1, 64, generator=g).half()  # one decode token: the GEMV
    ref1 = k.quant.weight_only_gemm_reference(x1, qw) + bias
    torch.testing.assert_close(kernel.apply_weights(layer, x1, bias), ref1, **_gemm_tol(ref1, torch.float16))
