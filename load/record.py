"""One request's raw record (a line of the JSONL log) and the metrics derived from it.

Definitions follow vLLM `bench serve` (docs/adr/0003-load-harness.md):
TTFT = first non-empty content chunk − send; ITL = gaps between content chunks (pooled over
requests); TPOT = (E2E − TTFT) / (n − 1) with n = `usage.completion_tokens`; E2E = end − send.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any


@dataclass
class RequestRecord:
    """Absolute times are Unix seconds; offsets (`*_s`) are seconds since `send`, from a monotonic clock."""

    id: str
    cls: str
    tenant: str
    api: str
    stream: bool
    send: float
    scheduled: float | None = None  # open loop: when the pacer wanted it sent
    first_chunk_s: float | None = None
    ttft_s: float | None = None
    chunk_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    status: int | None = None
    ok: bool = False
    error: str | None = None
    # Refused by the server (the SLA scheduler's in-band rejection, a gateway's 429/503): not ok,
    # and told apart from failures because admission control refuses on purpose.
    rejected: bool = False
    worker: int = 0

    @property
    def queue_s(self) -> float | None:
        """Client queue time (vLLM's `client_queue_time`): how late the send was against the schedule."""
        return None if self.scheduled is None else max(0.0, self.send - self.scheduled)

    @property
    def end(self) -> float | None:
        return None if self.e2e_s is None else self.send + self.e2e_s

    @property
    def tpot_s(self) -> float | None:
        return tpot(self.e2e_s, self.ttft_s, self.output_tokens)

    @property
    def itl_s(self) -> list[float]:
        return itl(self.chunk_s)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def tpot(e2e_s: float | None, ttft_s: float | None, output_tokens: int | None) -> float | None:
    """(E2E − TTFT) / (n − 1): undefined for one token, since there is no decode interval."""
    if e2e_s is None or ttft_s is None or output_tokens is None or output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


def itl(chunk_times: list[float]) -> list[float]:
    """Gaps between consecutive content chunks (a chunk may carry several tokens)."""
    return [b - a for a, b in pairwise(chunk_times)]


def write_records(path: Path, records: Iterable[RequestRecord]) -> None:
    with path.open("a", encoding="utf-8") as out:
        for record in records:
            out.write(record.to_json() + "\n")


def read_records(paths: Iterable[Path]) -> Iterator[RequestRecord]:
    """Read JSONL logs; a torn last line (the run was killed mid-write) is skipped, not fatal."""
    for path in paths:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                line = line.strip()
                if not line:
                    continue
                try:
                    yield RequestRecord.from_dict(json.loads(line))
                except (json.JSONDecodeError, TypeError):
                    continue
