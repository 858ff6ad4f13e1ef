"""Token usage out of an engine's SSE stream, to settle a tenant's tokens/min from the engine's
own count (issue 12, item 7).

A stream is pre-charged what the engine may generate; what it did generate is in the usage
chunk vLLM sends last when asked (`stream_options.include_usage`; the Responses API always sends
it in `response.completed`). The gateway asks for it on behalf of every limited tenant, and takes
it out of the stream again when the client did not ask, so the client sees what it asked for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

EVENT_END = b"\n\n"
USAGE_MARK = b'"total_tokens"'  # appears in a usage object and nowhere else in vLLM's chunks


@dataclass(slots=True)
class UsageRelay:
    """Passes SSE bytes through whole events at a time, noting the usage and dropping the usage
    chunk when `strip`. A trailing partial event is held until its end arrives."""

    strip: bool
    held: bytes = b""
    total_tokens: int | None = None

    @classmethod
    def for_request(
        cls, document: Mapping[str, Any], fields: Mapping[str, object]
    ) -> tuple[UsageRelay, dict[str, object]]:
        """The relay for a chat/completions stream, and the engine fields with usage asked for."""
        options = document.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return cls(strip=False), dict(fields)
        merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return cls(strip=True), {**fields, "stream_options": merged}

    def feed(self, chunk: bytes) -> bytes:
        """The complete events so far (less a stripped usage chunk); the rest is held."""
        data = self.held + chunk if self.held else chunk
        cut = data.rfind(EVENT_END) + len(EVENT_END)
        if cut < len(EVENT_END):  # no event ends here yet
            self.held = data
            return b""
        self.held = data[cut:]
        done = data[:cut]
        if USAGE_MARK not in done:  # every chunk but the last: one substring search
            return done
        return b"".join(self._event(e) for e in done[: -len(EVENT_END)].split(EVENT_END))

    def flush(self) -> bytes:
        held, self.held = self.held, b""
        return held

    def _event(self, event: bytes) -> bytes:
        kept = event + EVENT_END
        if USAGE_MARK not in event:
            return kept
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            try:
                document = json.loads(line[5:])
            except ValueError:
                return kept
            if not isinstance(document, dict):
                return kept
            response = document.get("response")
            usage = document.get("usage") or (response.get("usage") if isinstance(response, dict) else None)
            if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
                self.total_tokens = usage["total_tokens"]
                if self.strip and document.get("choices") == []:
                    return b""  # the usage-only chunk the client did not ask for
        return kept
