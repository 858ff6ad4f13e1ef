"""Overload control: bounded per-class queues in front of a bounded number of upstream slots.

The decision is pure (`decide`); `AdmissionQueue` is the asyncio layer that parks waiters.
Classes are ordered by `priority` (lower = more important, as in vLLM). When the gateway is
saturated, a request waits in its class's queue; each queue is bounded and the sum of all queues
is bounded, so memory stays bounded under any offered load. When the total bound is hit, the
newest waiter of the least important non-empty class below the arrival is shed (503) to make
room; if no less important waiter exists, the arrival itself is shed. Freed slots go to the most
important class first.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["run", "enqueue", "displace", "reject"]
    victim_class: str | None = None  # for displace


def decide(
    cls: str,
    *,
    running: int,
    slots: int,
    queued: Mapping[str, int],
    order: Sequence[str],
    per_class_limit: Mapping[str, int],
    total_limit: int,
) -> Decision:
    """`order` lists class names from most to least important."""
    if running < slots and not any(queued.get(c, 0) for c in order[: order.index(cls) + 1]):
        return Decision("run")
    if queued.get(cls, 0) >= per_class_limit[cls]:
        return Decision("reject")
    if sum(queued.values()) < total_limit:
        return Decision("enqueue")
    rank = order.index(cls)
    for victim in reversed(order[rank + 1 :]):
        if queued.get(victim, 0) > 0:
            return Decision("displace", victim)
    return Decision("reject")


class ShedError(Exception):
    """The request was refused or displaced by overload control."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class AdmissionQueue:
    def __init__(
        self,
        order: Sequence[str],
        per_class_limit: Mapping[str, int],
        total_limit: int,
        max_wait_s: Mapping[str, float],
    ) -> None:
        self.order = list(order)
        self.per_class_limit = dict(per_class_limit)
        self.total_limit = total_limit
        self.max_wait_s = dict(max_wait_s)
        # Scaled to zero: with no slot at all, hold requests this long while a replica starts.
        self.activation_wait_s: float | None = None
        self.slots = 0
        self.running = 0
        self._queues: dict[str, deque[asyncio.Future[None]]] = {c: deque() for c in self.order}
        self.shed_total: dict[str, int] = dict.fromkeys(self.order, 0)

    def queued(self) -> dict[str, int]:
        return {c: len(q) for c, q in self._queues.items()}

    def set_slots(self, slots: int) -> None:
        self.slots = slots
        self._wake()

    async def acquire(self, cls: str) -> None:
        decision = decide(
            cls,
            running=self.running,
            slots=self.slots,
            queued=self.queued(),
            order=self.order,
            per_class_limit=self.per_class_limit,
            total_limit=self.total_limit,
        )
        if decision.action == "run":
            self.running += 1
            return
        if decision.action == "reject":
            self.shed_total[cls] += 1
            raise ShedError(f"overloaded: the {cls} queue is full", self._retry_after(cls))
        if decision.action == "displace" and decision.victim_class is not None:
            victim = self._queues[decision.victim_class].pop()  # newest: it has waited least
            self.shed_total[decision.victim_class] += 1
            victim.set_exception(
                ShedError("overloaded: shed for a higher class", self._retry_after(decision.victim_class))
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues[cls].append(future)
        started = time.monotonic()
        timeout = self.max_wait_s.get(cls, 30.0)
        activating = self.slots == 0 and self.activation_wait_s is not None
        if activating and self.activation_wait_s is not None:
            timeout = self.activation_wait_s  # the bound a scale-from-zero promises
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout=timeout)
        except TimeoutError:
            if future.done() and not future.cancelled() and future.exception() is None:
                return  # granted in the same tick as the timeout: keep the slot
            self._discard(cls, future)
            self.shed_total[cls] += 1
            waited = time.monotonic() - started
            if activating and self.slots == 0:
                message = f"no replica became ready within {waited:.0f}s (scaling up from zero); retry later"
                raise ShedError(message, self._retry_after(cls)) from None
            raise ShedError(
                f"overloaded: waited {waited:.1f}s in the {cls} queue", self._retry_after(cls)
            ) from None
        except asyncio.CancelledError:
            # Client went away while queued. If the slot was already granted, give it back.
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release()
            else:
                self._discard(cls, future)
            raise

    def release(self) -> None:
        self.running = max(0, self.running - 1)
        self._wake()

    def _wake(self) -> None:
        for cls in self.order:
            queue = self._queues[cls]
            while queue and self.running < self.slots:
                future = queue.popleft()
                if future.done():
                    continue
                self.running += 1
                future.set_result(None)
            if self.running >= self.slots:
                return

    def _discard(self, cls: str, future: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._queues[cls].remove(future)
        if not future.done():
            future.cancel()

    def _retry_after(self, cls: str) -> float:
        # A rough hint: less important classes should back off longer.
        return 1.0 + self.order.index(cls)
