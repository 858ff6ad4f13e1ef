"""The gateway in front of real vLLM replicas (CPU build, tiny-random): byte-level streaming
integrity, SIGKILL of a replica under a bounded load run, auth end to end, and a schemathesis
run over the gateway's OpenAPI with zero 5xx."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import StartEngine, free_port, tiny_service

from tokenfleet.engine.gateway.app import Gateway, create_app
from tokenfleet.engine.gateway.server import ServerThread
from tokenfleet.engine.launch import EngineProcess
from tokenfleet.spec import LLMService

pytestmark = pytest.mark.vllm

VOLATILE_KEYS = ("id", "created", "request_id", "system_fingerprint")
VOLATILE = re.compile(rb'"(' + "|".join(VOLATILE_KEYS).encode() + rb')":("[^"]*"|\d+|null)')


def normalise(raw: bytes) -> bytes:
    """Drop what differs between two identical generations: ids and timestamps."""
    return VOLATILE.sub(rb'"\1":_', raw)


def _token_text(event: dict[str, Any]) -> str | None:
    """The text of a mid-stream token chunk (one choice, no finish reason), else None."""
    choices = event.get("choices") or []
    if len(choices) != 1 or choices[0].get("finish_reason") is not None:
        return None
    choice = choices[0]
    if "text" in choice:
        return str(choice["text"])
    delta = choice.get("delta") or {}
    return str(delta["content"]) if set(delta) == {"content"} else None


def stream_events(raw: bytes) -> list[Any]:
    """SSE events with adjacent token chunks merged: vLLM coalesces tokens into one chunk when its
    output handler runs behind the engine, so where chunk boundaries fall depends on timing, not
    on what passed through the gateway."""
    events: list[Any] = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        assert block.startswith(b"data: "), block
        payload = block.removeprefix(b"data: ")
        if payload == b"[DONE]":
            events.append("[DONE]")
            continue
        event = {k: v for k, v in json.loads(payload).items() if k not in VOLATILE_KEYS}
        text = _token_text(event)
        previous = events[-1] if events and isinstance(events[-1], dict) else None
        if text is not None and previous is not None and _token_text(previous) is not None:
            choice = previous["choices"][0]
            if "text" in choice:
                choice["text"] += text
            else:
                choice["delta"]["content"] += text
            continue
        events.append(event)
    return events


@contextmanager
def gateway_for(service: LLMService, members: list[tuple[str, str]]) -> Iterator[tuple[str, Gateway]]:
    app = create_app(service, members)
    server = ServerThread(app, free_port()).start()
    try:
        server.wait_until("/ready", timeout_s=30)
        yield server.url, app.state.gateway
    finally:
        server.stop()


@pytest.fixture(scope="module")
def single(engine: EngineProcess) -> Iterator[tuple[str, Gateway]]:
    with gateway_for(tiny_service(routing={"probeIntervalS": 0.5}), [("r0", engine.url)]) as pair:
        yield pair


# -- streaming integrity -------------------------------------------------------------------------

COMPLETION = {"model": "tiny", "prompt": "def parse(", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "import os"}],
    "max_tokens": 10,
    "temperature": 0,
    "ignore_eos": True,
}


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/completions", {**COMPLETION, "stream": True}),
        ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}),
        ("/v1/completions", COMPLETION),
        ("/v1/chat/completions", CHAT),
    ],
    ids=["completion-sse", "chat-sse", "completion-json", "chat-json"],
)
def test_bytes_through_the_gateway_equal_a_direct_call(
    single: tuple[str, Gateway], engine: EngineProcess, route: str, body: dict[str, Any]
) -> None:
    url, _ = single
    direct = httpx.post(f"{engine.url}{route}", json=body, timeout=60)
    via = httpx.post(f"{url}{route}", json=body, timeout=60)
    assert direct.status_code == via.status_code == 200
    assert via.headers["content-type"] == direct.headers["content-type"]
    if not body.get("stream"):
        assert normalise(via.content) == normalise(direct.content)
        return
    assert stream_events(via.content) == stream_events(direct.content)
    if via.content.count(b"data: ") == direct.content.count(b"data: "):
        # Same chunking on both sides (the usual case): then the bytes must match exactly.
        assert normalise(via.content) == normalise(direct.content)
    assert via.content.endswith(b"data: [DONE]\n\n")
    assert via.content.count(b"data: ") >= 4  # streamed in pieces, not buffered into one answer


def test_models_and_unknown_model_via_gateway(single: tuple[str, Gateway]) -> None:
    url, _ = single
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["tiny"]
    reply = httpx.post(f"{url}/v1/completions", json={**COMPLETION, "model": "nope"})
    assert reply.status_code == 404


def test_engine_accepts_class_and_tenant_fields(single: tuple[str, Gateway], engine: EngineProcess) -> None:
    url, gw = single
    reply = httpx.post(
        f"{url}/v1/completions", json=COMPLETION, headers={"x-tokenfleet-class": "batch"}, timeout=60
    )
    assert reply.status_code == 200
    assert reply.headers["x-tokenfleet-class"] == "batch"

    def batch_spans() -> list[Any]:  # the server span ends just after the answer is sent
        finished = gw.tracing.memory.get_finished_spans()
        return [
            s for s in finished if s.kind.name == "SERVER" and s.attributes["tokenfleet.class"] == "batch"
        ]

    deadline = time.monotonic() + 5
    while not batch_spans():
        assert time.monotonic() < deadline, "no SERVER span with the batch class"
        time.sleep(0.02)


def test_auth_and_limits_end_to_end(engine: EngineProcess, tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("k-team: team\n")
    service = tiny_service(
        gateway={"auth": True, "apiKeysFile": str(keys)},
        scheduler={"tenants": [{"name": "team", "requestsPerMinute": 2, "maxClass": "standard"}]},
    )
    with gateway_for(service, [("r0", engine.url)]) as (url, _):
        body = {**COMPLETION, "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        auth = {"authorization": "Bearer k-team", "x-tokenfleet-class": "interactive"}
        first = httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=60)
        assert first.status_code == 200
        assert first.headers["x-tokenfleet-class"] == "standard"
        assert first.json()["usage"]["completion_tokens"] == 2
        assert httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=60).status_code == 200
        limited = httpx.post(f"{url}/v1/completions", json=body, headers=auth)
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1


# -- failover with two real engines --------------------------------------------------------------


@dataclass
class Outcome:
    status: int | None = None
    started: bool = False  # a byte of the body reached the client
    finished: bool = False  # the stream ended with [DONE]
    error: str | None = None
    replica: str | None = None


def one_stream(url: str, index: int) -> Outcome:
    outcome = Outcome()
    body = {
        "model": "tiny",
        "prompt": f"request {index}: def f(",
        "max_tokens": 24,
        "stream": True,
        "ignore_eos": True,
    }
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as reply:
            outcome.status = reply.status_code
            outcome.replica = reply.headers.get("x-tokenfleet-replica")
            for chunk in reply.iter_raw():
                if chunk:
                    outcome.started = outcome.status == 200
                    if b'"error"' in chunk:
                        outcome.error = "mid-stream error event"
            outcome.finished = outcome.started and outcome.error is None
    except httpx.HTTPError as exc:
        outcome.error = type(exc).__name__
    return outcome


def test_sigkill_a_replica_under_load_loses_no_unstarted_request(
    engine: EngineProcess, start_engine: StartEngine
) -> None:
    engines = [engine, start_engine(tiny_service())]  # the shared engine survives; ours is killed
    victim = engines[1]
    service = tiny_service(
        routing={
            "policy": "round_robin",
            "probeIntervalS": 0.5,
            "ejectCooldownS": 1.0,
            "ejectAfterFailures": 1,
        }
    )
    members = [("keep", engines[0].url), ("victim", victim.url)]
    with gateway_for(service, members) as (url, gw):
        outcomes: list[Outcome] = []
        killed = threading.Event()

        def kill_when_busy() -> None:
            # Kill once the victim holds streams in flight: the worst moment for clients.
            deadline = time.monotonic() + 30
            while gw.replicas.replicas["victim"].in_flight < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert victim.process is not None
            os.killpg(victim.process.pid, signal.SIGKILL)  # the whole replica: server and engine core
            killed.set()

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=4) as pool:  # bounded: 40 requests, 4 at a time
            outcomes = list(pool.map(lambda i: one_stream(url, i), range(40)))
        killer.join()
        load_s = time.monotonic() - started
        assert killed.is_set()

        unstarted_failures = [o for o in outcomes if not o.started]
        broken_streams = [o for o in outcomes if o.started and not o.finished]
        assert unstarted_failures == [], unstarted_failures
        assert len(broken_streams) <= 4  # at most what was streaming from the victim when it died
        assert all(o.error == "mid-stream error event" for o in broken_streams)
        assert gw.replicas.replicas["victim"].breaker.state == "open"
        assert gw.replicas.replicas["victim"].breaker.ejections == 1
        metrics = httpx.get(f"{url}/metrics").text
        assert 'tokenfleet_gateway_ejections_total{replica="victim"} 1.0' in metrics

        # Restart the replica on its port: the prober re-admits it and it takes traffic again.
        restarted_at = time.monotonic()
        start_engine(tiny_service(), port=victim.port)
        deadline = time.monotonic() + 60
        while not gw.replicas.replicas["victim"].breaker.admits:
            assert time.monotonic() < deadline, "restarted replica never re-admitted"
            time.sleep(0.1)
        readmitted_s = time.monotonic() - restarted_at
        replicas = {one_stream(url, i).replica for i in range(4)}
        assert replicas == {"keep", "victim"}
        assert (
            'tokenfleet_gateway_readmissions_total{replica="victim"} 1.0' in httpx.get(f"{url}/metrics").text
        )
    print(
        f"\nfailover: {len(outcomes)} requests in {load_s:.1f}s, 0 unstarted lost, "
        f"{len(broken_streams)} broken mid-stream; re-admitted {readmitted_s:.1f}s after restart began"
    )


# -- schemathesis --------------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error(engine: EngineProcess) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    # A small context in the gateway's spec bounds the work each generated request can ask for.
    service = tiny_service(model={"name": "tiny", "source": "builtin://tiny-random", "maxModelLen": 32})
    with gateway_for(service, [("r0", engine.url)]) as (url, _):
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        failures: list[str] = []
        calls = 0

        for operation in schema.get_all_operations():
            op = operation.ok()

            @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=op.as_strategy())
            def check(case: Any) -> None:
                nonlocal calls
                calls += 1
                response = case.call(base_url=url, timeout=30)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code}")
                case.validate_response(response, checks=[not_a_server_error])

            check()
    assert calls >= 30
    assert failures == []
