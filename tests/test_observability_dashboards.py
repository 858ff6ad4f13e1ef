"""Grafana dashboards: generated files are current, well formed, and query only catalogued metrics."""

from __future__ import annotations

import json

import pytest

from tokenfleet.observability import grafana, prometheusrule
from tokenfleet.observability.catalogue import referenced_metrics, series_index

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
def test_dashboard_queries_only_catalogued_metrics(path: grafana.Path) -> None:
    document = json.loads(path.read_text())
    known = set(series_index()) | _recorded()
    exprs = grafana.expressions(document)
    assert exprs
    for expr in exprs:
        missing = referenced_metrics(expr) - known
        assert not missing, f"{path.name}: {expr!r} uses uncatalogued {missing}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_dashboard_structure(path: grafana.Path) -> None:
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
