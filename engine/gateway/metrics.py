"""The gateway's Prometheus metrics, in a registry of its own (one per app, so tests can run
several gateways in one process).

Label cardinality is bounded by construction: `route` is one of a fixed set, `replica` is a
replica slot id (at most replicas.max), `class` and `tenant` come from the spec (unknown tenants
never reach a metric: they got a 401), `code` is the status class (2xx/4xx/5xx), and `revision`
is a spec revision the gateway has routed to in its lifetime (two at a time, during a canary).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenfleet.operator.control.observe import Outcome

Metric = TypeVar("Metric", Counter, Gauge, Histogram)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def code_class(status: int) -> str:
    return f"{status // 100}xx"


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    _children: dict[tuple[object, tuple[str, ...]], object] = field(default_factory=dict, repr=False)

    def child(self, metric: Metric, *labels: str) -> Metric:
        """`metric.labels(*labels)`, remembered: prometheus_client validates the values and takes
        a lock on every call, on the hot path several times per request; label sets are bounded
        (see above), so is this cache."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return cast(Metric, found)

    def init_routes(self, routes: Iterable[str]) -> None:
        """Create the per-route counter that only an event would create at 0 (as `init_replica`
        does per replica): `retries` for each route the gateway proxies, so a day without a retry
        has the series too and `rate()` sees the first one."""
        for route in routes:
            self.child(self.retries, route)

    def init_replica(self, replica_id: str) -> None:
        """Create a member's replica-only counters at 0 (Prometheus practice for a label value once
        it is known): a labelled child otherwise appears with its first event, so a fleet whose
        replicas are never readmitted (the local fleet's restarted replica rejoins as a new member,
        under its id but with a fresh breaker) has no `readmissions` series at all, and `rate()`
        misses the first increment of one that appears mid-run. Cached by `child`, so repeating it
        per membership change costs nothing."""
        for counter in (self.ejections, self.readmissions):
            self.child(counter, replica_id)

    def forget_replica(self, replica_id: str) -> None:
        """Drop a replica's series once it has left (the gateway's membership update calls it,
        whoever changed the membership): a gone replica's `replica_routable` would otherwise keep
        its last value, an alert on it keep firing, and with endpoint discovery (replica ids are
        pod names) series of gone pods pile up for the process's life."""
        per_replica = (
            self.upstream_requests,
            self.errors,
            self.ejections,
            self.readmissions,
            self.in_flight,
            self.replica_up,
            self.first_byte,
        )
        for metric in per_replica:
            names = metric._labelnames  # prometheus_client lists children no other way
            for family in metric.collect():
                for sample in family.samples:
                    if sample.labels.get("replica") == replica_id:
                        with contextlib.suppress(KeyError):  # a histogram's samples share one child
                            metric.remove(*(sample.labels[name] for name in names))
        self._children = {key: child for key, child in self._children.items() if key[0] not in per_replica}

    def count_outcome(self, revision: str, outcome: Outcome, first_byte_s: float | None) -> None:
        """One attempt's outcome by revision (an `Outcomes` listener)."""
        self.child(self.revision_attempts, revision, outcome).inc()
        if outcome == "ok" and first_byte_s is not None:
            self.child(self.revision_first_byte, revision).observe(first_byte_s)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "tokenfleet_gateway_requests",
            "Requests answered by the gateway.",
            ["route", "class", "tenant", "code"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "tokenfleet_gateway_upstream_requests",
            "Attempts sent to a replica (a retried request counts once per attempt).",
            ["replica", "route", "outcome"],
            registry=r,
        )
        self.errors = Counter(
            "tokenfleet_gateway_errors",
            "Upstream failures by kind (connect, timeout, status_5xx, mid_stream).",
            ["replica", "route", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "tokenfleet_gateway_retries", "Requests retried on another replica.", ["route"], registry=r
        )
        self.ejections = Counter(
            "tokenfleet_gateway_ejections",
            "Replicas ejected by the circuit breaker.",
            ["replica"],
            registry=r,
        )
        self.readmissions = Counter(
            "tokenfleet_gateway_readmissions", "Ejected replicas admitted again.", ["replica"], registry=r
        )
        self.rejected = Counter(
            "tokenfleet_gateway_rejected",
            "Requests refused at the edge (auth, rate_limit, shed, invalid).",
            ["reason", "class", "tenant"],
            registry=r,
        )
        self.in_flight = Gauge(
            "tokenfleet_gateway_in_flight", "Requests in flight per replica.", ["replica"], registry=r
        )
        self.queued = Gauge(
            "tokenfleet_gateway_queued", "Requests waiting at the gateway per class.", ["class"], registry=r
        )
        self.replica_up = Gauge(
            "tokenfleet_gateway_replica_routable",
            "1 if the replica receives traffic.",
            ["replica"],
            registry=r,
        )
        self.latency = Histogram(
            "tokenfleet_gateway_request_duration_seconds",
            "Time from request to the last byte, per route and class.",
            ["route", "class"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Per revision: what canary analysis reads from another process (operator/metrics.py).
        self.revision_attempts = Counter(
            "tokenfleet_gateway_revision_attempts",
            "Attempts sent to a replica of each revision, by outcome (ok, refused: 4xx, error).",
            ["revision", "outcome"],
            registry=r,
        )
        self.revision_first_byte = Histogram(
            "tokenfleet_gateway_revision_first_byte_seconds",
            "Time to first byte of each revision's successful attempts (TTFT for streams).",
            ["revision"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_byte = Histogram(
            "tokenfleet_gateway_first_byte_seconds",
            "Time from request to the first byte from the chosen replica (TTFT for streams).",
            ["route", "class", "replica"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
