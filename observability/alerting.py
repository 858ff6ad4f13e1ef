"""Local rule evaluation (the cluster's rule file, evaluated in-process) and webhook delivery.

`RuleEngine.evaluate(db, t)` runs the recording rules (their results become series, as in
Prometheus), then the alerting rules with their `for:` hold, and returns the transitions
(firing, resolved). `WebhookNotifier` posts those in Alertmanager's webhook format (version 4),
so any receiver written for Alertmanager also works with `tokenfleet up`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml

from tokenfleet.observability import prometheusrule
from tokenfleet.observability.promql import TSDB, Node, Sample, as_vector, evaluate, parse, parse_duration

log = logging.getLogger(__name__)
State = Literal["pending", "firing"]


@dataclass(frozen=True, slots=True)
class RecordingRule:
    record: str
    expr: Node


@dataclass(frozen=True, slots=True)
class AlertRule:
    name: str
    expr: Node
    for_s: float
    labels: dict[str, str]
    annotations: dict[str, str]


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


# -- templates ---------------------------------------------------------------------------------

_TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")


def format_value(value: float) -> str:
    """Go's %v for a float64: integers without a decimal point, others shortest round-trip."""
    if math.isfinite(value) and value == int(value) and abs(value) < 1e21:
        return str(int(value))
    return repr(value)


def _humanize(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return format_value(value)
    prefixes = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""), (1e-3, "m"), (1e-6, "u")]
    for scale, prefix in prefixes:
        if abs(value) >= scale:
            return f"{value / scale:.4g}{prefix}"
    return f"{value:.4g}"


def render_template(text: str, labels: dict[str, str], value: float) -> str:
    """The Go-template subset the rule annotations use: $labels.x, $value, humanize*, printf."""

    def one(match: re.Match[str]) -> str:
        body = match.group(1)
        label = re.fullmatch(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", body)
        if label:
            return labels.get(label.group(1), "")
        printf = re.fullmatch(r'printf\s+"([^"]*)"\s+\$value', body)
        if printf:
            return printf.group(1) % value
        parts = [p.strip() for p in body.split("|")]
        if parts[0] != "$value":
            raise ValueError(f"unsupported template {{{{ {body} }}}}")
        if len(parts) == 1:
            return format_value(value)
        if parts[1:] == ["humanizePercentage"]:
            return f"{value * 100:.4g}%"
        if parts[1:] == ["humanize"]:
            return _humanize(value)
        raise ValueError(f"unsupported template function in {{{{ {body} }}}}")

    return _TEMPLATE.sub(one, text)


# -- rules -------------------------------------------------------------------------------------


@dataclass
class RuleEngine:
    recording: list[RecordingRule]
    alerting: list[AlertRule]
    # Locally, minutes-long `for:` holds make a demo useless; scale them (1.0 = as on a cluster).
    for_scale: float = 1.0
    active: dict[tuple[str, frozenset[tuple[str, str]]], Alert] = field(default_factory=dict)
    resolved: list[Alert] = field(default_factory=list)

    @classmethod
    def from_groups(cls, groups: list[dict[str, Any]], for_scale: float = 1.0) -> RuleEngine:
        recording: list[RecordingRule] = []
        alerting: list[AlertRule] = []
        for group in groups:
            for rule in group["rules"]:
                if "record" in rule:
                    recording.append(RecordingRule(rule["record"], parse(rule["expr"])))
                else:
                    alerting.append(
                        AlertRule(
                            name=rule["alert"],
                            expr=parse(rule["expr"]),
                            for_s=parse_duration(rule.get("for", "0s")),
                            labels={k: str(v) for k, v in rule.get("labels", {}).items()},
                            annotations={k: str(v) for k, v in rule.get("annotations", {}).items()},
                        )
                    )
        return cls(recording, alerting, for_scale)

    @classmethod
    def from_files(cls, files: list[Path] | None = None, for_scale: float = 1.0) -> RuleEngine:
        groups: list[dict[str, Any]] = []
        for path in files if files is not None else prometheusrule.rule_files():
            groups.extend(yaml.safe_load(path.read_text()).get("groups", []))
        return cls.from_groups(groups, for_scale)

    def evaluate(self, db: TSDB, t: float) -> list[Alert]:
        """One evaluation round at time t; returns alerts that started firing or resolved."""
        for rule in self.recording:
            for sample in as_vector(evaluate(rule.expr, db, t)):
                labels = {k: v for k, v in sample.labels if k != "__name__"}
                db.add({"__name__": rule.record, **labels}, t, sample.value)
        changes: list[Alert] = []
        for alert_rule in self.alerting:
            changes += self._evaluate_alert(alert_rule, as_vector(evaluate(alert_rule.expr, db, t)), t)
        return changes

    def _evaluate_alert(self, rule: AlertRule, vector: list[Sample], t: float) -> list[Alert]:
        changes: list[Alert] = []
        seen: set[tuple[str, frozenset[tuple[str, str]]]] = set()
        for sample in vector:
            labels = {k: v for k, v in sample.labels if k != "__name__"}
            labels.update(rule.labels)
            labels["alertname"] = rule.name
            key = (rule.name, frozenset(labels.items()))
            seen.add(key)
            annotations = {k: render_template(v, labels, sample.value) for k, v in rule.annotations.items()}
            alert = self.active.get(key)
            if alert is None:
                alert = self.active[key] = Alert(rule.name, labels, annotations, "pending", t, sample.value)
            alert.value, alert.annotations = sample.value, annotations
            if alert.state == "pending" and t - alert.active_at >= rule.for_s * self.for_scale:
                alert.state, alert.fired_at = "firing", t
                changes.append(alert)
        for key in [k for k in self.active if k[0] == rule.name and k not in seen]:
            alert = self.active.pop(key)
            if alert.state == "firing":
                alert.resolved_at = t
                self.resolved = [*self.resolved[-49:], alert]
                changes.append(alert)
        return changes

    def alerts(self) -> list[Alert]:
        """Active alerts, firing first."""
        return sorted(self.active.values(), key=lambda a: (a.state != "firing", a.rule, a.active_at))


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
