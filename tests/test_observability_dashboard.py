"""The built-in dashboard's server side, on the real gateway in front of fake engines (fast):
routes, SSE snapshots, chart values under traffic, a real rule firing and its webhook."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from conftest import free_port, tiny_service

from tokenfleet.engine.gateway.app import Gateway
from tokenfleet.engine.gateway.fake_engine import Faults, fake_engine
from tokenfleet.engine.gateway.server import ServerThread
from tokenfleet.observability.dashboard import (
    CHARTS,
    LocalMonitor,
    Source,
    evaluate_charts,
    legend,
    mount_dashboard,
)
from tokenfleet.observability.promql import TSDB


class Hook:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                hook.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"


@pytest.fixture
def fleet() -> Iterator[tuple[Gateway, ServerThread, LocalMonitor, Hook, ServerThread]]:
    engine_app, _ = fake_engine("r0")
    engine = ServerThread(engine_app, free_port()).start()
    gateway = Gateway(tiny_service())
    gateway.set_replicas([("r0", engine.url)])
    hook = Hook()
    monitor = LocalMonitor.for_gateway(gateway, webhook_url=hook.url, interval_s=0.2, for_scale=0.0)
    mount_dashboard(gateway.app, monitor)
    server = ServerThread(gateway.app, free_port()).start()
    server.wait_until("/ready")
    try:
        yield gateway, server, monitor, hook, engine
    finally:
        server.stop()
        engine.stop()
        hook.server.shutdown()
        hook.server.server_close()


def _wait(predicate: Any, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_page_script_snapshot_and_sse(
    fleet: tuple[Gateway, ServerThread, LocalMonitor, Hook, ServerThread],
) -> None:
    gateway, server, monitor, _, _ = fleet
    page = httpx.get(f"{server.url}/dashboard")
    assert page.status_code == 200
    assert "/dashboard/app.js" in page.text
    assert "{{PREFIX}}" not in page.text
    assert "http" not in page.text.split("<body>")[1]  # no CDN, nothing fetched from elsewhere
    script = httpx.get(f"{server.url}/dashboard/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert "EventSource" in script.text

    def throughput_seen() -> bool:
        points = (monitor.snapshot or {}).get("charts", {}).get("throughput", {}).get("points", {})
        return bool(points.get("requests/s", 0) > 0)

    # Keep traffic flowing until a rate window holds an increase: requests sent before the
    # monitor's first scrape would leave the counter flat (rate 0) for good.
    deadline = time.monotonic() + 40
    while not throughput_seen():
        assert time.monotonic() < deadline, "throughput never showed on the dashboard"
        response = httpx.post(
            f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3}
        )
        assert response.status_code == 200
        time.sleep(0.2)
    snap = httpx.get(f"{server.url}/dashboard/api/snapshot").json()
    assert set(snap["charts"]) == {c.id for c in CHARTS}
    assert snap["targets"] == {"gateway": True, "r0": True}
    assert snap["charts"]["replicas"]["points"]["routable"] == 1
    assert snap["traces"][0]["name"] == "POST /v1/completions"
    assert any(p.startswith("p95 ") for p in snap["charts"]["ttft"]["points"])
    with httpx.stream("GET", f"{server.url}/dashboard/events", timeout=10) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = []
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) == 2:
                    break
    assert events[1]["tick"] > events[0]["tick"]
    assert gateway.metrics is not None


def test_replica_down_fires_and_resolves_through_the_webhook(
    fleet: tuple[Gateway, ServerThread, LocalMonitor, Hook, ServerThread],
) -> None:
    gateway, server, monitor, hook, engine = fleet
    sick_app, faults = fake_engine("r1", faults=Faults(healthy=False))
    sick = ServerThread(sick_app, free_port()).start()
    gateway.set_replicas([("r0", engine.url), ("r1", sick.url)])
    _wait(
        lambda: any(
            a["name"] == "TokenfleetReplicaDown"
            and a["state"] == "firing"
            and a["labels"].get("replica") == "r1"
            for a in (monitor.snapshot or {}).get("alerts", [])
        )
    )
    snap = monitor.snapshot
    assert snap is not None
    # (r0 may have fired briefly too: a replica is unroutable until its first probe, and the
    # test runs with `for:` scaled to zero.)
    alert = next(a for a in snap["alerts"] if a["labels"].get("replica") == "r1")
    assert alert["annotations"]["summary"] == "Replica r1 receives no traffic"
    # Healthy again: the breaker re-admits it after its cooldown and the alert resolves.
    # (Removing r1 from the gateway would not: its routable=0 series outlives membership.)
    faults.healthy = True

    def r1(status: str) -> bool:
        return any(
            a["status"] == status and a["labels"].get("replica") == "r1"
            for b in hook.bodies
            for a in b["alerts"]
        )

    try:
        _wait(lambda: r1("resolved"), timeout_s=60)
    finally:
        sick.stop()
    assert r1("firing")
    assert all(b["version"] == "4" for b in hook.bodies)
    assert server.url


def test_monitor_survives_a_failing_source() -> None:
    import asyncio

    async def broken() -> str:
        raise httpx.ConnectError("down")

    async def good() -> str:
        return "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 0.5\n"

    monitor = LocalMonitor(sources=lambda: [Source("a", broken), Source("b", good)], clock=lambda: 100.0)
    snap = asyncio.run(monitor.tick())
    assert snap["targets"] == {"a": False, "b": True}
    assert snap["charts"]["kv"]["points"] == {"b": 0.5}


def test_chart_legends_and_values() -> None:
    db = TSDB()
    db.add({"__name__": "vllm:num_requests_waiting", "instance": "r0", "model_name": "m"}, 1, 3)
    charts = evaluate_charts(CHARTS, db, 1)
    assert charts["queue"]["points"] == {"engine r0": 3}
    assert legend("p95 {class}", {}) == "p95"


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


def test_idle_monitor_costs_nothing_and_remount_swaps_it() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    calls: list[int] = []

    async def source() -> str:
        calls.append(1)
        return '# TYPE tokenfleet_gateway_queued gauge\ntokenfleet_gateway_queued{class="batch"} 2\n'

    app = FastAPI()
    first = LocalMonitor(sources=lambda: [Source("gateway", source)], interval_s=0.05)
    second = LocalMonitor(sources=lambda: [Source("gateway", source)], interval_s=0.05)
    mount_dashboard(app, first)
    mount_dashboard(app, second)  # swaps the monitor, no duplicate routes
    assert sum(1 for r in app.routes if getattr(r, "path", "") == "/dashboard") == 1
    with TestClient(app) as client:
        time.sleep(0.3)
        assert calls == []  # nobody watching, no webhook: no scraping
        snap = client.get("/dashboard/api/snapshot").json()  # ticks on demand
        assert snap["charts"]["queue"]["points"] == {"gateway batch": 2}
        assert first.ticks == 0
        assert second.ticks == 1
    assert LocalMonitor(sources=list, always_on=True).active
