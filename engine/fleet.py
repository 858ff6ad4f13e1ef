"""The local fleet behind `tokenfleet up`: engine replicas as processes, the gateway in front,
and the control loop that keeps them at the spec — autoscaling, failover and rollouts.

Every decision comes from the pure control core (`tokenfleet.operator.control`), the same
functions the operator runs against Deployments; `LocalFleet` only observes processes and the
gateway it embeds, and applies the answers: start, drain and stop processes, set the gateway's
membership and canary weights. `run_up` wires the fleet, the gateway and signal handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from fastapi import Request
from fastapi.responses import JSONResponse

from tokenfleet.engine.gateway.app import LOCAL_HOSTS, Gateway
from tokenfleet.engine.gateway.calls import error_body
from tokenfleet.engine.gateway.replicas import Replica
from tokenfleet.engine.gateway.server import freeze_startup_heap, gateway_config
from tokenfleet.engine.launch import EngineProcess, engine_command
from tokenfleet.observability.control_metrics import ControlLoopMetrics
from tokenfleet.observability.dashboard import LocalMonitor, mount_dashboard
from tokenfleet.observability.stack import FleetObservability
from tokenfleet.operator.control import (
    Replacement,
    ReplicaObservation,
    RolloutState,
    ScaleDecision,
    ScaleState,
    Signals,
    SloCounts,
    autoscale,
    begin_rollout,
    failover,
    percentile,
    restarts_after_ready,
    revision_of,
    rollout,
    warmup_ends,
    window_stats,
)
from tokenfleet.operator.control.observe import Phase
from tokenfleet.spec import LLMService, LLMServiceSpec, SpecError, parse_service

log = logging.getLogger("tokenfleet.fleet")

SIGNAL_WINDOW_S = 60.0
DECISIONS_KEPT = 20
# Spec sections a running `tokenfleet up` can take without a restart; `model`, `engine` and
# `scheduler` define a revision and roll out; the gateway's own sections need a restart.
IN_PLACE = ("replicas", "autoscaling", "rollout", "failover")
NEEDS_RESTART = ("routing", "gateway")


def changed_sections(old: LLMServiceSpec, new: LLMServiceSpec) -> list[str]:
    return [name for name in LLMServiceSpec.model_fields if getattr(old, name) != getattr(new, name)]


def context_limit(serving: Sequence[LLMService]) -> int:
    """The longest context any of the revisions taking traffic accepts: the gateway's bound for
    a request's length, so each engine refuses what only it cannot serve (and the canary
    analysis sees that refusal as the revision's)."""
    return max(s.spec.model.max_model_len for s in serving)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# (service, replica id, port) -> a not-yet-started process serving that service's revision.
Launcher = Callable[[LLMService, str, int], EngineProcess]


@dataclass
class LocalReplica:
    id: str
    revision: str
    port: int
    process: EngineProcess
    phase: Phase = "starting"
    since: float = 0.0  # when it entered `phase`
    restarts: int = 0
    exit_code: int | None = None
    ready_since: float | None = None
    draining_since: float | None = None  # out of the gateway, waiting for its requests to finish
    member: Replica | None = None  # the gateway's record while draining: its in-flight count

    @property
    def pid(self) -> int | None:
        return self.process.process.pid if self.process.process is not None else None


ENGINE_MARKER = "vllm.entrypoints.openai.api_server"


def write_pid_file(path: Path, pids: list[int]) -> None:
    """The engines a running fleet owns (process-group leaders), for `reap_leftovers`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"fleet": os.getpid(), "engines": sorted(pids)}))
    temporary.replace(path)


def reap_leftovers(path: Path, marker: str = ENGINE_MARKER) -> list[int]:
    """Stop the engines a fleet that died without cleaning up left behind: each listed process
    group whose leader still runs `marker` (a pid reused by something else is left alone)."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    fleet = recorded.get("fleet")
    if isinstance(fleet, int) and fleet != os.getpid() and _alive(fleet):
        return []  # that fleet is still running: its engines are not leftovers
    stopped = []
    for pid in recorded.get("engines", []):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
                stopped.append(pid)
    path.unlink(missing_ok=True)
    return stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True, slots=True)
class Decision:
    at: float  # unix time
    kind: str  # scale | replace | rollout | apply
    reason: str


@dataclass
class LocalFleet:
    """Replica processes kept where the control core says, registered with the gateway."""

    gateway: Gateway
    launcher: Launcher
    desired: int
    log: Callable[[str], None] = print
    prepare: Callable[[LLMService], None] | None = None  # resolve a new revision's model, off-loop
    pid_file: Path | None = None  # where the engines' pids are kept for a later `reap_leftovers`
    # Told every tick the (id, url) of every replica process, draining ones too (Prometheus targets).
    on_replicas: Callable[[list[tuple[str, str]]], None] | None = None
    replicas: dict[str, LocalReplica] = field(default_factory=dict)
    decisions: deque[Decision] = field(default_factory=lambda: deque(maxlen=DECISIONS_KEPT))

    def __post_init__(self) -> None:
        self.service = self.gateway.service
        revision = revision_of(self.service.spec)
        self.services: dict[str, LLMService] = {revision: self.service}
        self.scale_state = ScaleState()
        self.last_scale: ScaleDecision | None = None
        self.rollout_state = RolloutState(stable=revision)
        self.weights: dict[str, int] | None = None
        self._serial = 0
        self._recorded: list[int] | None = None
        self.gateway.extra_status = self.status
        # The control loop's own series, on the gateway's /metrics (dashboards and alerts use them).
        self.service_name = self.service.metadata.name
        self.control = ControlLoopMetrics(registry=self.gateway.metrics.registry)
        self.control.init_service(self.service_name)
        self.gateway.app.add_api_route(
            "/admin/apply", self._apply_endpoint, methods=["POST"], include_in_schema=False
        )

    # -- observe ----------------------------------------------------------------------------

    def _observe(self, replica: LocalReplica, now: float) -> None:
        process = replica.process.process
        code = process.poll() if process is not None else None
        if code is not None:
            phase: Phase = "exited"
            if replica.exit_code is None:
                replica.exit_code = code
                self.log(f"tokenfleet: {replica.id} (port {replica.port}) exited with code {code}")
        else:
            member = self.gateway.replicas.replicas.get(replica.id)
            admits = member is not None and member.breaker.admits
            was_ready = replica.ready_since is not None
            phase = "ready" if admits else ("unhealthy" if was_ready else "starting")
        if phase == replica.phase:
            return
        if replica.phase == "ready" and replica.ready_since is not None:
            replica.restarts = restarts_after_ready(
                replica.restarts, now - replica.ready_since, self.service.spec.failover
            )
        replica.phase, replica.since = phase, now
        if phase == "ready":
            replica.ready_since = now

    def observations(self) -> list[ReplicaObservation]:
        return [
            ReplicaObservation(
                id=r.id,
                revision=r.revision,
                phase=r.phase,
                since=r.since,
                restarts=r.restarts,
                queue_depth=member.stats.waiting if member else 0.0,
                in_flight=member.in_flight if member else 0.0,
                kv_cache_usage=member.stats.kv_usage if member else 0.0,
            )
            for r in self._serving()
            for member in [self.gateway.replicas.replicas.get(r.id)]
        ]

    def signals(self, now: float) -> Signals:
        recent = self.gateway.outcomes.all_since(now - SIGNAL_WINDOW_S)
        ttfts = [t for outcome, t in recent if outcome == "ok" and t is not None]
        # Idle means no request for the whole scale-down window (at least a second).
        idle_window = max(1.0, self.service.spec.autoscaling.scale_down_stabilization_s)
        latest = self.gateway.outcomes.all_since(now - idle_window)
        slo: dict[str, SloCounts] = {}
        for member in self.gateway.replicas.replicas.values():
            for name, met, total in member.stats.slo:
                seen = slo.get(name, SloCounts())
                slo[name] = SloCounts(seen.met + met, seen.total + total)
        return Signals(
            gateway_queued=sum(self.gateway.admission.queued().values()),
            recent_requests=len(latest),
            ttft_p90_s=percentile(ttfts, 90) if ttfts else None,
            slo=slo,
        )

    def _serving(self) -> list[LocalReplica]:
        return [r for r in self.replicas.values() if r.draining_since is None]

    # -- decide and apply -------------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[Decision]:
        started = time.perf_counter()
        try:
            decisions = self._tick(time.monotonic() if now is None else now)
        except Exception:
            self.control.iteration(self.service_name, ok=False, duration_s=time.perf_counter() - started)
            raise
        self.control.iteration(self.service_name, ok=True, duration_s=time.perf_counter() - started)
        ready = sum(1 for r in self._serving() if r.phase == "ready")
        self.control.replicas(self.service_name, desired=self.desired, ready=ready)
        return decisions

    def _tick(self, now: float) -> list[Decision]:
        spec = self.service.spec
        for replica in self.replicas.values():
            self._observe(replica, now)
        observed = self.observations()
        decisions: list[Decision] = []

        scale = autoscale(
            spec.autoscaling,
            spec.replicas,
            self.desired,
            observed,
            self.signals(now),
            self.scale_state,
            now,
            rollout_in_progress=self.rollout_state.in_progress,
        )
        self.scale_state, self.last_scale = scale.state, scale
        if scale.desired != self.desired:
            decisions.append(self._decided("scale", scale.reason))
            self.control.decision(self.service_name, scale.direction, _scale_label(scale.reason))
            self.desired = scale.desired

        state = self.rollout_state
        since = state.step_started_at if state.step_started_at is not None else now
        warmed = warmup_ends(spec.rollout, state)
        warm = warmed if warmed is not None else now
        seen = self.gateway.outcomes
        stats = {rev: window_stats(seen.since(rev, since), seen.since(rev, warm)) for rev in self.services}
        plan = rollout(spec.rollout, state, self.desired, observed, stats, now)
        self._set_rollout(plan.state)
        decisions.extend(self._decided("rollout", event) for event in plan.events)

        for replacement in failover(spec.failover, observed, now):
            decisions.append(self._decided("replace", f"{replacement.replica}: {replacement.reason}"))
            self._replace(replacement, now)
        self._scale_revisions(plan.counts, now)
        self.weights = plan.weights
        self.gateway.set_weights(plan.weights)
        serving = [self.services[r] for r in plan.counts if r in self.services]
        if serving:  # (a recreate stops everything first: keep the limit until the new one starts)
            self.gateway.context_limit = context_limit(serving)
        self._drain(now)
        self.sync_gateway()
        self._record_pids()
        if self.on_replicas is not None:
            self.on_replicas([(r.id, f"http://127.0.0.1:{r.port}") for r in self.replicas.values()])
        return decisions

    def _record_pids(self) -> None:
        if self.pid_file is None:
            return
        pids = [r.pid for r in self.replicas.values() if r.pid is not None]
        if pids != self._recorded:
            write_pid_file(self.pid_file, pids)
            self._recorded = pids

    def _decided(self, kind: str, reason: str) -> Decision:
        decision = Decision(time.time(), kind, reason)
        self.decisions.append(decision)
        self.log(f"tokenfleet: {kind}: {reason}")
        return decision

    def _set_rollout(self, state: RolloutState) -> None:
        if state != self.rollout_state:
            self.rollout_state = state
            self.control.set_rollout(self.service_name, state.phase, state.step)
            live = set(self.services) & ({state.stable} | ({state.target} if state.target else set()))
            self.gateway.outcomes.forget(live)

    def _start(self, revision: str, now: float) -> LocalReplica:
        rid = f"replica-{self._serial}"
        self._serial += 1
        port = free_port()
        replica = LocalReplica(
            rid, revision, port, self.launcher(self.services[revision], rid, port), since=now
        )
        replica.process.start()
        self.replicas[rid] = replica
        self.log(f"tokenfleet: started {rid} ({revision}) on port {port}")
        return replica

    def _replace(self, replacement: Replacement, now: float) -> None:
        old = self.replicas[replacement.replica]
        if replacement.kind == "restart":
            self.control.replaced(self.service_name, "crashed")
        else:
            self.control.replaced(self.service_name, "unhealthy" if old.phase == "unhealthy" else "unready")
        _reap(old.process)  # a live but useless process gets no drain; a dead one's group goes too
        old.port = free_port()  # the dying process may still hold the old one
        fresh = self.launcher(self.services[old.revision], old.id, old.port)
        fresh.start()
        old.process, old.restarts, old.exit_code = fresh, old.restarts + 1, None
        old.phase, old.since, old.ready_since = "starting", now, None

    def _scale_revisions(self, counts: dict[str, int], now: float) -> None:
        for revision in sorted({r.revision for r in self._serving()} | set(counts)):
            mine = [r for r in self._serving() if r.revision == revision]
            wanted = counts.get(revision, 0)
            for _ in range(wanted - len(mine)):
                self._start(revision, now)
            # Surplus leaves unready-first, newest-first: the least useful replicas go.
            mine.sort(key=lambda r: (r.phase == "ready", -int(r.id.rsplit("-", 1)[1])))
            for replica in mine[: max(0, len(mine) - wanted)]:
                replica.draining_since = now
                replica.member = self.gateway.replicas.replicas.get(replica.id)
                self.log(f"tokenfleet: draining {replica.id} ({revision})")
        # Forget specs of revisions nothing runs or wants any more.
        keep = {r.revision for r in self.replicas.values()} | set(counts)
        keep |= {self.rollout_state.stable, self.rollout_state.target or ""}
        for revision in [rev for rev in self.services if rev not in keep]:
            del self.services[revision]

    def _drain(self, now: float) -> None:
        """Stop draining replicas once the gateway has no request left on them (or the drain
        time is up); the process then gets SIGTERM and vLLM's own shutdown timeout."""
        drain_s = self.service.spec.engine.shutdown_timeout_s
        for replica in list(self.replicas.values()):
            if replica.draining_since is None:
                continue
            in_flight = replica.member.in_flight if replica.member is not None else 0
            if in_flight and now - replica.draining_since < drain_s:
                continue
            del self.replicas[replica.id]
            threading.Thread(target=replica.process.stop, args=(drain_s + 10,), daemon=True).start()
            self.log(f"tokenfleet: stopped {replica.id} ({replica.revision})")

    def sync_gateway(self) -> None:
        serving = self._serving()
        self.gateway.set_replicas(
            ((r.id, f"http://127.0.0.1:{r.port}") for r in serving), {r.id: r.revision for r in serving}
        )

    # -- apply a new spec -------------------------------------------------------------------

    async def apply(self, new: LLMService) -> dict[str, Any]:
        """`tokenfleet apply`: take a changed spec; engine changes roll out by its strategy."""
        old = self.service
        if new.metadata.name != old.metadata.name:
            raise _ApplyError(f"metadata.name is {old.metadata.name!r} here; this fleet serves only that")
        changed = changed_sections(old.spec, new.spec)
        restart = [name for name in changed if name in NEEDS_RESTART]
        if new.spec.model.name != old.spec.model.name:
            restart.append("model.name (clients address the model by it)")
        scheduler = ("classes", "default_class", "tenants")
        if any(getattr(new.spec.scheduler, f) != getattr(old.spec.scheduler, f) for f in scheduler):
            restart.append("scheduler classes or tenants (the gateway classes requests by them)")
        if restart:
            raise _ApplyError(
                f"{', '.join(restart)} changed: the gateway reads them at start; restart `tokenfleet up`"
            )
        revision = revision_of(new.spec)
        if revision not in self.services and self.prepare is not None:
            await asyncio.to_thread(self.prepare, new)  # may build or download the model
        self.services[revision] = new
        self.service = new
        self.gateway.service = new
        if "replicas" in changed and not new.spec.autoscaling.enabled:
            self.desired = max(1, new.spec.replicas.min)
        elif "replicas" in changed or "autoscaling" in changed:
            self.desired = min(max(self.desired, new.spec.replicas.min), new.spec.replicas.max)
        before = self.rollout_state
        self._set_rollout(begin_rollout(before, revision, new.spec.rollout.strategy, time.monotonic()))
        if self.rollout_state != before:
            reason = f"{revision} applied ({', '.join(changed) or 'no change'}): {self.rollout_state.reason}"
            self._decided("apply", reason)
        return {
            "revision": revision,
            "changed": changed,
            "rollout": _rollout_status(self.rollout_state, self.weights),
        }

    async def _apply_endpoint(self, request: Request) -> JSONResponse:
        if request.client is None or request.client.host not in LOCAL_HOSTS:
            return JSONResponse(error_body(403, "admin is localhost only", "forbidden"), status_code=403)
        try:
            document = json.loads(await request.body())
            return JSONResponse(await self.apply(parse_service(document, "apply")))
        except json.JSONDecodeError as exc:
            return JSONResponse(error_body(400, f"invalid JSON: {exc.msg}", "invalid_request"), 400)
        except SpecError as exc:
            body = error_body(422, str(exc), "invalid_spec") | {"errors": exc.errors}
            return JSONResponse(body, status_code=422)
        except _ApplyError as exc:
            return JSONResponse(error_body(409, str(exc), "conflict"), status_code=409)

    # -- status and shutdown ----------------------------------------------------------------

    def status(self) -> dict[str, object]:
        ready = sum(1 for r in self._serving() if r.phase == "ready")
        return {
            "desired": self.desired,
            "ready": ready,
            "revision": self.rollout_state.stable,
            "autoscaling": {
                "enabled": self.service.spec.autoscaling.enabled,
                "metric": self.service.spec.autoscaling.metric,
                "value": None if self.last_scale is None else self.last_scale.metric_value,
                "reason": None if self.last_scale is None else self.last_scale.reason,
            },
            "rollout": _rollout_status(self.rollout_state, self.weights),
            "decisions": [{"at": d.at, "kind": d.kind, "reason": d.reason} for d in self.decisions],
            "slots": [
                {
                    "id": r.id,
                    "revision": r.revision,
                    "port": r.port,
                    "pid": r.pid,
                    "phase": "draining" if r.draining_since is not None else r.phase,
                    "restarts": r.restarts,
                    "exit_code": r.exit_code,
                }
                for r in sorted(self.replicas.values(), key=lambda r: int(r.id.rsplit("-", 1)[1]))
            ],
        }

    async def supervise(self, interval_s: float = 0.5) -> None:
        """Tick forever. A failing tick is logged and counted, never fatal: the loop goes on."""
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("control loop tick failed")
                self.log("tokenfleet: control loop tick failed (see the log); continuing")
            await asyncio.sleep(interval_s)

    def stop_all(self) -> None:
        """SIGTERM every replica at once (each drains for shutdownTimeoutS), then wait."""
        processes = [r.process for r in self.replicas.values()]
        for process in processes:
            if process.is_running() and process.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.process.send_signal(signal.SIGTERM)
        for process in processes:
            with contextlib.suppress(Exception):
                process.stop(timeout_s=self.service.spec.engine.shutdown_timeout_s + 10)
        self.replicas.clear()
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)


class _ApplyError(Exception):
    pass


def _rollout_status(state: RolloutState, weights: dict[str, int] | None) -> dict[str, object]:
    return {
        "phase": state.phase,
        "strategy": state.strategy,
        "stable": state.stable,
        "target": state.target,
        "step": state.step,
        "weights": weights,
        "reason": state.reason,
    }


def _scale_label(reason: str) -> str:
    """A fixed enum for the metric label (the free-text reason would be unbounded)."""
    for label in ("activation", "idle", "attainment"):
        if label in reason:
            return "slo" if label == "attainment" else label
    return "metric"


def _kill_group(process: EngineProcess) -> None:
    """SIGKILL the replica's whole process group, even when its leader is already gone (vLLM's
    engine-core child would otherwise survive a crashed API server)."""
    if process.process is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.process.pid, signal.SIGKILL)


def _reap(process: EngineProcess) -> None:
    """Collect the exit status and close the log off the event loop."""
    _kill_group(process)
    threading.Thread(target=process.stop, args=(5.0,), daemon=True).start()


def engine_launcher(
    log_dir: Path, environ: Mapping[str, str] = os.environ
) -> tuple[Launcher, Callable[[LLMService], None]]:
    """vLLM processes for a service's revision, and the step that resolves (builds) its model.

    With an OTLP endpoint in the environment (the one the gateway exports to), each engine
    exports its spans there too, so a request's trace runs gateway → engine.
    """
    from tokenfleet.models import resolve_model
    from tokenfleet.observability.otlp_endpoint import TraceExport, endpoint_from_env

    paths: dict[str, str] = {}
    endpoint = endpoint_from_env(environ)

    def prepare(service: LLMService) -> None:
        key = service.spec.model.model_dump_json()
        if key not in paths:
            paths[key] = resolve_model(service.spec.model)

    def launch(service: LLMService, replica_id: str, port: int) -> EngineProcess:
        prepare(service)
        path = paths[service.spec.model.model_dump_json()]
        traces = TraceExport.of_engines(endpoint, service.metadata.name) if endpoint else None
        command = engine_command(service.spec, path, port=port, traces=traces)
        log_path = log_dir / f"{replica_id}.log"
        return EngineProcess(command, port=port, log_path=log_path, cwd=log_dir, die_with_parent=True)

    return launch, prepare


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
    stop: asyncio.Event | None = None,
    log: Callable[[str], None] = print,
    prepare: Callable[[LLMService], None] | None = None,
    tick_s: float = 0.5,
    pid_file: Path | None = None,
    observability_dir: Path | None = None,
) -> int:
    gateway = Gateway(service)
    fleet = LocalFleet(gateway, launcher, replicas, log=log, prepare=prepare, pid_file=pid_file)
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
    # Prometheus + Alertmanager (observability/stack.py), their data under `observability_dir`.
    observe = FleetObservability(observability_dir) if observability_dir is not None else None
    try:
        while not server.started:
            if serving.done():
                log(f"tokenfleet: the gateway could not start on {host}:{port}")
                return 1
            await asyncio.sleep(0.05)
        supervisor = asyncio.create_task(fleet.supervise(tick_s))
        url = f"http://{host}:{port}/v1"
        log(f"tokenfleet: gateway on {url}; starting {replicas} replica(s) of {service.spec.model.name}")
        if observe is not None:
            prometheus = await observe.start(host, port, say=log)
            fleet.on_replicas = observe.replicas
            monitor = LocalMonitor.for_gateway(gateway, prometheus_url=prometheus, notice=observe.notice)
            mount_dashboard(gateway.app, monitor)
        announced = False
        while not stop.is_set():
            if not announced and (gateway.replicas.routable() or fleet.desired == 0):
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
        if observe is not None:
            await asyncio.to_thread(observe.stop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        log("tokenfleet: stopped")
    return 0


def run_up(
    service: LLMService, *, replicas: int | None = None, host: str = "127.0.0.1", port: int | None = None
) -> int:
    """`tokenfleet up`: blocks until Ctrl-C/SIGTERM; returns the exit code."""
    from tokenfleet.models import cache_dir

    spec = service.spec
    count = replicas if replicas is not None else max(1, spec.replicas.min)
    if not 1 <= count <= spec.replicas.max:
        print(f"tokenfleet: --replicas must be within 1..{spec.replicas.max} (replicas.max)", file=sys.stderr)
        return 2
    log_dir = cache_dir() / "logs" / service.metadata.name
    log_dir.mkdir(parents=True, exist_ok=True)
    pid_file = cache_dir() / "run" / f"{service.metadata.name}.json"
    leftovers = reap_leftovers(pid_file)
    if leftovers:
        print(
            f"tokenfleet: stopped {len(leftovers)} engine(s) an earlier `tokenfleet up` left behind",
            flush=True,
        )
    launcher, prepare = engine_launcher(log_dir)
    print(f"tokenfleet: resolving model {spec.model.source}", flush=True)
    prepare(service)
    print(f"tokenfleet: replica logs in {log_dir}", flush=True)
    # uvloop: the gateway's per-request CPU is its added latency (docs/results/gateway.md).
    return uvloop.run(
        serve_fleet(
            service,
            launcher,
            replicas=count,
            host=host,
            port=port or spec.gateway.port,
            log=lambda line: print(line, flush=True),
            prepare=prepare,
            pid_file=pid_file,
            observability_dir=cache_dir() / "observability" / service.metadata.name,
        )
    )


def format_status(status: dict[str, object]) -> str:
    """`tokenfleet status` as text: the control loop's view, then one row per replica (gateway
    and process views joined), then the last decisions with their reasons."""
    replicas = {str(r["id"]): r for r in _dicts(status.get("replicas"))}
    fleet = status.get("fleet")
    fleet = fleet if isinstance(fleet, dict) else {}
    slots = {str(s["id"]): s for s in _dicts(fleet.get("slots"))}
    lines = [
        f"service {status.get('service')}  model {status.get('model')}  policy {status.get('policy')}  "
        f"ready {status.get('ready')}",
    ]
    if fleet:
        lines.append(
            f"replicas: desired {fleet.get('desired')}, ready {fleet.get('ready')}  "
            f"revision {fleet.get('revision')}"
        )
        scaling = fleet.get("autoscaling")
        if isinstance(scaling, dict) and scaling.get("enabled"):
            lines.append(f"autoscaling on {scaling.get('metric')}: {scaling.get('reason')}")
        rollout_view = fleet.get("rollout")
        if isinstance(rollout_view, dict) and rollout_view.get("phase") != "idle":
            lines.append(
                f"rollout {rollout_view.get('phase')} ({rollout_view.get('strategy')} "
                f"{rollout_view.get('stable')} -> {rollout_view.get('target') or '-'}, step "
                f"{rollout_view.get('step')}, weights {rollout_view.get('weights') or '-'}): "
                f"{rollout_view.get('reason')}"
            )
    lines.append(
        f"{'REPLICA':<12} {'REVISION':<9} {'STATE':<9} {'PROCESS':<9} {'PORT':<6} {'PID':<8} "
        f"{'RESTARTS':<9} {'IN-FLIGHT':<10} {'WAITING':<8} {'EJECTIONS':<9} LAST ERROR"
    )
    for rid in sorted(set(replicas) | set(slots), key=_replica_order):
        r, s = replicas.get(rid, {}), slots.get(rid, {})
        lines.append(
            f"{rid:<12} {s.get('revision', r.get('revision', '-'))!s:<9} {r.get('state', '-')!s:<9} "
            f"{s.get('phase', '-')!s:<9} {s.get('port', '-')!s:<6} {s.get('pid', '-')!s:<8} "
            f"{s.get('restarts', '-')!s:<9} {r.get('in_flight', '-')!s:<10} "
            f"{r.get('engine_waiting', '-')!s:<8} {r.get('ejections', '-')!s:<9} {r.get('last_error') or ''}"
        )
    admission = status.get("admission")
    if isinstance(admission, dict):
        lines.append(
            f"admission: {admission.get('running')}/{admission.get('slots')} slots busy, "
            f"queued {admission.get('queued')}, shed {admission.get('shed')}"
        )
    decisions = _dicts(fleet.get("decisions"))
    if decisions:
        lines.append("last decisions:")
        for d in decisions[-10:]:
            at = time.strftime("%H:%M:%S", time.localtime(float(str(d.get("at", 0)))))
            lines.append(f"  {at} {d.get('kind')}: {d.get('reason')}")
    return "\n".join(lines)


def _replica_order(rid: str) -> tuple[int, str]:
    tail = rid.rsplit("-", 1)[-1]
    return (int(tail), rid) if tail.isdigit() else (1 << 30, rid)


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


def apply_spec(service: LLMService, base_url: str) -> int:
    """`tokenfleet apply`: send a validated spec to a running `tokenfleet up`."""
    import httpx

    document = service.model_dump(mode="json", by_alias=True, exclude_none=True)
    try:
        reply = httpx.post(f"{base_url}/admin/apply", json=document, timeout=600.0, trust_env=False)
    except httpx.HTTPError as exc:
        print(f"tokenfleet: no gateway at {base_url} ({type(exc).__name__}); is `tokenfleet up` running?")
        return 1
    body = reply.json() if reply.headers.get("content-type", "").startswith("application/json") else {}
    if reply.status_code != 200:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        print(f"tokenfleet: apply refused ({reply.status_code}): {message or reply.text}", file=sys.stderr)
        return 1
    rollout_view = body["rollout"]
    changed = ", ".join(body["changed"]) or "nothing"
    print(f"applied {service.metadata.name}: revision {body['revision']}, changed {changed}")
    print(f"rollout {rollout_view['phase']}: {rollout_view['reason'] or '-'}")
    return 0
