"""The built-in real-time dashboard, mounted on the gateway at /dashboard.

A `LocalMonitor` scrapes the gateway's own registry and every replica's /metrics once per
`interval_s`, keeps the samples in a small in-memory TSDB, evaluates the chart queries and the
cluster's alert rules (observability/rules, the same file Prometheus runs) on it, and pushes one
JSON snapshot per tick to every browser over Server-Sent Events. The page is plain HTML and the
project's own canvas drawing (observability/static/): no CDN, no build step, works offline.

Wiring, from the gateway (or `tokenfleet up`):

    from tokenfleet.observability.dashboard import LocalMonitor, mount_dashboard
    mount_dashboard(gateway.app, LocalMonitor.for_gateway(gateway, webhook_url=...))
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from opentelemetry.sdk.trace import ReadableSpan

from tokenfleet.observability.alerting import RuleEngine, WebhookNotifier
from tokenfleet.observability.otlp_receiver import OTLPReceiver, ReceivedSpan
from tokenfleet.observability.promql import TSDB, PromQLError, as_vector, evaluate, parse
from tokenfleet.observability.tracing import SpanSummary, TraceStore, TraceSummary

if TYPE_CHECKING:
    from tokenfleet.engine.gateway.app import Gateway

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
WINDOW = "30s"  # rate window for the live charts: short, scrapes are every second
# Live dashboard streams at once: each holds a connection and is sent every snapshot.
MAX_SUBSCRIBERS = 16


class TooManySubscribersError(RuntimeError):
    pass


COMPLETIONS = 'route=~"/v1/(chat/)?completions"'
WEBHOOK_ENV = "TOKENFLEET_ALERT_WEBHOOK_URL"
SLO = "tokenfleet_scheduler_slo_requests_total"


@dataclass(frozen=True, slots=True)
class Chart:
    id: str
    title: str
    unit: str
    series: tuple[tuple[str, str], ...]  # (PromQL, legend with {label} placeholders)


def _q(metric: str, by: str, q: float, selector: str = "") -> str:
    sel = f"{{{selector}}}" if selector else ""
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{sel}[{WINDOW}])))"


CHARTS: tuple[Chart, ...] = (
    Chart(
        "throughput",
        "Throughput",
        "/s",
        (
            (f"sum(rate(tokenfleet_gateway_requests_total{{{COMPLETIONS}}}[{WINDOW}]))", "requests/s"),
            (f"sum(rate(vllm:generation_tokens_total[{WINDOW}]))", "tokens/s"),
        ),
    ),
    Chart(
        "ttft",
        "TTFT p50 / p95 per class",
        "s",
        (
            (_q("tokenfleet_gateway_first_byte_seconds", "class", 0.5, COMPLETIONS), "p50 {class}"),
            (_q("tokenfleet_gateway_first_byte_seconds", "class", 0.95, COMPLETIONS), "p95 {class}"),
        ),
    ),
    Chart(
        "tpot",
        "TPOT p50 / p95 (engine)",
        "s",
        (
            (_q("vllm:request_time_per_output_token_seconds", "model_name", 0.5), "p50 {model_name}"),
            (_q("vllm:request_time_per_output_token_seconds", "model_name", 0.95), "p95 {model_name}"),
        ),
    ),
    Chart(
        "slo",
        "SLO attainment per class (SLA scheduler)",
        "ratio",
        (
            (
                f'sum by (slo_class, target) (rate({SLO}{{outcome="met"}}[{WINDOW}]))'
                f" / sum by (slo_class, target) (rate({SLO}[{WINDOW}]))",
                "{slo_class} {target}",
            ),
        ),
    ),
    Chart(
        "queue",
        "Queue depth",
        "",
        (
            ("sum by (instance) (vllm:num_requests_waiting)", "engine {instance}"),
            ("sum by (class) (tokenfleet_gateway_queued)", "gateway {class}"),
        ),
    ),
    Chart("kv", "KV-cache use", "ratio", (("max by (instance) (vllm:kv_cache_usage_perc)", "{instance}"),)),
    Chart(
        "replicas",
        "Replicas",
        "",
        (
            ("sum(tokenfleet_gateway_replica_routable)", "routable"),
            ("count(tokenfleet_gateway_replica_routable)", "known"),
            ("sum(vllm:num_requests_running)", "running requests"),
        ),
    ),
    Chart(
        "errors",
        "Errors",
        "/s",
        (
            (
                f'sum by (code) (rate(tokenfleet_gateway_requests_total{{code=~"4xx|5xx"}}[{WINDOW}]))',
                "{code}",
            ),
            (f"sum by (kind) (rate(tokenfleet_gateway_errors_total[{WINDOW}]))", "upstream {kind}"),
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class Source:
    """One /metrics to scrape; `instance` becomes the label, as Prometheus would add it."""

    instance: str
    fetch: Callable[[], Awaitable[str]]


def legend(template: str, labels: dict[str, str]) -> str:
    return template.format_map(
        {
            **dict.fromkeys(("class", "instance", "code", "kind", "slo_class", "target", "model_name"), ""),
            **labels,
        }
    ).strip()


def evaluate_charts(charts: Iterable[Chart], db: TSDB, t: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for chart in charts:
        points: dict[str, float] = {}
        for expr, template in chart.series:
            for sample in as_vector(evaluate(expr, db, t)):
                if math.isfinite(sample.value):
                    points[legend(template, dict(sample.labels))] = round(sample.value, 6)
        out[chart.id] = {"title": chart.title, "unit": chart.unit, "points": points}
    return out


def traces_from_spans(spans: Iterable[ReadableSpan], limit: int = 20) -> list[dict[str, Any]]:
    store = TraceStore(max_traces=limit)
    store.export(list(spans))
    return store.recent(limit)


def traces_from_received(spans: Iterable[ReceivedSpan], limit: int = 20) -> list[dict[str, Any]]:
    """Traces from spans an OTLP receiver collected (gateway and vLLM spans, joined by trace id)."""
    traces: dict[str, TraceSummary] = {}
    for span in spans:
        summary = SpanSummary(
            name=span.name,
            service=span.service,
            span_id=span.span_id,
            parent_id=span.parent_span_id or None,
            start_ns=span.start_ns,
            end_ns=span.end_ns,
            error=span.error,
            attributes=span.attributes,
        )
        traces.setdefault(span.trace_id, TraceSummary(span.trace_id)).spans.append(summary)
    newest = sorted(traces.values(), key=lambda t: max(s.end_ns for s in t.spans), reverse=True)
    return [t.as_dict() for t in newest[:limit]]


@dataclass
class LocalMonitor:
    sources: Callable[[], list[Source]]
    rules: RuleEngine = field(default_factory=RuleEngine.from_files)
    traces: Callable[[], list[dict[str, Any]]] = list
    webhook: WebhookNotifier | None = None
    interval_s: float = 1.0
    charts: tuple[Chart, ...] = CHARTS
    clock: Callable[[], float] = time.time
    db: TSDB = field(default_factory=lambda: TSDB(max_samples=1800))
    # Scrape and evaluate only while someone watches, a webhook wants alerts, or always_on:
    # a gateway nobody looks at pays nothing for its dashboard.
    always_on: bool = False
    snapshot: dict[str, Any] | None = None
    ticks: int = 0
    _subscribers: set[asyncio.Queue[dict[str, Any]]] = field(default_factory=set)
    _client: httpx.AsyncClient | None = None
    _ticking: asyncio.Future[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        for chart in self.charts:  # a typo in a chart query fails at start-up, not silently
            for expr, _ in chart.series:
                parse(expr)

    @classmethod
    def for_gateway(
        cls,
        gateway: Gateway,
        *,
        webhook_url: str | None = None,
        interval_s: float = 1.0,
        for_scale: float = 1.0,
        receiver: OTLPReceiver | None = None,
        always_on: bool = False,
        environ: Mapping[str, str] = os.environ,
    ) -> LocalMonitor:
        """Scrape the gateway's registry and each replica it knows; show its in-memory traces,
        or, with `receiver` (a local OTLP endpoint the gateway and engines export to), the
        joined gateway + engine traces. The webhook defaults to $TOKENFLEET_ALERT_WEBHOOK_URL."""
        webhook_url = webhook_url or environ.get(WEBHOOK_ENV) or None
        from prometheus_client import generate_latest

        monitor: LocalMonitor

        async def own() -> str:
            return generate_latest(gateway.metrics.registry).decode()

        def sources() -> list[Source]:
            found = [Source("gateway", own)]
            for replica in gateway.replicas.replicas.values():
                found.append(Source(replica.id, monitor.http_fetch(f"{replica.url}/metrics")))
            return found

        def traces() -> list[dict[str, Any]]:
            if receiver is not None:
                return traces_from_received(receiver.spans())
            return traces_from_spans(gateway.tracing.memory.get_finished_spans())

        monitor = cls(
            sources=sources,
            rules=RuleEngine.from_files(for_scale=for_scale),
            traces=traces,
            webhook=WebhookNotifier(webhook_url) if webhook_url else None,
            interval_s=interval_s,
            always_on=always_on,
        )
        return monitor

    def http_fetch(self, url: str) -> Callable[[], Awaitable[str]]:
        async def fetch() -> str:
            if self._client is None:
                self._client = httpx.AsyncClient(trust_env=False, timeout=2.0)
            response = await self._client.get(url)
            response.raise_for_status()
            return response.text

        return fetch

    async def tick(self) -> dict[str, Any]:
        t = self.clock()
        scraped: dict[str, bool] = {}
        for source in self.sources():
            try:
                text = await source.fetch()
                self.db.ingest_text(text, t, {"instance": source.instance})
                scraped[source.instance] = True
            except (httpx.HTTPError, ValueError) as exc:
                scraped[source.instance] = False
                log.debug("scrape of %s failed: %s", source.instance, exc)
            self.db.add(
                {"__name__": "up", "instance": source.instance}, t, 1.0 if scraped[source.instance] else 0.0
            )
        try:
            changes = self.rules.evaluate(self.db, t)
        except PromQLError as exc:  # pragma: no cover - rules are parsed and tested up front
            log.error("rule evaluation failed: %s", exc)
            changes = []
        if self.webhook is not None and changes:
            if self._client is None:
                self._client = httpx.AsyncClient(trust_env=False, timeout=2.0)
            await self.webhook.notify(self._client, changes)
        self.ticks += 1
        self.snapshot = {
            "t": t,
            "tick": self.ticks,
            "targets": scraped,
            "charts": evaluate_charts(self.charts, self.db, t),
            "alerts": [a.as_dict() for a in self.rules.alerts()],
            "resolved": [a.as_dict() for a in self.rules.resolved[-10:]],
            "traces": self.traces()[:20],
        }
        for queue in list(self._subscribers):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()  # a slow browser gets the newest snapshot, not a backlog
            queue.put_nowait(self.snapshot)
        return self.snapshot

    async def fresh_snapshot(self) -> dict[str, Any]:
        """A snapshot at most `interval_s` old: the running loop's, else one tick shared by every
        caller that asks meanwhile (a scrape of every replica costs the gateway 30+ ms; callers
        polling the endpoint must not multiply it)."""
        if self.snapshot is not None and self.clock() - float(self.snapshot["t"]) < self.interval_s:
            return self.snapshot
        if self._ticking is None:
            self._ticking = asyncio.ensure_future(self.tick())
            self._ticking.add_done_callback(self._ticked)
        return await asyncio.shield(self._ticking)

    def _ticked(self, _: asyncio.Future[dict[str, Any]]) -> None:
        self._ticking = None

    @property
    def active(self) -> bool:
        return self.always_on or self.webhook is not None or bool(self._subscribers)

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            if self.active:
                try:
                    await self.tick()
                except Exception:  # the dashboard must never take the gateway down
                    log.exception("dashboard tick failed")
            await asyncio.sleep(max(0.05, self.interval_s - (time.monotonic() - started)))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise TooManySubscribersError(f"{MAX_SUBSCRIBERS} dashboard streams open already")
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=2)
        if self.snapshot is not None:
            queue.put_nowait(self.snapshot)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)


def _static(name: str) -> str:
    return (STATIC / name).read_text()


@dataclass
class _Mounted:
    monitor: LocalMonitor


def mount_dashboard(app: FastAPI, monitor: LocalMonitor, prefix: str = "/dashboard") -> None:
    """Add the dashboard routes and run `monitor` for the app's lifetime (wraps its lifespan).

    Mounting again swaps the monitor (routes and lifespan read it through one holder), so a
    test or `tokenfleet up` can replace the gateway's default monitor before the app starts.
    """
    existing = getattr(app.state, "tokenfleet_dashboard", None)
    if isinstance(existing, _Mounted):
        existing.monitor = monitor
        return
    mounted = app.state.tokenfleet_dashboard = _Mounted(monitor)

    async def page() -> HTMLResponse:
        return HTMLResponse(_static("dashboard.html").replace("{{PREFIX}}", prefix))

    async def script() -> Response:
        return Response(_static("dashboard.js"), media_type="text/javascript")

    async def snapshot() -> JSONResponse:
        # Cached: a tick on demand only when the last one is older than the scrape interval.
        return JSONResponse(await mounted.monitor.fresh_snapshot())

    async def events(request: Request) -> Response:
        monitor = mounted.monitor
        if len(monitor._subscribers) >= MAX_SUBSCRIBERS:
            return JSONResponse(
                {"error": {"message": "too many dashboard streams; retry later", "code": 503}},
                status_code=503,
                headers={"retry-after": "10"},
            )

        async def stream() -> AsyncIterator[bytes]:
            async with monitor.subscribe() as queue:
                yield b"retry: 2000\n\n"
                while not await request.is_disconnected():
                    try:
                        item = await asyncio.wait_for(queue.get(), timeout=10.0)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    yield f"data: {json.dumps(item, separators=(',', ':'))}\n\n".encode()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )

    app.add_api_route(prefix, page, methods=["GET"], include_in_schema=False)
    app.add_api_route(f"{prefix}/app.js", script, methods=["GET"], include_in_schema=False)
    app.add_api_route(f"{prefix}/api/snapshot", snapshot, methods=["GET"], include_in_schema=False)
    app.add_api_route(f"{prefix}/events", events, methods=["GET"], include_in_schema=False)

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[Any]:
        async with inner(application) as state:
            monitor = mounted.monitor
            task = asyncio.create_task(monitor.run())
            try:
                yield state
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await monitor.close()

    app.router.lifespan_context = lifespan
