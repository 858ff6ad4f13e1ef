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
import json
from collections.abc import Callable
from dataclasses import dataclass
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


# The scope key of a callable the gateway sets while it waits for an answer to a request; the
# protocol calls it when the client's connection is lost before the response completed, so the
# gateway can stop the engine's work at once (uvicorn would only tell a task blocked in
# `receive`, and a non-streaming proxy is blocked on the engine, not on its client).
ON_DISCONNECT = "tokenfleet.on_disconnect"


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """Bounds on what one client connection may hold (a slowloris or a 16 MiB header).

    `head_timeout_s`: from the connection's first byte (or its opening) to the end of a request's
    headers; `body_timeout_s`: from the end of the headers to the end of the body. Both answer 408
    and close. `max_head_bytes`: request line and headers, else 431 and close.
    """

    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_head_bytes: int = 64 * 1024


def refusal(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, in the gateway's error shape."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": status}})
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n{body}"
    ).encode()


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's `http="httptools"` protocol over a `_TurnBuffered` transport, with `ClientLimits`
    (uvicorn's httptools protocol has no header or body read timeout and no header size cap)."""

    limits = ClientLimits()
    _phase = "head"  # "head": reading a request's headers; "body": its body; "app": neither
    _head_bytes = 0
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # The proxy is duck-typed: uvicorn uses write, close, is_closing, get_extra_info and
        # the reading/writing pause calls of its transport.
        self.buffered = _TurnBuffered(transport, asyncio.get_running_loop())
        super().connection_made(cast(asyncio.Transport, self.buffered))
        self._arm(self.limits.head_timeout_s)  # a connection that never sends a byte is bounded too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            hook = cast(dict[str, Any], cycle.scope).get(ON_DISCONNECT)
            if hook is not None:
                hook()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "head":
            self._head_bytes += len(data)
        super().data_received(data)
        if self._phase == "head" and self._head_bytes > self.limits.max_head_bytes:
            # Checked after parsing this read (a head that ends inside it is fine): memory held
            # for a head stays under the cap plus one read.
            self._refuse(431, "Request Header Fields Too Large", "request headers too large")
        elif self._phase == "body" and self._timer is None:
            # Only a body that did not come with its head costs a timer.
            self._arm(self.limits.body_timeout_s)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = "head"
        if self._timer is None:  # the first request's timer runs from the connection's opening
            self._arm(self.limits.head_timeout_s)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._phase = "body"
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._phase = "app"
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # The answer is whole: on the wire now, not at the end of the loop turn (one loop
        # iteration sooner; the queued flush then finds nothing held).
        self.buffered.flush()
        super().on_response_complete()

    def _arm(self, seconds: float) -> None:
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._phase == "head":
            self._refuse(408, "Request Timeout", "request headers not received in time")
        elif self._phase == "body":
            self._refuse(408, "Request Timeout", "request body not received in time")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._disarm()
        self._phase = "app"
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            # Nothing of an answer is on the wire yet: the client gets a status, not just a close.
            self.buffered.write(refusal(status, reason, message))
        self.transport.close()
