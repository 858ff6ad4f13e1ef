"""Send one OpenAI-compatible request and time it: the harness's only network code for requests.

`build_http_request` is pure (what goes on the wire: body, headers); `send` does the I/O with a
blocking httpx client, which Locust's gevent monkey-patching makes cooperative. Streaming
responses are timed here, per socket read: Locust's own response time stops at the headers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from tokenfleet.engine.sla_contract import CLASS_HEADER, EMPTY_STREAM_REFUSAL, REJECT_PREFIX
from tokenfleet.load import rxclock
from tokenfleet.load.record import RequestRecord
from tokenfleet.load.sse import SSEDecoder, StreamTimer

Api = Literal["completions", "chat"]
# A gateway's refusals: a tenant over its rate limit (429), admission or capacity (503).
REFUSED_STATUS = (429, 503)
UNFINISHED = "unfinished: stopped before the answer ended"


@dataclass(frozen=True, slots=True)
class LLMRequest:
    id: str
    prompt: str | list[int]  # text, or token ids (completions API only) for exact prompt lengths
    max_tokens: int
    cls: str = "standard"
    tenant: str = "default"
    api_key: str | None = None  # the tenant's key: a gateway attributes requests by key alone
    priority: int | None = None
    server_class: str | None = None  # the class asked of the server, when it is not `cls`
    ttft_ms: float | None = None  # this request's own deadline for the SLA scheduler
    api: Api = "completions"
    stream: bool = True
    ignore_eos: bool = True
    temperature: float = 0.0


def build_http_request(request: LLMRequest, model: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(path, JSON body, headers). An engine's scheduler reads class and tenant from `priority`
    and `vllm_xargs`; a gateway replaces those, takes the tenant from the API key and the asked-for
    class from the class header."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "stream": request.stream,
        "ignore_eos": request.ignore_eos,
        "vllm_xargs": {"slo_class": request.server_class or request.cls, "tenant": request.tenant},
    }
    if request.ttft_ms is not None:
        body["vllm_xargs"]["ttft_ms"] = request.ttft_ms
    if request.priority is not None:
        body["priority"] = request.priority
    if request.stream:
        # Token counts come from the server's usage, never from counting chunks.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": False}
    if request.api == "chat":
        if not isinstance(request.prompt, str):
            raise ValueError("token-id prompts need the completions API")
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        path = "/v1/completions"
        body["prompt"] = request.prompt
    headers = {CLASS_HEADER: request.server_class or request.cls, "x-request-id": request.id}
    if request.api_key is not None:
        headers["authorization"] = f"Bearer {request.api_key}"
    return path, body, headers


EMPTY_STREAM = f"refused: {EMPTY_STREAM_REFUSAL}"


def rejection(data: str) -> str | None:
    """The SLA scheduler's admission rejection in one SSE event or JSON body, if it is one: vLLM
    cannot answer a scheduler's refusal with an HTTP error, so the scheduler finishes the request
    at once with finish_reason `abort` and a stop_reason starting with REJECT_PREFIX."""
    if REJECT_PREFIX not in data:
        return None  # every other event costs one substring search
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    choices = payload.get("choices") if isinstance(payload, dict) else None
    for choice in choices if isinstance(choices, list) else []:
        reason = choice.get("stop_reason") if isinstance(choice, dict) else None
        if choice.get("finish_reason") == "abort" and str(reason).startswith(REJECT_PREFIX):
            return str(reason)
    return None


def send(
    client: httpx.Client,
    base_url: str,
    request: LLMRequest,
    model: str,
    *,
    scheduled: float | None = None,
    worker: int = 0,
    timeout_s: float = 120.0,
    on_cancel: Callable[[RequestRecord], None] | None = None,
) -> RequestRecord:
    """Send and time one request. Never raises for server or network trouble: a failed request is
    a record with `ok=False` and the reason, so the run goes on and the report counts it. A
    refusal is also `rejected`. If the caller's task is killed mid-request (Locust ends users
    still in flight at its stop timeout), `on_cancel` gets what was measured, as unfinished."""
    path, body, headers = build_http_request(request, model)
    record = RequestRecord(
        id=request.id,
        cls=request.cls,
        tenant=request.tenant,
        api=request.api,
        stream=request.stream,
        send=time.time(),
        scheduled=scheduled,
        worker=worker,
        # Known before any answer for token ids; the server's usage replaces it when it comes.
        prompt_tokens=len(request.prompt) if isinstance(request.prompt, list) else None,
    )
    start = time.perf_counter()
    rxclock.reset()
    try:
        with client.stream(
            "POST", base_url.rstrip("/") + path, json=body, headers=headers, timeout=timeout_s
        ) as response:
            record.status = response.status_code
            if response.status_code >= 400:
                detail = response.read().decode("utf-8", errors="replace")[:300]
                record.error = f"HTTP {response.status_code}: {detail}"
                record.rejected = response.status_code in REFUSED_STATUS
            elif request.stream:
                read_stream(response, start, record)
            else:
                _read_whole(response, start, record)
    except httpx.TimeoutException as exc:
        record.error = f"timeout: {type(exc).__name__}"
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    except BaseException:
        record.error = UNFINISHED
        record.e2e_s = time.perf_counter() - start
        if on_cancel is not None:
            on_cancel(record)
        raise
    if record.e2e_s is None:
        record.e2e_s = time.perf_counter() - start
    record.ok = record.error is None
    return record


def arrival_offset(read_at_s: float, kernel_rx: float | None, send_wall: float) -> float:
    """Seconds since send at which a read's bytes arrived: the kernel's receive stamp when there
    is one (it excludes the time this process waited for a CPU), else when we read them."""
    if kernel_rx is None:
        return read_at_s
    kernel_s = kernel_rx - send_wall
    # The two clocks differ (wall vs monotonic); a stamp outside [0, read time] is not trusted.
    return kernel_s if 0.0 <= kernel_s <= read_at_s else read_at_s


def read_stream(response: httpx.Response, start: float, record: RequestRecord) -> None:
    """Read an SSE answer to its end into `record` (timings since `start`, a perf_counter
    reading; tokens; why it failed, if it did)."""
    decoder, timer = SSEDecoder(), StreamTimer()
    refused: str | None = None
    try:
        t_end = 0.0
        for raw in response.iter_raw():
            # Socket arrival, before parsing.
            t_end = arrival_offset(time.perf_counter() - start, rxclock.last_receive(), record.send)
            for data in decoder.feed(raw):
                timer.on_event(data, t_end)
                refused = refused or rejection(data)
        t_end = max(t_end, arrival_offset(time.perf_counter() - start, rxclock.last_receive(), record.send))
        for data in decoder.flush():
            timer.on_event(data, t_end)
            refused = refused or rejection(data)
        record.e2e_s = t_end
    finally:
        # Also when the read is cut off from outside: an unfinished record keeps its timings.
        record.first_chunk_s = timer.first_chunk_s
        record.ttft_s = timer.first_token_s
        record.chunk_s = timer.content_times
        if timer.prompt_tokens is not None:
            record.prompt_tokens = timer.prompt_tokens
        record.output_tokens = timer.output_tokens
    if refused is not None:
        record.rejected = True
        record.error = refused
    elif timer.error is not None:
        record.error = timer.error
    elif timer.finish_reason == "abort":
        record.error = "aborted by the server"
    elif not timer.done:
        record.error = "stream ended without [DONE]"
    elif timer.first_chunk_s is None:
        # A whole stream without a single choice: vLLM finished the request before any token, and
        # its serving layer drops a first event with nothing in it, the SLA scheduler's refusal
        # (finish_reason abort, stop_reason REJECT_PREFIX…) included. A client is still there to
        # read, and max_tokens ≥ 1, so only the engine's refusal ends a request so.
        record.rejected = True
        record.error = EMPTY_STREAM


def _read_whole(response: httpx.Response, start: float, record: RequestRecord) -> None:
    body = response.read()
    record.e2e_s = time.perf_counter() - start
    try:
        payload = json.loads(body)
    except ValueError:
        record.error = f"malformed JSON response: {body[:120]!r}"
        return
    usage = payload.get("usage") or {}
    record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
    record.output_tokens = usage.get("completion_tokens")
    if (refused := rejection(body.decode("utf-8", errors="replace"))) is not None:
        record.rejected = True
        record.error = refused
