"""The gateway benchmark's plumbing, against fake replicas (the real run is `tokenfleet bench gateway`)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tokenfleet.engine.gateway.__main__ import parse_replica
from tokenfleet.load import gateway_bench as bench
from tokenfleet.load.client import UNFINISHED
from tokenfleet.load.record import RequestRecord


def test_description_in_milliseconds() -> None:
    described = bench.describe_ms([i / 1000 for i in range(1, 101)])
    assert described["n"] == 100
    assert described["p50_ms"] == pytest.approx(50.5, abs=0.01)
    assert described["p99_ms"] == pytest.approx(99.01, abs=0.01)


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
        "failover_s": 20.0,
        "skip": ["failover"],
    }
    assert "# Gateway benchmark" in capsys.readouterr().out


def record(ok: bool, first_chunk_s: float | None, error: str | None = None) -> RequestRecord:
    return RequestRecord(
        "r", "standard", "default", "completions", True, 0.0, first_chunk_s=first_chunk_s, ok=ok, error=error
    )


def test_stream_outcomes_tell_lost_from_broken_from_cut() -> None:
    records = [
        record(True, 0.01),
        record(True, 0.02),
        record(False, None, "HTTP 503: no replica"),  # lost before streaming
        record(False, None, "ConnectError: refused"),
        record(False, 0.01, "stream error: the model server failed mid-stream"),  # broken after a token
        record(False, 0.01, UNFINISHED),  # the harness's own stop: not the gateway's doing
    ]
    assert bench.stream_outcomes(records) == {
        "requests": 6,
        "lost_before_streaming": 2,
        "broken_mid_stream": 1,
        "completed": 2,
        "cut_at_stop": 1,
    }


def test_failover_workload_streams_long_answers_from_four_users() -> None:
    workload = bench.failover_workload()
    assert (workload.arrival.mode, workload.stream, workload.ignore_eos) == ("closed", True, True)
    assert workload.arrival.shape.value == 4  # type: ignore[union-attr]
    assert workload.output_tokens.value == 128  # type: ignore[union-attr]
