"""End to end on a real vLLM CPU server behind the real gateway: one request is one trace with
gateway and engine spans (received over OTLP/HTTP), and every metric a dashboard or alert rule
references is served by the live /metrics endpoints."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import ENGINE_START_TIMEOUT_S, free_port, painted_pixels, tiny_service
from prometheus_client.parser import text_string_to_metric_families

from tokenfleet.engine.gateway.app import Gateway
from tokenfleet.engine.gateway.server import ServerThread
from tokenfleet.engine.launch import EngineProcess, engine_command
from tokenfleet.models import ensure_builtin
from tokenfleet.observability import grafana, prometheusrule
from tokenfleet.observability.catalogue import referenced_metrics, series_index
from tokenfleet.observability.dashboard import LocalMonitor, mount_dashboard
from tokenfleet.observability.otlp_endpoint import TraceExport
from tokenfleet.observability.otlp_receiver import OTLPReceiver, ReceivedSpan
from tokenfleet.observability.stack import LocalStack, write_scaled_rules

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
GATEWAY_SERVICE = "tokenfleet-gateway-tiny"


@dataclass
class Stack:
    receiver: OTLPReceiver
    engine: EngineProcess
    gateway: Gateway
    server: ServerThread
    monitor: LocalMonitor
    prometheus: LocalStack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    receiver = OTLPReceiver().start()
    # The SLA scheduler too, so its series are on the engine's /metrics (multiprocess mode).
    service = tiny_service(scheduler={"policy": "sla"})
    model = ensure_builtin("tiny-random")
    port = free_port()
    logs = tmp_path_factory.mktemp("traced-engine")
    traces = TraceExport.of_engines(receiver.endpoint, service.metadata.name)
    command = engine_command(service.spec, str(model), port=port, traces=traces)
    engine = EngineProcess(command, port=port, log_path=logs / "engine.log", cwd=logs)
    # Short batch delay: spans leave the engine within ~0.2 s instead of 5 s.
    engine.start(extra_env={"OTEL_BSP_SCHEDULE_DELAY": "200"})
    saved = {k: os.environ.get(k) for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_BSP_SCHEDULE_DELAY")}
    # The gateway's exporter reads the standard variable (base URL; it appends /v1/traces).
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint.removesuffix("/v1/traces")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    server: ServerThread | None = None
    # The real Prometheus, `for:` scaled to zero so the browser test sees a real rule fire soon.
    rules = write_scaled_rules(logs / "rules", 0.0)
    prometheus = LocalStack(logs / "prometheus", interval_s=1, rule_files=rules)
    try:
        engine.wait_ready(ENGINE_START_TIMEOUT_S)
        prometheus.start()
        gateway = Gateway(service)
        gateway.set_replicas([("r0", engine.url)])
        monitor = LocalMonitor.for_gateway(
            gateway, prometheus_url=prometheus.prometheus_url, interval_s=0.5, receiver=receiver
        )
        mount_dashboard(gateway.app, monitor)
        server = ServerThread(gateway.app, free_port()).start()
        server.wait_until("/ready", timeout_s=30)
        prometheus.set_targets(server.url, [("r0", engine.url)])
        yield Stack(receiver, engine, gateway, server, monitor, prometheus)
    finally:
        prometheus.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if server is not None:
            server.stop()
        engine.stop(timeout_s=30)
        receiver.stop()


def _completion(stack: Stack, prompt: str) -> httpx.Response:
    return httpx.post(
        f"{stack.server.url}/v1/completions",
        json={"model": "tiny", "prompt": prompt, "max_tokens": 4},
        timeout=60,
    )


def test_one_request_is_one_trace_with_gateway_and_engine_spans(stack: Stack) -> None:
    response = _completion(stack, "one request, one trace")
    assert response.status_code == 200, response.text
    stack.gateway.tracing.provider.force_flush()

    def gateway_spans(r: OTLPReceiver) -> list[ReceivedSpan]:
        return [s for s in r.spans() if s.service == GATEWAY_SERVICE and s.name.endswith("/v1/completions")]

    assert stack.receiver.wait_for(lambda r: len(gateway_spans(r)) == 1), "gateway span never arrived"
    (server_span,) = gateway_spans(stack.receiver)

    def engine_span_of(r: OTLPReceiver) -> list[ReceivedSpan]:
        return [s for s in r.traces().get(server_span.trace_id, []) if s.name == "llm_request"]

    assert stack.receiver.wait_for(lambda r: len(engine_span_of(r)) == 1, timeout_s=30), (
        f"no vLLM span in trace {server_span.trace_id}; "
        f"got {[(s.service, s.name) for s in stack.receiver.spans()]}"
    )
    (engine_span,) = engine_span_of(stack.receiver)
    assert engine_span.service == "tokenfleet-engine-tiny", "vLLM's spans under the engines' service name"
    trace = stack.receiver.traces()[server_span.trace_id]
    # One trace: the engine span hangs off a span of the gateway's, and both share the trace id.
    gateway_ids = {s.span_id for s in trace if s.service == GATEWAY_SERVICE}
    assert engine_span.parent_span_id in gateway_ids
    # engine span -> the gateway's SERVER span of that request
    assert engine_span.parent_span_id == server_span.span_id
    assert server_span.parent_span_id == ""  # the gateway started the trace
    assert engine_span.attributes.get("gen_ai.usage.completion_tokens") == 4
    assert server_span.attributes["tokenfleet.replica"] == "r0"
    # No other trace received a span for this request.
    other = [
        s for s in stack.receiver.spans() if s.trace_id != server_span.trace_id and s.name == "llm_request"
    ]
    assert other == []


def _declared_families(text: str) -> dict[str, int]:
    """family name -> number of samples (0 for a family declared before any label child exists)."""
    return {f.name: len(f.samples) for f in text_string_to_metric_families(text)}


def test_every_referenced_metric_is_served_live(stack: Stack) -> None:
    assert _completion(stack, "fill the histograms").status_code == 200
    engine = _declared_families(httpx.get(f"{stack.engine.url}/metrics", timeout=10).text)
    gateway = _declared_families(httpx.get(f"{stack.server.url}/metrics", timeout=10).text)
    live = {"vllm": engine, "gateway": gateway, "scheduler": engine}
    index = series_index()
    referenced: set[str] = set()
    for path in sorted(grafana.OUT_DIR.glob("*.json")):
        for expr in grafana.expressions(json.loads(path.read_text())):
            referenced |= referenced_metrics(expr)
    for _, expr in prometheusrule.expressions():
        referenced |= referenced_metrics(expr)
    missing = []
    checked = 0
    for name in sorted(referenced):
        metric = index.get(name)
        if metric is None or metric.source not in live:
            continue  # recording rules; control-loop series are checked in-process
        checked += 1
        # prometheus_client's parser names counter families without `_total`.
        if metric.family.removesuffix("_total") not in live[metric.source]:
            missing.append(name)
    assert checked >= 30
    assert not missing, f"referenced but not served by the running gateway/engine: {missing}"
    # vLLM's series carry samples after a request (not just declarations).
    for family in (
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds",
    ):
        assert engine[family] > 0, family
    # The scheduler counted the finished requests against their class targets (the SLI).
    slo = httpx.get(f"{stack.engine.url}/metrics", timeout=10).text
    met = [
        s.value
        for f in text_string_to_metric_families(slo)
        if f.name == "tokenfleet_scheduler_slo_requests"
        for s in f.samples
        if s.name.endswith("_total")
    ]
    assert sum(met) > 0


CHROMIUM = shutil.which("chromium")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "results" / "dashboard.png"


def _load(url: str, stop: threading.Event, sent: list[int], limit: int = 150) -> None:
    """Bounded closed-loop load: one request at a time until told to stop."""
    with httpx.Client(timeout=60) as client:
        while not stop.is_set() and sum(sent) < limit:
            stream = sum(sent) % 2 == 0
            body = {"model": "tiny", "prompt": f"load {sum(sent)}", "max_tokens": 16, "stream": stream}
            if stream:
                with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                    for _ in response.iter_bytes():
                        pass
            else:
                client.post(f"{url}/v1/completions", json=body)
            sent.append(1)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/install.sh)")
def test_dashboard_in_headless_chromium(stack: Stack, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    stop = threading.Event()
    sent: list[int] = []
    workers = [threading.Thread(target=_load, args=(stack.server.url, stop, sent)) for _ in range(2)]
    try:
        with playwright.sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"),
                executable_path=CHROMIUM,
                headless=True,
                viewport={"width": 1500, "height": 980},
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
            try:
                page = context.new_page()
                external: list[str] = []
                page.on(
                    "request",
                    lambda r: external.append(r.url) if not r.url.startswith(stack.server.url) else None,
                )
                page.goto(f"{stack.server.url}/dashboard")
                assert page.title() == "tokenfleet — live"
                board = "window.tokenfleetDashboard"
                page.wait_for_function(f"{board} && {board}.snapshots() >= 2", timeout=30_000)
                # The bounded load starts once the page is live, so it overlaps the checks below
                # however long the browser took to start on a busy machine.
                for worker in workers:
                    worker.start()
                # Charts update while load runs: throughput and KV series carry live values.
                page.wait_for_function(
                    f"({board}.latest('throughput', 'requests/s') || 0) > 0", timeout=60_000
                )
                page.wait_for_function(f"({board}.latest('throughput', 'tokens/s') || 0) > 0", timeout=60_000)
                before = page.evaluate(f"{board}.snapshots()")
                page.wait_for_function(f"{board}.snapshots() >= {before + 4}", timeout=30_000)
                assert "r0" in page.evaluate(f"{board}.series('kv')")
                # Latest traces: joined gateway + vLLM spans from the local OTLP receiver.
                page.locator("#traces tr[data-trace]").first.wait_for(timeout=30_000)
                joined = [t for t in stack.monitor.snapshot["traces"] if len(t["services"]) == 2]  # type: ignore[index]
                assert joined, "no trace with both gateway and engine spans on the dashboard"
                assert painted_pixels(page, "chart-throughput") > 500  # the canvas really has a chart
                # A replica that never answers: the gateway ejects it, the real rule fires.
                stack.gateway.set_replicas(
                    [("r0", stack.engine.url), ("r1", f"http://127.0.0.1:{free_port()}")]
                )
                alert = page.locator('.alert.firing[data-alertname="TokenfleetReplicaDown"]')
                alert.first.wait_for(timeout=30_000)
                assert "Replica r1 receives no traffic" in alert.first.inner_text()
                page.wait_for_timeout(5000)  # let more points land for the screenshot
                page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
                if os.environ.get("TOKENFLEET_UPDATE_SCREENSHOTS"):
                    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(tmp_path / "dashboard.png", SCREENSHOT)
                assert external == [], f"the page fetched from elsewhere: {external}"
            finally:
                context.close()
    finally:
        stop.set()
        for worker in workers:
            if worker.ident is not None:  # started
                worker.join(timeout=60)
        stack.gateway.set_replicas([("r0", stack.engine.url)])
    assert sum(sent) > 0
