"""Prometheus metrics of the SLA scheduler.

The scheduler runs inside vLLM's EngineCore process, not the API server that serves /metrics.
How the numbers get out (ADR 0004, "Metrics"):

- If `PROMETHEUS_MULTIPROC_DIR` is set in the engine's environment (tokenfleet's launcher sets
  it to a fresh directory for `policy: sla`; vLLM itself sets it when `--api-server-count > 1`),
  prometheus_client writes every value to mmap files in that directory, and vLLM's own /metrics
  handler already reads that directory with `MultiProcessCollector` — so our series appear on
  the engine's normal /metrics endpoint next to `vllm:*`.
- Otherwise, if `TOKENFLEET_SCHEDULER_METRICS_PORT` is set, a small exporter thread serves our
  registry on that port (127.0.0.1 unless `TOKENFLEET_SCHEDULER_METRICS_HOST` says otherwise).
- Otherwise they stay in-process (still visible to tests that build the scheduler in-process).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "tokenfleet_scheduler"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PORT_ENV = "TOKENFLEET_SCHEDULER_METRICS_PORT"
HOST_ENV = "TOKENFLEET_SCHEDULER_METRICS_HOST"

WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
SCHEDULE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.025, 0.1)


class SchedulerMetrics:
    """The scheduler's series; one instance per scheduler (per engine core / DP rank)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # A private registry: never collide with vLLM's collectors in the global REGISTRY.
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Waiting requests per SLO class.",
            ["slo_class"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.running = Gauge(
            f"{PREFIX}_running",
            "Running requests per SLO class.",
            ["slo_class"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.wait = Histogram(
            f"{PREFIX}_wait_seconds",
            "Queue wait from arrival to first scheduling, per SLO class.",
            ["slo_class"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.max_wait = Gauge(
            f"{PREFIX}_max_wait_seconds",
            "Longest queue wait seen since start, per SLO class.",
            ["slo_class"],
            registry=r,
            multiprocess_mode="max",
        )
        self.slo = Counter(
            f"{PREFIX}_slo_requests",
            "Finished requests by SLO target (ttft, tpot) and outcome (met, missed).",
            ["slo_class", "target", "outcome"],
            registry=r,
        )
        self.preemptions = Counter(
            f"{PREFIX}_preemptions",
            "Requests preempted by the SLA scheduler, per victim SLO class.",
            ["slo_class"],
            registry=r,
        )
        self.overtakes = Counter(
            f"{PREFIX}_overtakes",
            "Requests admitted ahead of an older waiting request of a lower SLO class, per class.",
            ["slo_class"],
            registry=r,
        )
        self.rejections = Counter(
            f"{PREFIX}_rejections",
            "Requests rejected by per-class admission control.",
            ["slo_class"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            f"{PREFIX}_tenant_tokens",
            "Tokens served per tenant and SLO class (kind = prompt | output).",
            ["tenant", "slo_class", "kind"],
            registry=r,
        )
        self.schedule_time = Histogram(
            f"{PREFIX}_schedule_seconds",
            "Wall time of one schedule() call (policy work plus vLLM's own).",
            buckets=SCHEDULE_BUCKETS,
            registry=r,
        )
        self.policy_time = Histogram(
            f"{PREFIX}_policy_seconds",
            "Wall time of the SLA policy's own work in one schedule() call (vLLM's excluded).",
            buckets=SCHEDULE_BUCKETS,
            registry=r,
        )
        self._max_wait: dict[str, float] = {}
        self._tenant_children: dict[tuple[str, str, str], Counter] = {}

    def init_classes(self, classes: Iterable[str]) -> None:
        """Create every per-class child at 0 so dashboards see the series before traffic."""
        for c in classes:
            self.queue_depth.labels(c).set(0)
            self.running.labels(c).set(0)
            self.wait.labels(c)
            self.max_wait.labels(c).set(0)
            self.preemptions.labels(c)
            self.overtakes.labels(c)
            self.rejections.labels(c)
            for target in ("ttft", "tpot"):
                for outcome in ("met", "missed"):
                    self.slo.labels(c, target, outcome)

    def observe_wait(self, slo_class: str, wait_s: float) -> None:
        self.wait.labels(slo_class).observe(wait_s)
        if wait_s > self._max_wait.get(slo_class, 0.0):
            self._max_wait[slo_class] = wait_s
            self.max_wait.labels(slo_class).set(wait_s)

    def observe_slo(self, slo_class: str, target: str, met: bool) -> None:
        self.slo.labels(slo_class, target, "met" if met else "missed").inc()

    def add_tenant_tokens(self, tenant: str, slo_class: str, prompt: int, output: int) -> None:
        # Children cached: prometheus_client's labels() costs more than the increment itself,
        # and this runs every engine step.
        for kind, n in (("prompt", prompt), ("output", output)):
            if n:
                key = (tenant, slo_class, kind)
                child = self._tenant_children.get(key)
                if child is None:
                    child = self._tenant_children[key] = self.tenant_tokens.labels(*key)
                child.inc(n)

    def set_depths(self, waiting: dict[str, int], running: dict[str, int]) -> None:
        for c, n in waiting.items():
            self.queue_depth.labels(c).set(n)
        for c, n in running.items():
            self.running.labels(c).set(n)


def export(metrics: SchedulerMetrics, env: dict[str, str] | None = None) -> str:
    """Make the metrics reachable as the module docstring describes; returns how."""
    env = dict(os.environ) if env is None else env
    if env.get(MULTIPROC_ENV):
        return f"multiprocess:{env[MULTIPROC_ENV]}"
    port = env.get(PORT_ENV)
    if port:
        host = env.get(HOST_ENV, "127.0.0.1")
        start_http_server(int(port), addr=host, registry=metrics.registry)
        return f"http://{host}:{port}/metrics"
    return "in-process"
