"""The vLLM plugin and the engine flags: CPU fallback, idempotent registration, the spec turning
kernels on, the bench's smoke mode, one real `tokenfleet serve` with a kernel enabled, and (on a
GPU only) the swap itself."""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
import threading
import time
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from conftest import free_port, tiny_service

from tokenfleet.engine.launch import engine_command
from tokenfleet.kernels import plugin
from tokenfleet.kernels.names import KERNELS_ENV, KNOWN, custom_ops_for, parse_enabled
from tokenfleet.spec import KNOWN_KERNELS, EngineSpec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def plugin_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A fresh per-process plugin state, and the plugin's log lines (vLLM's logger does not
    propagate to the root logger, so a handler goes on ours directly)."""
    monkeypatch.setattr(plugin, "_status", {})
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(level=logging.DEBUG)
    plugin.logger.addHandler(handler)
    old_level = plugin.logger.level
    plugin.logger.setLevel(logging.DEBUG)
    yield lines
    plugin.logger.removeHandler(handler)
    plugin.logger.setLevel(old_level)


def test_known_kernels_match_the_spec() -> None:
    (literal,) = typing.get_args(EngineSpec.model_fields["kernels"].annotation)
    assert set(typing.get_args(literal)) == set(KNOWN_KERNELS) == set(KNOWN)
    with pytest.raises(ValueError, match="unknown tokenfleet kernels"):
        parse_enabled("rms_norm,flash_magic")
    assert parse_enabled(" rms_norm, rms_norm ,") == ["rms_norm"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback shows only without a GPU")
def test_plugin_on_cpu_registers_nothing_and_says_why(
    monkeypatch: pytest.MonkeyPatch, plugin_log: list[str]
) -> None:
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.kernels import linear
    from vllm.platforms import PlatformEnum

    monkeypatch.setenv(KERNELS_ENV, "rms_norm,silu_and_mul,w4a16_gemm")
    cuda_kernels = list(linear._POSSIBLE_KERNELS[PlatformEnum.CUDA])
    plugin.register()
    plugin.register()  # vLLM may call it again in the same process
    assert "RMSNorm" not in op_registry_oot
    assert "SiluAndMul" not in op_registry_oot
    assert linear._POSSIBLE_KERNELS[PlatformEnum.CUDA] == cuda_kernels
    assert set(plugin.status()) == {"rms_norm", "silu_and_mul", "w4a16_gemm"}
    assert all("no CUDA device" in why for why in plugin.status().values())
    assert len(plugin_log) == 1, plugin_log  # said once per process
    assert "not registered: no CUDA device" in plugin_log[0]


def test_plugin_without_kernels_or_with_a_typo_registers_nothing(
    monkeypatch: pytest.MonkeyPatch, plugin_log: list[str]
) -> None:
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    plugin.register()
    assert plugin.status() == {}
    monkeypatch.setenv(KERNELS_ENV, "rms_norm,rotary_embedding")
    plugin.register()
    assert plugin.status() == {}
    assert any("unknown tokenfleet kernels ['rotary_embedding']" in line for line in plugin_log)


def test_registration_is_idempotent(monkeypatch: pytest.MonkeyPatch, plugin_log: list[str]) -> None:
    """With a (pretended) GPU: each layer is registered once, whatever the number of calls."""
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.kernels import linear
    from vllm.platforms import PlatformEnum

    from tokenfleet.kernels import vllm_layers

    monkeypatch.setenv(KERNELS_ENV, "rms_norm,silu_and_mul,w4a16_gemm")
    monkeypatch.setattr(plugin, "unavailable_reason", lambda: None)
    cuda_kernels = linear._POSSIBLE_KERNELS[PlatformEnum.CUDA]
    saved_kernels, saved_oot = list(cuda_kernels), dict(op_registry_oot)
    try:
        plugin.register()
        plugin.register()
        plugin._status.clear()  # a re-imported plugin module: the registrars themselves must hold
        plugin.register()
        assert op_registry_oot["RMSNorm"] is vllm_layers.TritonRMSNorm
        assert op_registry_oot["SiluAndMul"] is vllm_layers.TritonSiluAndMul
        names = [kernel.__name__ for kernel in cuda_kernels]
        assert names[0] == "TokenfleetW4A16LinearKernel"
        assert names.count("TokenfleetW4A16LinearKernel") == 1
        assert plugin.status() == dict.fromkeys(("rms_norm", "silu_and_mul", "w4a16_gemm"), "registered")
        # The engine's custom_ops flags name exactly the classes vLLM will look up.
        assert f"+{vllm_layers.TritonRMSNorm.name}" in custom_ops_for(["rms_norm"])
        assert f"+{vllm_layers.TritonSiluAndMul.name}" in custom_ops_for(["silu_and_mul"])
    finally:
        cuda_kernels[:] = saved_kernels
        op_registry_oot.clear()
        op_registry_oot.update(saved_oot)


def test_spec_kernels_become_engine_flags() -> None:
    service = tiny_service("k", engine={"kernels": ["rms_norm", "silu_and_mul"]})
    command = engine_command(service.spec, "/m", port=8000)
    flag = command.argv.index("--compilation-config")
    custom_ops = json.loads(command.argv[flag + 1])["custom_ops"]
    assert custom_ops == ["+RMSNorm", "+rms_norm", "+SiluAndMul", "+silu_and_mul"]
    assert command.env[KERNELS_ENV] == "rms_norm,silu_and_mul"

    gemm_only = engine_command(tiny_service("k", engine={"kernels": ["w4a16_gemm"]}).spec, "/m", port=8000)
    assert "--compilation-config" not in gemm_only.argv
    assert gemm_only.env[KERNELS_ENV] == "w4a16_gemm"
    plain = engine_command(tiny_service("k").spec, "/m", port=8000)
    assert "--compilation-config" not in plain.argv
    assert KERNELS_ENV not in plain.env


def test_entry_point_is_declared_and_resolves() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["vllm.general_plugins"]["tokenfleet_kernels"]
    module, _, attr = target.partition(":")
    assert getattr(importlib.import_module(module), attr) is plugin.register


def test_bench_smoke_writes_report(tmp_path: Path) -> None:
    # A subprocess: --smoke sets TRITON_INTERPRET before any kernel is imported.
    done = subprocess.run(
        [sys.executable, "-m", "tokenfleet.cli", "kernels", "bench", "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "kernels-cpu-smoke.json").read_text())
    rows = report["rows"]
    variants = {(r["kernel"], r["variant"]) for r in rows}
    for step in ("0-unfused", "1-fused", "2-vectorised", "3-tuned", "4-autotuned"):
        assert ("fused_add_rms_norm", f"step {step}") in variants
    for step in ("0-dequant-matmul", "1-fused-naive", "2-fused-tuned", "3-splitk", "4-autotuned"):
        assert ("w4a16", f"step {step}") in variants
    assert {("silu_and_mul", "triton"), ("w8a16", "triton")} <= variants
    for bits in (4, 8):  # the decode GEMV next to the 16-bit matmul and the GEMM, M = 1 and 3
        decode = [r for r in rows if r["kernel"] == f"w{bits}a16 decode"]
        assert {r["variant"] for r in decode} == {
            "torch matmul (16-bit W)",
            "GEMM (step 4, checkpoint order)",
            "GEMV (repacked)",
        }
        assert {r["tokens"] for r in decode} == {1, 3}
        gemv = [r for r in decode if r["variant"] == "GEMV (repacked)"]
        assert all(r["us"] is not None and r["max_err"] < 1e-2 for r in gemv)
        assert all("x vs eager" in r["derived"] and "x vs old GEMM" in r["derived"] for r in gemv)
        assert all("BLOCK_N=" in r["note"] for r in gemv)
    ours = [r for r in rows if r["variant"].startswith(("step", "triton"))]
    assert all(r["us"] is not None and r["max_err"] is not None for r in ours)
    assert max(r["max_err"] for r in ours if r["kernel"] != "w4a16" and r["kernel"] != "w8a16") < 2e-2
    markdown = (tmp_path / "kernels-cpu-smoke.md").read_text()
    assert "times are meaningless" in markdown
    assert "## Targets" in markdown
    assert "W4A16 GEMV at M=1" in markdown
    assert len(list((tmp_path / "kernels-cpu-smoke").glob("*.png"))) == 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_swaps_kernels_in_and_outputs_match(monkeypatch: pytest.MonkeyPatch) -> None:  # pragma: gpu
    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.kernels.linear import choose_mp_linear_kernel
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.scalar_type import scalar_types

    from tokenfleet.kernels import quant, vllm_layers
    from tokenfleet.kernels.rmsnorm import fused_add_rms_norm_reference

    monkeypatch.setenv(KERNELS_ENV, "rms_norm,silu_and_mul,w4a16_gemm")
    plugin.register()
    assert set(plugin.status().values()) == {"registered"}
    ops = ["none", *custom_ops_for(["rms_norm", "silu_and_mul"])]
    with set_current_vllm_config(VllmConfig(compilation_config=CompilationConfig(custom_ops=ops))):
        norm = RMSNorm(4096, eps=1e-6, dtype=torch.bfloat16).cuda()
        act = SiluAndMul()
    assert type(norm) is vllm_layers.TritonRMSNorm
    assert type(act) is vllm_layers.TritonSiluAndMul
    assert norm._forward_method.__func__ is vllm_layers.TritonRMSNorm.forward_cuda

    norm.weight.data.normal_()
    x = torch.randn(64, 4096, dtype=torch.bfloat16, device="cuda")
    res = torch.randn_like(x)
    ref_out, ref_res = fused_add_rms_norm_reference(x.float(), res.float(), norm.weight.data.float(), 1e-6)
    out, new_res = norm(x.clone(), res.clone())
    torch.testing.assert_close(out.float(), ref_out, atol=3e-2, rtol=1.6e-2)
    torch.testing.assert_close(new_res.float(), ref_res, atol=3e-2, rtol=1.6e-2)
    gate_up = torch.randn(64, 2 * 1024, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(act(gate_up), SiluAndMul.forward_native(gate_up), atol=1e-2, rtol=1.6e-2)

    config = MPLinearLayerConfig((4096, 1024), (4096, 1024), scalar_types.uint4b8, torch.bfloat16, 128, False)
    assert choose_mp_linear_kernel(config) is vllm_layers.TokenfleetW4A16LinearKernel
    qw = quant.quantize_rtn(torch.randn(1024, 4096, device="cuda").bfloat16(), 4, 128)
    kernel = vllm_layers.TokenfleetW4A16LinearKernel(config, "weight_packed", "weight_scale")
    layer = torch.nn.Module()
    for name, tensor in quant.to_compressed_tensors(qw).items():
        if name != "weight_shape":
            layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    kernel.process_weights_after_loading(layer)
    xs = torch.randn(3, 4096, dtype=torch.bfloat16, device="cuda")
    ref = quant.weight_only_gemm_reference(xs.float(), qw)
    torch.testing.assert_close(
        kernel.apply_weights(layer, xs).float(), ref, atol=2e-2 * float(ref.abs().max()), rtol=2e-2
    )


@pytest.mark.vllm
@pytest.mark.slow
def test_serve_with_a_kernel_enabled_falls_back_and_answers(tmp_path: Path) -> None:
    """`tokenfleet serve` with engine.kernels: [rms_norm] on the CPU build: vLLM loads our plugin
    (entry point), accepts the custom_ops flags, keeps its own RMSNorm and answers."""
    service = tiny_service("kern", engine={"maxNumSeqs": 2, "kernels": ["rms_norm"], "shutdownTimeoutS": 5})
    spec_file = tmp_path / "service.yaml"
    spec_file.write_text(yaml.safe_dump(service.model_dump(by_alias=True, mode="json")))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenfleet.cli", "serve", "-f", str(spec_file), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout or []:
            lines.append(line)
            if "tokenfleet: serving" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 600
        while not ready.wait(1):
            assert proc.poll() is None, "".join(lines[-40:])
            assert time.monotonic() < deadline, "serve did not become ready"
        body = {"model": "kern", "prompt": "def main(", "max_tokens": 4, "ignore_eos": True}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        reader.join(10)
    log = "".join(lines)
    assert "tokenfleet kernels rms_norm not registered: no CUDA device" in log
