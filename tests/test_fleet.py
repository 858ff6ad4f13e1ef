"""The local fleet: pure control-loop decisions, the supervisor with fake replica processes, and
`tokenfleet up` / `tokenfleet status` end to end with a real vLLM replica."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from conftest import free_port, tiny_service
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tokenfleet.engine.fleet import LocalFleet, engine_launcher, format_status, print_status, serve_fleet
from tokenfleet.engine.gateway.app import Gateway
from tokenfleet.engine.launch import EngineCommand, EngineProcess
from tokenfleet.models import ensure_builtin
from tokenfleet.operator.control import revision_of
from tokenfleet.spec import LLMService

# -- status --------------------------------------------------------------------------------------


def test_format_status_joins_gateway_and_process_views_and_shows_decisions() -> None:
    text = format_status(
        {
            "service": "svc",
            "model": "tiny",
            "policy": "round_robin",
            "ready": True,
            "replicas": [{"id": "replica-0", "state": "ready", "in_flight": 1, "ejections": 0}],
            "fleet": {
                "desired": 2,
                "ready": 1,
                "revision": "abcd1234",
                "autoscaling": {"enabled": True, "metric": "in_flight", "reason": "in_flight 3.00/replica"},
                "rollout": {
                    "phase": "progressing",
                    "strategy": "canary",
                    "stable": "abcd1234",
                    "target": "ffff0000",
                    "step": 1,
                    "weights": {"abcd1234": 50, "ffff0000": 50},
                    "reason": "step 2: 50% to ffff0000",
                },
                "decisions": [{"at": 0, "kind": "scale", "reason": "in_flight 3.00/replica: 1 -> 2"}],
                "slots": [
                    {
                        "id": "replica-0",
                        "revision": "abcd1234",
                        "phase": "ready",
                        "port": 8101,
                        "pid": 42,
                        "restarts": 1,
                    }
                ],
            },
            "admission": {"running": 1, "slots": 16, "queued": {}, "shed": {}},
        }
    )
    row = next(line for line in text.splitlines() if line.startswith("replica-0"))
    assert row.split()[:7] == ["replica-0", "abcd1234", "ready", "ready", "8101", "42", "1"]
    assert "1/16 slots busy" in text
    assert "replicas: desired 2, ready 1  revision abcd1234" in text
    assert "rollout progressing (canary abcd1234 -> ffff0000, step 1" in text
    assert "scale: in_flight 3.00/replica: 1 -> 2" in text.splitlines()[-1]


def test_status_without_a_gateway_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert print_status(f"http://127.0.0.1:{free_port()}") == 1
    assert "is `tokenfleet up` running?" in capsys.readouterr().out


# -- the supervisor with fake replica processes --------------------------------------------------


def fake_launcher(log_dir: Path):  # type: ignore[no-untyped-def]
    """Fake replicas; a spec's engine.extraArgs (e.g. --error-rate=0.5) become the fake's flags."""

    def launch(service: LLMService, replica_id: str, port: int) -> EngineProcess:
        argv = [
            sys.executable,
            "-m",
            "tokenfleet.load.fake_engine",
            "--port",
            str(port),
            "--name",
            replica_id,
            "--max-model-len",
            str(service.spec.model.max_model_len),
            *service.spec.engine.extra_args,
        ]
        return EngineProcess(EngineCommand(argv, {}), port=port, log_path=log_dir / f"{replica_id}.log")

    return launch


async def _poll(url: str, predicate, timeout_s: float = 60.0) -> dict:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(trust_env=False) as client:
        while True:
            try:
                status = (await client.get(f"{url}/admin/status", timeout=2)).json()
                if predicate(status):
                    return status  # type: ignore[no-any-return]
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "fleet never reached the expected state"
            await asyncio.sleep(0.1)


def _phases(status: dict) -> list[str]:  # type: ignore[type-arg]
    return [s["phase"] for s in status["fleet"]["slots"]]


def test_fleet_restarts_a_killed_replica_and_stops_everything(tmp_path: Path) -> None:
    service = tiny_service(routing={"policy": "round_robin", "probeIntervalS": 0.1, "ejectCooldownS": 0.2})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logs: list[str] = []

    async def scenario() -> tuple[int, list[int]]:
        stop = asyncio.Event()
        fleet = asyncio.create_task(
            serve_fleet(
                service,
                fake_launcher(tmp_path),
                replicas=2,
                port=port,
                stop=stop,
                tick_s=0.1,
                log=logs.append,
            )
        )
        status = await _poll(url, lambda s: _phases(s) == ["ready", "ready"])
        pids = [s["pid"] for s in status["fleet"]["slots"]]
        async with httpx.AsyncClient(trust_env=False) as client:
            body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
            served = {
                (await client.post(f"{url}/v1/completions", json=body)).json()["served_by"] for _ in range(4)
            }
            assert served == {"replica-0", "replica-1"}
            os.kill(pids[1], signal.SIGKILL)
            # requests keep succeeding while the replica is dead (retry, then ejection)
            for _ in range(6):
                assert (await client.post(f"{url}/v1/completions", json=body)).status_code == 200
            status = await _poll(
                url, lambda s: s["fleet"]["slots"][1]["restarts"] == 1 and _phases(s) == ["ready", "ready"]
            )
            new_pids = [s["pid"] for s in status["fleet"]["slots"]]
            assert new_pids[0] == pids[0]
            assert new_pids[1] != pids[1]
        stop.set()
        return await fleet, new_pids

    code, pids = asyncio.run(scenario())
    assert code == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert any("exited with code" in line for line in logs)
    assert any("replace: replica-1: process exited (restart 1" in line for line in logs)
    assert logs[-1] == "tokenfleet: stopped"


def test_fleet_reports_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        logs: list[str] = []
        code = asyncio.run(
            serve_fleet(tiny_service(), fake_launcher(tmp_path), replicas=1, port=port, log=logs.append)
        )
    assert code == 1
    assert any("could not listen" in line for line in logs)


def sleeper(service: LLMService, replica_id: str, port: int) -> EngineProcess:
    """A replica process whose start hangs (never ready)."""
    return EngineProcess(EngineCommand([sys.executable, "-c", "import time; time.sleep(60)"], {}), port=port)


def test_local_fleet_replaces_a_hung_start_and_stops_surplus_without_blocking() -> None:
    gateway = Gateway(tiny_service(failover={"startupTimeoutS": 0.5}))
    logs: list[str] = []
    fleet = LocalFleet(gateway, sleeper, desired=2, log=logs.append)
    try:
        assert fleet.tick(now=0.0) == []
        assert set(gateway.replicas.replicas) == {"replica-0", "replica-1"}
        first = [r.process.process for r in fleet.replicas.values()]
        decisions = fleet.tick(now=1.0)
        assert [d.kind for d in decisions] == ["replace", "replace"]
        assert "not ready 1s after start (limit 0.5s)" in decisions[0].reason
        for process in first:  # killed as a group, not leaked
            assert process is not None
            process.wait(timeout=10)
        assert [s["restarts"] for s in fleet.status()["slots"]] == [1, 1]  # type: ignore[index]
        fleet.service = tiny_service(replicas={"min": 1, "max": 1})
        fleet.desired = 1
        started = time.monotonic()
        fleet.tick(now=1.1)
        assert time.monotonic() - started < 1.0  # the drain happens off the event loop
        assert set(gateway.replicas.replicas) == {"replica-0"}
        assert gateway.status()["fleet"]["slots"][0]["phase"] == "starting"
        assert any("draining replica-1" in line for line in logs)
        # The control loop's decisions are on the gateway's /metrics, with bounded reasons.
        exposition = generate_latest(gateway.metrics.registry).decode()
        service = 'service="tiny"'
        assert f'tokenfleet_control_replacements_total{{reason="unready",{service}}} 2.0' in exposition
        assert f"tokenfleet_control_desired_replicas{{{service}}} 1.0" in exposition
        assert f'tokenfleet_control_loop_iterations_total{{outcome="ok",{service}}} 3.0' in exposition
    finally:
        fleet.stop_all()
    assert not fleet.replicas


def test_a_replica_the_local_fleet_stops_leaves_no_gateway_series() -> None:
    """The local fleet sets the gateway's membership itself (no discovery): a replica it scales
    away takes its per-replica series with it when it leaves the gateway, so a `replica_routable`
    at 0 (here: never ready) cannot hold TokenfleetReplicaDown firing for an id that is gone; the
    series its last request recreates as it ends go once it has no request left."""
    gateway = Gateway(tiny_service())
    metrics = gateway.metrics

    def series(rid: str) -> dict[str, float]:
        families = text_string_to_metric_families(generate_latest(metrics.registry).decode())
        return {s.name: s.value for f in families for s in f.samples if s.labels.get("replica") == rid}

    fleet = LocalFleet(gateway, sleeper, desired=2, log=lambda line: None)
    try:
        fleet.tick(now=0.0)
        member = gateway.replicas.replicas["replica-1"]
        metrics.child(metrics.upstream_requests, "replica-1", "/v1/completions", "ok").inc()
        metrics.child(metrics.first_byte, "/v1/completions", "standard", "replica-1").observe(0.1)
        assert series("replica-1")["tokenfleet_gateway_replica_routable"] == 0.0  # starting
        member.in_flight = 1  # a request still running on it
        fleet.service = tiny_service(replicas={"min": 1, "max": 1})
        fleet.desired = 1
        fleet.tick(now=1.0)  # replica-1 (the newest unready one) is drained: out of the gateway
        assert set(gateway.replicas.replicas) == {"replica-0"}
        assert series("replica-1") == {}
        # The request ends (the forwarder counts it on the replica that served it), then the
        # drain ends on the next tick.
        member.in_flight = 0
        metrics.child(metrics.upstream_requests, "replica-1", "/v1/completions", "ok").inc()
        fleet.tick(now=2.0)
        assert set(fleet.replicas) == {"replica-0"}
        assert series("replica-1") == {}
        assert series("replica-0")["tokenfleet_gateway_replica_routable"] == 0.0
    finally:
        fleet.stop_all()


def test_a_failing_tick_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    gateway = Gateway(tiny_service())
    calls: list[int] = []

    def broken(service: LLMService, replica_id: str, port: int) -> EngineProcess:
        calls.append(port)
        raise OSError("no such file")

    fleet = LocalFleet(gateway, broken, desired=1, log=lambda line: None)

    async def run() -> None:
        task = asyncio.create_task(fleet.supervise(0.01))
        while len(calls) < 3:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(run())
    assert len(calls) >= 3
    assert "control loop tick failed" in caplog.text
    exposition = generate_latest(gateway.metrics.registry).decode()
    assert 'tokenfleet_control_loop_iterations_total{outcome="error",service="tiny"}' in exposition


def test_revision_changes_with_engine_sections_only() -> None:
    base = tiny_service()
    assert revision_of(base.spec) == revision_of(tiny_service().spec)
    assert revision_of(base.spec) != revision_of(tiny_service(engine={"maxNumSeqs": 4}).spec)
    assert revision_of(base.spec) == revision_of(tiny_service(replicas={"min": 1, "max": 3}).spec)


def test_engines_export_traces_where_the_gateway_does(tmp_path: Path) -> None:
    """An OTLP endpoint in `tokenfleet up`'s environment reaches every engine it launches, so a
    request's trace runs gateway → engine; without one, vLLM traces nothing."""
    collector = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    launch, _ = engine_launcher(tmp_path, environ=collector)
    argv = launch(tiny_service(), "replica-0", free_port()).command.argv
    assert argv[argv.index("--otlp-traces-endpoint") + 1] == "http://127.0.0.1:4318/v1/traces"
    launch, _ = engine_launcher(tmp_path, environ={})
    assert "--otlp-traces-endpoint" not in launch(tiny_service(), "replica-0", free_port()).command.argv


# -- `tokenfleet up` end to end ------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.slow
def test_tokenfleet_up_serves_through_the_gateway_and_stops_cleanly(tmp_path: Path) -> None:
    ensure_builtin("tiny-random")
    port = free_port()
    service = tiny_service().model_dump(by_alias=True, exclude_none=True)
    spec_path = tmp_path / "service.yaml"
    spec_path.write_text(yaml.safe_dump(service))
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    cli = [sys.executable, "-m", "tokenfleet.cli"]
    up = subprocess.Popen(
        [*cli, "up", "-f", str(spec_path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        lines: list[str] = []
        assert up.stdout is not None
        while not any("ready — OpenAI API at" in line for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            assert up.poll() is None, "".join(lines)
            lines.append(up.stdout.readline())
        assert f"http://127.0.0.1:{port}/v1" in lines[-1]

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        completion = client.completions.create(model="tiny", prompt="def f(", max_tokens=4, temperature=0)
        assert completion.usage is not None
        assert completion.usage.completion_tokens == 4

        status = subprocess.run(
            [*cli, "status", "--port", str(port)], capture_output=True, text=True, env=env
        )
        assert status.returncode == 0, status.stderr
        row = next(line for line in status.stdout.splitlines() if line.startswith("replica-0"))
        assert row.split()[2:4] == ["ready", "ready"]
        as_json = subprocess.run(
            [*cli, "status", "--port", str(port), "--json"], capture_output=True, text=True, env=env
        )
        engine_pid = yaml.safe_load(as_json.stdout)["fleet"]["slots"][0]["pid"]

        up.send_signal(signal.SIGTERM)
        rest, _ = up.communicate(timeout=90)
        assert up.returncode == 0, rest
        assert "tokenfleet: stopped" in rest
        with pytest.raises(ProcessLookupError):
            os.kill(engine_pid, 0)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_a_new_fleet_stops_engines_a_dead_fleet_left_behind(tmp_path: Path) -> None:
    from tokenfleet.engine.fleet import ENGINE_MARKER, reap_leftovers, write_pid_file

    # A stand-in engine (its command line carries the marker) and an unrelated process.
    engine = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", ENGINE_MARKER], start_new_session=True
    )
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    dead_fleet = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_fleet.wait()
    pid_file = tmp_path / "run" / "svc.json"
    try:
        write_pid_file(pid_file, [engine.pid, other.pid])
        data = json.loads(pid_file.read_text())
        data["fleet"] = dead_fleet.pid
        pid_file.write_text(json.dumps(data))
        assert reap_leftovers(pid_file) == [engine.pid]
        assert engine.wait(timeout=10) == -signal.SIGKILL
        assert other.poll() is None  # a pid that is not an engine is left alone
        assert not pid_file.exists()
        write_pid_file(pid_file, [other.pid])  # this process's own fleet: still alive, not reaped
        assert reap_leftovers(pid_file) == []
    finally:
        for process in (engine, other):
            if process.poll() is None:
                process.kill()
                process.wait()
