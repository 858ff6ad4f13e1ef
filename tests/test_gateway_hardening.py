"""Issue 12 (hardening), the gateway-side items: each test fails on the code before the fix.

Fake replicas (fake_engine.py) and raw sockets; real vLLM only where vLLM's own behaviour is
the point (test_gateway_compat.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, tiny_service

from tokenfleet.cli import main
from tokenfleet.engine.gateway.app import Gateway, create_app
from tokenfleet.engine.gateway.breaker import Breaker
from tokenfleet.engine.gateway.breaker import routable as breaker_routable
from tokenfleet.engine.gateway.resume import StreamResume
from tokenfleet.engine.gateway.server import ServerThread
from tokenfleet.engine.gateway.tenancy import KeyFileError, parse_keys, parse_keys_env
from tokenfleet.engine.gateway.validation import estimated_tokens, validate_body
from tokenfleet.engine.gateway.wire import ClientLimits
from tokenfleet.load.fake_engine import Faults, fake_engine
from tokenfleet.observability.dashboard import MAX_SUBSCRIBERS, LocalMonitor, TooManySubscribersError
from tokenfleet.spec import LLMService, SpecError, local_problems

# -- item 10: engine.extraArgs reserved flags -------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--served_model_name", "evil"],
        ["--max_model_len=99999"],
        ["--config", "file.yaml"],
        ["--config=file.yaml"],
        ["--trust-remote-code"],
        ["--trust_remote_code"],
    ],
)
def test_extra_args_reserved_flags_are_normalised(args: list[str]) -> None:
    with pytest.raises(SpecError):
        tiny_service(engine={"extraArgs": args})


def test_trust_remote_code_only_with_the_spec_field() -> None:
    service = tiny_service(engine={"extraArgs": ["--trust_remote_code"], "trustRemoteCode": True})
    assert service.spec.engine.trust_remote_code


# -- item 11: every field consumed or refused -------------------------------------------------


SECRET_ONLY = """apiVersion: tokenfleet.dev/v1alpha1
kind: LLMService
metadata: {name: s}
spec:
  gateway: {auth: true, apiKeysSecret: keys}
"""


def test_api_keys_secret_is_refused_for_local_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SECRET_ONLY)
    assert main(["validate", "-f", str(path)]) == 0  # valid for a cluster: the operator reads it
    assert main(["validate", "--local", "-f", str(path)]) == 1
    err = capsys.readouterr().err
    assert "spec.gateway.apiKeysSecret: not supported by tokenfleet up" in err
    assert "set apiKeysFile" in err
    assert main(["up", "-f", str(path)]) == 2  # refused before anything starts
    cluster_only = tiny_service(engine={"image": "vllm/vllm-openai:v0.32.0"})
    assert local_problems(cluster_only) == []


# -- fixtures: fake replicas and a gateway on a real uvicorn ------------------------------------


class Fake:
    def __init__(self, name: str) -> None:
        self.faults = Faults()
        app, _ = fake_engine(name, faults=self.faults)
        self.server = ServerThread(app, free_port()).start()

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[Fake, Fake]]:
    pair = (Fake("a"), Fake("b"))
    yield pair
    for fake in pair:
        fake.server.stop()


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> None:
    if "fakes" in request.fixturenames:
        for fake in request.getfixturevalue("fakes"):
            for key, value in vars(Faults()).items():
                setattr(fake.faults, key, value)


@contextmanager
def running(
    service: LLMService, members: list[tuple[str, str]], **server: Any
) -> Iterator[tuple[str, Gateway]]:
    app = create_app(service, members)
    thread = ServerThread(app, free_port(), **server).start()
    try:
        if members:
            thread.wait_until("/ready")
        yield thread.url, app.state.gateway
    finally:
        thread.stop()


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def read_answer(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


COMPLETION = {"model": "tiny", "prompt": "def f(", "max_tokens": 3}
FAST = {"probeIntervalS": 0.1, "ejectCooldownS": 0.3, "ejectAfterFailures": 2}


# -- item 5: slow and oversized clients ---------------------------------------------------------


def test_slow_and_oversized_clients_are_bounded(fakes: tuple[Fake, Fake]) -> None:
    limits = ClientLimits(head_timeout_s=0.5, body_timeout_s=0.5, max_head_bytes=8192)
    service = tiny_service(routing=FAST)
    with running(service, [("r0", fakes[0].url)], limits=limits, max_connections=8) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        started = time.monotonic()
        # A head that never ends: 408 after the head timeout, connection closed.
        with socket.create_connection(("127.0.0.1", port)) as slow_head:
            slow_head.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
            assert read_answer(slow_head).startswith(b"HTTP/1.1 408")
        # A body sent too slowly (the byte every 5 s): 408.
        with socket.create_connection(("127.0.0.1", port)) as slow_body:
            slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
            assert read_answer(slow_body).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < 4
        # A 1 MiB header: 431, and the gateway does not hold it.
        with socket.create_connection(("127.0.0.1", port)) as big:
            with contextlib.suppress(OSError):  # the gateway may close while we still send
                big.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (1 << 20) + b"\r\n\r\n")
            assert read_answer(big).startswith(b"HTTP/1.1 431")
        # Connections beyond the cap get 503 for their requests; below it, service goes on.
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        try:
            time.sleep(0.1)
            with socket.create_connection(("127.0.0.1", port)) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                assert read_answer(extra).startswith(b"HTTP/1.1 503")
        finally:
            for sock in idle:
                sock.close()
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200)
        # A normal request, head and body in separate writes, still passes.
        with socket.create_connection(("127.0.0.1", port)) as ok:
            body = json.dumps(COMPLETION).encode()
            ok.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n")
            ok.sendall(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
            time.sleep(0.1)
            ok.sendall(body)
            assert read_answer(ok).startswith(b"HTTP/1.1 200")


# -- item 6: work for a client that is gone is cancelled upstream -----------------------------


def test_non_streaming_request_of_a_gone_client_is_cancelled_upstream(fakes: tuple[Fake, Fake]) -> None:
    service = tiny_service(routing=FAST)
    with running(service, [("r0", fakes[0].url)]) as (url, gateway):
        fakes[0].faults.delay_s = 3.0
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps(COMPLETION).encode()
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(
                b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            wait_for(lambda: len(fakes[0].faults.seen) == 1)
        # The engine hears of it well before its 3 s answer, and the gateway's slot is free.
        wait_for(lambda: fakes[0].faults.cancelled == 1, timeout_s=2.0)
        wait_for(lambda: gateway.admission.running == 0, timeout_s=1.0)
        assert gateway.replicas.replicas["r0"].in_flight == 0
        assert gateway.replicas.replicas["r0"].breaker.failures == 0  # not the replica's fault


def test_first_byte_timeout_cancels_the_first_attempt(fakes: tuple[Fake, Fake]) -> None:
    service = tiny_service(routing={**FAST, "firstByteTimeoutS": 0.5, "policy": "round_robin"})
    with running(service, [("r0", fakes[0].url), ("r1", fakes[1].url)]) as (url, _):
        fakes[0].faults.delay_s = 3.0
        fakes[1].faults.delay_s = 3.0
        reply = httpx.post(f"{url}/v1/completions", json=COMPLETION, timeout=10)
        assert reply.status_code == 502
        # Both attempts timed out; each engine heard its client (the gateway) leave.
        wait_for(lambda: fakes[0].faults.cancelled + fakes[1].faults.cancelled == 2, timeout_s=2.0)


# -- item 7: tokens per minute cannot be bypassed ----------------------------------------------


def test_streams_are_precharged_to_the_context_and_settled_from_usage(fakes: tuple[Fake, Fake]) -> None:
    tenants = [{"name": "default", "tokensPerMinute": 100_000}]
    service = tiny_service(routing=FAST, scheduler={"tenants": tenants})
    with running(service, [("r0", fakes[0].url)]) as (url, gateway):
        # No max_tokens: what the engine may generate is the rest of the 512-token context.
        body = {"model": "tiny", "prompt": "def f(", "stream": True}
        assert (
            estimated_tokens(
                validate_body("/v1/completions", body, model_name="tiny", max_model_len=512), 512
            )
            > 500
        )
        reply = httpx.post(f"{url}/v1/completions", json=body)
        assert reply.status_code == 200
        assert fakes[0].faults.seen[-1]["stream_options"] == {"include_usage": True}
        assert b"usage" not in reply.content  # the client did not ask for it
        assert reply.content.endswith(b"data: [DONE]\n\n")
        # Settled from the engine's count (1 prompt + 4 generated), not the pre-charge.
        wait_for(lambda: gateway.ledger.buckets[("default", "tokens")].tokens > 100_000 - 10)
        # A client that asks for usage gets it.
        asked = httpx.post(f"{url}/v1/completions", json={**body, "stream_options": {"include_usage": True}})
        assert b'"total_tokens":5' in asked.content


def test_tenant_concurrency_cap(fakes: tuple[Fake, Fake]) -> None:
    tenants = [{"name": "default", "maxConcurrent": 2}]
    service = tiny_service(routing=FAST, scheduler={"tenants": tenants})
    with running(service, [("r0", fakes[0].url)]) as (url, gateway):
        fakes[0].faults.delay_s = 1.0
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=COMPLETION), range(4)))
        codes = sorted(r.status_code for r in replies)
        assert codes == [200, 200, 429, 429]
        wait_for(lambda: gateway.ledger.tenant_active["default"] == 0)  # settled just after each answer
        assert httpx.post(f"{url}/v1/completions", json=COMPLETION).status_code == 200


# -- item 8: operational endpoints behind the keys ---------------------------------------------


def test_operational_endpoints_need_a_key_from_elsewhere(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("sk-alpha: default\n")
    service = tiny_service(gateway={"auth": True, "apiKeysFile": str(keys)})
    app = create_app(service, [])

    async def codes(client: tuple[str, int], headers: dict[str, str]) -> dict[str, int]:
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            paths = ("/metrics", "/openapi.json", "/docs", "/dashboard/api/snapshot", "/health")
            return {p: (await http.get(p, headers=headers)).status_code for p in paths}

    remote = asyncio.run(codes(("203.0.113.9", 4000), {}))
    assert remote == {
        "/metrics": 401,
        "/openapi.json": 401,
        "/docs": 401,
        "/dashboard/api/snapshot": 401,
        "/health": 200,
    }
    keyed = asyncio.run(codes(("203.0.113.9", 4000), {"authorization": "Bearer sk-alpha"}))
    assert keyed["/metrics"] == 200
    assert keyed["/openapi.json"] == 200


def test_dashboard_snapshot_is_cached_and_subscribers_bounded() -> None:
    gateway = Gateway(tiny_service())
    monitor = LocalMonitor.for_gateway(gateway, environ={})

    async def run() -> None:
        first = await monitor.fresh_snapshot()
        second = await monitor.fresh_snapshot()
        assert first is second
        assert monitor.ticks == 1  # one scrape for both calls
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(MAX_SUBSCRIBERS):
                await stack.enter_async_context(monitor.subscribe())
            with pytest.raises(TooManySubscribersError):
                await stack.enter_async_context(monitor.subscribe())

    asyncio.run(run())


# -- item 9: no internals or secrets in answers and logs ---------------------------------------


def test_502_is_generic_with_a_request_id(fakes: tuple[Fake, Fake], caplog: pytest.LogCaptureFixture) -> None:
    service = tiny_service(routing={**FAST, "ejectAfterFailures": 5})
    with running(service, [("r0", fakes[0].url)]) as (url, _):
        fakes[0].faults.status_5xx = 2  # the attempt and its retry fail
        with caplog.at_level(logging.WARNING, logger="tokenfleet.engine.gateway.forward"):
            reply = httpx.post(f"{url}/v1/completions", json=COMPLETION, headers={"x-request-id": "req-42"})
    assert reply.status_code == 502
    message = reply.json()["error"]["message"]
    assert "req-42" in message
    assert "r0" not in message  # no replica names, exception types or texts
    assert "status 500" not in message
    assert "r0: _UpstreamStatusError status 500" in caplog.text  # the cause is logged, with the id
    assert "request req-42" in caplog.text


def test_key_errors_do_not_print_keys() -> None:
    with pytest.raises(KeyFileError) as env_error:
        parse_keys_env("sk-secret-value-123")
    assert "sk-s" not in str(env_error.value)
    with pytest.raises(KeyFileError) as file_error:
        parse_keys("sk-secret-value-123: [unclosed")
    assert "sk-secret" not in str(file_error.value)


# -- item 13: probe timeouts under load, panic threshold ---------------------------------------


SLOW_PROBES = {**FAST, "connectTimeoutS": 0.2, "policy": "round_robin"}  # probe timeout 1.2 s


def test_probe_timeouts_do_not_eject_a_replica_that_answers(fakes: tuple[Fake, Fake]) -> None:
    service = tiny_service(routing=SLOW_PROBES)
    with running(service, [("r0", fakes[0].url), ("r1", fakes[1].url)]) as (url, gateway):
        fakes[0].faults.health_delay_s = 2.0  # CPU-starved: probes time out, requests complete
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert httpx.post(f"{url}/v1/completions", json=COMPLETION).status_code == 200
            time.sleep(0.05)
        assert gateway.replicas.replicas["r0"].breaker.state == "closed"
        assert gateway.replicas.replicas["r0"].breaker.ejections == 0


def test_panic_threshold_routes_to_softly_ejected_replicas(fakes: tuple[Fake, Fake]) -> None:
    service = tiny_service(routing=SLOW_PROBES)
    with running(service, [("r0", fakes[0].url), ("r1", fakes[1].url)]) as (url, gateway):
        for fake in fakes:
            fake.faults.health_delay_s = 2.0  # idle and slow: both ejected by probe timeouts
        wait_for(lambda: all(r.breaker.state == "open" for r in gateway.replicas.replicas.values()))
        replies = [httpx.post(f"{url}/v1/completions", json=COMPLETION) for _ in range(2)]
        assert [r.status_code for r in replies] == [200, 200]  # not 503: route to all in panic
    # A refused connection is definitive: no panic routing to a replica that is gone.
    gone = [Breaker(state="open", definitive=True), Breaker(state="open", definitive=False)]
    assert breaker_routable(gone) == [1]
    assert breaker_routable([Breaker(state="closed"), Breaker(state="open", definitive=False)]) == [0]


# -- item 12: every prompt form, /v1/responses -------------------------------------------------


def test_prompt_forms_and_responses_route(fakes: tuple[Fake, Fake]) -> None:
    tenants = [{"name": "default", "tokensPerMinute": 1_000_000}]
    service = tiny_service(routing=FAST, scheduler={"tenants": tenants})
    with running(service, [("r0", fakes[0].url)]) as (url, _):
        for prompt in ("def f(", ["a", "b"], [1, 2, 3, 4], [[1, 2], [3, 4, 5]]):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 2}
            assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200, prompt
            assert fakes[0].faults.seen[-1]["prompt"] == prompt
        too_long = {"model": "tiny", "prompt": [1] * 513, "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=too_long).status_code == 400
        assert httpx.post(f"{url}/v1/completions", json={**too_long, "prompt": [-1]}).status_code == 400
        responses = {"model": "tiny", "input": "def f(", "max_output_tokens": 2}
        reply = httpx.post(f"{url}/v1/responses", json=responses)
        assert reply.status_code == 200
        assert fakes[0].faults.seen[-1]["vllm_xargs"] == {"slo_class": "standard", "tenant": "default"}
        image = {"model": "tiny", "input": [{"role": "user", "content": [{"type": "input_image"}]}]}
        assert httpx.post(f"{url}/v1/responses", json=image).status_code == 400
    ids = validate_body(
        "/v1/completions",
        {"model": "tiny", "prompt": [[1, 2], [3]], "max_tokens": 5},
        model_name="tiny",
        max_model_len=512,
    )
    assert estimated_tokens(ids, 512) == (2 + 5) + (1 + 5)  # token ids count exactly


# -- item 14: a stream resumed on another replica ------------------------------------------------


def test_broken_stream_is_resumed_on_another_replica(fakes: tuple[Fake, Fake]) -> None:
    service = tiny_service(routing={**FAST, "policy": "round_robin"})
    with running(service, [("r0", fakes[0].url), ("r1", fakes[1].url)]) as (url, gateway):
        fakes[0].faults.die_after_chunks = 3  # r0 (round robin's first pick) breaks; r1 resumes
        body = {"model": "tiny", "prompt": "def f(", "max_tokens": 8, "stream": True}
        reply = httpx.post(f"{url}/v1/completions", json=body)
        chunks = [json.loads(e[6:]) for e in reply.text.split("\n\n") if e.startswith("data: {")]
        assert not any("error" in c for c in chunks)
        # One unbroken run: positions 6..13 (the prompt is 6 long), each once, in order.
        assert [c["choices"][0]["text"] for c in chunks] == [f"t{k}" for k in range(6, 14)]
        assert {c["id"] for c in chunks} == {chunks[0]["id"]}
        assert all(c["choices"][0].get("token_ids") is None for c in chunks)  # not asked for
        assert reply.text.endswith("data: [DONE]\n\n")
        continuation = fakes[1].faults.seen[-1]
        assert continuation["prompt"] == [ord(c) for c in "def f("] + [1006, 1007, 1008]
        assert continuation["max_tokens"] == 5
        assert gateway.replicas.replicas["r0"].in_flight == 0
        assert gateway.replicas.replicas["r1"].in_flight == 0


def test_resumed_chat_chunks_keep_the_chat_shape() -> None:
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    resume, fields = StreamResume.for_request("/v1/chat/completions", chat, {"priority": 0}, 512)
    assert fields["return_token_ids"] is True
    first = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "tiny"}
    head = {**first, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    token = {**first, "choices": [{"index": 0, "delta": {"content": "a"}, "token_ids": [7]}]}
    sent = resume.feed(
        f"data: {json.dumps({**head, 'prompt_token_ids': [1, 2]})}\n\ndata: {json.dumps(token)}\n\n".encode()
    )
    assert b'"token_ids":null' in sent  # not asked for: null, as vLLM sends it then
    assert b"[1,2]" not in sent
    assert resume.remaining() == 3
    body = json.loads(resume.continuation("tiny"))
    assert body["prompt"] == [1, 2, 7]
    assert body["max_tokens"] == 3
    assert body["priority"] == 0
    more = {
        "id": "cmpl-9",
        "object": "text_completion",
        "choices": [{"index": 0, "text": "b", "token_ids": [8]}],
    }
    out = json.loads(resume.feed(f"data: {json.dumps(more)}\n\n".encode())[6:])
    assert out["id"] == "chatcmpl-1"
    assert out["object"] == "chat.completion.chunk"
    assert out["choices"][0]["delta"] == {"content": "b"}
