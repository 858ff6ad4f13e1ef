"""Forwarding one request to the replicas: pick, attempt, retry before the first byte, relay.

Retry rule: an attempt that fails before anything reached the client (connect error, reset,
timeout, 5xx status, or a stream that dies before its first chunk) is retried on another
replica, at most `routing.retries` times. Streams are relayed lazily: the first upstream chunk
is read before the client gets headers, so "engine died right after accepting" is retryable.
Once a byte was sent the request is never replayed (generation is not idempotent); a stream that
breaks is resumed on another replica when `resume.py` allows, else ends with an SSE `error` data
event.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenfleet.engine.gateway import routing
from tokenfleet.engine.gateway.calls import Call, request_id, sse_error
from tokenfleet.engine.gateway.ledger import TenantLedger
from tokenfleet.engine.gateway.metrics import GatewayMetrics
from tokenfleet.engine.gateway.outcomes import Outcomes
from tokenfleet.engine.gateway.replicas import Replica, ReplicaSet
from tokenfleet.engine.gateway.resume import StreamResume
from tokenfleet.engine.gateway.tracing import Tracing
from tokenfleet.engine.gateway.upstream import Upstream, UpstreamError, UpstreamResponse
from tokenfleet.engine.gateway.usage import UsageRelay
from tokenfleet.engine.gateway.validation import RequestError
from tokenfleet.engine.gateway.wire import Answer
from tokenfleet.engine.sla_contract import CLASS_HEADER, EMPTY_STREAM_REFUSAL, REJECT_PREFIX
from tokenfleet.spec import RoutingSpec

REPLICA_HEADER = "x-tokenfleet-replica"

log = logging.getLogger(__name__)


class Refuse(Protocol):
    """The routes' refusal (`Gateway._refuse`): an error answer that also ends the call."""

    def __call__(self, call: Call, exc: RequestError, retry_after: float | None = None) -> JSONResponse: ...


class Forwarder:
    """Sends admitted requests to the replicas; the routes (`app.py`) own a call's start and end."""

    def __init__(
        self,
        *,
        routing: RoutingSpec,
        model_name: str,
        replicas: ReplicaSet,
        upstream: Upstream,
        metrics: GatewayMetrics,
        outcomes: Outcomes,
        tracing: Tracing,
        ledger: TenantLedger,
        refuse: Refuse,
        finish: Callable[[Call, int], None],
    ) -> None:
        self.routing = routing
        self.model_name = model_name  # a resumed stream's continuation names it
        self.replicas = replicas
        self.upstream = upstream
        self.metrics = metrics
        self.outcomes = outcomes
        self.tracing = tracing
        self.ledger = ledger
        self._refuse = refuse
        self._finish = finish
        # Traffic percent per revision during a canary (set by the control loop); None: all replicas.
        self.weights: dict[str, int] | None = None
        self.counter = itertools.count()
        self.rng = random.Random()

    def _upstream_headers(self, call: Call) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": call.headers.get("accept", "*/*")}
        request_id = call.headers.get("x-request-id")
        if request_id:
            headers["x-request-id"] = request_id[:128]
        # The engine's spans hang off this request's SERVER span: one trace per request.
        headers.update(self.tracing.context_headers(call.span))
        return headers

    def _route_key(self, call: Call, document: Mapping[str, Any] | None) -> routing.RouteKey:
        if self.routing.policy == "prefix_affinity" and document is not None:
            return routing.RouteKey(prefix=routing.prompt_prefix(document, self.routing.prefix_chars))
        if self.routing.policy == "session_affinity":
            return routing.RouteKey(session=call.headers.get(self.routing.session_header.lower()))
        return routing.RouteKey()

    def _pick(self, key: routing.RouteKey, exclude: list[str]) -> Replica | None:
        candidates = self.replicas.routable(exclude)
        if not candidates:
            return None
        if self.weights is not None:
            candidates = routing.by_revision_weight(candidates, self.weights, self.rng)
        view = routing.choose(
            self.routing.policy,
            [r.view() for r in candidates],
            key,
            counter=next(self.counter),
            rng=self.rng,
            load_factor=self.routing.bounded_load_factor,
        )
        return self.replicas.replicas[view.id]

    async def forward(
        self,
        call: Call,
        method: str,
        body: bytes | None,
        *,
        streaming: bool,
        release: Callable[[], None] | None,
        document: Mapping[str, Any] | None = None,
        usage: UsageRelay | None = None,
        resume: StreamResume | None = None,
    ) -> Response:
        """Try up to `1 + routing.retries` replicas; the answer, or a 502/503 when none answered.

        `release` (the admission slot) is handed to the response that commits, else freed here.
        """
        headers = self._upstream_headers(call)
        key = self._route_key(call, document)
        tried: list[str] = []
        last_error = "no ready replica"
        try:
            for attempt in range(1 + self.routing.retries):
                replica = self._pick(key, tried)
                if replica is None:
                    break
                tried.append(replica.id)
                if attempt:
                    self.metrics.retries.labels(call.route).inc()
                    call.span.set_attribute("tokenfleet.retries", attempt)
                outcome = await self._attempt(
                    call, replica, method, body, headers, streaming, release, usage, resume
                )
                if isinstance(outcome, Response):
                    release = None  # handed over to the response
                    return outcome
                last_error = outcome
        finally:
            if release is not None:
                release()
        if not tried:
            return self._refuse(
                call, RequestError(503, "no ready replica", "upstream_error"), retry_after=1.0
            )
        # The cause (replica, exception text) goes to the log, never to the client.
        rid = request_id(call)
        log.warning("request %s: all %d attempt(s) failed: %s", rid, len(tried), last_error)
        message = f"the model server failed to answer: all {len(tried)} attempt(s) failed (request id {rid})"
        return self._refuse(call, RequestError(502, message, "upstream_error"), retry_after=1.0)

    async def _attempt(
        self,
        call: Call,
        replica: Replica,
        method: str,
        body: bytes | None,
        headers: dict[str, str],
        streaming: bool,
        release: Callable[[], None] | None,
        usage: UsageRelay | None = None,
        resume: StreamResume | None = None,
    ) -> Response | str:
        """One try on one replica: a Response once committed to the client, else why it failed."""
        call.replica = replica.id
        self._enter(replica)
        upstream: UpstreamResponse | None = None
        try:
            upstream = await self.upstream.send(method, f"{replica.url}{call.route}", body, headers)
            if upstream.status >= 500:
                raise _UpstreamStatusError(upstream.status)
            first_byte_s = time.perf_counter() - call.started
            if streaming and upstream.status == 200:
                chunks = upstream.chunks()
                first = await anext(chunks, b"")
                # vLLM sends a stream's headers before any work; its first event comes with the
                # first token, so that is the stream's time to first token.
                first_byte_s = time.perf_counter() - call.started
                self._observe_first_byte(call, replica, first_byte_s)
                while (empty := ended_without_output(first)) is None:
                    more = await anext(chunks, None)
                    if more is None:
                        break
                    first += more  # only choice-less events so far (a usage chunk): read on
                rejection = scheduler_rejection(first) or (EMPTY_STREAM_REFUSAL if empty else None)
                if rejection is not None:
                    self.outcomes.record(replica.revision, "refused", first_byte_s)
                    return self._engine_rejected(call, replica, rejection, release)
                self.outcomes.record(replica.revision, "ok", first_byte_s)
                self.replicas.request_succeeded(replica)
                self.metrics.child(self.metrics.upstream_requests, replica.id, call.route, "ok").inc()
                headers = self._response_headers(call, replica, upstream.content_type or "text/event-stream")
                relay = self._relay(call, replica, upstream, first, chunks, release, usage, resume)
                upstream = None  # the relay owns it now
                return StreamingResponse(relay, status_code=200, media_type=None, headers=headers)
            content = await upstream.read()
        except (UpstreamError, _UpstreamStatusError) as exc:
            kind = exc.kind if isinstance(exc, UpstreamError) else "status_5xx"
            # UpstreamError's text starts with the cause's type name already.
            cause = exc if isinstance(exc, UpstreamError) else f"{type(exc).__name__} {exc}"
            reason = f"{replica.id}: {cause}"
            self.metrics.errors.labels(replica.id, call.route, kind).inc()
            self.metrics.upstream_requests.labels(replica.id, call.route, kind).inc()
            self.replicas.request_failed(replica, reason)
            self.outcomes.record(replica.revision, "error", None)
            self._leave(replica)
            log.info("request attempt on %s failed: %s", replica.id, reason)
            # A failed attempt is an event on the request's span (the retry is the next attempt).
            call.span.add_event(
                "upstream attempt failed",
                {"tokenfleet.replica": replica.id, "error.type": kind, "exception.message": reason},
            )
            return reason
        except asyncio.CancelledError:  # the client went away (app's _client_gone): not the replica's fault
            self._leave(replica)
            raise
        finally:
            if upstream is not None:
                upstream.close()
        ok = 200 <= upstream.status < 300
        rejection = scheduler_rejection(content) if ok else None
        if rejection is not None:
            self._observe_first_byte(call, replica, first_byte_s)
            self.outcomes.record(replica.revision, "refused", first_byte_s)
            return self._engine_rejected(call, replica, rejection, release)
        # Replica and admission accounting, token settlement, metrics and the span's end run
        # once the answer is on the wire: the client does not wait for them. They are queued
        # right behind the write, ahead of any request that arrives after, so the next request
        # still sees them done.
        status = upstream.status
        return Answer(
            content,
            status,
            self._raw_response_headers(call, replica, upstream.content_type),
            after=lambda: self._answered(
                call, replica, status, content if ok else None, first_byte_s, release
            ),
        )

    def _answered(
        self,
        call: Call,
        replica: Replica,
        status: int,
        content: bytes | None,
        first_byte_s: float,
        release: Callable[[], None] | None,
    ) -> None:
        self._leave(replica)
        self.replicas.request_succeeded(replica)
        self.metrics.child(self.metrics.upstream_requests, replica.id, call.route, "ok").inc()
        self._observe_first_byte(call, replica, first_byte_s)
        # The gateway validated the request already: a 4xx here is the revision refusing it.
        self.outcomes.record(replica.revision, "refused" if 400 <= status < 500 else "ok", first_byte_s)
        if release is not None:
            release()
        if content is not None:
            self.ledger.settle_tokens(call, content)
        self._finish(call, status)

    def _observe_first_byte(self, call: Call, replica: Replica, seconds: float) -> None:
        self.metrics.child(self.metrics.first_byte, call.route, call.cls, replica.id).observe(seconds)

    def _engine_rejected(
        self, call: Call, replica: Replica, reason: str, release: Callable[[], None] | None
    ) -> Response:
        """The engine's scheduler refused the request (its class queue is full): 503, retry later.

        The replica is healthy (it answered), so this is not a failure for the circuit breaker,
        and it is not retried elsewhere: every replica runs the same admission limits.
        """
        self._leave(replica)
        self.replicas.request_succeeded(replica)
        self.metrics.upstream_requests.labels(replica.id, call.route, "ok").inc()
        if release is not None:
            release()
        self.ledger.refund(call.tenant, call.estimate)  # refused work used none of the allowance
        message = f"engine scheduler rejected the request: {reason}"
        return self._refuse(call, RequestError(503, message, "overloaded"), retry_after=1.0)

    def _raw_response_headers(
        self, call: Call, replica: Replica, content_type: str | None
    ) -> list[tuple[bytes, bytes]]:
        """`_response_headers` as ASGI's byte pairs (what `Answer` sends as they are)."""
        headers = self._response_headers(call, replica, content_type)
        return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]

    def _response_headers(self, call: Call, replica: Replica, content_type: str | None) -> dict[str, str]:
        headers = {REPLICA_HEADER: replica.id}
        if call.cls != "none":
            headers[CLASS_HEADER] = call.cls
        if content_type:
            headers["content-type"] = content_type
        return headers

    async def _relay(
        self,
        call: Call,
        replica: Replica,
        upstream: UpstreamResponse,
        first: bytes,
        chunks: AsyncIterator[bytes],
        release: Callable[[], None] | None,
        usage: UsageRelay | None = None,
        resume: StreamResume | None = None,
    ) -> AsyncIterator[bytes]:
        """Pass the engine's SSE bytes through (less a usage chunk the client did not ask for,
        see `UsageRelay`). A break is resumed on another replica when `resume` allows (see
        `resume.py`), else it becomes an SSE error event."""
        tail = first[-2:]
        status = 200
        resumes_left = self.routing.retries
        tried = [replica.id]
        current: tuple[Replica, UpstreamResponse] | None = (replica, upstream)
        pending = first
        try:
            while current is not None:
                try:
                    if pending:
                        out = _shaped(pending, usage, resume)
                        if out:
                            tail = (tail + out)[-2:]
                            yield out
                    async for chunk in chunks:
                        # Tokens are flowing: the replica is alive whatever its probes say.
                        current[0].last_success = time.monotonic()
                        out = _shaped(chunk, usage, resume)
                        if out:
                            tail = (tail + out)[-2:]
                            yield out
                    if usage is not None and usage.held:
                        yield usage.flush()
                    break
                except UpstreamError as exc:
                    broken, broken_upstream = current
                    current = None
                    self._stream_broke(call, broken, exc)
                    broken_upstream.close()
                    self._leave(broken)
                    if resume is not None and resume.finished:
                        yield b"data: [DONE]\n\n"  # only the stream's end was lost
                        break
                    if resume is not None and resumes_left > 0 and resume.remaining() > 0:
                        resumes_left -= 1
                        resume.broken()
                        opened = await self._continue_stream(call, resume, tried)
                        if opened is not None:
                            current = (opened[0], opened[1])
                            chunks, pending = opened[2], opened[3]
                            continue
                    status = 502
                    rid = request_id(call)
                    held = usage.flush() if usage is not None else b""
                    tail = (tail + held)[-2:]
                    prefix = b"" if tail in (b"", b"\n\n") else b"\n\n"  # never glue onto a partial event
                    message = f"the model server failed mid-stream; not retried (request id {rid})"
                    yield held + prefix + sse_error(message)
        finally:
            if current is not None:
                # Closing the upstream aborts the engine's request (frees its KV cache) even when
                # the client went away and this generator is being cancelled: a plain call, no
                # await that the cancellation could interrupt.
                live, live_upstream = current
                if status == 200:
                    live.last_success = time.monotonic()  # alive: see breaker's `busy`
                live_upstream.close()
                self._leave(live)
            if usage is not None and usage.total_tokens is not None:
                self.ledger.settle(call, usage.total_tokens)
            if release is not None:
                release()
            # A client that disconnected surfaces here as GeneratorExit: still one finished call.
            self._finish(call, status)

    def _stream_broke(self, call: Call, replica: Replica, exc: UpstreamError) -> None:
        self.metrics.errors.labels(replica.id, call.route, "mid_stream").inc()
        self.replicas.request_failed(replica, f"{replica.id}: stream broke: {exc.cause_name}")
        self.outcomes.record(replica.revision, "error", None)
        log.warning("request %s: %s broke mid-stream: %s", request_id(call), replica.id, exc)

    async def _continue_stream(
        self, call: Call, resume: StreamResume, tried: list[str]
    ) -> tuple[Replica, UpstreamResponse, AsyncIterator[bytes], bytes] | None:
        """Open the continuation of a broken stream on a replica not tried yet, up to its first
        chunk; None when no replica could take it."""
        body = resume.continuation(self.model_name)
        headers = self._upstream_headers(call)
        key = self._route_key(call, resume.document)
        while (replica := self._pick(key, tried)) is not None:
            tried.append(replica.id)
            self._enter(replica)
            upstream: UpstreamResponse | None = None
            try:
                upstream = await self.upstream.send("POST", f"{replica.url}/v1/completions", body, headers)
                if upstream.status != 200:
                    raise _UpstreamStatusError(upstream.status)
                chunks = upstream.chunks()
                first = await anext(chunks, b"")
            except (UpstreamError, _UpstreamStatusError) as exc:
                if upstream is not None:
                    upstream.close()
                self._leave(replica)
                if isinstance(exc, _UpstreamStatusError) and exc.status < 500:
                    log.warning("request %s: continuation refused: %s", request_id(call), exc)
                    return None  # every replica would refuse it alike
                self.replicas.request_failed(replica, f"{replica.id}: {exc}")
                continue
            self.metrics.retries.labels(call.route).inc()
            call.span.set_attribute("tokenfleet.resumed", len(tried) - 1)
            call.replica = replica.id
            return replica, upstream, chunks, first
        return None

    def _enter(self, replica: Replica) -> None:
        replica.in_flight += 1
        replica.requests += 1

    def _leave(self, replica: Replica) -> None:
        replica.in_flight = max(0, replica.in_flight - 1)


def _shaped(chunk: bytes, usage: UsageRelay | None, resume: StreamResume | None) -> bytes:
    """An upstream chunk as the client gets it: resumable streams rewritten first (whole events,
    token ids it did not ask for removed), then a usage chunk it did not ask for taken out."""
    if resume is not None:
        chunk = resume.feed(chunk)
    if usage is not None:
        chunk = usage.feed(chunk)
    return chunk


def scheduler_rejection(content: bytes) -> str | None:
    """The SLA scheduler's admission rejection carried in an engine's 200 answer, if any.

    vLLM cannot turn a scheduler decision into an HTTP error, so the scheduler finishes the
    request at once with finish_reason `abort` and a stop_reason starting `tokenfleet:rejected`
    (engine/sla_scheduler.py). `content` is a JSON body or the first bytes of an SSE stream.
    """
    if REJECT_PREFIX.encode() not in content:
        return None  # the common case costs one substring search
    documents: list[Any] = []
    text = content.decode(errors="replace")
    for line in [text, *text.splitlines()]:
        payload = line.removeprefix("data: ").strip()
        with contextlib.suppress(ValueError):
            documents.append(json.loads(payload))
    for document in documents:
        choices = document.get("choices") if isinstance(document, dict) else None
        for choice in choices or []:
            reason = choice.get("stop_reason") if isinstance(choice, dict) else None
            if choice.get("finish_reason") == "abort" and str(reason).startswith(REJECT_PREFIX):
                return str(reason).removeprefix(REJECT_PREFIX).lstrip(": ") or "class queue full"
    return None


def ended_without_output(head: bytes) -> bool | None:
    """Did a stream whose first bytes are `head` end before any choice? True at a [DONE] with only
    choice-less events (a usage chunk) before it, False at the first event that is anything else,
    None while only choice-less events have come.

    vLLM 0.32's serving layer drops an event with no token and no text before the first token,
    so the SLA scheduler's refusal (finish_reason abort, stop_reason `tokenfleet:rejected…`)
    reaches a stream as its [DONE] alone; a request finished before its first token by anything
    else is an abort the client did not ask for either.
    """
    for event in head.split(b"\n\n")[:-1]:  # complete events only: the last piece may be cut
        data = event.strip().removeprefix(b"data:").strip()
        if not data:
            continue
        if data == b"[DONE]":
            return True
        try:
            document = json.loads(data)
        except ValueError:
            return False
        if not isinstance(document, dict) or document.get("choices") or "choices" not in document:
            return False
    return None


class _UpstreamStatusError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"status {status}")
        self.status = status
