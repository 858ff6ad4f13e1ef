"""The gateway benchmark's plumbing, against fake replicas (the real run is `tokenfleet bench gateway`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from tokenfleet.engine.fleet import free_port
from tokenfleet.engine.gateway.__main__ import parse_replica
from tokenfleet.engine.gateway.server import ServerThread
from tokenfleet.load import gateway_bench as bench


def test_quantiles_and_description() -> None:
    values = [i / 1000 for i in range(1, 101)]
    assert bench.quantile(values, 0.5) == pytest.approx(0.0505, abs=0.001)
    described = bench.describe_ms(values)
    assert described["n"] == 100
    assert described["p99_ms"] == pytest.approx(99.0, abs=1.01)
    assert bench.quantile([], 0.5) != bench.quantile([], 0.5)  # NaN for no data


def test_paired_latency_through_a_gateway_process(tmp_path: Path) -> None:
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    with (
        bench.fake_process(tmp_path) as fake,
        bench.gateway_process(bench.bench_service("round_robin"), [("r0", fake)], tmp_path) as via,
    ):
        started = time.perf_counter()
        result = bench.paired_latency(fake, via, body, pairs=20, warmup=2)
        wall_ms = (time.perf_counter() - started) * 1000
    direct, gateway = result["direct"], result["gateway"]
    assert direct["n"] == gateway["n"] == 20
    for side in (direct, gateway):
        assert side["p50_ms"] <= side["p90_ms"] <= side["p99_ms"]
        # Milliseconds, not seconds: a loopback HTTP round trip through httpx takes > 50 µs ...
        assert side["p50_ms"] >= 0.05
    # ... and the measured calls fit inside the wall time of the whole measurement.
    assert (direct["mean_ms"] + gateway["mean_ms"]) * 20 <= wall_ms
    assert result["added_p50_ms"] == pytest.approx(gateway["p50_ms"] - direct["p50_ms"], abs=0.002)
    # The gateway's process was found and measured (None when the CPU time could not be read).
    assert result["gateway_cpu_ms_per_request"] is not None
    assert result["gateway_cpu_ms_per_request"] >= 0
    report = bench.render(
        {
            "machine": "test",
            "date": "today",
            "overhead": {"fake": result},
            "policies": {
                "round_robin": {"ttft": {"mean": 0.1, "p50": 0.1, "p99": 0.2}, "prefix_cache_hit_rate": 0.5}
            },
            "failover": {"requests": 10, "lost_before_streaming": 0},
            "failover_resume": {"requests": 10, "broken_mid_stream": 0},
        }
    )
    assert "| fake |" in report
    assert "| round_robin | None | None | 100 ms | 100 ms | 200 ms | 50.0% | 0.0 |" in report
    assert "- lost before streaming: 0" in report
    assert "## Failover with stream resume" in report
    assert "- broken mid stream: 0" in report


def test_parse_replica_argument() -> None:
    assert parse_replica("r0=http://127.0.0.1:8001") == ("r0", "http://127.0.0.1:8001")
    with pytest.raises(Exception, match="expected id=http"):
        parse_replica("r0:8001")


def test_cli_wires_bench_gateway(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tokenfleet.cli import main

    seen: dict[str, object] = {}

    def fake_run(out: Path, **kwargs: object) -> dict[str, object]:
        seen.update(kwargs, out=out)
        return {"machine": "m", "date": "d", "overhead": {}}

    monkeypatch.setattr(bench, "run_bench", fake_run)
    assert main(["bench", "gateway", "--out", "somewhere", "--pairs", "7", "--skip", "failover"]) == 0
    assert seen == {
        "out": Path("somewhere"),
        "pairs": 7,
        "policy_duration_s": 40.0,
        "failover_requests": 100,
        "skip": ["failover"],
    }
    assert "# Gateway benchmark" in capsys.readouterr().out


def test_stream_outcome_reads_events_not_substrings() -> None:
    """A token whose text is "error" is a token; only an error event breaks a stream."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: dict[str, object]) -> StreamingResponse:
        broken = str(body["prompt"]).startswith("req 2:")

        async def events() -> AsyncIterator[bytes]:
            yield b'data: {"choices":[{"index":0,"text":"error","finish_reason":null}]}\n\n'
            if broken:
                yield b'data: {"error":{"message":"the model server failed mid-stream","code":502}}\n\n'
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    server = ServerThread(app, free_port()).start()
    try:
        assert bench.stream_once(server.url, 1) == {
            "started": True,
            "finished": True,
            "status": 200,
            "error": None,
        }
        broken = bench.stream_once(server.url, 2)
        assert broken == {"started": True, "finished": False, "status": 200, "error": "mid-stream"}
    finally:
        server.stop()
