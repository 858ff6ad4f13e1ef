"""The local fleet behind `tokenfleet up`: engine replicas as processes, the gateway in front.

`decide` is the control loop's pure core — given what each replica slot looks like now, which
slots to start, restart or stop — so the operator can run the same decisions against
Deployments. `LocalFleet` applies them to processes; `run_up` wires the fleet, the gateway and
signal handling together.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import uvicorn
import uvloop

from tokenfleet.engine.gateway.app import Gateway
from tokenfleet.engine.gateway.server import freeze_startup_heap, gateway_config
from tokenfleet.engine.launch import EngineCommand, EngineProcess, engine_command
from tokenfleet.observability.control_metrics import ControlLoopMetrics
from tokenfleet.spec import LLMService

Phase = Literal["absent", "starting", "ready", "unready", "exited"]


@dataclass(frozen=True, slots=True)
class SlotView:
    """What the control loop knows about one replica slot."""

    slot: int
    phase: Phase
    restarts: int = 0
    since: float = 0.0  # when it entered this phase (started, or exited)


@dataclass(frozen=True, slots=True)
class Action:
    kind: Literal["start", "restart", "stop"]
    slot: int
    reason: str

    @property
    def metric_reason(self) -> str:
        """A fixed enum for metric labels (the free-text reason would be unbounded)."""
        if self.kind == "restart":
            return "crashed" if self.reason == "replica exited" else "unready"
        return "missing" if self.kind == "start" else "surplus"


@dataclass(frozen=True, slots=True)
class Policy:
    # Like KServe's startup probe (60 x 10 s): big models on GPUs, or any model on a busy CPU
    # box, can take minutes; restarting a slow start only makes it slower.
    startup_timeout_s: float = 600.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 30.0


def restart_delay(restarts: int, policy: Policy) -> float:
    """Exponential back-off so a replica that crashes at start-up does not spin the CPU."""
    return float(min(policy.backoff_cap_s, policy.backoff_base_s * 2 ** min(restarts, 16)))


def decide(slots: Sequence[SlotView], desired: int, now: float, policy: Policy = Policy()) -> list[Action]:
    """Actions that move the observed slots towards `desired` healthy replicas."""
    actions: list[Action] = []
    by_slot = {s.slot: s for s in slots}
    for index in range(desired):
        view = by_slot.get(index)
        if view is None or view.phase == "absent":
            actions.append(Action("start", index, "missing replica"))
        elif view.phase == "exited":
            if now - view.since >= restart_delay(view.restarts, policy):
                actions.append(Action("restart", index, "replica exited"))
        elif view.phase == "starting" and now - view.since > policy.startup_timeout_s:
            actions.append(Action("restart", index, f"not ready after {policy.startup_timeout_s:.0f}s"))
    for view in sorted(slots, key=lambda s: -s.slot):
        if view.slot >= desired and view.phase not in ("absent", "exited"):
            actions.append(Action("stop", view.slot, "above desired replicas"))
    return actions


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


Launcher = Callable[[int, int], EngineProcess]  # (slot, port) -> a not-yet-started process


@dataclass
class Slot:
    index: int
    port: int
    process: EngineProcess | None = None
    restarts: int = 0
    since: float = field(default_factory=time.monotonic)
    exit_code: int | None = None
    was_ready: bool = False

    @property
    def id(self) -> str:
        return f"replica-{self.index}"


class LocalFleet:
    """Replica processes kept at `desired`, registered with the gateway as they come and go."""

    def __init__(
        self,
        gateway: Gateway,
        launcher: Launcher,
        desired: int,
        policy: Policy = Policy(),
        log: Callable[[str], None] = print,
    ) -> None:
        self.gateway = gateway
        self.launcher = launcher
        self.desired = desired
        self.policy = policy
        self.log = log
        self.slots: dict[int, Slot] = {}
        gateway.extra_status = self.status
        # The control loop's own series, on the gateway's /metrics (dashboards and alerts use them).
        self.service_name = gateway.service.metadata.name
        self.control = ControlLoopMetrics(registry=gateway.metrics.registry)
        self.control.init_service(self.service_name)

    def view(self, slot: Slot) -> SlotView:
        process = slot.process
        if process is None:
            return SlotView(slot.index, "absent", slot.restarts, slot.since)
        if not process.is_running():
            return SlotView(slot.index, "exited", slot.restarts, slot.since)
        replica = self.gateway.replicas.replicas.get(slot.id)
        if replica is not None and replica.breaker.admits:
            return SlotView(slot.index, "ready", slot.restarts, slot.since)
        return SlotView(slot.index, "unready" if slot.was_ready else "starting", slot.restarts, slot.since)

    def tick(self, now: float | None = None) -> list[Action]:
        started = time.perf_counter()
        try:
            actions = self._tick(time.monotonic() if now is None else now)
        except Exception:
            self.control.iteration(self.service_name, ok=False, duration_s=time.perf_counter() - started)
            raise
        self.control.iteration(self.service_name, ok=True, duration_s=time.perf_counter() - started)
        ready = sum(1 for slot in self.slots.values() if self.view(slot).phase == "ready")
        self.control.replicas(self.service_name, desired=self.desired, ready=ready)
        for action in actions:
            if action.kind == "restart":
                self.control.replaced(self.service_name, action.metric_reason)
            else:
                direction = "up" if action.kind == "start" else "down"
                self.control.decision(self.service_name, direction, action.metric_reason)
        return actions

    def _tick(self, now: float) -> list[Action]:
        for slot in self.slots.values():
            process = slot.process
            if process is not None and process.process is not None:
                code = process.process.poll()
                if code is not None and slot.exit_code is None:
                    slot.exit_code = code
                    slot.since = now  # back-off counts from the exit
                    self.log(f"tokenfleet: {slot.id} (port {slot.port}) exited with code {code}")
            if self.view(slot).phase == "ready":
                slot.was_ready = True
        views = [self.view(s) for s in self.slots.values()]
        actions = decide(views, self.desired, now, self.policy)
        for action in actions:
            self.apply(action, now)
        if actions:
            self.sync_gateway()
        return actions

    def apply(self, action: Action, now: float) -> None:
        # This runs on the gateway's event loop: nothing here may block for long.
        if action.kind == "stop":
            stopped = self.slots.pop(action.slot)
            if stopped.process is not None:  # drain in the background (SIGTERM, then wait)
                timeout = self.gateway.spec.engine.shutdown_timeout_s + 10
                threading.Thread(target=stopped.process.stop, args=(timeout,), daemon=True).start()
            return
        slot = self.slots.get(action.slot) or Slot(action.slot, free_port())
        self.slots[action.slot] = slot
        if action.kind == "restart":
            old = slot.process.process if slot.process is not None else None
            if old is not None and old.poll() is None:  # a hung start: no drain, just gone
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(old.pid, signal.SIGKILL)
                old.wait(timeout=10)
            slot.restarts += 1
        slot.process = self.launcher(slot.index, slot.port)
        slot.process.start()
        slot.since, slot.exit_code, slot.was_ready = now, None, False
        self.log(f"tokenfleet: {action.kind} {slot.id} on port {slot.port} ({action.reason})")

    def sync_gateway(self) -> None:
        self.gateway.set_replicas((s.id, f"http://127.0.0.1:{s.port}") for s in self.slots.values())

    def status(self) -> dict[str, object]:
        return {
            "desired": self.desired,
            "slots": [
                {
                    "id": s.id,
                    "port": s.port,
                    "pid": s.process.process.pid if s.process and s.process.process else None,
                    "phase": self.view(s).phase,
                    "restarts": s.restarts,
                    "exit_code": s.exit_code,
                }
                for s in sorted(self.slots.values(), key=lambda s: s.index)
            ],
        }

    async def supervise(self, interval_s: float = 0.5) -> None:
        while True:
            self.tick()
            await asyncio.sleep(interval_s)

    def stop_all(self) -> None:
        """SIGTERM every replica at once (each drains for shutdownTimeoutS), then wait."""
        processes = [s.process for s in self.slots.values() if s.process is not None]
        for process in processes:
            if process.is_running() and process.process is not None:
                process.process.send_signal(signal.SIGTERM)
        for process in processes:
            process.stop(timeout_s=self.gateway.spec.engine.shutdown_timeout_s + 10)
        self.slots.clear()


def engine_launcher(service: LLMService, model_path: str, log_dir: Path) -> Launcher:
    def launch(slot: int, port: int) -> EngineProcess:
        command: EngineCommand = engine_command(service.spec, model_path, port=port)
        return EngineProcess(command, port=port, log_path=log_dir / f"replica-{slot}.log", cwd=log_dir)

    return launch


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `run_up` owns SIGINT/SIGTERM and the order of
    shutdown (stop accepting, drain the gateway, then drain the engines)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_fleet(
    service: LLMService,
    launcher: Launcher,
    *,
    replicas: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    policy: Policy = Policy(),
    stop: asyncio.Event | None = None,
    log: Callable[[str], None] = print,
) -> int:
    gateway = Gateway(service)
    fleet = LocalFleet(gateway, launcher, replicas, policy, log)
    freeze_startup_heap()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    drain_s = service.spec.engine.shutdown_timeout_s
    server = _Server(
        # The loop is the caller's: run_up starts it on uvloop.
        gateway_config(gateway.app, host, port, drain_s=drain_s, loop="none")
    )
    # Bind here rather than in uvicorn, which sys.exit()s when the port is taken.
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        log(f"tokenfleet: the gateway could not listen on {host}:{port}: {exc.strerror}")
        return 1
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    supervisor: asyncio.Task[None] | None = None
    try:
        while not server.started:
            if serving.done():
                log(f"tokenfleet: the gateway could not start on {host}:{port}")
                return 1
            await asyncio.sleep(0.05)
        supervisor = asyncio.create_task(fleet.supervise())
        url = f"http://{host}:{port}/v1"
        log(f"tokenfleet: gateway on {url}; starting {replicas} replica(s) of {service.spec.model.name}")
        announced = False
        while not stop.is_set():
            if not announced and gateway.replicas.routable():
                announced = True
                log(f"tokenfleet: ready — OpenAI API at {url} (model {service.spec.model.name!r})")
            if serving.done():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.2)
    finally:
        log("tokenfleet: stopping — draining requests, then replicas")
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        server.should_exit = True
        with contextlib.suppress(Exception):
            await serving
        listener.close()
        await asyncio.to_thread(fleet.stop_all)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        log("tokenfleet: stopped")
    return 0


def run_up(
    service: LLMService, *, replicas: int | None = None, host: str = "127.0.0.1", port: int | None = None
) -> int:
    """`tokenfleet up`: blocks until Ctrl-C/SIGTERM; returns the exit code."""
    from tokenfleet.models import cache_dir, resolve_model

    spec = service.spec
    count = replicas if replicas is not None else max(1, spec.replicas.min)
    if not 1 <= count <= spec.replicas.max:
        print(f"tokenfleet: --replicas must be within 1..{spec.replicas.max} (replicas.max)", file=sys.stderr)
        return 2
    print(f"tokenfleet: resolving model {spec.model.source}", flush=True)
    model_path = resolve_model(spec.model)
    log_dir = cache_dir() / "logs" / service.metadata.name
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"tokenfleet: replica logs in {log_dir}", flush=True)
    launcher = engine_launcher(service, model_path, log_dir)
    # uvloop: the gateway's per-request CPU is its added latency (docs/results/gateway.md).
    return uvloop.run(
        serve_fleet(
            service,
            launcher,
            replicas=count,
            host=host,
            port=port or spec.gateway.port,
            log=lambda line: print(line, flush=True),
        )
    )


def format_status(status: dict[str, object]) -> str:
    """`tokenfleet status` as a table: one row per replica, gateway and process views joined."""
    replicas = {str(r["id"]): r for r in _dicts(status.get("replicas"))}
    fleet = status.get("fleet")
    slots = {str(s["id"]): s for s in _dicts(fleet.get("slots") if isinstance(fleet, dict) else None)}
    lines = [
        f"service {status.get('service')}  model {status.get('model')}  policy {status.get('policy')}  "
        f"ready {status.get('ready')}",
        f"{'REPLICA':<12} {'STATE':<9} {'PROCESS':<9} {'PORT':<6} {'PID':<8} {'RESTARTS':<9} "
        f"{'IN-FLIGHT':<10} {'WAITING':<8} {'EJECTIONS':<9} LAST ERROR",
    ]
    for rid in sorted(set(replicas) | set(slots)):
        r, s = replicas.get(rid, {}), slots.get(rid, {})
        lines.append(
            f"{rid:<12} {r.get('state', '-')!s:<9} {s.get('phase', '-')!s:<9} {s.get('port', '-')!s:<6} "
            f"{s.get('pid', '-')!s:<8} {s.get('restarts', '-')!s:<9} {r.get('in_flight', '-')!s:<10} "
            f"{r.get('engine_waiting', '-')!s:<8} {r.get('ejections', '-')!s:<9} {r.get('last_error') or ''}"
        )
    admission = status.get("admission")
    if isinstance(admission, dict):
        lines.append(
            f"admission: {admission.get('running')}/{admission.get('slots')} slots busy, "
            f"queued {admission.get('queued')}, shed {admission.get('shed')}"
        )
    return "\n".join(lines)


def _dicts(value: object) -> list[dict[str, object]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def print_status(base_url: str, *, as_json: bool = False) -> int:
    import json

    import httpx

    try:
        reply = httpx.get(f"{base_url}/admin/status", timeout=5.0, trust_env=False)
    except httpx.HTTPError as exc:
        print(f"tokenfleet: no gateway at {base_url} ({type(exc).__name__}); is `tokenfleet up` running?")
        return 1
    if reply.status_code != 200:
        print(f"tokenfleet: {base_url}/admin/status answered {reply.status_code}")
        return 1
    status = reply.json()
    print(json.dumps(status, indent=2) if as_json else format_status(status))
    return 0
