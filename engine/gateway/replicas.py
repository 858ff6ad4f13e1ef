"""Replica state the gateway keeps, and the prober that refreshes it from each engine's
`/health` and `/metrics`. Transitions go through the pure `breaker` functions."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from tokenfleet.engine.gateway import breaker
from tokenfleet.engine.gateway.routing import ReplicaView
from tokenfleet.engine.gateway.upstream import Upstream, UpstreamError
from tokenfleet.observability import promtext

# Engine series the gateway reads (vLLM V1 names).
WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
BUSY_WINDOW_S = 10.0

# The SLA scheduler's TTFT SLO counters (engine/sla_metrics.py), for the autoscaler.
SLO_SERIES = "tokenfleet_scheduler_slo_requests_total"
ENGINE_SERIES = (WAITING, RUNNING, KV_USAGE, PREFIX_QUERIES, PREFIX_HITS)


@dataclass(frozen=True, slots=True)
class EngineStats:
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    slo: tuple[tuple[str, float, float], ...] = ()  # (class, TTFT met, TTFT total), cumulative


def parse_slo_counters(text: str) -> tuple[tuple[str, float, float], ...]:
    """Per class, the TTFT SLO requests met and in total (absent when the engine runs no SLA
    scheduler: the substring check keeps that case free)."""
    if SLO_SERIES not in text:
        return ()
    met: dict[str, float] = {}
    total: dict[str, float] = {}
    for _, fields, count in promtext.series_samples(text, (SLO_SERIES,)):
        if fields.get("target") != "ttft" or "slo_class" not in fields:
            continue
        name = fields["slo_class"]
        total[name] = total.get(name, 0.0) + count
        if fields.get("outcome") == "met":
            met[name] = met.get(name, 0.0) + count
    return tuple((name, met.get(name, 0.0), total[name]) for name in sorted(total))


def parse_engine_metrics(text: str) -> EngineStats:
    """Sum each series of interest over its labels (one engine serves one model)."""
    sums = promtext.series_sums(text, ENGINE_SERIES)
    return EngineStats(
        waiting=sums[WAITING],
        running=sums[RUNNING],
        kv_usage=sums[KV_USAGE],
        prefix_queries=sums[PREFIX_QUERIES],
        prefix_hits=sums[PREFIX_HITS],
        slo=parse_slo_counters(text),
    )


@dataclass
class Replica:
    id: str
    url: str
    breaker: breaker.Breaker = field(default_factory=breaker.Breaker)
    in_flight: int = 0
    stats: EngineStats = field(default_factory=EngineStats)
    last_probe: float = 0.0
    last_error: str | None = None
    requests: int = 0
    revision: str = ""  # the spec revision it runs (canary traffic is split by revision)
    last_success: float = -1e9  # monotonic time of its latest answer or streamed chunk

    def view(self) -> ReplicaView:
        return ReplicaView(self.id, self.in_flight, int(self.stats.waiting))

    def status(self) -> dict[str, object]:
        return {
            "id": self.id,
            "url": self.url,
            "revision": self.revision,
            "state": {"closed": "ready", "open": "ejected", "unknown": "starting"}[self.breaker.state],
            "in_flight": self.in_flight,
            "engine_waiting": self.stats.waiting,
            "engine_running": self.stats.running,
            "kv_cache_usage": round(self.stats.kv_usage, 4),
            "prefix_cache_hit_rate": (
                round(self.stats.prefix_hits / self.stats.prefix_queries, 4)
                if self.stats.prefix_queries
                else None
            ),
            "ejections": self.breaker.ejections,
            "requests": self.requests,
            "last_error": self.last_error,
        }


Transition = Callable[[Replica, breaker.State, breaker.State], None]


class ReplicaSet:
    """The replicas behind the gateway. Mutated only from the event loop thread."""

    def __init__(
        self,
        *,
        eject_after_failures: int,
        cooldown_s: float,
        on_transition: Transition | None = None,
    ) -> None:
        self.replicas: dict[str, Replica] = {}
        self.eject_after_failures = eject_after_failures
        self.cooldown_s = cooldown_s
        # A replica that answered a request this recently is alive: a probe timeout alone (CPU
        # starvation under load) does not eject it.
        self.busy_window_s = BUSY_WINDOW_S
        self.on_transition = on_transition

    def set(self, members: Iterable[tuple[str, str]], revisions: Mapping[str, str] | None = None) -> None:
        """Replace membership with (id, url) pairs, keeping state of replicas that stay."""
        wanted = dict(members)
        for rid in list(self.replicas):
            if rid not in wanted or self.replicas[rid].url != wanted[rid].rstrip("/"):
                del self.replicas[rid]
        for rid, url in wanted.items():
            replica = self.replicas.setdefault(rid, Replica(rid, url.rstrip("/")))
            if revisions is not None:
                replica.revision = revisions.get(rid, "")

    def routable(self, exclude: Iterable[str] = ()) -> list[Replica]:
        skip = set(exclude)
        replicas = self.replicas.values()
        if all(r.breaker.admits for r in replicas):  # the usual case: no panic arithmetic
            return [r for r in replicas if r.id not in skip]
        members = list(replicas)
        chosen = breaker.routable([r.breaker for r in members])
        return [members[i] for i in chosen if members[i].id not in skip]

    def _apply(self, replica: Replica, new: breaker.Breaker) -> None:
        old = replica.breaker.state
        replica.breaker = new
        if new.state != old and self.on_transition is not None:
            self.on_transition(replica, old, new.state)

    def request_succeeded(self, replica: Replica) -> None:
        replica.last_success = time.monotonic()
        self._apply(replica, breaker.on_request_success(replica.breaker))

    def request_failed(self, replica: Replica, error: str) -> None:
        replica.last_error = error
        self._apply(
            replica, breaker.on_request_failure(replica.breaker, time.monotonic(), self.eject_after_failures)
        )

    def probed(
        self, replica: Replica, ok: bool, error: str | None = None, *, timed_out: bool = False
    ) -> None:
        now = time.monotonic()
        replica.last_probe = now
        if error:
            replica.last_error = error
        busy = now - replica.last_success < self.busy_window_s
        self._apply(
            replica,
            breaker.on_probe(replica.breaker, ok, now, self.cooldown_s, timed_out=timed_out, busy=busy),
        )


async def probe_once(client: Upstream, replicas: ReplicaSet, timeout_s: float) -> None:
    async def one(replica: Replica) -> None:
        try:
            status, _ = await client.get(f"{replica.url}/health", timeout_s)
            ok = status == 200
            replicas.probed(replica, ok, None if ok else f"/health answered {status}")
        except UpstreamError as exc:
            replicas.probed(replica, False, f"/health: {exc.cause_name}", timed_out=exc.kind == "timeout")
            return
        if ok:
            with contextlib.suppress(UpstreamError):
                status, body = await client.get(f"{replica.url}/metrics", timeout_s)
                if status == 200:
                    replica.stats = parse_engine_metrics(body.decode(errors="replace"))

    await asyncio.gather(*(one(r) for r in list(replicas.replicas.values())))


async def probe_forever(
    client: Upstream,
    replicas: ReplicaSet,
    interval_s: float,
    timeout_s: float,
    after: Callable[[], None] | None = None,
) -> None:
    while True:
        await probe_once(client, replicas, timeout_s)
        if after is not None:
            after()
        await asyncio.sleep(interval_s)
