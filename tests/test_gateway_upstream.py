"""The gateway's upstream HTTP/1.1 client (engine/gateway/upstream.py), byte by byte against
scripted servers; its own answers leaving in one write (wire.py); and the retry rule on top:
pooled connections are reused, a replica that resets before answering is retried elsewhere, a
body that breaks midway raises after the bytes that did arrive, stalls time out, and a
SIGKILLed replica process loses no request that had not started streaming."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
import uvloop
from conftest import free_port, tiny_service

from tokenfleet.engine.gateway import upstream
from tokenfleet.engine.gateway.app import create_app
from tokenfleet.engine.gateway.server import ServerThread
from tokenfleet.engine.gateway.upstream import Upstream, UpstreamError, UpstreamResponse
from tokenfleet.engine.gateway.wire import _TurnBuffered

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
JSON_BODY = b'{"ok":true}'


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request's head and body (content-length only), or None when the client closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def answer(body: bytes = JSON_BODY, *extra: bytes) -> bytes:
    headers = b"".join(line + b"\r\n" for line in extra)
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + headers
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, as a process that dies does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Scripted:
    """A TCP server that runs `script` on every connection and records what it saw."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def url(self, path: str = "/v1/completions") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[Scripted]:
    server = Scripted(script)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


@asynccontextmanager
async def client(
    connect_timeout_s: float = 2.0, read_timeout_s: float = 2.0, **kw: Any
) -> AsyncIterator[Upstream]:
    pool = Upstream(connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s, **kw)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


def keep_alive(server_ref: list[Scripted]) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            server_ref[0].requests.append(request[0] + request[1])
            writer.write(answer())
            await writer.drain()

    return script


HEADERS = {"content-type": "application/json"}
Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Each client test on both loops: the gateway runs on uvloop, whose transports differ."""
    return uvloop.run if request.param == "uvloop" else asyncio.run


async def collect(reply: UpstreamResponse, into: list[bytes], received: asyncio.Event | None = None) -> None:
    """Read the whole body into `into`; `received` is set once a piece has arrived."""
    async for piece in reply.chunks():
        into.append(piece)
        if received is not None:
            received.set()


# -- the client ----------------------------------------------------------------------------------


def test_pooled_connection_is_reused_and_requests_are_well_formed(run: Runner) -> None:
    async def main() -> None:
        ref: list[Scripted] = []
        async with scripted(keep_alive(ref)) as server, client() as pool:
            ref.append(server)
            for i in range(5):
                reply = await pool.send(
                    "POST", server.url(), b'{"n":%d}' % i, {**HEADERS, "x-request-id": "r1"}
                )
                assert reply.status == 200
                assert reply.content_type == "application/json"
                assert await reply.read() == JSON_BODY
                reply.close()  # a no-op once the body was read: the connection stays pooled
            status, body = await pool.get(server.url("/health"), timeout_s=1.0)
            assert (status, body) == (200, JSON_BODY)
            assert server.connections == 1
            first = server.requests[0]
            assert first.startswith(b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:")
            assert (
                b"\r\ncontent-type: application/json\r\nx-request-id: r1\r\ncontent-length: 7\r\n\r\n"
                in first
            )
            assert first.endswith(b'{"n":0}')
            assert server.requests[-1].startswith(b"GET /health HTTP/1.1\r\n")
            assert b"content-length" not in server.requests[-1]

    run(main())


def test_connection_close_and_idle_expiry_are_not_reused(
    run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_request(reader) is not None:
            writer.write(answer(JSON_BODY, b"connection: close"))
            await writer.drain()

    async def main() -> None:
        async with scripted(closing) as server, client() as pool:
            for _ in range(3):
                reply = await pool.send("GET", server.url(), None, {})
                assert await reply.read() == JSON_BODY
            assert server.connections == 3
        ref: list[Scripted] = []
        async with scripted(keep_alive(ref)) as server, client() as pool:
            ref.append(server)
            monkeypatch.setattr(upstream, "KEEPALIVE_S", 0.05)
            for _ in range(2):
                await (await pool.send("GET", server.url(), None, {})).read()
                await asyncio.sleep(0.1)  # idle longer than the keep-alive: never reused
            assert server.connections == 2

    run(main())


def test_chunked_stream_arrives_untouched_and_a_close_delimited_body_is_complete(run: Runner) -> None:
    events = [b'data: {"t": 0}\n\n', b'data: {"t": 1}\n\n', b"data: [DONE]\n\n"]

    async def sse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD)
        for event in events:
            writer.write(chunk(event))
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    async def main() -> None:
        async with scripted(sse) as server, client() as pool:
            reply = await pool.send("POST", server.url(), b"{}", HEADERS)
            assert reply.content_type == "text/event-stream"
            received = [piece async for piece in reply.chunks()]
            assert b"".join(received) == b"".join(events)
            assert len(received) >= 2  # relayed as they came, not buffered to the end
        async with scripted(http10) as server, client() as pool:
            reply = await pool.send("GET", server.url(), None, {})
            assert await reply.read() == b"all of it"

    run(main())


def test_refused_reset_and_garbage_are_connect_errors(run: Runner) -> None:
    async def resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        reset(writer)

    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    async def main() -> None:
        async with client() as pool:
            with pytest.raises(UpstreamError) as refused:
                await pool.send("POST", f"http://127.0.0.1:{free_port()}/v1/completions", b"{}", HEADERS)
            assert refused.value.kind == "connect"
            assert refused.value.cause_name == "ConnectionRefusedError"
            for script in (resets, hangs_up, garbage):
                async with scripted(script) as server:
                    with pytest.raises(UpstreamError) as failed:
                        await pool.send("POST", server.url(), b"{}", HEADERS)
                    assert failed.value.kind == "connect"
            with pytest.raises(ValueError, match="line break"):
                await pool.send("POST", "http://127.0.0.1:1/", b"{}", {"x-request-id": "a\r\nevil: 1"})

    run(main())


def test_a_body_that_breaks_midway_yields_what_arrived_then_raises(run: Runner) -> None:
    async def main() -> None:
        # The replica resets only once the client holds the first chunk: an RST that overtook
        # unread data would discard it, and a fixed delay only makes that unlikely.
        first_read = asyncio.Event()

        async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(SSE_HEAD + chunk(b"data: 1\n\n"))
            await writer.drain()
            await first_read.wait()
            reset(writer)

        async with scripted(dies) as server, client() as pool:
            reply = await pool.send("POST", server.url(), b"{}", HEADERS)
            received: list[bytes] = []
            with pytest.raises(UpstreamError) as broke:
                await collect(reply, received, first_read)
            assert received == [b"data: 1\n\n"]
            assert broke.value.kind == "connect"

    run(main())


def test_stalls_time_out_and_the_connection_is_dropped(run: Runner) -> None:
    async def stalls_before_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def stalls_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(b"data: 1\n\n"))
        await writer.drain()
        await asyncio.sleep(5)

    async def main() -> None:
        async with client(read_timeout_s=0.2) as pool:
            async with scripted(stalls_before_headers) as server:
                started = time.monotonic()
                with pytest.raises(UpstreamError) as stalled:
                    await pool.send("POST", server.url(), b"{}", HEADERS)
                assert stalled.value.kind == "timeout"
                assert time.monotonic() - started < 2
            async with scripted(stalls_mid_body) as server:
                reply = await pool.send("POST", server.url(), b"{}", HEADERS)
                with pytest.raises(UpstreamError) as stalled:
                    await collect(reply, [])
                assert stalled.value.kind == "timeout"
                with pytest.raises(UpstreamError) as probe:  # a probe's own, shorter deadline
                    await pool.get(server.url("/health"), timeout_s=0.1)
                assert probe.value.kind == "timeout"
            assert all(not p.idle for p in pool._pools.values())  # nothing half-read was pooled

    run(main())


def test_closing_mid_body_hangs_up_on_the_replica(run: Runner) -> None:
    async def main() -> None:
        seen = asyncio.Event()

        async def streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(SSE_HEAD + chunk(b"data: 1\n\n"))
            await writer.drain()
            if await reader.read(1) == b"":  # EOF: the client closed (vLLM aborts the request)
                seen.set()

        async with scripted(streams) as server, client() as pool:
            reply = await pool.send("POST", server.url(), b"{}", HEADERS)
            assert await anext(reply.chunks()) == b"data: 1\n\n"
            reply.close()
            await asyncio.wait_for(seen.wait(), 2)

    run(main())


def test_connection_limit_makes_senders_wait_then_time_out(run: Runner) -> None:
    async def main() -> None:
        go = asyncio.Event()

        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await read_request(reader) is not None:
                await go.wait()
                writer.write(answer())
                await writer.drain()

        async with scripted(slow) as server, client(connect_timeout_s=0.2, max_connections=1) as pool:
            first = asyncio.create_task(pool.send("POST", server.url(), b"{}", HEADERS))
            await asyncio.sleep(0.05)
            with pytest.raises(UpstreamError) as waited:  # the only slot is taken
                await pool.send("POST", server.url(), b"{}", HEADERS)
            assert waited.value.kind == "timeout"
            second = asyncio.create_task(pool.send("POST", server.url(), b"{}", HEADERS))
            await asyncio.sleep(0.05)
            go.set()
            assert await (await first).read() == JSON_BODY  # reading it to the end frees the slot
            assert await (await second).read() == JSON_BODY
            assert server.connections == 1

    run(main())


def test_a_large_body_survives_back_pressure(run: Runner) -> None:
    body = os.urandom(3 * upstream.HIGH_WATER)

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for start in range(0, len(body), 65536):
                writer.write(chunk(body[start : start + 65536]))
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async def main() -> None:
        async with scripted(big) as server, client() as pool:
            reply = await pool.send("GET", server.url(), None, {})
            received = bytearray()
            async for piece in reply.chunks():
                received += piece
                await asyncio.sleep(0.01)  # a slow client: the replica's bytes wait in TCP
            assert bytes(received) == body
            reply = await pool.send("GET", server.url(), None, {})  # the connection was reused
            assert await reply.read() == body
            assert server.connections == 1

    run(main())


# -- the gateway's own answers: one write per loop turn (wire.py) --------------------------------


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_writes_in_one_loop_turn_leave_as_one(run: Runner) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        real = RecordingTransport()
        wire = _TurnBuffered(real, loop)  # type: ignore[arg-type]
        wire.write(b"HTTP/1.1 200 OK\r\n\r\n")
        wire.writelines([b"{", b"}"])
        assert real.writes == []
        await asyncio.sleep(0)
        assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
        wire.write(b"last")
        wire.close()  # what is held goes out before the close
        assert real.writes[-1] == b"last"
        assert real.closing
        assert wire.get_extra_info("peername") == "info:peername"
        gone = RecordingTransport()
        wire = _TurnBuffered(gone, loop)  # type: ignore[arg-type]
        wire.write(b"never sent")
        gone.closing = True  # the client went away within the turn
        await asyncio.sleep(0)
        wire.write(b"dropped")
        wire.abort()
        await asyncio.sleep(0)
        assert gone.writes == []
        assert gone.aborted

    run(main())


# -- the gateway on top of it -------------------------------------------------------------------


class ThreadedReplica:
    """A scripted replica on its own event loop thread: answers probes like an engine and
    runs `on_post` for every POST."""

    def __init__(self, on_post: Script) -> None:
        self.on_post = on_post
        self.connections = 0
        self.posts = 0
        self.handlers: set[asyncio.Task[None]] = set()
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        ready = threading.Event()

        async def serve() -> None:
            self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)
            ready.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop)
        assert ready.wait(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    return
                if request[0].startswith(b"POST"):
                    self.posts += 1
                    await self.on_post(reader, writer)
                    if writer.transport.is_closing():
                        return
                else:
                    writer.write(answer(b"", b"x-probe: 1"))
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.handlers.discard(task)

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            for task in list(self.handlers):
                task.cancel()
            await asyncio.gather(*self.handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@contextmanager
def gateway_over(*replicas: ThreadedReplica) -> Iterator[str]:
    service = tiny_service(routing={"policy": "round_robin", "probeIntervalS": 0.1, "ejectAfterFailures": 5})
    app = create_app(service, [(f"r{i}", r.url) for i, r in enumerate(replicas)])
    server = ServerThread(app, free_port()).start()
    try:
        server.wait_until("/ready")
        yield server.url
    finally:
        server.stop()
        for replica in replicas:
            replica.stop()


COMPLETION = {"model": "tiny", "prompt": "def f(", "max_tokens": 3}
SERVED = json.dumps({"choices": [{"text": "ok"}], "usage": {"total_tokens": 4}}).encode()


async def serves(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(answer(SERVED))
    await writer.drain()


async def resets_before_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    reset(writer)


def test_gateway_reuses_upstream_connections() -> None:
    replica = ThreadedReplica(serves)
    with gateway_over(replica) as url, httpx.Client() as http:
        for _ in range(20):
            assert http.post(f"{url}/v1/completions", json=COMPLETION).content == SERVED
    assert replica.posts == 20
    assert replica.connections <= 3  # probes and requests share a handful of pooled connections


def test_gateway_retries_a_reset_before_the_first_byte_on_another_replica() -> None:
    dying, healthy = ThreadedReplica(resets_before_answering), ThreadedReplica(serves)
    with gateway_over(dying, healthy) as url:
        replies = [httpx.post(f"{url}/v1/completions", json=COMPLETION) for _ in range(4)]
        metrics = httpx.get(f"{url}/metrics").text
    assert [r.status_code for r in replies] == [200] * 4
    assert {r.headers["x-tokenfleet-replica"] for r in replies} == {"r1"}
    assert dying.posts >= 2  # round robin sent it some, each retried on r1
    assert 'tokenfleet_gateway_errors_total{kind="connect",replica="r0",route="/v1/completions"}' in metrics


def test_gateway_ends_a_broken_stream_with_one_error_event() -> None:
    async def breaks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + chunk(b'data: {"choices": [{"text": "a"}]}\n\ndata: {"cho'))
        await writer.drain()
        await asyncio.sleep(0.05)
        reset(writer)

    replica = ThreadedReplica(breaks)
    with gateway_over(replica) as url:
        reply = httpx.post(f"{url}/v1/completions", json={**COMPLETION, "stream": True})
    assert reply.status_code == 200
    events = reply.content.split(b"\n\n")
    assert events[0] == b'data: {"choices": [{"text": "a"}]}'
    # Whole events only are relayed: the partial one never reaches the client (resume.py).
    error = json.loads(events[1].removeprefix(b"data: "))
    assert "not retried" in error["error"]["message"]
    assert replica.posts == 1


class StartedStreams:
    """Streams whose first bytes reached the client, by the replica that served them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_replica: dict[str, int] = {}

    def add(self, replica: str) -> None:
        with self._lock:
            self._by_replica[replica] = self._by_replica.get(replica, 0) + 1

    def on(self, replica: str) -> int:
        with self._lock:
            return self._by_replica.get(replica, 0)


def stream(url: str, index: int, started: StartedStreams | None = None) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": f"req {index}", "max_tokens": 30, "stream": True}
    outcome: dict[str, Any] = {"started": False, "error": None}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as reply:
            for piece in reply.iter_raw():
                if piece and reply.status_code == 200:
                    if not outcome["started"] and started is not None:
                        started.add(reply.headers.get("x-tokenfleet-replica", ""))
                    outcome["started"] = True
                    if b'"error"' in piece:
                        outcome["error"] = "mid-stream"
    except httpx.HTTPError as exc:
        outcome["error"] = type(exc).__name__
    return outcome


@pytest.mark.slow
def test_sigkill_of_a_fake_replica_process_loses_no_unstarted_request() -> None:
    ports = [free_port(), free_port()]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tokenfleet.load.fake_engine", "--port", str(port)],
            start_new_session=True,
            env={**os.environ, "PYTHONSAFEPATH": "1"},  # never import the repo's top-level folders
        )
        for port in ports
    ]
    service = tiny_service(
        routing={
            "policy": "round_robin",
            "probeIntervalS": 0.2,
            "ejectCooldownS": 1.0,
            "ejectAfterFailures": 1,
        }
    )
    app = create_app(service, [(f"r{i}", f"http://127.0.0.1:{port}") for i, port in enumerate(ports)])
    server = ServerThread(app, free_port()).start()
    try:
        server.wait_until("/ready", timeout_s=30)
        gateway = app.state.gateway
        deadline = time.monotonic() + 30
        while len(gateway.replicas.routable()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        started = StartedStreams()

        def kill_when_busy() -> None:
            # Kill once two streams of r1 have reached their client: the kill then breaks them
            # mid-stream, and requests not yet sent to r1 must go to r0 instead.
            deadline = time.monotonic() + 20
            while started.on("r1") < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            os.killpg(processes[1].pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        with ThreadPoolExecutor(max_workers=4) as pool:
            outcomes = list(pool.map(lambda i: stream(server.url, i, started), range(24)))
        killer.join()
    finally:
        server.stop()
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert [o for o in outcomes if not o["started"]] == []
    broken = [o for o in outcomes if o["error"] is not None]
    assert len(broken) <= 4
    assert all(o["error"] == "mid-stream" for o in broken)
    print(
        f"\nfake replica SIGKILL: {len(outcomes)} streams, 0 unstarted lost, {len(broken)} broken mid-stream"
    )
