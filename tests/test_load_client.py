"""The timed client and the bench command against the calibrated fake server (no vLLM needed):
timings match the server's known delays, failures are records, bad targets and workloads fail
fast, Ctrl-C keeps partial results, repeats and compare work end to end."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tokenfleet.cli import main
from tokenfleet.load import rxclock
from tokenfleet.load.bench import BenchError, locust_command, machine_info, preflight, run_repeated
from tokenfleet.load.client import LLMRequest, arrival_offset, send
from tokenfleet.load.fake_openai import MODEL, FakeConfig, FakeOpenAI

FAST_WORKLOAD = """
name: fast
seed: 3
prompts: {kind: synthetic, inputTokens: {dist: fixed, value: 8}}
outputTokens: {dist: fixed, value: 5}
arrival: {mode: open, process: poisson, maxConcurrency: 8, shape: {kind: constant, value: 8}}
classes:
  - {name: interactive, share: 1, priority: 0, ttftMs: 500, tpotMs: 100}
  - {name: batch, share: 1, priority: 2}
"""


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(FakeConfig(ttft_s=0.1, itl_s=0.02)) as server:
        yield server


@pytest.fixture
def workload_file(tmp_path: Path) -> Path:
    path = tmp_path / "fast.yaml"
    path.write_text(FAST_WORKLOAD)
    return path


def test_streaming_timings_match_server_delays(fake: FakeOpenAI) -> None:
    with httpx.Client() as client:
        for api in ("completions", "chat"):
            request = LLMRequest(id="r", prompt="hi", max_tokens=6, api=api)  # type: ignore[arg-type]
            record = send(client, fake.url, request, MODEL)
            assert record.ok, record.error
            assert record.output_tokens == 6
            assert record.ttft_s is not None
            # Socket-arrival time, not buffered: never before the server's delay, and close to it
            # (the bound leaves room for a CPU-starved shared test machine).
            assert 0.1 <= record.ttft_s < 0.4
            assert len(record.chunk_s) == 6
            # Chunks read together share a timestamp (a late read), but the gaps add up.
            assert sum(record.itl_s) >= 5 * 0.02 - 0.005
            assert 0.015 < sorted(record.itl_s)[2] < 0.06
            assert record.tpot_s is not None
            assert 0.019 < record.tpot_s < 0.06
            assert record.e2e_s is not None
            assert record.e2e_s >= 0.1 + 5 * 0.02


def test_non_streaming_request(fake: FakeOpenAI) -> None:
    with httpx.Client() as client:
        record = send(client, fake.url, LLMRequest(id="r", prompt="hi", max_tokens=3, stream=False), MODEL)
    assert record.ok
    assert record.ttft_s is None
    assert record.output_tokens == 3
    assert record.e2e_s is not None
    assert record.e2e_s >= 0.14


def test_failures_are_records_not_exceptions(fake: FakeOpenAI) -> None:
    with httpx.Client() as client:
        fake.config.fail_after_tokens = 2
        record = send(client, fake.url, LLMRequest(id="r", prompt="hi", max_tokens=6), MODEL)
        assert not record.ok
        assert record.error == "fake failure"
        assert len(record.chunk_s) == 2
        fake.config.fail_after_tokens = None
        fake.config.status = 500
        record = send(client, fake.url, LLMRequest(id="r", prompt="hi", max_tokens=6), MODEL)
        assert not record.ok
        assert record.status == 500
        assert record.error is not None
        assert record.error.startswith("HTTP 500")
        fake.config.status = 200
        fake.config.ttft_s = 1.0
        record = send(client, fake.url, LLMRequest(id="r", prompt="hi", max_tokens=2), MODEL, timeout_s=0.2)
        assert not record.ok
        assert record.error is not None
        assert record.error.startswith("timeout")
    with httpx.Client() as client:
        record = send(client, "http://127.0.0.1:9", LLMRequest(id="r", prompt="hi", max_tokens=2), MODEL)
    assert not record.ok
    assert "ConnectError" in (record.error or "")


def test_preflight_fails_fast_on_bad_targets(fake: FakeOpenAI) -> None:
    assert preflight(fake.url, None) == MODEL
    assert preflight(fake.url, MODEL) == MODEL
    started = time.monotonic()
    with pytest.raises(BenchError, match="cannot reach target"):
        preflight("http://127.0.0.1:9", None)
    assert time.monotonic() - started < 5
    with pytest.raises(BenchError, match="not served"):
        preflight(fake.url, "other")
    with FakeOpenAI() as other, httpx.Client() as client:
        assert client.get(other.url + "/nothing").status_code == 404
    with pytest.raises(BenchError, match="not an OpenAI-compatible server"):
        preflight(fake.url + "/v1", None)  # a wrong base path: GET /v1/v1/models is a 404


def test_cli_rejects_bad_workload_and_target_before_traffic(
    fake: FakeOpenAI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("arrival: {shape: {kind: ramp, start: 1, end: 2}}\n")
    code = main(
        [
            "bench",
            "run",
            "-w",
            str(bad),
            "--target",
            fake.url,
            "--duration",
            "5",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "arrival.shape.ramp.durationS" in err
    assert fake.config.ttft_count == 0
    code = main(
        ["bench", "run", "--target", "http://127.0.0.1:9", "--duration", "5", "--out", str(tmp_path / "o")]
    )
    assert code == 3
    assert "cannot reach target" in capsys.readouterr().err
    with pytest.raises(BenchError, match="duration"):
        run_repeated(
            bad.parent / "none.yaml" if False else _ok_workload(tmp_path), fake.url, 0, tmp_path / "o"
        )


def _ok_workload(tmp_path: Path) -> Path:
    path = tmp_path / "ok.yaml"
    path.write_text(FAST_WORKLOAD)
    return path


def test_bench_repeat_and_compare(
    fake: FakeOpenAI, workload_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.config.ttft_s, fake.config.itl_s = 0.05, 0.01
    a = tmp_path / "a"
    progress = io.StringIO()
    result = run_repeated(workload_file, fake.url, 4, a, repeat=2, workers=1, progress=progress)
    assert "done" in progress.getvalue()  # the progress display: "[  2/4 s] done N failed 0 ..."
    assert [p.name for p in result.runs] == ["run-1", "run-2"]
    agg = json.loads((a / "summary.json").read_text())["aggregate"]
    assert agg["TTFT mean (ms)"]["n"] == 2
    assert 50 <= agg["TTFT mean (ms)"]["mean"] < 300
    assert "mean ± 95% CI" in (a / "report.md").read_text()
    run1 = json.loads((a / "run-1" / "summary.json").read_text())
    assert run1["overall"]["failed"] == 0
    assert run1["overall"]["requests"] >= 10
    assert set(run1["classes"]) == {"interactive", "batch"}
    assert run1["accuracy"]["server_ttft_count"] == run1["accuracy"]["harness_ttft_count"]
    # Harness vs the fake server's own TTFT: only the client path differs.
    assert run1["accuracy"]["relative_difference"] > -0.01  # a client cannot see a token early
    assert run1["accuracy"]["relative_difference"] < 1.0
    for name in ("locust_stats.csv", "locust.html", "requests.jsonl", "timeline.png", "latency_cdf.png"):
        assert (a / "run-1" / name).stat().st_size > 0, name
    stats_csv = (a / "run-1" / "locust_stats.csv").read_text()
    assert "interactive,TTFT" in stats_csv
    # B is slower: compare marks TTFT as significantly worse.
    fake.config.ttft_s = 0.15
    b = tmp_path / "b"
    assert (
        main(
            [
                "bench",
                "run",
                "-w",
                str(workload_file),
                "--target",
                fake.url,
                "--duration",
                "4",
                "--out",
                str(b),
                "-q",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["bench", "compare", str(a / "run-1"), str(b)]) == 0
    out = capsys.readouterr().out
    ttft_row = next(line for line in out.splitlines() if line.startswith("| TTFT mean (ms)"))
    assert "* worse" in ttft_row
    assert main(["bench", "compare", str(a), str(tmp_path / "missing")]) == 2


def _ok_records(raw_dir: Path) -> int:
    """Requests the running bench has finished and written (one JSON line each)."""
    count = 0
    for path in raw_dir.glob("raw-*.jsonl"):
        count += sum(
            1
            for line in path.read_bytes().splitlines(keepends=True)
            if line.endswith(b"\n") and b'"ok":true' in line
        )
    return count


def test_ctrl_c_writes_partial_results(fake: FakeOpenAI, workload_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenfleet.cli",
            "bench",
            "run",
            "-w",
            str(workload_file),
            "--target",
            fake.url,
            "--duration",
            "60",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    # Interrupt once some requests have finished (not after a guessed delay), so there is
    # something partial to keep; the deadline only bounds a broken run.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None and _ok_records(out / "raw") < 3:
        time.sleep(0.1)
    assert process.poll() is None, "the bench ended before it was interrupted"
    finished_before = _ok_records(out / "raw")
    assert finished_before >= 3
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr.decode()[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["interrupted"] is True
    assert summary["overall"]["requests"] >= finished_before
    # It stopped on the signal, well before the 60 s it was asked for.
    assert summary["run"]["duration_s"] < 60
    assert b"interrupted" in stdout
    assert (out / "report.md").exists()


def test_locust_command_and_machine_info(tmp_path: Path) -> None:
    command = locust_command(tmp_path, "http://x", web=True, web_port=9999, workers=3, stop_timeout_s=5)
    assert "--autostart" in command
    assert command[command.index("--web-port") + 1] == "9999"
    assert command[command.index("--processes") + 1] == "3"
    assert "--headless" not in command
    headless = locust_command(tmp_path, "http://x", web=False, web_port=1, workers=1, stop_timeout_s=5)
    assert "--headless" in headless
    assert "--processes" not in headless
    info = machine_info()
    assert info["cpus"] >= 1
    assert "locust_version" in info


def test_sweep_stops_when_the_server_saturates(tmp_path: Path) -> None:
    # Capacity 2 × (50 ms + 4 × 10 ms) per request ≈ 22 req/s: 4 req/s is served, 60 req/s is not.
    workload = tmp_path / "sweep.yaml"
    workload.write_text(
        "name: sweep\nseed: 2\noutputTokens: {dist: fixed, value: 5}\n"
        "arrival: {mode: open, maxConcurrency: 200, shape: {kind: sweep, rates: [4, 60, 120], stepS: 3}}\n"
    )
    with FakeOpenAI(FakeConfig(ttft_s=0.05, itl_s=0.01, capacity=2)) as fake:
        result = run_repeated(workload, fake.url, 30, tmp_path / "out", stop_timeout_s=2)
    sweep = result.summary["sweep"]
    assert [step["offered_rate"] for step in sweep] == [4, 60]
    assert not sweep[0]["saturated"]
    assert sweep[0]["achieved_rate"] > 1  # 3 s of Poisson arrivals at 4/s: noisy, but all served
    assert sweep[1]["saturated"]
    # The run stopped after the saturated step instead of going on to 120 req/s: no step for it,
    # and fewer requests than the 120 req/s step alone would have sent.
    assert len(sweep) == 2
    assert result.summary["overall"]["requests"] < 120 * 3
    assert "## Sweep" in (result.dir / "report.md").read_text()


def test_kernel_receive_stamp_excludes_reader_delay(fake: FakeOpenAI) -> None:
    fake.config.ttft_s = 0.05
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1, "stream": True}
    with rxclock.stamping_client(10) as client:
        send_wall = time.time()
        with client.stream("POST", fake.url + "/v1/completions", json=body) as response:
            # The reader is busy elsewhere until the server has written the first token (its
            # TTFT count says so), and only then reads it.
            deadline = time.monotonic() + 30
            while fake.config.ttft_count < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert fake.config.ttft_count == 1
            # The server counts before it writes: wait until the event is in this host's socket
            # buffer (readable), which is after the kernel stamped it.
            sock = response.extensions["network_stream"].get_extra_info("socket")
            readable, _, _ = select.select([sock], [], [], 30)
            assert readable, "the first event never reached the socket"
            arrived_by = time.time() - send_wall
            first = next(response.iter_raw())
            read_at = time.time() - send_wall
            stamp = rxclock.last_receive()
        assert b"data:" in first
        assert stamp is not None
        # Received after the server's 50 ms delay, and by the time the socket was readable (so
        # before the read): the stamp is the kernel's arrival time, not the reader's.
        assert 0.04 <= stamp - send_wall <= arrived_by < read_at
        # And through the harness's own timing path: never before the server's delay, never
        # after the whole answer.
        record = send(client, fake.url, LLMRequest(id="r", prompt="x", max_tokens=3), MODEL)
        assert record.ok
        assert record.ttft_s is not None
        assert record.e2e_s is not None
        assert 0.05 <= record.ttft_s <= record.e2e_s


def test_arrival_offset_trusts_only_plausible_stamps() -> None:
    assert arrival_offset(0.5, None, 100.0) == 0.5
    assert arrival_offset(0.5, 100.2, 100.0) == pytest.approx(0.2)
    assert arrival_offset(0.5, 100.9, 100.0) == 0.5  # after the read: clocks disagree
    assert arrival_offset(0.5, 99.0, 100.0) == 0.5  # before the send: a stale stamp
    assert rxclock.parse_timestamp([]) is None
