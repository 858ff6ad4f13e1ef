"""Streams that survive a dead replica (issue 12, item 14), on real vLLM: the victim replica's
connection dies mid-stream, the gateway resumes the stream on the other, and with greedy
decoding the client's text is the unbroken run's, with the whole request's usage.

The victim sits behind a TCP proxy that forwards exactly three SSE events of the stream and then
drops both connections, as a replica that dies does. Killing the engine itself is a race the
test cannot win: the tiny model writes all its tokens in well under a second, before any kill
issued at the client's first token lands, and the gateway has read them all by then.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import pytest
from conftest import free_port, tiny_service

from tokenfleet.engine.gateway.app import create_app
from tokenfleet.engine.gateway.server import ServerThread
from tokenfleet.engine.launch import EngineProcess

TOKENS = 400  # long enough that the kill lands mid-stream (the context is 512)


def events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


class DyingProxy:
    """Forwards TCP to a replica; the first response that carries SSE events is cut after
    `events` complete events (both sides closed). Everything else passes through."""

    def __init__(self, upstream_port: int, events: int = 3) -> None:
        self.upstream_port, self.events = upstream_port, events
        self.port = free_port()
        self.cut = False
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DyingProxy:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def upstream() -> None:
            while data := await client_r.read(65536):
                up_w.write(data)
                await up_w.drain()

        async def downstream() -> None:
            seen, buffer = 0, b""
            while data := await up_r.read(65536):
                if self.cut or b"data: " not in buffer + data:
                    client_w.write(data)
                    await client_w.drain()
                    continue
                buffer += data
                # Forward up to the end of the `events`-th event, then die.
                end = 0
                while seen < self.events:
                    start = buffer.find(b"data: ", end)
                    stop = buffer.find(b"\n\n", start) if start >= 0 else -1
                    if stop < 0:
                        break
                    seen, end = seen + 1, stop + 2
                client_w.write(buffer[:end])
                await client_w.drain()
                buffer = buffer[end:]
                if seen >= self.events:
                    self.cut = True
                    return

        pumps = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        for writer in (client_w, up_w):
            writer.transport.abort()


@pytest.mark.vllm
def test_stream_resumes_on_another_replica_when_the_first_dies_mid_stream(engine: EngineProcess) -> None:
    # Both replicas are the session's one engine, reached two ways: through the dying proxy and
    # directly. To the gateway they are two replicas; the engine start is shared.
    engine_url = engine.url
    proxy = DyingProxy(engine.port).start()
    greedy = {
        "model": "tiny",
        "prompt": "def f(",
        "max_tokens": TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    unbroken = httpx.post(f"{engine_url}/v1/completions", json=greedy, timeout=120).json()

    service = tiny_service(routing={"policy": "round_robin", "probeIntervalS": 0.2})
    app = create_app(service, [("victim", proxy.url), ("survivor", engine_url)])
    gateway = app.state.gateway
    server = ServerThread(app, free_port()).start()
    try:
        deadline = time.monotonic() + 30
        while len(gateway.replicas.routable()) < 2:
            assert time.monotonic() < deadline, "replicas never became ready"
            time.sleep(0.05)
        body = {**greedy, "stream": True, "stream_options": {"include_usage": True}}
        lines: list[str] = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as reply:
            assert reply.headers["x-tokenfleet-replica"] == "victim"  # round robin's first pick
            lines.extend(reply.iter_lines())
    finally:
        server.stop()
        proxy.stop()

    received = events(lines)
    assert not any("error" in e for e in received), lines[-3:]
    assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
    text = "".join(c["text"] for e in received for c in e["choices"])
    assert text == unbroken["choices"][0]["text"]  # greedy: the resumed text is the unbroken run's
    usage = received[-1]["usage"]
    assert usage["prompt_tokens"] == unbroken["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == TOKENS
    assert {e["id"] for e in received} == {received[0]["id"]}  # one stream, as the client sees it
    assert all(c.get("token_ids") is None for e in received for c in e["choices"])  # not asked for
    assert gateway.metrics.retries.labels("/v1/completions")._value.get() == 1  # it was resumed
