"""Grafana dashboards: generated files are current, well formed, query only catalogued metrics,
and every panel query runs on a real Prometheus scraping the whole catalogue."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from tokenfleet.observability import grafana, prometheusrule, stack
from tokenfleet.observability.catalogue import CATALOGUE, referenced_metrics, series_index
from tokenfleet.observability.stack import LocalStack, write_scaled_rules

FILES = sorted(grafana.OUT_DIR.glob("*.json"))


def _recorded() -> set[str]:
    return {r["record"] for g in prometheusrule.load_groups() for r in g["rules"] if "record" in r}


def test_dashboard_files_are_generated() -> None:
    rendered = grafana.render_all()
    assert {p.name for p in FILES} == set(rendered)
    for path in FILES:
        assert path.read_text() == rendered[path.name], (
            f"{path.name} is stale: python -m tokenfleet.observability.grafana"
        )


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_dashboard_queries_only_catalogued_metrics(path: Path) -> None:
    document = json.loads(path.read_text())
    known = set(series_index()) | _recorded()
    exprs = grafana.expressions(document)
    assert exprs
    for expr in exprs:
        missing = referenced_metrics(expr) - known
        assert not missing, f"{path.name}: {expr!r} uses uncatalogued {missing}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    document = json.loads(path.read_text())
    assert document["uid"].startswith("tokenfleet-")
    ids = [p["id"] for p in document["panels"]]
    assert len(ids) == len(set(ids))
    for panel in document["panels"]:
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        assert panel["datasource"]["uid"] == "${datasource}"


def test_fleet_overview_has_the_issue_panels() -> None:
    titles = " | ".join(p["title"] for p in grafana.fleet()["panels"]).lower()
    for word in (
        "requests/s",
        "tokens/s",
        "ttft",
        "tpot",
        "slo attainment",
        "queue",
        "kv",
        "replicas",
        "errors",
    ):
        assert word in titles, word


def test_every_catalogued_metric_is_shown_somewhere() -> None:
    """A metric nobody looks at is either missing a panel or should not exist."""
    used: set[str] = set()
    documents = [build() for build in grafana.DASHBOARDS.values()]
    for document in documents:
        for expr in grafana.expressions(document):
            used |= referenced_metrics(expr)
    for _, expr in prometheusrule.expressions():
        used |= referenced_metrics(expr)
    index = series_index()
    shown = {index[name].name for name in used if name in index}
    unshown = {m for m in {m.name for m in index.values()} if m not in shown}
    assert not unshown, f"catalogued but on no dashboard or rule: {sorted(unshown)}"


# -- every panel query on a real Prometheus -----------------------------------------------------

# Label values that the panels' selectors match (route=~completions, code=~4xx|5xx, outcome="met").
LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "route": ("/v1/completions",),
    "code": ("5xx",),
    "outcome": ("met", "missed"),
    "kind": ("output",),
    "target": ("ttft",),
    "state": ("progressing",),
    "le": ("0.1",),
}


class Catalogue:
    """Every catalogued family with one child per label-value combination; counters and
    histograms grow with each scrape, so rates and quantiles have data."""

    def __init__(self) -> None:
        self.scrapes = 0

    def collect(self) -> Iterator[Metric]:
        self.scrapes += 1
        n = float(self.scrapes)
        for metric in CATALOGUE:
            labels = list(metric.labels)
            combos = list(itertools.product(*(LABEL_VALUES.get(label, ("a",)) for label in labels)))
            family: CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
            if metric.kind == "counter":
                family = CounterMetricFamily(metric.family, metric.help, labels=labels)
                for values in combos:
                    family.add_metric(list(values), n)
            elif metric.kind == "histogram":
                family = HistogramMetricFamily(metric.name, metric.help, labels=labels)
                for values in combos:
                    family.add_metric(list(values), [("0.1", n / 2), ("1.0", n), ("+Inf", n)], n / 3)
            else:
                family = GaugeMetricFamily(metric.name, metric.help, labels=labels)
                for values in combos:
                    family.add_metric(list(values), 1.0)
            yield family


def _runnable(expr: str) -> str:
    """A panel query as Grafana sends it: variables substituted."""
    return expr.replace("$__rate_interval", "30s").replace("$instance", ".*").replace("$service", ".*")


def _all_panel_queries() -> Iterable[tuple[str, str, str]]:
    for name, build in grafana.DASHBOARDS.items():
        for panel in build()["panels"]:
            for target in panel["targets"]:
                yield name, panel["title"], _runnable(target["expr"])


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if stack.binaries()["prometheus"] is None:
        pytest.skip("prometheus missing: scripts/install.sh installs Debian's package")
    registry = CollectorRegistry()
    registry.register(Catalogue())  # type: ignore[arg-type]
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    root = tmp_path_factory.mktemp("grafana-prometheus")
    # The project's rules too (the burn-rate panel reads a recording rule), evaluated every second.
    local = LocalStack(root / "stack", interval_s=1, rule_files=write_scaled_rules(root / "rules", 1.0))
    try:
        local.start()
        local.set_targets(None, [("r0", f"http://127.0.0.1:{server.server_port}")])
        yield local.prometheus_url
    finally:
        local.stop()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _query(url: str, expr: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(
        f"{url}/api/v1/query", params={"query": expr}, timeout=10, trust_env=False
    ).json()
    return body


def test_every_panel_query_runs_on_prometheus_and_has_data(prometheus: str) -> None:
    queries = list(_all_panel_queries())
    assert len(queries) > 60
    for name, title, expr in queries:
        body = _query(prometheus, expr)
        assert body["status"] == "success", f"{name} / {title}: {expr!r}: {body.get('error')}"

    def empty() -> list[str]:
        return [f"{n} / {t}: {e}" for n, t, e in queries if not _query(prometheus, e)["data"]["result"]]

    # Rates need two scrapes in their window and the recording rules a round: wait for them.
    deadline = time.monotonic() + 60
    missing = empty()
    while missing and time.monotonic() < deadline:
        time.sleep(0.5)
        missing = empty()
    assert not missing, f"panel queries without data on the generated series: {missing}"


def test_every_query_variable_has_values_on_prometheus(prometheus: str) -> None:
    for name, build in grafana.DASHBOARDS.items():
        for variable in build()["templating"]["list"]:
            if variable["type"] != "query":
                continue
            metric, label = variable["query"].removeprefix("label_values(").removesuffix(")").split(", ")
            body = httpx.get(
                f"{prometheus}/api/v1/label/{label}/values",
                params={"match[]": metric},
                timeout=10,
                trust_env=False,
            ).json()
            assert body["status"] == "success", (name, variable["name"], body)
            deadline = time.monotonic() + 30
            while not body["data"] and time.monotonic() < deadline:
                time.sleep(0.5)
                body = httpx.get(
                    f"{prometheus}/api/v1/label/{label}/values",
                    params={"match[]": metric},
                    timeout=10,
                    trust_env=False,
                ).json()
            assert body["data"], f"{name}: ${variable['name']} has no values"
