"""End to end: `bench run` with Locust master + 2 workers and the web UI against the real vLLM server."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port

from tokenfleet.engine.launch import EngineProcess
from tokenfleet.load.bench import BenchResult, run_workload
from tokenfleet.load.workload import parse_workload

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

DURATION_S = 15.0


def test_bench_run_against_vllm_with_web_ui(engine: EngineProcess, tmp_path: Path) -> None:
    workload = parse_workload(
        {
            "name": "e2e",
            "seed": 1,
            "prompts": {"kind": "synthetic", "inputTokens": {"dist": "uniform", "min": 16, "max": 48}},
            "outputTokens": {"dist": "fixed", "value": 12},
            "arrival": {"mode": "open", "maxConcurrency": 16, "shape": {"kind": "constant", "value": 3}},
            "classes": [
                {"name": "interactive", "share": 1, "priority": 0, "ttftMs": 5000, "tpotMs": 1000},
                {"name": "batch", "share": 1, "priority": 2},
            ],
            "tenants": [{"name": "acme", "share": 1}, {"name": "globex", "share": 1}],
        }
    )
    port = free_port()
    out = tmp_path / "run"
    result: list[BenchResult] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(
                run_workload(workload, engine.url, DURATION_S, out, web=True, web_port=port, workers=2)
            )
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    ui_status, stats = None, None
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline and stats is None:
        time.sleep(1)
        try:
            ui_status = httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code
            stats = httpx.get(f"http://127.0.0.1:{port}/stats/requests", timeout=2).json()
        except httpx.HTTPError:
            continue
    thread.join(timeout=90)
    assert not errors, errors
    assert ui_status == 200
    assert stats is not None
    # "ready": the master answered before its workers connected and the run began.
    assert stats["state"] in ("ready", "spawning", "running", "stopped")

    summary = result[0].summary
    assert summary == json.loads((out / "summary.json").read_text())
    overall = summary["overall"]
    # ~3 req/s for 15 s; allow for start-up and the machine being shared.
    assert overall["requests"] >= 15
    assert overall["failed"] == 0, overall["errors"]
    assert overall["ttft"]["p50"] > 0
    # Every 12-token answer has a TPOT; it may be 0 where the client was held off the CPU and read
    # an answer's tokens in one go (ADR 0004, "Testing on shared CPUs"), so only its sign is fixed.
    assert overall["tpot"]["count"] == overall["ok"]
    assert overall["tpot"]["min"] >= 0
    assert overall["output_tokens"] == 12 * overall["ok"]  # ignore_eos: usage counts every token
    assert set(summary["classes"]) == {"interactive", "batch"}
    assert sum(c["requests"] for c in summary["classes"].values()) == overall["requests"]
    assert set(summary["tenants"]) == {"acme", "globex"}
    assert summary["run"]["workers"] == 2
    workers = {json.loads(line)["worker"] for line in (out / "requests.jsonl").read_text().splitlines()}
    assert workers == {0, 1}
    server = summary["server"]
    assert server["samples"] >= 5
    assert "max_running" in server
    assert "kv_cache_usage" in " ".join(server)
    assert summary["accuracy"]["server_ttft_count"] == summary["accuracy"]["harness_ttft_count"]
    for name in ("report.md", "locust.html", "locust_stats.csv", "latency_cdf.png", "timeline.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "| interactive |" in report
    assert "| globex |" in report
    assert "vllm" in json.dumps(summary["run"]["machine"])
    assert "interactive,TTFT" in (out / "locust_stats.csv").read_text()
