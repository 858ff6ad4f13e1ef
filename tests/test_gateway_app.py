"""The gateway's HTTP behaviour against fake replicas with injected faults (fast, deterministic).

What needs vLLM's own bytes or a real process death is in test_gateway_engine.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, tiny_service
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tokenfleet.engine.gateway.app import Gateway, create_app
from tokenfleet.engine.gateway.server import ServerThread
from tokenfleet.engine.gateway.tracing import PROPAGATOR, Tracing
from tokenfleet.load.fake_engine import Faults, fake_engine
from tokenfleet.spec import LLMService

FAST = {"probeIntervalS": 0.1, "ejectCooldownS": 0.3, "ejectAfterFailures": 2}
COMPLETION = {"model": "tiny", "prompt": "def f(", "max_tokens": 3}


class Fake:
    def __init__(self, name: str) -> None:
        self.faults = Faults()
        app, _ = fake_engine(name, faults=self.faults)
        self.server = ServerThread(app, free_port()).start()

    @property
    def url(self) -> str:
        return self.server.url

    def reset(self) -> None:
        fresh = Faults()
        for key, value in vars(fresh).items():
            setattr(self.faults, key, value)


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[Fake, Fake]]:
    pair = (Fake("a"), Fake("b"))
    yield pair
    for fake in pair:
        fake.server.stop()


@pytest.fixture(autouse=True)
def _reset(fakes: tuple[Fake, Fake]) -> None:
    for fake in fakes:
        fake.reset()


@contextmanager
def running(service: LLMService, members: list[tuple[str, str]]) -> Iterator[tuple[str, Gateway]]:
    app = create_app(service, members)
    server = ServerThread(app, free_port()).start()
    try:
        if members:
            server.wait_until("/ready")
        yield server.url, app.state.gateway
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateway(fakes: tuple[Fake, Fake]) -> Iterator[tuple[str, Gateway]]:
    service = tiny_service(routing={"policy": "round_robin", **FAST})
    with running(service, [("r0", fakes[0].url), ("r1", fakes[1].url)]) as pair:
        yield pair


def wait_for(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def wait_admitted(gw: Gateway, count: int) -> None:
    wait_for(lambda: gw.admission.running + sum(gw.admission.queued().values()) >= count)


def states(url: str) -> dict[str, str]:
    return {r["id"]: r["state"] for r in httpx.get(f"{url}/admin/status").json()["replicas"]}


# -- forwarding ----------------------------------------------------------------------------------


def test_forwards_completions_and_sets_class_and_tenant(
    gateway: tuple[str, Gateway], fakes: tuple[Fake, Fake]
) -> None:
    url, _ = gateway
    body = {**COMPLETION, "vllm_xargs": {"tenant": "root", "slo_class": "interactive"}, "priority": 0}
    replies = [httpx.post(f"{url}/v1/completions", json=body) for _ in range(2)]
    assert [r.status_code for r in replies] == [200, 200]
    assert {r.headers["x-tokenfleet-replica"] for r in replies} == {"r0", "r1"}  # round robin
    assert {r.json()["served_by"] for r in replies} == {"a", "b"}
    seen = fakes[0].faults.seen[-1]
    # the client's own vllm_xargs is replaced; a body priority maps to its class (fcfs -> 0)
    assert seen["vllm_xargs"] == {"slo_class": "interactive", "tenant": "default"}
    assert seen["priority"] == 0


def test_chat_and_models_are_forwarded(gateway: tuple[str, Gateway]) -> None:
    url, _ = gateway
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(f"{url}/v1/chat/completions", json=chat).status_code == 200
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny"


def test_sse_bytes_pass_through_untouched(gateway: tuple[str, Gateway], fakes: tuple[Fake, Fake]) -> None:
    url, _ = gateway
    body = {**COMPLETION, "stream": True, "max_tokens": 5}
    direct = httpx.post(f"{fakes[0].url}/v1/completions", json=body).content
    via = [httpx.post(f"{url}/v1/completions", json=body) for _ in range(2)]
    r0 = next(r for r in via if r.headers["x-tokenfleet-replica"] == "r0")
    assert r0.headers["content-type"].startswith("text/event-stream")
    assert r0.content == direct
    assert r0.content.endswith(b"data: [DONE]\n\n")


def test_trace_context_reaches_the_engine(gateway: tuple[str, Gateway], fakes: tuple[Fake, Fake]) -> None:
    url, gw = gateway
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = f"00-{trace_id}-00f067aa0ba902b7-01"
    for _ in range(2):
        httpx.post(f"{url}/v1/completions", json=COMPLETION, headers={"traceparent": parent})
    forwarded = [f.faults.headers[-1]["traceparent"] for f in fakes]
    assert all(tp.split("-")[1] == trace_id for tp in forwarded)

    def traced() -> list[Any]:
        finished = gw.tracing.memory.get_finished_spans()
        return [s for s in finished if format(s.context.trace_id, "032x") == trace_id]

    wait_for(lambda: len(traced()) == 2)  # spans end just after the answer is sent
    spans = traced()
    assert [s.kind.name for s in spans] == ["SERVER", "SERVER"]  # one span per request
    span = spans[0]
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["http.route"] == "/v1/completions"
    assert span.attributes["tokenfleet.replica"] in {"r0", "r1"}
    # engine -> the gateway's span of that request -> the caller's span
    assert all(s.parent is not None and s.parent.span_id == 0x00F067AA0BA902B7 for s in spans)
    assert {tp.split("-")[2] for tp in forwarded} == {format(s.context.span_id, "016x") for s in spans}
    assert all(tp.endswith("-01") for tp in forwarded)  # the caller's sampled flag carries on


def test_context_headers_are_what_the_w3c_propagator_writes() -> None:
    tracing = Tracing("test", {})
    for state in (TraceState(), TraceState([("vendor", "opaque")])):
        parent = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0xF067AA0BA902B7, True, TraceFlags(1), state)
        span = tracing.tracer.start_span("s", context=trace.set_span_in_context(NonRecordingSpan(parent)))
        expected: dict[str, str] = {}
        PROPAGATOR.inject(expected, context=trace.set_span_in_context(span))
        assert tracing.context_headers(span) == expected
    assert tracing.context_headers(trace.INVALID_SPAN) == {}


def test_health_ready_metrics_openapi(gateway: tuple[str, Gateway]) -> None:
    url, _ = gateway
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").status_code == 200
    httpx.post(f"{url}/v1/completions", json=COMPLETION)
    metrics = httpx.get(f"{url}/metrics").text
    for series in (
        'tokenfleet_gateway_requests_total{class="standard",code="2xx",route="/v1/completions",tenant="default"}',
        "tokenfleet_gateway_request_duration_seconds_bucket",
        "tokenfleet_gateway_first_byte_seconds_bucket",
        'tokenfleet_gateway_replica_routable{replica="r0"} 1.0',
        "tokenfleet_gateway_in_flight",
    ):
        assert series in metrics
    spec = httpx.get(f"{url}/openapi.json").json()
    assert set(spec["paths"]) == {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/models",
        "/health",
        "/ready",
    }
    assert "CompletionRequest" in spec["components"]["schemas"]


def test_retry_counters_exist_at_zero_for_every_route_before_any_retry() -> None:
    """Created with the gateway's routes (Prometheus practice for a known label value): a day
    without a retry still has the series the dashboards plot, and `rate()` counts the first one."""
    gateway = Gateway(tiny_service(gateway={"exposeEndpoints": ["/tokenize", "/version"]}))
    registry = gateway.metrics.registry
    families = text_string_to_metric_families(generate_latest(registry).decode())
    retries = {
        sample.labels["route"]: sample.value
        for family in families
        if family.name == "tokenfleet_gateway_retries"
        for sample in family.samples
        if sample.name == "tokenfleet_gateway_retries_total"
    }
    openai = ["/v1/completions", "/v1/chat/completions", "/v1/responses"]
    assert retries == dict.fromkeys([*openai, "/v1/models", "/tokenize", "/version"], 0.0)


def in_flight_gauges(url: str) -> dict[str, float]:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    family = next(f for f in families if f.name == "tokenfleet_gateway_in_flight")
    return {sample.labels["replica"]: sample.value for sample in family.samples}


def test_in_flight_gauge_reads_the_live_count_at_scrape_time(
    gateway: tuple[str, Gateway], fakes: tuple[Fake, Fake]
) -> None:
    url, _ = gateway
    for fake in fakes:
        fake.faults.delay_s = 1.0
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{url}/v1/completions", json=COMPLETION, timeout=10)
        wait_for(lambda: sum(in_flight_gauges(url).values()) == 1)
        assert set(in_flight_gauges(url)) == {"r0", "r1"}
        assert pending.result().status_code == 200
    wait_for(lambda: in_flight_gauges(url) == {"r0": 0, "r1": 0})


def test_proxied_routes_answer_a_wrong_method_with_405(gateway: tuple[str, Gateway]) -> None:
    # The proxied routes are served by FastRoutedApp, ahead of FastAPI's router; a wrong method still
    # reaches the router and gets its 405 with Allow.
    url, _ = gateway
    reply = httpx.get(f"{url}/v1/completions")
    assert reply.status_code == 405
    assert reply.headers["allow"] == "POST"
    assert httpx.post(f"{url}/v1/models", json={}).status_code == 405


def test_vllm_admin_endpoints_are_not_exposed(gateway: tuple[str, Gateway]) -> None:
    url, _ = gateway
    for method, path in [
        ("POST", "/pause"),
        ("POST", "/tokenize"),
        ("GET", "/version"),
        ("POST", "/v1/embeddings"),
    ]:
        assert httpx.request(method, f"{url}{path}", json={}).status_code in (404, 405)


# -- hostile requests ----------------------------------------------------------------------------

HOSTILE: list[tuple[str, bytes | dict[str, Any], int]] = [
    ("bad json", b"{not json", 400),
    ("empty body", b"", 400),
    ("json array", b"[1, 2]", 400),
    ("json string", b'"hello"', 400),
    ("NaN literal", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, 400),
    ("body over limit", {"model": "tiny", "prompt": "x" * 1_100_000}, 413),
    ("missing model", {"prompt": "x"}, 400),
    ("missing prompt", {"model": "tiny"}, 400),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, 404),
    ("negative max_tokens", {**COMPLETION, "max_tokens": -1}, 400),
    ("zero max_tokens", {**COMPLETION, "max_tokens": 0}, 400),
    ("max_tokens over context", {**COMPLETION, "max_tokens": 10**9}, 400),
    ("string max_tokens", {**COMPLETION, "max_tokens": "many"}, 400),
    ("bool max_tokens", {**COMPLETION, "max_tokens": True}, 400),
    ("float max_tokens", {**COMPLETION, "max_tokens": 2.5}, 400),
    ("prompt is a number", {"model": "tiny", "prompt": 42}, 400),
    ("empty prompt", {"model": "tiny", "prompt": ""}, 400),
    ("huge n", {**COMPLETION, "n": 10_000}, 400),
    ("temperature string", {**COMPLETION, "temperature": "hot"}, 400),
    ("negative temperature", {**COMPLETION, "temperature": -1}, 400),
    ("stream not bool", {**COMPLETION, "stream": "yes"}, 400),
    ("model is a list", {"model": ["tiny"], "prompt": "x"}, 400),
    ("unknown class priority", {**COMPLETION, "priority": 99}, 400),
    ("too many stop strings", {**COMPLETION, "stop": ["a"] * 50}, 400),
]
HOSTILE_CHAT: list[tuple[str, dict[str, Any], int]] = [
    ("no messages", {"model": "tiny", "messages": []}, 400),
    ("messages not a list", {"model": "tiny", "messages": "hi"}, 400),
    ("bad role", {"model": "tiny", "messages": [{"role": "root", "content": "hi"}]}, 400),
    ("content a number", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400),
]


@pytest.mark.parametrize(("name", "payload", "status"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_completion_gets_4xx_and_never_reaches_an_engine(
    gateway: tuple[str, Gateway],
    fakes: tuple[Fake, Fake],
    name: str,
    payload: bytes | dict[str, Any],
    status: int,
) -> None:
    url, _ = gateway
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    reply = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["message"]
    assert not fakes[0].faults.seen
    assert not fakes[1].faults.seen
    assert httpx.post(f"{url}/v1/completions", json=COMPLETION).status_code == 200  # still serving


@pytest.mark.parametrize(("name", "payload", "status"), HOSTILE_CHAT, ids=[h[0] for h in HOSTILE_CHAT])
def test_hostile_chat_gets_4xx(
    gateway: tuple[str, Gateway], name: str, payload: dict[str, Any], status: int
) -> None:
    url, _ = gateway
    reply = httpx.post(f"{url}/v1/chat/completions", json=payload)
    assert reply.status_code == status
    assert reply.json()["error"]["message"]


def test_unknown_class_header_and_lying_content_length(gateway: tuple[str, Gateway]) -> None:
    url, _ = gateway
    reply = httpx.post(f"{url}/v1/completions", json=COMPLETION, headers={"x-tokenfleet-class": "vip"})
    assert reply.status_code == 400
    assert "unknown class" in reply.text
    # A client that declares a small body and streams a huge one is cut off at the limit.
    raw = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5)
    with raw:
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 65536
        try:
            for _ in range(40):
                raw.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except OSError:
            pass  # the gateway may close as soon as it has refused
        answer = raw.recv(256)
    assert answer.startswith(b"HTTP/1.1 413")


# -- failover ------------------------------------------------------------------------------------


def test_5xx_before_body_is_retried_on_another_replica(
    gateway: tuple[str, Gateway], fakes: tuple[Fake, Fake]
) -> None:
    url, gw = gateway

    def retries() -> float | None:
        return gw.metrics.registry.get_sample_value(
            "tokenfleet_gateway_retries_total", {"route": "/v1/completions"}
        )

    before = retries()
    assert before is not None  # the series is there, at its count so far, before this retry
    fakes[0].faults.status_5xx = 1
    replies = [httpx.post(f"{url}/v1/completions", json=COMPLETION) for _ in range(2)]
    assert [r.status_code for r in replies] == [200, 200]
    assert fakes[0].faults.status_5xx == 0  # r0 was tried and failed; r1 answered instead
    assert retries() == before + 1

    def retried() -> list[Any]:  # the failed attempt is an event on the request's one span
        finished = gw.tracing.memory.get_finished_spans()
        return [s for s in finished if (s.attributes or {}).get("tokenfleet.retries") == 1]

    wait_for(lambda: len(retried()) == 1)
    (span,) = retried()
    (event,) = span.events
    assert event.name == "upstream attempt failed"
    assert event.attributes is not None
    assert event.attributes["tokenfleet.replica"] == "r0"
    assert event.attributes["error.type"] == "status_5xx"
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 200


def test_every_attempt_failing_gives_502_not_a_hang(
    gateway: tuple[str, Gateway], fakes: tuple[Fake, Fake]
) -> None:
    url, _ = gateway
    fakes[0].faults.status_5xx = 5
    fakes[1].faults.status_5xx = 5
    reply = httpx.post(f"{url}/v1/completions", json=COMPLETION)
    assert reply.status_code == 502
    assert "2 attempt(s) failed" in reply.json()["error"]["message"]  # one retry, bounded


def test_stream_dying_before_first_byte_is_retried(
    gateway: tuple[str, Gateway], fakes: tuple[Fake, Fake]
) -> None:
    url, _ = gateway
    fakes[0].faults.die_after_chunks = 0
    fakes[1].faults.die_after_chunks = 0
    with httpx.stream("POST", f"{url}/v1/completions", json={**COMPLETION, "stream": True}) as reply:
        text = reply.read().decode()
    # both die before a byte: the client gets one clean error, never half a stream
    assert reply.status_code == 502
    fakes[1].faults.die_after_chunks = None
    # Those failures may have ejected a replica (ejectAfterFailures 2 counts the previous test's
    # too): wait for the probes to re-admit both, so the retry below has somewhere to go.
    wait_for(lambda: set(states(url).values()) == {"ready"})
    for _ in range(2):
        with httpx.stream("POST", f"{url}/v1/completions", json={**COMPLETION, "stream": True}) as reply:
            text = reply.read().decode()
        assert reply.status_code == 200
        assert text.endswith("data: [DONE]\n\n")
        assert '"served_by":"b"' in text


def test_stream_breaking_midway_ends_with_an_error_event_and_is_not_replayed(
    gateway: tuple[str, Gateway], fakes: tuple[Fake, Fake]
) -> None:
    url, _ = gateway
    for fake in fakes:
        fake.faults.die_after_chunks = 2
    # With logprobs a stream cannot be resumed from token ids (test_gateway_hardening resumes one).
    body = {**COMPLETION, "stream": True, "max_tokens": 5, "logprobs": 1}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as reply:
        events = [e for e in reply.read().decode().split("\n\n") if e]
    assert reply.status_code == 200
    assert len(events) == 3
    error = json.loads(events[-1].removeprefix("data: "))
    assert error["error"]["type"] == "upstream_error"
    assert "not retried" in error["error"]["message"]
    assert len(fakes[0].faults.seen) + len(fakes[1].faults.seen) == 1


def test_refused_connection_is_retried_and_the_dead_replica_ejected_then_readmitted(
    fakes: tuple[Fake, Fake],
) -> None:
    dead_port = free_port()
    service = tiny_service(routing={"policy": "round_robin", **FAST})
    with running(service, [("live", fakes[0].url), ("dead", f"http://127.0.0.1:{dead_port}")]) as (url, gw):
        gw.replicas.replicas["dead"].breaker = gw.replicas.replicas["live"].breaker  # pretend it was up
        replies = [httpx.post(f"{url}/v1/completions", json=COMPLETION) for _ in range(4)]
        assert [r.status_code for r in replies] == [200] * 4
        assert {r.headers["x-tokenfleet-replica"] for r in replies} == {"live"}
        wait_for(lambda: states(url)["dead"] == "ejected")
        assert 'tokenfleet_gateway_ejections_total{replica="dead"} 1.0' in httpx.get(f"{url}/metrics").text
        # the replica comes back on its port: the prober re-admits it after the cooldown
        app, _ = fake_engine("reborn")
        reborn = ServerThread(app, dead_port).start()
        try:
            wait_for(lambda: states(url)["dead"] == "ready")
            served = {
                httpx.post(f"{url}/v1/completions", json=COMPLETION).json()["served_by"] for _ in range(4)
            }
            assert served == {"a", "reborn"}
        finally:
            reborn.stop()


def test_unhealthy_probe_ejects_and_healthy_readmits(fakes: tuple[Fake, Fake]) -> None:
    service = tiny_service(routing={"policy": "least_outstanding", **FAST})
    with running(service, [("r0", fakes[0].url), ("r1", fakes[1].url)]) as (url, _):
        fakes[1].faults.healthy = False
        wait_for(lambda: states(url)["r1"] == "ejected")
        assert {
            httpx.post(f"{url}/v1/completions", json=COMPLETION).json()["served_by"] for _ in range(6)
        } == {"a"}
        fakes[1].faults.healthy = True
        wait_for(lambda: states(url)["r1"] == "ready")


def test_no_ready_replica_gives_503_with_retry_after() -> None:
    classes = [{"name": "standard", "priority": 0, "maxWaitS": 0.2}]
    service = tiny_service(
        routing=FAST,
        scheduler={"classes": classes, "defaultClass": "standard"},
        gateway={"defaultLimits": {"requestsPerMinute": 1}},
    )
    with running(service, []) as (url, _):
        assert httpx.get(f"{url}/ready").status_code == 503
        for _ in range(3):  # shed requests are refunded: never 429 for what was not served
            reply = httpx.post(f"{url}/v1/completions", json=COMPLETION)
            assert reply.status_code == 503
            assert reply.headers["retry-after"]


# -- routing through the gateway -----------------------------------------------------------------


def test_prefix_and_session_affinity_stick(fakes: tuple[Fake, Fake]) -> None:
    members = [("r0", fakes[0].url), ("r1", fakes[1].url)]
    with running(tiny_service(routing={"policy": "prefix_affinity", "prefixChars": 16, **FAST}), members) as (
        url,
        _,
    ):
        for shared in ("You are a helpful assistant. ", "Translate to French: "):
            body = {"model": "tiny", "prompt": shared + "question {}", "max_tokens": 1}
            homes = {
                httpx.post(f"{url}/v1/completions", json={**body, "prompt": shared + str(i)}).json()[
                    "served_by"
                ]
                for i in range(5)
            }
            assert len(homes) == 1
    with running(tiny_service(routing={"policy": "session_affinity", **FAST}), members) as (url, _):
        for session in ("alice", "bob", "carol"):
            homes = {
                httpx.post(
                    f"{url}/v1/completions", json=COMPLETION, headers={"x-session-id": session}
                ).json()["served_by"]
                for _ in range(4)
            }
            assert len(homes) == 1


# -- auth, limits, classes -----------------------------------------------------------------------


@pytest.fixture
def keyed(tmp_path: Path, fakes: tuple[Fake, Fake]) -> Iterator[str]:
    keys = tmp_path / "keys.yaml"
    keys.write_text("free-key: free\npro-key: pro\n")
    service = tiny_service(
        routing=FAST,
        gateway={"auth": True, "apiKeysFile": str(keys), "defaultLimits": {"requestsPerMinute": 1000}},
        scheduler={
            "policy": "sla",
            "tenants": [
                {"name": "free", "maxClass": "standard", "requestsPerMinute": 3},
                {"name": "pro", "tokensPerMinute": 100},
            ],
        },
    )
    with running(service, [("r0", fakes[0].url)]) as (url, _):
        yield url


def test_missing_or_wrong_key_is_401_and_never_reaches_the_engine(
    keyed: str, fakes: tuple[Fake, Fake]
) -> None:
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic free-key"}):
        reply = httpx.post(f"{keyed}/v1/completions", json=COMPLETION, headers=headers)
        assert reply.status_code == 401
        assert "API key" in reply.json()["error"]["message"]
    assert httpx.get(f"{keyed}/v1/models").status_code == 401
    assert not fakes[0].faults.seen


def test_tenant_class_is_capped_and_passed_to_the_engine(keyed: str, fakes: tuple[Fake, Fake]) -> None:
    reply = httpx.post(
        f"{keyed}/v1/completions",
        json=COMPLETION,
        headers={"authorization": "Bearer free-key", "x-tokenfleet-class": "interactive"},
    )
    assert reply.status_code == 200
    assert reply.headers["x-tokenfleet-class"] == "standard"
    assert fakes[0].faults.seen[-1]["vllm_xargs"] == {"slo_class": "standard", "tenant": "free"}
    assert fakes[0].faults.seen[-1]["priority"] == 1  # sla policy: the class priority
    reply = httpx.post(
        f"{keyed}/v1/completions",
        json=COMPLETION,
        headers={"x-api-key": "pro-key", "x-tokenfleet-class": "interactive"},
    )
    assert reply.headers["x-tokenfleet-class"] == "interactive"


def test_requests_per_minute_limit_gives_429_with_retry_after(keyed: str) -> None:
    auth = {"authorization": "Bearer free-key"}
    codes = [
        httpx.post(f"{keyed}/v1/completions", json=COMPLETION, headers=auth).status_code for _ in range(4)
    ]
    assert codes == [200, 200, 200, 429]
    reply = httpx.post(f"{keyed}/v1/completions", json=COMPLETION, headers=auth)
    assert reply.status_code == 429
    assert 1 <= int(reply.headers["retry-after"]) <= 20
    # another tenant is unaffected
    assert (
        httpx.post(f"{keyed}/v1/completions", json=COMPLETION, headers={"x-api-key": "pro-key"}).status_code
        == 200
    )


def test_tokens_per_minute_limit_counts_prompt_and_output(keyed: str) -> None:
    auth = {"x-api-key": "pro-key"}
    big = {**COMPLETION, "max_tokens": 60}
    assert httpx.post(f"{keyed}/v1/completions", json=big, headers=auth).status_code == 200
    reply = httpx.post(f"{keyed}/v1/completions", json=big, headers=auth)
    assert reply.status_code == 429
    assert "tokens/min" in reply.json()["error"]["message"]


# -- overload ------------------------------------------------------------------------------------


def test_overload_sheds_lowest_class_first_with_503(fakes: tuple[Fake, Fake]) -> None:
    fakes[0].faults.delay_s = 2.0
    classes = [
        {"name": "interactive", "priority": 0, "maxWaitS": 10},
        {"name": "standard", "priority": 1, "maxWaitS": 10},
        {"name": "batch", "priority": 2, "maxWaitS": 10},
    ]
    service = tiny_service(
        routing=FAST,
        scheduler={"classes": classes, "defaultClass": "standard"},
        gateway={"maxInFlightPerReplica": 1, "maxQueuePerClass": 2, "maxQueueTotal": 2},
    )
    results: dict[str, httpx.Response] = {}

    def send(url: str, name: str, cls: str) -> None:
        results[name] = httpx.post(
            f"{url}/v1/completions", json=COMPLETION, headers={"x-tokenfleet-class": cls}, timeout=30
        )

    with running(service, [("r0", fakes[0].url)]) as (url, gw):
        order = [
            ("hold", "standard"),
            ("b1", "batch"),
            ("b2", "batch"),
            ("i1", "interactive"),
            ("i2", "interactive"),
        ]
        threads = []
        for name, cls in order:
            thread = threading.Thread(target=send, args=(url, name, cls))
            thread.start()
            threads.append(thread)
            # arrive in this order
            wait_admitted(gw, min(len(threads), 3))
        wait_for(lambda: gw.admission.queued() == {"interactive": 2, "standard": 0, "batch": 0})
        for thread in threads:
            thread.join()
        metrics = httpx.get(f"{url}/metrics").text
    assert {n: r.status_code for n, r in results.items()} == {
        "hold": 200,
        "b1": 503,
        "b2": 503,
        "i1": 200,
        "i2": 200,
    }
    assert results["b1"].headers["retry-after"] == "3"
    assert "overloaded" in results["b1"].json()["error"]["message"]
    assert (
        'tokenfleet_gateway_rejected_total{class="batch",reason="unavailable",tenant="default"} 2.0'
        in metrics
    )


@pytest.mark.parametrize("stream", [False, True])
def test_engine_scheduler_rejection_becomes_503_with_retry_after(
    gateway: tuple[str, Gateway], fakes: tuple[Fake, Fake], stream: bool
) -> None:
    url, _ = gateway
    for fake in fakes:
        fake.faults.reject = "tokenfleet:rejected: queue of class 'batch' is full (4/4 waiting)"
    response = httpx.post(f"{url}/v1/completions", json={**COMPLETION, "stream": stream}, timeout=10)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    # A stream carries no reason: vLLM drops the refusal's event (see ended_without_output).
    expected = "before any output" if stream else "queue of class 'batch' is full"
    assert expected in response.json()["error"]["message"]
    # The replica answered: it stays routable, and normal traffic still flows.
    for fake in fakes:
        fake.faults.reject = None
    assert httpx.post(f"{url}/v1/completions", json=COMPLETION, timeout=10).status_code == 200


def test_scheduler_rejection_parser() -> None:
    from tokenfleet.engine.gateway.forward import scheduler_rejection

    abort = {"finish_reason": "abort", "stop_reason": "tokenfleet:rejected: full"}
    assert scheduler_rejection(json.dumps({"choices": [abort]}).encode()) == "full"
    assert scheduler_rejection(f"data: {json.dumps({'choices': [abort]})}\n\n".encode()) == "full"
    other = {"finish_reason": "length", "stop_reason": "tokenfleet:rejected: full"}
    assert scheduler_rejection(json.dumps({"choices": [other]}).encode()) is None
    assert scheduler_rejection(b'{"choices": [{"text": "tokenfleet:rejected"}]}') is None
    assert scheduler_rejection(b"data: tokenfleet:rejected not json") is None


def test_a_stream_that_ends_before_any_output_is_the_engines_refusal() -> None:
    from tokenfleet.engine.gateway.forward import ended_without_output

    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 0}}\n\n'
    token = b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n'
    assert ended_without_output(b"data: [DONE]\n\n") is True
    assert ended_without_output(usage + b"data: [DONE]\n\n") is True
    assert ended_without_output(usage) is None  # [DONE] not here yet: read on
    assert ended_without_output(b'data: {"choices": [') is None  # an event cut mid-way
    assert ended_without_output(token + b"data: [DONE]\n\n") is False
    assert ended_without_output(b'data: {"error": {"message": "boom"}}\n\n') is False
    assert ended_without_output(b"data: not json\n\n") is False


def test_a_streams_first_byte_is_its_first_event_not_its_headers(fakes: tuple[Fake, Fake]) -> None:
    """vLLM answers a stream's headers before queueing and prefill: the gateway's TTFT (what the
    canary analysis and the autoscaler read) must wait for the first event."""
    fakes[0].faults.first_token_delay_s = 0.4
    with running(tiny_service(routing=FAST), [("r0", fakes[0].url)]) as (url, gw):
        body = {**COMPLETION, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as reply:
            assert reply.status_code == 200
            reply.read()
        attempts = gw.outcomes.all_since(0.0)
    assert len(attempts) == 1
    outcome, first_byte_s = attempts[0]
    assert outcome == "ok"
    assert first_byte_s is not None
    assert first_byte_s >= 0.4
