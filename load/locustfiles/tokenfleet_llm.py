"""The Locust side of `tokenfleet bench run` (run by Locust in its own process, never imported).

Locust monkey-patches the standard library with gevent when it is imported, which is why this
file is the only one that imports it and is started by the bench as a subprocess. It stays thin:
the pacing, request generation, timing and shapes are the pure modules next door; this file wires
them to Locust's users, shape ticks and `events.request` (so the web UI shows TTFT/TPOT/E2E).
It lives alone in its folder because Locust puts the locustfile's folder on sys.path.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import gevent
import httpx
from locust import LoadTestShape, User, constant, events, task
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

from tokenfleet.load.client import send
from tokenfleet.load.keys import resolve_tenant_keys
from tokenfleet.load.pacer import Pacer
from tokenfleet.load.record import RequestRecord
from tokenfleet.load.rxclock import stamping_client
from tokenfleet.load.shapes import Sweep, saturated
from tokenfleet.load.traffic import RequestFactory, offered_level
from tokenfleet.load.workload import Workload, shape_of

CONFIG: dict[str, Any] = json.loads(Path(os.environ["TOKENFLEET_BENCH_CONFIG"]).read_text())
WORKLOAD = Workload.model_validate(CONFIG["workload"])
SHAPE = shape_of(WORKLOAD)
OFFERED = offered_level(WORKLOAD)
DURATION_S: float = CONFIG["duration_s"]
RAW_DIR = Path(CONFIG["raw_dir"])
OPEN_LOOP = WORKLOAD.arrival.mode == "open"


def level(t: float) -> float | None:
    """The shape's level (with tenants' `add` bursts in open loop), None past the duration."""
    return None if t >= DURATION_S else OFFERED(t)


@dataclass
class ProcessState:
    """One per Locust process: the shared pacer (open loop), request factory and raw log."""

    t0: float
    worker: int
    factory: RequestFactory
    pacer: Pacer | None
    log: TextIO
    # One connection pool per process: an httpx.Client per user would build an SSL context each,
    # tens of ms of CPU that stalls every other greenlet's timestamps while users spawn.
    http: httpx.Client

    def write(self, record: RequestRecord) -> None:
        self.log.write(record.to_json() + "\n")


STATE: ProcessState | None = None
# Set when Locust starts stopping: users that wake for a slot then must not send (the stop
# timeout is for requests in flight, not for new ones).
STOPPING = False


def _on_test_start(environment: Any, **_: Any) -> None:
    global STATE, STOPPING
    STOPPING = False  # a new test started from the web UI after an earlier one stopped
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        return
    worker = runner.worker_index if isinstance(runner, WorkerRunner) else 0
    workers = max(1, int(CONFIG["workers"]))
    t0 = time.time()
    pacer = None
    if OPEN_LOOP:
        arrival = WORKLOAD.arrival
        pacer = Pacer(
            level,
            process=arrival.process,
            burstiness=arrival.burstiness,
            share=1.0 / workers,  # the target rate is split across worker processes
            seed=WORKLOAD.seed * 1000 + worker,
        )
    RAW_DIR.mkdir(parents=True, exist_ok=True)
    (RAW_DIR / f"start-{os.getpid()}.json").write_text(json.dumps({"t0": t0, "worker": worker}))
    log = (RAW_DIR / f"raw-{os.getpid()}.jsonl").open("a", encoding="utf-8", buffering=1)
    http = stamping_client(WORKLOAD.timeout_s)
    factory = RequestFactory(WORKLOAD, worker, keys=resolve_tenant_keys(WORKLOAD))
    STATE = ProcessState(t0, worker, factory, pacer, log, http)


def mark_stop() -> None:
    """When the load ended: the shape's decision (duration or saturation), else Locust's stop
    (Ctrl-C). In-flight requests may finish later; the measured window ends here."""
    path = RAW_DIR / "stop.json"
    if not path.exists():
        RAW_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"t": time.time()}))


def _on_test_stop(environment: Any, **_: Any) -> None:
    if not isinstance(environment.runner, WorkerRunner):
        mark_stop()
    if STATE is not None:
        STATE.log.flush()


def _on_test_stopping(**_: Any) -> None:
    global STOPPING
    STOPPING = True


events.test_start.add_listener(_on_test_start)
events.test_stopping.add_listener(_on_test_stopping)
events.test_stop.add_listener(_on_test_stop)


def report(record: RequestRecord) -> None:
    """Into Locust's own stats (UI, CSV, HTML): one row per (class, metric)."""
    tokens = record.output_tokens or 0
    if not record.ok:
        events.request.fire(
            request_type=record.cls,
            name="E2E",
            response_time=(record.e2e_s or 0.0) * 1000,
            response_length=tokens,
            exception=RuntimeError(record.error or "failed"),
            context={"tenant": record.tenant},
        )
        return
    for name, value in (("TTFT", record.ttft_s), ("TPOT", record.tpot_s), ("E2E", record.e2e_s)):
        if value is not None:
            events.request.fire(
                request_type=record.cls,
                name=name,
                response_time=value * 1000,
                response_length=tokens,
                exception=None,
                context={"tenant": record.tenant},
            )


class LLMUser(User):  # type: ignore[misc]  # locust is untyped here
    """Open loop: waits for its pacer slot, then sends. Closed loop: sends back to back."""

    wait_time = constant(0)

    @task  # type: ignore[untyped-decorator]
    def one_request(self) -> None:
        state = STATE
        if state is None:
            gevent.sleep(0.05)
            return
        scheduled = None
        if state.pacer is not None:
            slot = state.pacer.claim()
            if slot is None:
                raise StopUser()
            # Drawn at the slot's time, in slot order: a seed gives the same requests at the same
            # times on every run, however late a user wakes.
            request = state.factory.next(slot)
            scheduled = state.t0 + slot
            delay = scheduled - time.time()
            if delay > 0:
                gevent.sleep(delay)
        else:
            elapsed = time.time() - state.t0
            if level(elapsed) is None:
                raise StopUser()
            request = state.factory.next(elapsed)
        if STOPPING:
            raise StopUser()
        record = send(
            state.http,
            CONFIG["target"],
            request,
            CONFIG["model"],
            scheduled=scheduled,
            worker=state.worker,
            timeout_s=WORKLOAD.timeout_s,
            on_cancel=state.write,
        )
        state.write(record)
        report(record)


class BenchShape(LoadTestShape):  # type: ignore[misc]
    """Users over time: a fixed pool in open loop (the pacer sets the rate), the curve itself in
    closed loop. A sweep ends at the first step whose completions lag its offered rate."""

    def __init__(self) -> None:
        super().__init__()
        self._step = 0
        self._completed_at_step = 0
        self.saturated_at: int | None = None

    def _completed(self) -> int:
        stats = self.runner.stats if self.runner is not None else None
        if stats is None:
            return 0
        return sum(e.num_requests - e.num_failures for (name, _), e in stats.entries.items() if name == "E2E")

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        value = level(t)
        if isinstance(SHAPE, Sweep):
            step = SHAPE.step_index(t)
            if step != self._step:
                done = self._completed()
                achieved = (done - self._completed_at_step) / SHAPE.step_s
                offered = SHAPE.rates[self._step]
                self._step, self._completed_at_step = step, done
                if saturated(offered, achieved, SHAPE.min_achieved_ratio):
                    self.saturated_at = step - 1
                    mark_stop()
                    return None
        if value is None:
            mark_stop()
            return None
        if OPEN_LOOP:
            users = WORKLOAD.arrival.max_concurrency
            return users, float(users)
        users = max(0, round(value))
        return users, float(max(1, users))
