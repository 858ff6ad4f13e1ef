"""Per-tenant token buckets (requests/min and tokens/min): pure, time passed in explicitly."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Bucket:
    """`capacity` units, refilled continuously at `per_minute / 60` units per second.

    `tokens` may go negative: token usage is known only after a response (post-paid, as the
    Envoy AI Gateway does), and a tenant that overspent waits until the debt is refilled.
    """

    per_minute: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, per_minute: float, now: float) -> Bucket:
        return cls(per_minute=per_minute, tokens=per_minute, updated=now)

    @property
    def rate_per_s(self) -> float:
        return self.per_minute / 60.0


@dataclass(frozen=True, slots=True)
class Take:
    bucket: Bucket
    ok: bool
    retry_after_s: float  # 0 when ok


def refill(bucket: Bucket, now: float) -> Bucket:
    elapsed = max(0.0, now - bucket.updated)
    tokens = min(bucket.per_minute, bucket.tokens + elapsed * bucket.rate_per_s)
    return replace(bucket, tokens=tokens, updated=max(now, bucket.updated))


def take(bucket: Bucket, amount: float, now: float) -> Take:
    """Take `amount` if available; otherwise say how long until it would be.

    A request larger than the whole bucket is admitted when the bucket is full (else it could
    never pass) and leaves the bucket in debt.
    """
    bucket = refill(bucket, now)
    need = min(amount, bucket.per_minute)
    if bucket.tokens >= need:
        return Take(replace(bucket, tokens=bucket.tokens - amount), True, 0.0)
    return Take(bucket, False, (need - bucket.tokens) / bucket.rate_per_s)


def adjust(bucket: Bucket, delta: float, now: float) -> Bucket:
    """Charge (delta > 0) or refund (delta < 0) after the fact, e.g. real vs estimated tokens."""
    bucket = refill(bucket, now)
    return replace(bucket, tokens=min(bucket.per_minute, bucket.tokens - delta))
