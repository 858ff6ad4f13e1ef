"""uvicorn's httptools protocol, with a response's head and body leaving in one write.

uvicorn writes the status line and headers as soon as the app sends `http.response.start`, and
the body separately; uvloop puts each write on the wire at once. So every answer cost two
syscalls and two TCP segments, and woke the client twice (it reads the head, then waits again
for the body) — on a loaded 2-vCPU machine a measurable part of the gateway's added latency.
Here writes made during one event loop turn are joined and sent at the end of the turn, as
asyncio's own streams do not but Nagle's algorithm would: for the gateway's answers, head and
body (or head and first SSE chunk) are always written in the same turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class Answer(Response):
    """A whole upstream answer in hand (the proxied non-streaming case), and what to do once it
    is sent.

    Starlette's Response with a BackgroundTask would run the bookkeeping in the same loop turn as
    the sends, so before `_TurnBuffered` puts the answer on the wire; here `after` is queued
    behind that write instead. The headers come ready as ASGI's byte pairs (no content-length:
    it is added here).
    """

    def __init__(
        self, body: bytes, status: int, headers: list[tuple[bytes, bytes]], *, after: Callable[[], None]
    ) -> None:
        # Not Response.__init__: it would render and re-encode what is already bytes.
        self.body = body
        self.status_code = status
        self.raw_headers = [(b"content-length", b"%d" % len(body)), *headers]
        self.background = None
        self.after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            await send({"type": "http.response.body", "body": self.body})
        finally:
            asyncio.get_running_loop().call_soon(self.after)


class _TurnBuffered:
    """A transport whose writes within one loop turn go out as one. Anything else is the real
    transport's; closing sends what is held first."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is None:
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._held += data

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading, ...
        return getattr(self._transport, name)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's `http="httptools"` protocol over a `_TurnBuffered` transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # The proxy is duck-typed: uvicorn uses write, close, is_closing, get_extra_info and
        # the reading/writing pause calls of its transport.
        self.buffered = _TurnBuffered(transport, asyncio.get_running_loop())
        super().connection_made(cast(asyncio.Transport, self.buffered))

    def on_response_complete(self) -> None:
        # The answer is whole: on the wire now, not at the end of the loop turn (one loop
        # iteration sooner; the queued flush then finds nothing held).
        self.buffered.flush()
        super().on_response_complete()
