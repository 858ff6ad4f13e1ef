"""The built-in dashboard over a real Prometheus: the real gateway in front of a fake engine, both
scraped by the prometheus binary (observability/stack.py); routes, SSE snapshots, chart values
and history under traffic, a real rule firing and resolving, the page in headless Chromium, and
the one line it shows without a Prometheus."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, painted_pixels, tiny_service
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tokenfleet.engine.gateway.app import Gateway
from tokenfleet.engine.gateway.server import ServerThread
from tokenfleet.load.fake_engine import Faults, fake_engine
from tokenfleet.observability import dashboard, stack
from tokenfleet.observability.dashboard import (
    CHARTS,
    LocalMonitor,
    PrometheusAPI,
    alert_view,
    legend,
    matrix_series,
    mount_dashboard,
    notice_for,
    resolved_since,
    vector_points,
)
from tokenfleet.observability.stack import INSTALL_HINT, LocalStack, write_scaled_rules

BINARIES = stack.binaries()
needs_prometheus = pytest.mark.skipif(
    BINARIES["prometheus"] is None, reason="prometheus missing: scripts/install.sh installs Debian's package"
)
CHROMIUM = shutil.which("chromium")


@dataclass
class Live:
    gateway: Gateway
    server: ServerThread
    engine: ServerThread
    stack: LocalStack
    monitor: LocalMonitor


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    engine_app, _ = fake_engine("r0")
    engine = ServerThread(engine_app, free_port()).start()
    gateway = Gateway(tiny_service())
    gateway.set_replicas([("r0", engine.url)])
    # `for:` scaled to zero and 1 s scrapes, so a rule fires within seconds.
    local = LocalStack(
        tmp_path / "stack", interval_s=1, rule_files=write_scaled_rules(tmp_path / "rules", 0.0)
    )
    server: ServerThread | None = None
    try:
        local.start()
        monitor = LocalMonitor.for_gateway(gateway, prometheus_url=local.prometheus_url, interval_s=0.5)
        mount_dashboard(gateway.app, monitor)
        server = ServerThread(gateway.app, free_port()).start()
        server.wait_until("/ready")
        local.set_targets(server.url, [("r0", engine.url)])
        yield Live(gateway, server, engine, local, monitor)
    finally:
        if server is not None:
            server.stop()
        local.stop()
        engine.stop()


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.1)


def snapshot(live: Live) -> dict[str, Any]:
    reply = httpx.get(f"{live.server.url}/dashboard/api/snapshot", timeout=10)
    assert reply.status_code == 200
    body: dict[str, Any] = reply.json()
    return body


def complete(live: Live) -> None:
    body = {"model": "tiny", "prompt": "x", "max_tokens": 3}
    assert httpx.post(f"{live.server.url}/v1/completions", json=body, timeout=10).status_code == 200


def traffic_until(live: Live, predicate: Callable[[], bool], what: str) -> None:
    """Keep requests flowing until `predicate`: a rate needs an increase between two scrapes."""
    deadline = time.monotonic() + 60
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within 60 s"
        complete(live)
        time.sleep(0.2)


@needs_prometheus
def test_page_script_snapshot_history_and_sse(live: Live) -> None:
    page = httpx.get(f"{live.server.url}/dashboard")
    assert page.status_code == 200
    assert "/dashboard/app.js" in page.text
    assert "{{PREFIX}}" not in page.text
    assert "http" not in page.text.split("<body>")[1]  # no CDN, nothing fetched from elsewhere
    script = httpx.get(f"{live.server.url}/dashboard/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert "EventSource" in script.text
    traffic_until(
        live,
        lambda: snapshot(live)["charts"]["throughput"]["points"].get("requests/s", 0) > 0,
        "throughput never showed on the dashboard",
    )
    snap = snapshot(live)
    assert snap["notice"] is None
    assert set(snap["charts"]) == {c.id for c in CHARTS}
    assert snap["targets"] == {"gateway": True, "r0": True}
    assert snap["charts"]["replicas"]["points"]["routable"] == 1
    assert snap["charts"]["queue"]["points"]["engine r0"] == 0  # the engine's own series, via Prometheus
    assert snap["traces"][0]["name"] == "POST /v1/completions"
    assert any(p.startswith("p95 ") for p in snap["charts"]["ttft"]["points"])
    history = httpx.get(f"{live.server.url}/dashboard/api/history", timeout=30).json()
    rates = history["charts"]["throughput"]["series"]["requests/s"]
    assert len(rates) == len(history["times"])
    assert any(v is not None and v > 0 for v in rates)  # query_range: the past, not just now
    with httpx.stream("GET", f"{live.server.url}/dashboard/events", timeout=10) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = []
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) == 2:
                    break
    assert events[1]["tick"] > events[0]["tick"]


@needs_prometheus
def test_every_chart_query_parses_in_prometheus(live: Live) -> None:
    api = PrometheusAPI(live.stack.prometheus_url)

    async def run() -> None:
        try:
            for chart in CHARTS:
                for expr, _ in chart.series:
                    await api.query(expr, time.time())  # raises on a parse error
        finally:
            await api.close()

    asyncio.run(run())


@needs_prometheus
def test_replica_down_fires_and_resolves_on_the_dashboard(live: Live) -> None:
    sick_app, faults = fake_engine("r1", faults=Faults(healthy=False))
    sick = ServerThread(sick_app, free_port()).start()
    try:
        live.gateway.set_replicas([("r0", live.engine.url), ("r1", sick.url)])

        def r1(alerts: list[dict[str, Any]], state: str) -> bool:
            return any(
                a["name"] == "TokenfleetReplicaDown"
                and a["state"] == state
                and a["labels"].get("replica") == "r1"
                for a in alerts
            )

        wait_for(lambda: r1(snapshot(live)["alerts"], "firing"), "TokenfleetReplicaDown never fired for r1")
        alert = next(a for a in snapshot(live)["alerts"] if a["labels"].get("replica") == "r1")
        assert alert["annotations"]["summary"] == "Replica r1 receives no traffic"
        # Healthy again: the breaker re-admits it after its cooldown and the alert resolves.
        faults.healthy = True
        wait_for(lambda: r1(snapshot(live)["resolved"], "resolved"), "the alert never resolved", timeout_s=90)
    finally:
        sick.stop()


def test_without_prometheus_the_page_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboard, "binaries", lambda: {"prometheus": None, "alertmanager": None})
    gateway = Gateway(tiny_service())
    monitor = LocalMonitor.for_gateway(gateway, environ={})
    snap = asyncio.run(monitor.tick())
    assert snap["notice"] == INSTALL_HINT
    assert "apt-get install prometheus" in INSTALL_HINT
    assert snap["targets"] == {}
    assert snap["alerts"] == []
    assert all(c["points"] == {} for c in snap["charts"].values())
    assert "TOKENFLEET_PROMETHEUS_URL" in str(notice_for(None, "/usr/bin/prometheus"))
    assert notice_for("http://prometheus:9090", None) is None
    from_env = LocalMonitor.for_gateway(gateway, environ={"TOKENFLEET_PROMETHEUS_URL": "http://p:9090"})
    assert from_env.prometheus_url == "http://p:9090"
    assert from_env.notice is None


def test_an_unreachable_prometheus_is_one_line_not_an_error() -> None:
    monitor = LocalMonitor(prometheus_url=f"http://127.0.0.1:{free_port()}")
    snap = asyncio.run(monitor.tick())
    assert snap["notice"].startswith("Prometheus at http://127.0.0.1:")
    assert "did not answer" in snap["notice"]


def test_prometheus_answers_become_points_series_and_alerts() -> None:
    vector = [
        {"metric": {"instance": "r0"}, "value": [1.0, "3"]},
        {"metric": {"instance": "r1"}, "value": [1.0, "NaN"]},
    ]
    assert vector_points(vector, "engine {instance}") == {"engine r0": 3.0}
    assert legend("p95 {class}", {}) == "p95"
    times = [10.0, 11.0, 12.0]
    matrix = [{"metric": {"class": "batch"}, "values": [[10, "1"], [12, "+Inf"], [11, "2"]]}]
    assert matrix_series(matrix, "{class}", times) == {"batch": [1.0, 2.0, None]}
    raw = {
        "labels": {"alertname": "Down", "replica": "r1"},
        "annotations": {"summary": "s"},
        "state": "firing",
        "activeAt": "2026-01-01T00:00:00Z",
        "value": "0e+00",
    }
    view = alert_view(raw)
    assert (view["name"], view["value"], view["state"]) == ("Down", 0.0, "firing")
    firing, gone = resolved_since({}, [view, {**view, "state": "pending", "labels": {"alertname": "P"}}], 5.0)
    assert list(firing.values()) == [view]
    assert gone == []
    firing, gone = resolved_since(firing, [], 9.0)
    assert firing == {}
    assert gone == [{**view, "state": "resolved", "resolved_at": 9.0}]


class CountingAPI(PrometheusAPI):
    def __init__(self) -> None:
        super().__init__("http://unused")
        self.calls = 0

    async def query(self, expr: str, t: float) -> list[dict[str, Any]]:
        self.calls += 1
        if expr.startswith("sum by (class) (tokenfleet_gateway_queued)"):
            return [{"metric": {"class": "batch"}, "value": [t, "2"]}]
        return []

    async def alerts(self) -> list[dict[str, Any]]:
        return []


def test_idle_monitor_costs_nothing_and_remount_swaps_it() -> None:
    first_api, second_api = CountingAPI(), CountingAPI()
    app = FastAPI()
    first = LocalMonitor(prometheus_url=None, api=first_api, interval_s=0.05)
    second = LocalMonitor(prometheus_url=None, api=second_api, interval_s=0.05)
    mount_dashboard(app, first)
    mount_dashboard(app, second)  # swaps the monitor, no duplicate routes
    assert sum(1 for r in app.routes if getattr(r, "path", "") == "/dashboard") == 1
    with TestClient(app) as client:
        mounted = app.state.tokenfleet_dashboard
        wait_for(lambda: mounted.rounds >= 5, "the dashboard loop never went round")
        assert second_api.calls == 0  # nobody watching: five rounds, no queries
        snap = client.get("/dashboard/api/snapshot").json()  # ticks on demand
        assert snap["charts"]["queue"]["points"] == {"gateway batch": 2}
        assert first.ticks == 0
        assert second.ticks == 1
    assert first_api.calls == 0
    assert LocalMonitor(prometheus_url=None, always_on=True).active


def test_traces_from_received_joins_services() -> None:
    from tokenfleet.observability.dashboard import traces_from_received
    from tokenfleet.observability.otlp_receiver import ReceivedSpan

    spans = [
        ReceivedSpan("t1", "a", "", "POST /v1/completions", 2, "gw", {"tokenfleet.class": "x"}, 0, 5_000_000),
        ReceivedSpan("t1", "b", "a", "llm_request", 2, "vllm", {}, 1_000_000, 4_000_000, error=True),
        ReceivedSpan("t2", "c", "", "older", 2, "gw", {}, 0, 1_000_000),
    ]
    first, second = traces_from_received(spans)
    assert first["name"] == "POST /v1/completions"
    assert first["services"] == ["gw", "vllm"]
    assert first["duration_ms"] == 5.0
    assert first["error"] is True
    assert second["name"] == "older"


# -- the page in Chromium ---------------------------------------------------------------------


def _browser(p: Any, profile: Path) -> Any:
    return p.chromium.launch_persistent_context(
        str(profile),
        executable_path=CHROMIUM,
        headless=True,
        viewport={"width": 1400, "height": 900},
        args=[
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )


@needs_prometheus
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/install.sh)")
def test_dashboard_in_headless_chromium_over_prometheus(live: Live, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            complete(live)
            stop.wait(0.1)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        with playwright.sync_playwright() as p:
            context = _browser(p, tmp_path / "profile")
            try:
                page = context.new_page()
                external: list[str] = []
                page.on(
                    "request",
                    lambda r: external.append(r.url) if not r.url.startswith(live.server.url) else None,
                )
                page.goto(f"{live.server.url}/dashboard")
                assert page.title() == "tokenfleet — live"
                board = "window.tokenfleetDashboard"
                page.wait_for_function(f"{board} && {board}.snapshots() >= 2", timeout=30_000)
                page.wait_for_function(
                    f"({board}.latest('throughput', 'requests/s') || 0) > 0", timeout=60_000
                )
                assert "engine r0" in page.evaluate(f"{board}.series('queue')")
                assert page.locator("#notice").is_hidden()
                page.locator("#traces tr[data-trace]").first.wait_for(timeout=30_000)
                assert painted_pixels(page, "chart-throughput") > 500  # the canvas really has a chart
                # A replica that never answers: the gateway ejects it, Prometheus's rule fires.
                live.gateway.set_replicas(
                    [("r0", live.engine.url), ("r1", f"http://127.0.0.1:{free_port()}")]
                )
                alert = page.locator('.alert.firing[data-alertname="TokenfleetReplicaDown"]')
                alert.first.wait_for(timeout=60_000)
                assert "Replica r1 receives no traffic" in alert.first.inner_text()
                assert external == [], f"the page fetched from elsewhere: {external}"

                # Without a Prometheus the same page says, in one line, what to install.
                bare = FastAPI()
                mount_dashboard(bare, LocalMonitor(prometheus_url=None, notice=INSTALL_HINT, interval_s=0.5))
                server = ServerThread(bare, free_port()).start()
                try:
                    page.goto(f"{server.url}/dashboard")
                    page.wait_for_function(f"{board} && {board}.snapshots() >= 1", timeout=30_000)
                    assert page.locator("#notice").inner_text() == INSTALL_HINT
                finally:
                    server.stop()
            finally:
                context.close()
    finally:
        stop.set()
        worker.join(timeout=30)
