"""Webhook delivery in Alertmanager's format (version 4), kept for tests/test_gateway_hardening.py.

Rules are evaluated by Prometheus and alerts delivered by Alertmanager (observability/stack.py);
nothing in the product calls this module any more. It goes once the hardening test that checks
a failed delivery logs no secret URL (Alertmanager's concern now) is removed.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import httpx

log = logging.getLogger(__name__)
State = Literal["pending", "firing"]


@dataclass(slots=True)
class Alert:
    rule: str
    labels: dict[str, str]
    annotations: dict[str, str]
    state: State
    active_at: float
    value: float
    fired_at: float | None = None
    resolved_at: float | None = None

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(repr(sorted(self.labels.items())).encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.rule,
            "state": self.state if self.resolved_at is None else "resolved",
            "labels": self.labels,
            "annotations": self.annotations,
            "active_at": self.active_at,
            "value": self.value,
        }


# -- delivery ----------------------------------------------------------------------------------


def _iso(t: float | None) -> str:
    if t is None:
        return "0001-01-01T00:00:00Z"
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def webhook_payload(alerts: list[Alert], receiver: str = "local", external_url: str = "") -> dict[str, Any]:
    """Alertmanager's webhook body (version 4) for one group of alerts."""
    items = [
        {
            "status": "resolved" if a.resolved_at is not None else "firing",
            "labels": a.labels,
            "annotations": a.annotations,
            "startsAt": _iso(a.fired_at or a.active_at),
            "endsAt": _iso(a.resolved_at),
            "generatorURL": f"{external_url}/dashboard",
            "fingerprint": a.fingerprint,
        }
        for a in alerts
    ]
    common = set.intersection(*(set(a.labels.items()) for a in alerts)) if alerts else set()
    return {
        "version": "4",
        "groupKey": "{}:{}",
        "status": "firing" if any(i["status"] == "firing" for i in items) else "resolved",
        "receiver": receiver,
        "groupLabels": {},
        "commonLabels": dict(common),
        "commonAnnotations": {},
        "externalURL": external_url,
        "truncatedAlerts": 0,
        "alerts": items,
    }


@dataclass
class WebhookNotifier:
    url: str
    external_url: str = ""
    timeout_s: float = 5.0
    delivered: int = 0
    failed: int = 0

    async def notify(self, client: httpx.AsyncClient, changes: list[Alert]) -> bool:
        """POST the changes; a failed delivery is counted and logged, never raised (the loop goes on)."""
        if not changes:
            return True
        try:
            response = await client.post(
                self.url,
                json=webhook_payload(changes, external_url=self.external_url),
                timeout=self.timeout_s,
            )
            response.raise_for_status()
        except httpx.HTTPError as exc:
            self.failed += 1
            # A webhook URL's path and query are often its secret (Slack, Teams tokens), and
            # httpx's error text repeats the URL: log the origin and the kind of failure only.
            status = exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None
            origin = httpx.URL(self.url).copy_with(path="/", query=None, fragment=None, userinfo=b"")
            what = type(exc).__name__ + (f" (status {status})" if status is not None else "")
            log.warning("alert webhook to %s failed: %s", origin, what)
            return False
        self.delivered += 1
        return True
