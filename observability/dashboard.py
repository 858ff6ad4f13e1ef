"""The built-in real-time dashboard, mounted on the gateway at /dashboard: a view over Prometheus.

A `LocalMonitor` asks a Prometheus's HTTP API (`/api/v1/query`, `/api/v1/query_range`,
`/api/v1/alerts`) for the chart queries, the targets' `up` and the alerts its rules (the
project's observability/rules) hold, and pushes one JSON snapshot per tick to every browser over
Server-Sent Events. The gateway does no scraping: the Prometheus is the one `tokenfleet up`
starts (observability/stack.py) or a cluster's, named by $TOKENFLEET_PROMETHEUS_URL. The page is
plain HTML and the project's own canvas drawing (observability/static/): no CDN, no build step.

Wiring, from the gateway (or `tokenfleet up`, which mounts again with its Prometheus's URL):

    from tokenfleet.observability.dashboard import LocalMonitor, mount_dashboard
    mount_dashboard(gateway.app, LocalMonitor.for_gateway(gateway, prometheus_url=...))
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from opentelemetry.sdk.trace import ReadableSpan

from tokenfleet.observability.otlp_receiver import OTLPReceiver, ReceivedSpan
from tokenfleet.observability.stack import INSTALL_HINT, PROMETHEUS_URL_ENV, binaries
from tokenfleet.observability.tracing import SpanSummary, TraceStore, TraceSummary

if TYPE_CHECKING:
    from tokenfleet.engine.gateway.app import Gateway

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
# Rate window for the live charts: several scrapes of the local Prometheus (every 2 s); a
# cluster's Prometheus scraping every 30 s wants $TOKENFLEET_DASHBOARD_WINDOW=2m.
WINDOW = "30s"
WINDOW_ENV = "TOKENFLEET_DASHBOARD_WINDOW"
HISTORY_S = 180  # what a page opening shows at once, from query_range
# Live dashboard streams at once: each holds a connection and is sent every snapshot.
MAX_SUBSCRIBERS = 16


class TooManySubscribersError(RuntimeError):
    pass


COMPLETIONS = 'route=~"/v1/(chat/)?completions"'
SLO = "tokenfleet_scheduler_slo_requests_total"


@dataclass(frozen=True, slots=True)
class Chart:
    id: str
    title: str
    unit: str
    series: tuple[tuple[str, str], ...]  # (PromQL, legend with {label} placeholders)


def _q(metric: str, by: str, q: float, window: str, selector: str = "") -> str:
    sel = f"{{{selector}}}" if selector else ""
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{sel}[{window}])))"


def charts(window: str = WINDOW) -> tuple[Chart, ...]:
    """The live charts; `window` is the rate window (a few scrape intervals of the Prometheus)."""
    return (
        Chart(
            "throughput",
            "Throughput",
            "/s",
            (
                (f"sum(rate(tokenfleet_gateway_requests_total{{{COMPLETIONS}}}[{window}]))", "requests/s"),
                (f"sum(rate(vllm:generation_tokens_total[{window}]))", "tokens/s"),
            ),
        ),
        Chart(
            "ttft",
            "TTFT p50 / p95 per class",
            "s",
            (
                (
                    _q("tokenfleet_gateway_first_byte_seconds", "class", 0.5, window, COMPLETIONS),
                    "p50 {class}",
                ),
                (
                    _q("tokenfleet_gateway_first_byte_seconds", "class", 0.95, window, COMPLETIONS),
                    "p95 {class}",
                ),
            ),
        ),
        Chart(
            "tpot",
            "TPOT p50 / p95 (engine)",
            "s",
            (
                (
                    _q("vllm:request_time_per_output_token_seconds", "model_name", 0.5, window),
                    "p50 {model_name}",
                ),
                (
                    _q("vllm:request_time_per_output_token_seconds", "model_name", 0.95, window),
                    "p95 {model_name}",
                ),
            ),
        ),
        Chart(
            "slo",
            "SLO attainment per class (SLA scheduler)",
            "ratio",
            (
                (
                    f'sum by (slo_class, target) (rate({SLO}{{outcome="met"}}[{window}]))'
                    f" / sum by (slo_class, target) (rate({SLO}[{window}]))",
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
        Chart(
            "kv", "KV-cache use", "ratio", (("max by (instance) (vllm:kv_cache_usage_perc)", "{instance}"),)
        ),
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
                    f'sum by (code) (rate(tokenfleet_gateway_requests_total{{code=~"4xx|5xx"}}[{window}]))',
                    "{code}",
                ),
                (f"sum by (kind) (rate(tokenfleet_gateway_errors_total[{window}]))", "upstream {kind}"),
            ),
        ),
    )


CHARTS = charts()


LEGEND_LABELS = ("class", "instance", "code", "kind", "slo_class", "target", "model_name")


def legend(template: str, labels: Mapping[str, str]) -> str:
    return template.format_map({**dict.fromkeys(LEGEND_LABELS, ""), **labels}).strip()


def vector_points(result: Iterable[Mapping[str, Any]], template: str) -> dict[str, float]:
    """An instant vector from /api/v1/query as legend -> value (NaN and ±Inf left out)."""
    points: dict[str, float] = {}
    for sample in result:
        value = float(sample["value"][1])
        if math.isfinite(value):
            points[legend(template, sample["metric"])] = round(value, 6)
    return points


def matrix_series(
    result: Iterable[Mapping[str, Any]], template: str, times: list[float]
) -> dict[str, list[float | None]]:
    """A range result from /api/v1/query_range on the given step times, None where no sample."""
    index = {round(t, 3): i for i, t in enumerate(times)}
    series: dict[str, list[float | None]] = {}
    for item in result:
        values = series.setdefault(legend(template, item["metric"]), [None] * len(times))
        for at, text in item["values"]:
            i, value = index.get(round(float(at), 3)), float(text)
            if i is not None and math.isfinite(value):
                values[i] = round(value, 6)
    return series


def alert_view(alert: Mapping[str, Any]) -> dict[str, Any]:
    """One alert from /api/v1/alerts, as the page shows it."""
    labels = dict(alert.get("labels", {}))
    return {
        "name": labels.get("alertname", ""),
        "state": alert.get("state", ""),
        "labels": labels,
        "annotations": dict(alert.get("annotations", {})),
        "active_at": alert.get("activeAt"),
        "value": float(alert.get("value", "nan")),
    }


def _key(alert: Mapping[str, Any]) -> str:
    return json.dumps(alert["labels"], sort_keys=True)


def resolved_since(
    firing_before: Mapping[str, dict[str, Any]], alerts: list[dict[str, Any]], t: float
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Prometheus forgets a resolved alert: the alerts firing now (by labels) and those that
    fired last time and are gone, marked resolved at t."""
    firing = {_key(a): a for a in alerts if a["state"] == "firing"}
    gone = [{**a, "state": "resolved", "resolved_at": t} for k, a in firing_before.items() if k not in firing]
    return firing, gone


def notice_for(prometheus_url: str | None, prometheus_binary: str | None) -> str | None:
    """The one line the page shows when it has no Prometheus to read."""
    if prometheus_url is not None:
        return None
    if prometheus_binary is None:
        return INSTALL_HINT
    return f"No Prometheus to read: `tokenfleet up` starts one; elsewhere set ${PROMETHEUS_URL_ENV}."


class PrometheusError(RuntimeError):
    pass


@dataclass
class PrometheusAPI:
    """The few calls of Prometheus's HTTP API the dashboard makes."""

    url: str
    timeout_s: float = 2.0
    _client: httpx.AsyncClient | None = None

    async def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=False, timeout=self.timeout_s)
        try:
            response = await self._client.get(f"{self.url.rstrip('/')}{path}", params=params)
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise PrometheusError(f"Prometheus at {self.url} did not answer ({type(exc).__name__})") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType', response.status_code)}: {body.get('error', '')}")
        return body["data"]

    async def query(self, expr: str, t: float) -> list[dict[str, Any]]:
        data = await self._get("/api/v1/query", {"query": expr, "time": f"{t:.3f}"})
        return list(data["result"]) if data["resultType"] == "vector" else []

    async def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        return list((await self._get("/api/v1/query_range", params))["result"])

    async def alerts(self) -> list[dict[str, Any]]:
        return list((await self._get("/api/v1/alerts"))["alerts"])

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


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


def _empty_charts(charts: Iterable[Chart]) -> dict[str, Any]:
    return {c.id: {"title": c.title, "unit": c.unit, "points": {}} for c in charts}


@dataclass
class LocalMonitor:
    prometheus_url: str | None
    traces: Callable[[], list[dict[str, Any]]] = list
    interval_s: float = 1.0
    charts: tuple[Chart, ...] = CHARTS
    clock: Callable[[], float] = time.time
    notice: str | None = None  # shown instead of charts when there is no Prometheus to read
    # Query only while someone watches (or always_on): a gateway nobody looks at pays nothing.
    always_on: bool = False
    snapshot: dict[str, Any] | None = None
    ticks: int = 0
    resolved: list[dict[str, Any]] = field(default_factory=list)
    _firing: dict[str, dict[str, Any]] = field(default_factory=dict)
    api: PrometheusAPI | None = None  # built from prometheus_url unless given
    _subscribers: set[asyncio.Queue[dict[str, Any]]] = field(default_factory=set)
    _ticking: asyncio.Future[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.api is None and self.prometheus_url is not None:
            self.api = PrometheusAPI(self.prometheus_url, timeout_s=max(1.0, 2 * self.interval_s))
        if self.api is None and self.notice is None:
            self.notice = notice_for(None, binaries()["prometheus"])

    @classmethod
    def for_gateway(
        cls,
        gateway: Gateway,
        *,
        prometheus_url: str | None = None,
        interval_s: float = 1.0,
        receiver: OTLPReceiver | None = None,
        always_on: bool = False,
        notice: str | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> LocalMonitor:
        """Read the Prometheus at `prometheus_url` (default $TOKENFLEET_PROMETHEUS_URL); show the
        gateway's in-memory traces, or, with `receiver` (a local OTLP endpoint the gateway and
        engines export to), the joined gateway + engine traces."""
        url = prometheus_url or environ.get(PROMETHEUS_URL_ENV) or None

        def traces() -> list[dict[str, Any]]:
            if receiver is not None:
                return traces_from_received(receiver.spans())
            return traces_from_spans(gateway.tracing.memory.get_finished_spans())

        return cls(
            prometheus_url=url,
            traces=traces,
            interval_s=interval_s,
            charts=charts(environ.get(WINDOW_ENV) or WINDOW),
            always_on=always_on,
            notice=notice,
        )

    async def _chart_points(self, api: PrometheusAPI, t: float) -> tuple[dict[str, Any], list[str]]:
        queries = [(chart, expr, template) for chart in self.charts for expr, template in chart.series]
        results = await asyncio.gather(
            *(api.query(expr, t) for _, expr, _ in queries), return_exceptions=True
        )
        out = _empty_charts(self.charts)
        errors: list[str] = []
        for (chart, expr, template), result in zip(queries, results, strict=True):
            if isinstance(result, BaseException):
                errors.append(f"{expr}: {result}")
                continue
            out[chart.id]["points"].update(vector_points(result, template))
        return out, errors

    async def tick(self) -> dict[str, Any]:
        t = self.clock()
        charts_now, targets, alerts = _empty_charts(self.charts), {}, []
        notice = self.notice
        if self.api is not None:
            try:
                up = await self.api.query("up", t)
                targets = {s["metric"].get("instance", "?"): float(s["value"][1]) == 1 for s in up}
                alerts = [alert_view(a) for a in await self.api.alerts()]
                charts_now, errors = await self._chart_points(self.api, t)
                notice = f"{len(errors)} chart queries failed: {errors[0]}" if errors else None
            except PrometheusError as exc:
                notice = str(exc)
            self._firing, gone = resolved_since(self._firing, alerts, t)
            self.resolved = [*self.resolved, *gone][-10:]
        self.ticks += 1
        self.snapshot = {
            "t": t,
            "tick": self.ticks,
            "prometheus": self.prometheus_url,
            "notice": notice,
            "targets": targets,
            "charts": charts_now,
            # Firing first, as Alertmanager lists them.
            "alerts": sorted(alerts, key=lambda a: (a["state"] != "firing", a["name"])),
            "resolved": self.resolved,
            "traces": self.traces()[:20],
        }
        for queue in list(self._subscribers):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()  # a slow browser gets the newest snapshot, not a backlog
            queue.put_nowait(self.snapshot)
        return self.snapshot

    async def history(self, seconds: float = HISTORY_S) -> dict[str, Any]:
        """The charts over the last `seconds`, one point per interval (what a page opens with)."""
        end = self.clock()
        step = max(1.0, self.interval_s)
        start = end - seconds
        times = [start + i * step for i in range(int(seconds / step) + 1)]
        out: dict[str, Any] = {"times": times, "charts": {}}
        for chart in self.charts:
            series: dict[str, list[float | None]] = {}
            if self.api is not None:
                for expr, template in chart.series:
                    with contextlib.suppress(PrometheusError):
                        series.update(
                            matrix_series(await self.api.query_range(expr, start, end, step), template, times)
                        )
            out["charts"][chart.id] = {"title": chart.title, "unit": chart.unit, "series": series}
        return out

    async def fresh_snapshot(self) -> dict[str, Any]:
        """A snapshot at most `interval_s` old: the running loop's, else one tick shared by every
        caller that asks meanwhile (callers polling the endpoint must not multiply the queries)."""
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
        return self.always_on or bool(self._subscribers)

    async def close(self) -> None:
        if self.api is not None:
            await self.api.close()

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
    rounds: int = 0  # loop rounds so far, ticked or idle (tests wait on it instead of sleeping)


async def _run(mounted: _Mounted) -> None:
    """Tick the mounted monitor while it is active; it is read each round, so a remount (e.g.
    `tokenfleet up` once its Prometheus is ready) takes over without a restart."""
    while True:
        monitor = mounted.monitor
        started = time.monotonic()
        if monitor.active:
            try:
                await monitor.tick()
            except Exception:  # the dashboard must never take the gateway down
                log.exception("dashboard tick failed")
        mounted.rounds += 1
        await asyncio.sleep(max(0.05, monitor.interval_s - (time.monotonic() - started)))


def mount_dashboard(app: FastAPI, monitor: LocalMonitor, prefix: str = "/dashboard") -> None:
    """Add the dashboard routes and run `monitor` for the app's lifetime (wraps its lifespan).

    Mounting again swaps the monitor (routes and the loop read it through one holder), before
    or after the app started.
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
        # Cached: a tick on demand only when the last one is older than the interval.
        return JSONResponse(await mounted.monitor.fresh_snapshot())

    async def history() -> JSONResponse:
        return JSONResponse(await mounted.monitor.history())

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
    app.add_api_route(f"{prefix}/api/history", history, methods=["GET"], include_in_schema=False)
    app.add_api_route(f"{prefix}/events", events, methods=["GET"], include_in_schema=False)

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[Any]:
        async with inner(application) as state:
            task = asyncio.create_task(_run(mounted))
            try:
                yield state
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await mounted.monitor.close()

    app.router.lifespan_context = lifespan
