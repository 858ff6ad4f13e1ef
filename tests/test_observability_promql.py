"""The local PromQL subset and rule engine: unit tests, and promtool's own rule tests replayed
through them (the built-in dashboard must fire exactly the alerts Prometheus would)."""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tokenfleet.observability import prometheusrule
from tokenfleet.observability.alerting import (
    RuleEngine,
    WebhookNotifier,
    format_value,
    render_template,
    webhook_payload,
)
from tokenfleet.observability.promql import TSDB, PromQLError, evaluate, parse, parse_duration

TESTS = prometheusrule.RULES_DIR / "tests"


def _expand(values: str) -> list[float | None]:
    """promtool's series notation: `a+bxN`, `a-bxN`, `axN`, `_`, plain numbers."""
    out: list[float | None] = []
    for token in values.split():
        m = re.fullmatch(r"(-?[\d.e]+)(?:([+-])([\d.e]+))?x(\d+)", token)
        if token == "_":
            out.append(None)
        elif m:
            start, sign, step, n = m.groups()
            delta = float(step or 0) * (-1 if sign == "-" else 1)
            out += [float(start) + i * delta for i in range(int(n) + 1)]
        else:
            out.append(float(token))
    return out


def _series_labels(text: str) -> dict[str, str]:
    name, _, rest = text.partition("{")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return {"__name__": name, **labels}


def _promtool_cases() -> list[tuple[str, dict[str, Any]]]:
    cases = []
    for path in sorted(TESTS.glob("*.yaml")):
        for group in yaml.safe_load(path.read_text())["tests"]:
            cases.append((f"{path.stem}:{group['name']}", group))
    return cases


@pytest.mark.parametrize(("name", "group"), _promtool_cases(), ids=[c[0] for c in _promtool_cases()])
def test_local_engine_agrees_with_promtool_tests(name: str, group: dict[str, Any]) -> None:
    step = parse_duration(group.get("interval", "1m"))
    db = TSDB()
    for series in group["input_series"]:
        labels = _series_labels(series["series"])
        for i, value in enumerate(_expand(series["values"])):
            if value is not None:
                db.add(labels, i * step, value)
    engine = RuleEngine.from_files()
    checks = sorted(group["alert_rule_test"], key=lambda c: parse_duration(c["eval_time"]))
    t = 0.0
    for check in checks:
        until = parse_duration(check["eval_time"])
        while t <= until:
            engine.evaluate(db, t)
            t += 60.0
        firing = [a for a in engine.alerts() if a.rule == check["alertname"] and a.state == "firing"]
        got = sorted(
            (sorted((k, v) for k, v in a.labels.items() if k != "alertname"), a.annotations) for a in firing
        )
        want = sorted(
            (sorted((k, str(v)) for k, v in e["exp_labels"].items()), e.get("exp_annotations", {}))
            for e in check.get("exp_alerts") or []
        )
        assert got == want, f"{check['alertname']} at {check['eval_time']}"


def _db() -> TSDB:
    db = TSDB()
    for i in range(11):
        t = i * 60.0
        db.add({"__name__": "x_total", "a": "1", "b": "p"}, t, 5 * i)
        db.add({"__name__": "x_total", "a": "1", "b": "q"}, t, 10 * i)
        db.add({"__name__": "x_total", "a": "2", "b": "p"}, t, 0)
        for le, count in (("0.1", i), ("1", 3 * i), ("+Inf", 4 * i)):
            db.add({"__name__": "h_bucket", "le": le, "class": "c"}, t, count)
    return db


def _values(expr: str, db: TSDB, t: float = 600.0) -> dict[tuple[tuple[str, str], ...], float]:
    value = evaluate(expr, db, t)
    assert isinstance(value, list)
    return {tuple(sorted(s.labels)): s.value for s in value}


def test_selectors_aggregations_and_arithmetic() -> None:
    db = _db()
    assert _values('x_total{b="p", a=~"1|3"}', db) == {(("__name__", "x_total"), ("a", "1"), ("b", "p")): 50}
    assert _values('sum by (a) (x_total{b!="q"})', db) == {(("a", "1"),): 50, (("a", "2"),): 0}
    assert _values("sum without (b) (rate(x_total[5m]))", db) == {(("a", "1"),): 0.25, (("a", "2"),): 0}
    assert _values('count(x_total{a!~"2"})', db) == {(): 2}
    assert _values("max(x_total) - min(x_total)", db) == {(): 100}
    assert _values("avg by (b) (x_total)", db)[(("b", "p"),)] == 25
    ratio = _values('sum by (a) (rate(x_total{b="p"}[5m])) / sum by (a) (rate(x_total[5m]))', db)
    assert ratio[(("a", "1"),)] == pytest.approx(1 / 3)
    assert math.isnan(ratio[(("a", "2"),)])  # 0/0, as in Prometheus
    assert _values('increase(x_total{b="q"}[5m])', db)[(("a", "1"), ("b", "q"))] == 40
    assert _values('delta(x_total{b="q"}[2m])', db)[(("a", "1"), ("b", "q"))] == 10
    assert evaluate("2 * 3 + 1 > 6", db, 0) == 1.0
    assert evaluate("2 ^ 3 ^ 2", db, 0) == 512.0
    assert evaluate("-1 - -2 + +1", db, 0) == 2.0
    assert evaluate("7 % 4 / 0", db, 0) == math.inf
    assert evaluate("time()", db, 12) == 12.0
    assert evaluate('scalar(x_total{b="q", a="1"})', db, 600) == 100
    assert math.isnan(evaluate("scalar(x_total)", db, 600))  # type: ignore[arg-type]


def test_histogram_quantile_interpolates() -> None:
    got = _values("histogram_quantile(0.5, sum by (le, class) (rate(h_bucket[5m])))", _db())
    assert got[(("class", "c"),)] == pytest.approx(0.55)
    # A rank in the +Inf bucket reports the highest finite bound.
    got = _values("histogram_quantile(0.99, sum by (le, class) (rate(h_bucket[5m])))", _db())
    assert got[(("class", "c"),)] == 1.0


def test_set_operators_and_matching() -> None:
    db = TSDB()
    db.add({"__name__": "ts", "service": "s1"}, 0, 100)
    db.add({"__name__": "ts", "service": "s2"}, 0, 100)
    db.add({"__name__": "st", "service": "s1", "state": "progressing"}, 0, 1)
    db.add({"__name__": "st", "service": "s2", "state": "progressing"}, 0, 0)
    expr = '(time() - ts) > 50 and on (service) st{state="progressing"} == 1'
    assert _values(expr, db, 200) == {(("service", "s1"),): 100}
    assert _values("ts unless on (service) st == 1", db, 200) == {
        (("__name__", "ts"), ("service", "s2")): 100
    }
    assert len(_values("ts or st", db, 200)) == 4
    assert _values("ts - ignoring (state) st", db, 200) == {
        (("service", "s1"),): 99,
        (("service", "s2"),): 100,
    }
    assert _values("ts * on (service) st", db, 200) == {(("service", "s1"),): 100, (("service", "s2"),): 0}
    assert _values("ts > bool_x", db, 200) == {}  # an unknown metric is an empty vector, not an error
    assert _values("-ts", db, 200)[(("service", "s1"),)] == -100


def test_staleness_and_counter_reset() -> None:
    db = TSDB()
    for t, v in ((0, 10), (60, 20), (120, 5), (180, 15)):
        db.add({"__name__": "c_total"}, t, v)
    assert _values("increase(c_total[10m])", db, 180) == {(): 25}
    assert _values("c_total", db, 180 + 301) == {}  # older than the 5-minute lookback


@pytest.mark.parametrize(
    "expr",
    [
        "rate(x[5m]) offset 1m",
        "x > bool 1",
        "a * on (b) group_left c",
        "abs(x)",
        "rate(x)",
        "x[5m]",
        "sum(",
        "x{a>1}",
    ],
)
def test_outside_the_subset_is_an_error(expr: str) -> None:
    with pytest.raises(PromQLError):
        evaluate(parse(expr), TSDB(), 0)


def test_every_shipped_rule_parses() -> None:
    engine = RuleEngine.from_files()
    assert len(engine.alerting) == len(prometheusrule.alert_names())
    assert engine.recording


def test_ingest_exposition_text() -> None:
    db = TSDB()
    text = (
        '# HELP a_total x\n# TYPE a_total counter\na_total{k="v"} 3\na_created{k="v"} 1.7e9\n'
        "# HELP g x\n# TYPE g gauge\ng 1.5\n"
    )
    assert db.ingest_text(text, 10, {"instance": "r0"}) == 2
    assert db.names() == {"a_total", "g"}
    assert _values("a_total", db, 10) == {(("__name__", "a_total"), ("instance", "r0"), ("k", "v")): 3}


def test_templates() -> None:
    labels = {"instance": "e1"}
    assert render_template("{{ $labels.instance }} {{ $value }}", labels, 15.0) == "e1 15"
    assert render_template("{{ $value | humanizePercentage }}", labels, 0.09999999) == "10%"
    assert render_template('{{ printf "%.2f" $value }}', labels, 0.2) == "0.20"
    assert render_template("{{ $value | humanize }}", labels, 1234.0) == "1.234k"
    assert render_template("{{ $value | humanize }}", labels, 0.25) == "250m"
    assert format_value(0.5) == "0.5"
    with pytest.raises(ValueError, match="unsupported"):
        render_template("{{ $value | title }}", labels, 1.0)
    with pytest.raises(ValueError, match="unsupported"):
        render_template("{{ .Foo }}", labels, 1.0)


class _Receiver:
    """A local webhook receiver recording every POSTed JSON body."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.bodies.append(json.loads(body))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhook_receives_firing_then_resolved() -> None:
    groups = [
        {
            "name": "g",
            "rules": [
                {
                    "alert": "Down",
                    "expr": "up_gauge == 0",
                    "for": "1m",
                    "labels": {"severity": "page"},
                    "annotations": {"summary": "{{ $labels.replica }} down"},
                }
            ],
        }
    ]
    engine = RuleEngine.from_groups(groups)
    db = TSDB()
    receiver = _Receiver()

    async def run() -> list[bool]:
        notifier = WebhookNotifier(receiver.url, external_url="http://127.0.0.1:1")
        results = []
        async with httpx.AsyncClient() as client:
            for t, value in ((0, 0), (30, 0), (60, 0), (90, 1)):
                db.add({"__name__": "up_gauge", "replica": "r0"}, t, value)
                results.append(await notifier.notify(client, engine.evaluate(db, t)))
        assert notifier.delivered == 2
        return results

    try:
        assert asyncio.run(run()) == [True] * 4
    finally:
        receiver.close()
    firing, resolved = receiver.bodies
    assert firing["version"] == "4"
    assert firing["status"] == "firing"
    assert firing["alerts"][0]["labels"] == {"replica": "r0", "severity": "page", "alertname": "Down"}
    assert firing["alerts"][0]["annotations"] == {"summary": "r0 down"}
    assert firing["alerts"][0]["endsAt"].startswith("0001-")
    assert firing["commonLabels"]["alertname"] == "Down"
    assert resolved["status"] == "resolved"
    assert resolved["alerts"][0]["fingerprint"] == firing["alerts"][0]["fingerprint"]
    assert resolved["alerts"][0]["endsAt"] == "1970-01-01T00:01:30Z"
    assert engine.resolved[-1].as_dict()["state"] == "resolved"


def test_webhook_failure_is_counted_not_raised() -> None:
    receiver = _Receiver(status=500)
    engine = RuleEngine.from_groups([{"name": "g", "rules": [{"alert": "A", "expr": "vector_x > 0"}]}])
    db = TSDB()
    db.add({"__name__": "vector_x"}, 0, 1)

    async def run() -> WebhookNotifier:
        notifier = WebhookNotifier(receiver.url)
        async with httpx.AsyncClient() as client:
            assert await notifier.notify(client, []) is True
            assert await notifier.notify(client, engine.evaluate(db, 0)) is False
        return notifier

    try:
        notifier = asyncio.run(run())
    finally:
        receiver.close()
    assert (notifier.delivered, notifier.failed) == (0, 1)
    assert webhook_payload([])["status"] == "resolved"
    assert Path(prometheusrule.RULES_DIR).is_dir()
