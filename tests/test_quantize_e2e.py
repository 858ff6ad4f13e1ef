"""Quantization end to end: the real pipeline (quant venv, llm-compressor, vLLM CPU), then by spec.

One bounded test: RTN W4A16 and RTN W8A8 of the small random-weight model, evaluated through vLLM
by the pipeline (which serves each checkpoint and generates text), then a service whose
`model.quantization` names the W4A16 checkpoint is served and answers. On a fresh machine it creates the
quantization venv (about a minute; cached under the tokenfleet cache, keyed by requirements).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import httpx
import pytest
from conftest import ENGINE_START_TIMEOUT_S, tiny_service

from tokenfleet.engine.fleet import free_port
from tokenfleet.engine.launch import EngineProcess, engine_command
from tokenfleet.engine.quantize.config import parse_config
from tokenfleet.engine.quantize.pipeline import prepare, run_pipeline
from tokenfleet.models import resolve_model

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# CI quantizes the random-weight model (built in seconds); with
# TOKENFLEET_QUANT_E2E_MODEL=builtin://tiny-code the same test runs on the default model.
MODEL = os.environ.get("TOKENFLEET_QUANT_E2E_MODEL", "builtin://tiny-random")

TECHNIQUES = ["rtn-w4a16", "rtn-w8a8"]
# The CPU kernel vLLM picks for each scheme (its log line), so a silent fall-back to full
# precision would fail the test.
KERNELS = {"rtn-w4a16": "CPUWNA16LinearKernel", "rtn-w8a8": "CPUInt8ScaledMMLinearKernel"}


def test_pipeline_quantizes_then_vllm_serves_both_checkpoints(tmp_path: Path) -> None:
    config = parse_config(
        {
            "model": MODEL,
            # A fresh folder, so every run quantizes and evaluates (the venv stays cached).
            "outputDir": str(tmp_path / "checkpoints"),
            "techniques": TECHNIQUES,
            "calibration": {"samples": 4, "seqLen": 64},
            "evaluation": {
                "pplWindows": 4,
                "seqLen": 64,
                "benchDurationS": 4,
                "benchUsers": 2,
                "maxModelLen": 256,
                "dtype": "bfloat16",
                "startTimeoutS": ENGINE_START_TIMEOUT_S,
            },
            "report": str(tmp_path / "report" / "quantization.md"),
        }
    )
    prep = prepare(config)
    progress = io.StringIO()
    results = run_pipeline(prep, progress=progress)

    for name in TECHNIQUES:
        assert (prep.out_dir / name / "quantize_result.json").is_file()
        evaluation = results[f"eval:{name}"]
        assert math.isfinite(evaluation["ppl"])
        assert evaluation["sample_text"].strip()
        assert evaluation["weights_mb"] < results["eval:baseline"]["weights_mb"]
        assert evaluation["requests_ok"] > 0
        log = prep.out_dir / "eval" / name / "engine.log"
        assert KERNELS[name] in log.read_text(errors="replace")
    report = (tmp_path / "report" / "quantization.md").read_text()
    assert "| rtn-w4a16 | rtn | W4A16 |" in report
    assert "**Recommendation:**" in report
    assert (tmp_path / "report" / "quantization-ppl-vs-size.png").stat().st_size > 0

    # A second run changes nothing: every step is skipped.
    again = io.StringIO()
    run_pipeline(prepare(config), progress=again)
    assert again.getvalue().count("unchanged, skipped") == 2 + 2 * len(TECHNIQUES) + 1

    # Served by spec: model.quantization names the checkpoint (a technique name resolves to the
    # same folder under the cache; test_quantize_config covers that lookup).
    checkpoint = str(prep.out_dir / "rtn-w4a16")
    model = {
        "name": "tiny-w4",
        "source": MODEL,
        "maxModelLen": 256,
        "quantization": checkpoint,
    }
    service = tiny_service("tiny-w4", model=model)
    model_path = resolve_model(service.spec.model)
    assert model_path == checkpoint
    port = free_port()
    engine = EngineProcess(
        engine_command(service.spec, model_path, port=port), port=port, log_path=tmp_path / "spec-engine.log"
    )
    engine.start()
    try:
        engine.wait_ready(ENGINE_START_TIMEOUT_S)
        body = {"model": "tiny-w4", "prompt": "def main(", "max_tokens": 8, "temperature": 0.0}
        answer = httpx.post(f"{engine.url}/v1/completions", json=body, timeout=120.0).json()
        assert answer["usage"]["completion_tokens"] == 8
        assert answer["choices"][0]["text"]
    finally:
        engine.stop(timeout_s=30)
    assert "CPUWNA16LinearKernel" in (tmp_path / "spec-engine.log").read_text(errors="replace")
