"""Server-sent events from an OpenAI-compatible stream, timed per socket read.

The transport hands raw bytes with the time they came off the socket (before any JSON parsing,
as the benchmarking reference asks) to `SSEDecoder`; `StreamTimer` turns the decoded events into
the per-request timings. Both are pure: no I/O, no clocks, so they are unit-tested on bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DONE = "[DONE]"


class SSEDecoder:
    """Incremental SSE framing: bytes in, complete `data:` payloads out.

    An event ends at a blank line (LF or CRLF); several `data:` lines in one event are joined with
    a newline (the SSE spec); comments (`:`) and other fields (`event:`, `id:`) are ignored
    because the OpenAI protocol puts everything in `data`.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        events: list[str] = []
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                break
            line = self._buffer[:newline].rstrip(b"\r").decode("utf-8", errors="replace")
            self._buffer = self._buffer[newline + 1 :]
            if line == "":
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
        return events

    def flush(self) -> list[str]:
        """At end of stream: an unterminated last event still counts (some servers omit the blank line)."""
        events = self.feed(b"\n\n") if self._buffer or self._data else []
        return events


@dataclass
class StreamTimer:
    """Accumulates one streamed response. Times are seconds since the request was sent.

    `first_chunk_s` is vLLM `bench serve`'s TTFT (first chunk carrying `choices`, even if empty);
    `first_token_s` is ours and AIPerf's/inference-perf's (first chunk with non-empty content).
    `content_times` holds every chunk with non-empty content (for ITL = gaps between them).
    """

    first_chunk_s: float | None = None
    first_token_s: float | None = None
    content_times: list[float] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False

    def on_event(self, data: str, t: float) -> None:
        if data.strip() == DONE:
            self.done = True
            return
        try:
            payload = json.loads(data)
        except json.JSONDecodeError:
            self.error = self.error or f"malformed SSE data: {data[:120]!r}"
            return
        if not isinstance(payload, dict):
            self.error = self.error or f"unexpected SSE payload: {data[:120]!r}"
            return
        error = _error_message(payload)
        if error is not None:
            # A server error mid-stream (vLLM sends {"error": {...}} as a data event) fails the request.
            self.error = error
            return
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
            self.output_tokens = _int_or_none(usage.get("completion_tokens"))
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices:
            return  # the usage-only chunk (include_usage) has `choices: []`: not a token
        if self.first_chunk_s is None:
            self.first_chunk_s = t
        text = "".join(_choice_text(c) for c in choices if isinstance(c, dict))
        for choice in choices:
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        if text:
            if self.first_token_s is None:
                self.first_token_s = t
            self.content_times.append(t)
            self.text_parts.append(text)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


def _choice_text(choice: dict[str, Any]) -> str:
    """Completions put text in `text`; chat in `delta.content` (or `delta.reasoning_content`)."""
    text = choice.get("text")
    if isinstance(text, str):
        return text
    delta = choice.get("delta")
    if isinstance(delta, dict):
        parts = [delta.get("content"), delta.get("reasoning_content"), delta.get("reasoning")]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def _error_message(payload: dict[str, Any]) -> str | None:
    error = payload.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    if isinstance(error, str):
        return error
    if payload.get("object") == "error":
        return str(payload.get("message") or payload)
    return None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
