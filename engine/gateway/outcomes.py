"""Attempt outcomes per revision, kept for the control loop's canary analysis and autoscaler.

One bounded deque per revision of (time, outcome, time to first byte); appending is the only work on
the request path. Readers (the control loop, once a tick) filter by time. A listener sees every
outcome too: the gateway counts them per revision in `/metrics`, for readers in other processes
(the operator's canary analysis on a cluster).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from tokenfleet.operator.control.observe import Outcome

# Enough for a minute at ~150 requests/s per revision; older samples fall off the left.
MAX_SAMPLES = 10_000

Sample = tuple[float, Outcome, float | None]
Listener = Callable[[str, Outcome, float | None], None]


class Outcomes:
    def __init__(self, clock: Callable[[], float] = time.monotonic, listener: Listener | None = None) -> None:
        self.clock = clock
        self.listener = listener
        self._by_revision: dict[str, deque[Sample]] = {}

    def record(self, revision: str, outcome: Outcome, first_byte_s: float | None) -> None:
        samples = self._by_revision.get(revision)
        if samples is None:
            samples = self._by_revision[revision] = deque(maxlen=MAX_SAMPLES)
        samples.append((self.clock(), outcome, first_byte_s))
        if self.listener is not None:
            self.listener(revision, outcome, first_byte_s)

    def since(self, revision: str, start: float) -> list[tuple[Outcome, float | None]]:
        """(outcome, first byte seconds) of the revision's attempts at or after `start`."""
        return [(outcome, ttfb) for t, outcome, ttfb in self._by_revision.get(revision, ()) if t >= start]

    def all_since(self, start: float) -> list[tuple[Outcome, float | None]]:
        return [sample for revision in list(self._by_revision) for sample in self.since(revision, start)]

    def forget(self, keep: set[str]) -> None:
        """Drop revisions nothing runs any more."""
        for revision in list(self._by_revision):
            if revision not in keep:
                del self._by_revision[revision]
