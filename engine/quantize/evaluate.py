"""Evaluate one model directory in the engine environment: serve it with vLLM, then measure.

- perplexity on held-out windows from prompt logprobs (`prompt_logprobs=0` returns each prompt
  token's own log-probability; the first token has none),
- size of the weights on disk,
- throughput and latency on a fixed short closed-loop workload through the load harness.
The baseline goes through the very same path, so recovery compares like with like.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tokenfleet.engine.fleet import free_port
from tokenfleet.engine.launch import EngineProcess, engine_command
from tokenfleet.engine.quantize.config import EvaluationConfig
from tokenfleet.spec import parse_service

SERVED_NAME = "quant-eval"


def weights_mb(model_dir: Path) -> float:
    """Bytes of the weight files (what quantization shrinks), in MB."""
    return round(sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 1e6, 3)


def nll_of(prompt_logprobs: Sequence[dict[str, Any] | None], ids: Sequence[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] and the token count, from one prompt_logprobs list."""
    total = 0.0
    count = 0
    for token, entry in zip(ids[1:], prompt_logprobs[1:], strict=True):
        if entry is None:
            raise ValueError("a prompt position has no logprob")
        total -= float(entry[str(token)]["logprob"])
        count += 1
    return total, count


def perplexity(client: httpx.Client, url: str, windows: Sequence[Sequence[int]]) -> dict[str, float]:
    nll = 0.0
    tokens = 0
    for ids in windows:
        body = {
            "model": SERVED_NAME,
            "prompt": list(ids),
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
        }
        response = client.post(f"{url}/v1/completions", json=body, timeout=300.0)
        response.raise_for_status()
        window_nll, window_tokens = nll_of(response.json()["choices"][0]["prompt_logprobs"], ids)
        nll += window_nll
        tokens += window_tokens
    return {"ppl": math.exp(nll / tokens), "nll": nll / tokens, "tokens": float(tokens)}


def sample(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> str:
    """A greedy completion: a glance at what the numbers mean (and proof that the model generates)."""
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    response = client.post(f"{url}/v1/completions", json=body, timeout=300.0)
    response.raise_for_status()
    return str(response.json()["choices"][0]["text"])


def workload_dict(cfg: EvaluationConfig) -> dict[str, Any]:
    """The fixed short workload: closed loop, fixed prompt and output lengths, EOS ignored."""
    return {
        "name": "quantization",
        "seed": 7,
        "api": "completions",
        "stream": True,
        "ignoreEos": True,
        "warmupS": min(3.0, cfg.bench_duration_s / 4),
        "prompts": {"kind": "synthetic", "inputTokens": {"dist": "fixed", "value": cfg.input_tokens}},
        "outputTokens": {"dist": "fixed", "value": cfg.output_tokens},
        "arrival": {"mode": "closed", "shape": {"kind": "constant", "value": cfg.bench_users}},
    }


def bench(url: str, cfg: EvaluationConfig, out_dir: Path) -> dict[str, Any]:
    from tokenfleet.load.bench import run_workload
    from tokenfleet.load.workload import parse_workload

    workload = parse_workload(workload_dict(cfg), "quantization-workload")
    result = run_workload(workload, url, cfg.bench_duration_s, out_dir)
    overall = result.summary["overall"]
    server = result.summary.get("server") or {}
    return {
        "requests_ok": overall["ok"],
        "requests_failed": overall["failed"],
        "output_tok_per_s": overall["output_tok_per_s"],
        "req_per_s": overall["req_per_s"],
        # A small model finishes a request within one of vLLM's output-handler cycles, so the
        # client sees all tokens in one chunk (client TPOT 0); the engine's own histograms
        # (vLLM /metrics, means over the window) time every token, so the table uses those.
        "ttft_ms": _ms(server.get("ttft_mean_s")),
        "tpot_ms": _ms(server.get("itl_mean_s")),
        "client_ttft_p50_ms": _ms(overall["ttft"].get("p50")),
        "client_e2e_p50_ms": _ms(overall["e2e"].get("p50")),
        "bench_dir": str(out_dir),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


@contextmanager
def served(model_dir: Path, cfg: EvaluationConfig, log_path: Path) -> Iterator[EngineProcess]:
    """A vLLM server for `model_dir` (its checkpoint's quantization_config picks the kernels)."""
    service = parse_service(
        {
            "apiVersion": "tokenfleet.dev/v1alpha1",
            "kind": "LLMService",
            "metadata": {"name": "quant-eval"},
            "spec": {
                "model": {
                    "name": SERVED_NAME,
                    "source": str(model_dir),
                    "maxModelLen": cfg.max_model_len,
                    "dtype": cfg.dtype,
                },
                "engine": {
                    "maxNumSeqs": max(cfg.bench_users, 4),
                    "kvCacheGib": cfg.kv_cache_gib,
                    "shutdownTimeoutS": 2,
                },
            },
        }
    )
    port = free_port()
    engine = EngineProcess(
        engine_command(service.spec, str(model_dir), port=port), port=port, log_path=log_path
    )
    engine.start()
    try:
        engine.wait_ready(cfg.start_timeout_s)
        yield engine
    finally:
        engine.stop(timeout_s=30)


def evaluate(
    model_dir: Path, windows: Sequence[Sequence[int]], cfg: EvaluationConfig, out_dir: Path
) -> dict[str, Any]:
    """Serve `model_dir`, score perplexity, run the workload; one result dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with served(model_dir, cfg, out_dir / "engine.log") as engine:
        ready_s = time.monotonic() - started
        with httpx.Client() as client:
            ppl_started = time.monotonic()
            result: dict[str, Any] = perplexity(client, engine.url, windows)
            result["ppl_s"] = round(time.monotonic() - ppl_started, 1)
            result["sample_text"] = sample(client, engine.url, cfg.sample_prompt, cfg.sample_tokens)
        if cfg.bench_duration_s > 0:
            result |= bench(engine.url, cfg, out_dir / "bench")
    result |= {"weights_mb": weights_mb(model_dir), "start_s": round(ready_s, 1)}
    return result
