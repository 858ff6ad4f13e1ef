"""The tenant ledger: each tenant's token buckets (`limits.py`) and its requests in the gateway.

Pre-paid by an estimate when a request is admitted, refunded when it is refused or shed, settled
from the engine's `usage` afterwards (post-paid, as the Envoy AI Gateway does).
"""

from __future__ import annotations

import json
import time

from tokenfleet.engine.gateway import limits
from tokenfleet.engine.gateway.calls import Call
from tokenfleet.engine.gateway.validation import RequestError
from tokenfleet.spec import RateLimit, Tenant


class TenantLedger:
    def __init__(self, defaults: RateLimit) -> None:
        self.defaults = defaults  # `gateway.defaultLimits`: for tenants that set none of their own
        self.buckets: dict[tuple[str, str], limits.Bucket] = {}
        self.tenant_active: dict[str, int] = {}  # requests per tenant in the gateway now

    def leave(self, call: Call) -> None:
        """A finished request no longer counts against its tenant's concurrency."""
        if call.holds_tenant_slot:
            self.tenant_active[call.tenant] -= 1

    def enter(self, call: Call, tenant: Tenant) -> None:
        """Count the request against the tenant's concurrency cap, or refuse it (429)."""
        cap = tenant.max_concurrent or self.defaults.max_concurrent
        if cap is None:
            return
        active = self.tenant_active.get(tenant.name, 0)
        if active >= cap:
            self.refund(tenant.name, call.estimate)
            raise RequestError(
                429, f"tenant over its limit of {cap} concurrent requests; retry later", "rate_limit_exceeded"
            )
        self.tenant_active[tenant.name] = active + 1
        call.holds_tenant_slot = True

    def tenant_limits(self, tenant: Tenant) -> tuple[int | None, int | None]:
        defaults = self.defaults
        return (
            tenant.requests_per_minute or defaults.requests_per_minute,
            tenant.tokens_per_minute or defaults.tokens_per_minute,
        )

    def charge(self, tenant: Tenant, tokens: int) -> None:
        """Take one request and the estimated tokens from the tenant's buckets, or 429."""
        rpm, tpm = self.tenant_limits(tenant)
        now = time.monotonic()
        takes: list[tuple[tuple[str, str], limits.Take]] = []
        for kind, per_minute, amount in (("requests", rpm, 1), ("tokens", tpm, tokens)):
            if per_minute is None:
                continue
            key = (tenant.name, kind)
            bucket = self.buckets.get(key) or limits.Bucket.full(per_minute, now)
            result = limits.take(bucket, amount, now)
            if not result.ok:
                raise RateLimitedError(kind, per_minute, result.retry_after_s)
            takes.append((key, result))
        for key, result in takes:  # commit only when every bucket agreed
            self.buckets[key] = result.bucket

    def refund(self, tenant_name: str, tokens: int) -> None:
        now = time.monotonic()
        for kind, amount in (("requests", 1), ("tokens", tokens)):
            key = (tenant_name, kind)
            if key in self.buckets:
                self.buckets[key] = limits.adjust(self.buckets[key], -amount, now)

    def settle_tokens(self, call: Call, content: bytes) -> None:
        """Post-pay: correct the tokens bucket with the response's real usage."""
        if (call.tenant, "tokens") not in self.buckets:
            return
        try:
            usage = json.loads(content).get("usage") or {}
            actual = int(usage["total_tokens"])
        except (ValueError, TypeError, AttributeError, KeyError):
            return
        self.settle(call, actual)

    def settle(self, call: Call, actual: int) -> None:
        key = (call.tenant, "tokens")
        if key in self.buckets:
            self.buckets[key] = limits.adjust(self.buckets[key], actual - call.estimate, time.monotonic())


class RateLimitedError(RequestError):
    def __init__(self, kind: str, per_minute: int, retry_after_s: float) -> None:
        super().__init__(
            429, f"tenant over its {kind}/min limit ({per_minute}); retry later", "rate_limit_exceeded"
        )
        self.retry_after_s = retry_after_s
