"""The gateway's client towards its replicas: a minimal pooled HTTP/1.1 client on asyncio.

Why not a general client: the gateway's CPU per proxied request *is* its added latency, and on
the 2-vCPU machines this runs on, a request through httpx (httpx → httpcore → anyio → h11, all
pure Python) cost ~1.3 ms of client CPU and through aiohttp ~0.3 ms. This client does only what
the gateway needs — keep-alive connections per replica, one request at a time on each, the
response parsed by httptools (llhttp, C) — and costs a fraction of that. It never follows
redirects, never decompresses, never reads the environment's proxy settings.

The rest of the gateway sees `Upstream`, `UpstreamResponse` and `UpstreamError`: every way a
replica can fail (refused, reset, timed out, closed mid-body, spoke garbage) arrives as one
exception type with a `kind` for metrics.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Literal, cast
from urllib.parse import urlsplit

import httptools

ErrorKind = Literal["connect", "timeout"]
# vLLM's HTTP server (uvicorn) closes idle keep-alive connections after 5 s. Dropping ours
# sooner means we never send a request on a connection the engine is closing at that moment
# (a POST on it would fail, and is not safe to resend).
KEEPALIVE_S = 4.0
MAX_IDLE_PER_REPLICA = 256
# Body bytes held for a slow client before we stop reading from the replica (back-pressure
# then reaches the engine through TCP), and the level at which we read again.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class UpstreamError(Exception):
    """A replica failed to answer: `kind` is "timeout" or "connect" (refused, reset, closed)."""

    def __init__(self, kind: ErrorKind, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__} {cause}".strip())
        self.kind: ErrorKind = kind
        self.cause_name = type(cause).__name__


def _error(exc: BaseException) -> UpstreamError:
    return UpstreamError("timeout" if isinstance(exc, TimeoutError) else "connect", exc)


class _Exchange:
    """One response as its connection parses it; what the reader waits on."""

    __slots__ = (
        "connection",
        "content_type",
        "delimited",
        "done",
        "error",
        "head",
        "on_end",
        "queue",
        "size",
        "status",
        "waiter",
    )

    def __init__(
        self, connection: _Connection, loop: asyncio.AbstractEventLoop, on_end: Callable[[], None]
    ) -> None:
        self.connection: _Connection | None = connection  # None once the body is complete
        self.on_end: Callable[[], None] | None = on_end  # frees the client's connection slot
        self.head: asyncio.Future[None] = loop.create_future()
        self.queue: deque[bytes] = deque()
        self.size = 0
        self.status = 0
        self.content_type: str | None = None
        self.delimited = False  # content-length or chunked: the body's end is explicit
        self.done = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def end(self) -> None:
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end()

    def complete(self) -> None:
        self.done = True
        self.connection = None
        self.end()
        self.wake()

    def fail(self, exc: BaseException) -> None:
        if self.done or self.error is not None:
            return
        self.error = exc
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # marked retrieved: a send that was cancelled never awaits it
        self.end()
        self.wake()


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a replica, carrying one request at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.paused = False
        self.closed = False
        self.idle_since = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:  # not HTTP, or bytes after a complete response
            self._lost(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        exchange = self.exchange
        self.exchange = None
        if exchange is None or exchange.done:
            return
        if exc is None and exchange.head.done() and not exchange.delimited:
            exchange.complete()  # a body delimited by the close itself (HTTP/1.0 style)
        else:
            exchange.fail(exc or ConnectionResetError("the replica closed the connection"))

    # -- httptools callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        name = name.lower()
        if name == b"content-type":
            exchange.content_type = value.decode("latin-1")
        elif name in (b"content-length", b"transfer-encoding"):
            exchange.delimited = True

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None and not exchange.head.done():
            exchange.status = self.parser.get_status_code()
            exchange.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        exchange.queue.append(body)
        exchange.size += len(body)
        if exchange.size > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        exchange.wake()

    def on_message_complete(self) -> None:
        exchange = self.exchange
        self.exchange = None
        if exchange is not None:
            exchange.complete()
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        # Reusable only if the replica keeps it open and has all of our request: an answer that
        # came before our body was sent (an early error) leaves the connection mid-request.
        sent = self.transport is not None and self.transport.get_write_buffer_size() == 0
        if self.parser.should_keep_alive() and sent and not self.closed:
            self.pool.release(self)
        else:
            self.close()

    # -- ours -------------------------------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        if self.exchange is not None:
            self.exchange.fail(exc)
        self.close()

    def start(self, request: bytes, on_end: Callable[[], None]) -> _Exchange:
        assert self.transport is not None
        self.exchange = _Exchange(self, self.loop, on_end)
        self.transport.write(request)
        return self.exchange

    def drained(self, exchange: _Exchange) -> None:
        """The reader took bytes: read from the replica again once the backlog is small."""
        if self.paused and exchange.size < LOW_WATER and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()


class _Pool:
    """Idle keep-alive connections to one replica (host, port, scheme), newest last."""

    def __init__(self, host: str, port: int, tls: bool) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.idle: list[_Connection] = []

    def take(self) -> _Connection | None:
        cutoff = time.monotonic() - KEEPALIVE_S
        while self.idle:
            connection = self.idle.pop()  # the most recently used one: warm, least likely stale
            if connection.closed or connection.idle_since < cutoff:
                connection.close()
                continue
            return connection
        return None

    def release(self, connection: _Connection) -> None:
        if len(self.idle) >= MAX_IDLE_PER_REPLICA:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        self.idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        if connection in self.idle:
            self.idle.remove(connection)

    def close(self) -> None:
        for connection in list(self.idle):
            connection.close()


class UpstreamResponse:
    """A replica's answer whose status line and headers have arrived; read or stream the body once."""

    __slots__ = ("_exchange", "_read_timeout_s", "content_type", "status")

    def __init__(self, exchange: _Exchange, read_timeout_s: float) -> None:
        self._exchange = exchange
        self._read_timeout_s = read_timeout_s
        self.status = exchange.status
        self.content_type = exchange.content_type

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool."""
        exchange = self._exchange
        if exchange.done:  # the usual small answer: it arrived with the headers
            body = b"".join(exchange.queue)
            exchange.queue.clear()
            return body
        return b"".join([chunk async for chunk in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive: transfer encoding removed, otherwise untouched. Bytes that
        arrived before a failure are yielded first, then the failure is raised."""
        exchange = self._exchange
        while True:
            if exchange.queue:
                chunk = exchange.queue.popleft() if len(exchange.queue) == 1 else b"".join(exchange.queue)
                exchange.queue.clear()
                exchange.size = 0
                if exchange.connection is not None:
                    exchange.connection.drained(exchange)
                yield chunk
                continue
            if exchange.error is not None:
                raise _error(exchange.error)
            if exchange.done:
                return
            exchange.waiter = asyncio.get_running_loop().create_future()
            await _within(exchange.waiter, self._read_timeout_s, exchange)

    def close(self) -> None:
        """Drop the connection unless the body was read to its end (then it is already pooled).

        Closing mid-body is how the engine learns the client went away: vLLM aborts the
        request and frees its KV cache.
        """
        connection = self._exchange.connection
        if connection is not None:
            self._exchange.connection = None
            connection.close()


async def _within(future: asyncio.Future[None], timeout_s: float, exchange: _Exchange) -> None:
    """Wait for `future`; past `timeout_s` the exchange fails and its connection is dropped."""

    def expire() -> None:
        if not future.done():
            exchange.fail(TimeoutError(f"no bytes from the replica for {timeout_s:g}s"))
            if exchange.connection is not None:
                exchange.connection.close()

    timer = asyncio.get_running_loop().call_later(timeout_s, expire)
    try:
        await future
    finally:
        timer.cancel()


class Upstream:
    """One pooled HTTP/1.1 client for all of a gateway's replicas. Use it on one event loop."""

    def __init__(
        self, *, connect_timeout_s: float, read_timeout_s: float, max_connections: int = 1024
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self._pools: dict[tuple[str, int, bool], _Pool] = {}
        self._targets: dict[str, tuple[_Pool, bytes]] = {}  # url -> (pool, request-line prefix)
        self._busy: asyncio.Semaphore | None = None
        self._tls: ssl.SSLContext | None = None

    async def start(self) -> None:
        self._busy = asyncio.Semaphore(self.max_connections)

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._targets.clear()

    def _target(self, method: str, url: str) -> tuple[_Pool, bytes]:
        """The pool for `url` and the request's first lines, parsed once per distinct URL."""
        key = f"{method} {url}"
        cached = self._targets.get(key)
        if cached is not None:
            return cached
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        pool = self._pools.setdefault((parts.hostname, port, tls), _Pool(parts.hostname, port, tls))
        target = parts.path or "/"
        if parts.query:
            target += f"?{parts.query}"
        head = f"{method} {target} HTTP/1.1\r\nhost: {parts.netloc}\r\n".encode("latin-1")
        if len(self._targets) < 4096:  # replicas x routes: small; the bound is only a safety net
            self._targets[key] = (pool, head)
        return pool, head

    async def _connection(self, pool: _Pool) -> _Connection:
        connection = pool.take()
        if connection is not None:
            return connection
        loop = asyncio.get_running_loop()
        if pool.tls and self._tls is None:
            self._tls = ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(pool), pool.host, pool.port, ssl=self._tls if pool.tls else None
                )
        except (OSError, TimeoutError) as exc:
            raise _error(exc) from None
        return protocol

    async def send(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]
    ) -> UpstreamResponse:
        """Send a request and wait for the response's status and headers (not the body)."""
        assert self._busy is not None, "upstream client not started"
        pool, head = self._target(method, url)
        lines = [head]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:  # never let a forwarded value split the request
                raise ValueError(f"header {name!r} has a line break")
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        if body is not None:
            lines.append(b"content-length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        if body:
            lines.append(body)
        busy = self._busy
        if busy.locked():  # every connection in use: wait for one, as long as for a connect
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    await busy.acquire()
            except TimeoutError as exc:
                raise _error(exc) from None
        else:
            await busy.acquire()
        try:
            connection = await self._connection(pool)
        except BaseException:
            busy.release()
            raise
        # From here the exchange owns the slot: it frees it when the body ends or fails.
        exchange = connection.start(b"".join(lines), busy.release)
        try:
            await _within(exchange.head, self.read_timeout_s, exchange)
        except BaseException as exc:
            connection.close()  # failed or cancelled half way: the connection's state is unknown
            exchange.fail(exc)
            if isinstance(exc, (OSError, TimeoutError, httptools.HttpParserError)):
                raise _error(exc) from None
            raise
        return UpstreamResponse(exchange, self.read_timeout_s)

    async def get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        """A small GET (health and metrics probes): status and body, within `timeout_s` overall."""
        try:
            async with asyncio.timeout(timeout_s):
                response = await self.send("GET", url, None, {})
                try:
                    return response.status, await response.read()
                finally:
                    response.close()
        except TimeoutError as exc:
            raise _error(exc) from None
