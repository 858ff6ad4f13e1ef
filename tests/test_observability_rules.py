"""Alert rules: promtool checks and unit tests, the generated PrometheusRule, Alertmanager config."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tokenfleet.observability import prometheusrule
from tokenfleet.observability.catalogue import referenced_metrics, series_index

RULES = prometheusrule.RULES_DIR
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: scripts/install.sh installs Debian's prometheus package"
)
# The list of alerts, each required to exist (and to be unit-tested below).
REQUIRED_ALERTS = {
    "TokenfleetSLOBurnRateFast",
    "TokenfleetSLOBurnRateSlow",
    "TokenfleetQueueGrowing",
    "TokenfleetKVCacheSaturated",
    "TokenfleetReplicaDown",
    "TokenfleetErrorRate",
    "TokenfleetRolloutStuck",
    "TokenfleetControlLoopFailing",
}


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


@needs_promtool
def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", *map(str, prometheusrule.rule_files()))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests() -> None:
    tests = sorted((RULES / "tests").glob("*.yaml"))
    assert tests
    result = _promtool("test", "rules", *map(str, tests), cwd=RULES / "tests")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_catches_a_broken_rule(tmp_path: Path) -> None:
    """The checks above are not vacuous: a wrong expectation makes promtool fail."""
    test = yaml.safe_load((RULES / "tests" / "tokenfleet_rules_test.yaml").read_text())
    test["rule_files"] = [str(RULES / "tokenfleet.rules.yaml")]
    first = test["tests"][0]["alert_rule_test"][0]
    first["exp_alerts"] = []  # the fast burn does fire at 10m
    path = tmp_path / "broken_test.yaml"
    path.write_text(yaml.safe_dump(test))
    assert _promtool("test", "rules", str(path)).returncode != 0


def test_every_required_alert_exists_and_is_unit_tested() -> None:
    names = set(prometheusrule.alert_names())
    assert names >= REQUIRED_ALERTS
    tested = {
        case["alertname"]
        for path in (RULES / "tests").glob("*.yaml")
        for group in yaml.safe_load(path.read_text())["tests"]
        for case in group.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert names <= tested, f"alerts without a firing unit test: {sorted(names - tested)}"


def test_rules_reference_only_catalogued_metrics() -> None:
    groups = prometheusrule.load_groups()
    known = set(series_index()) | {r["record"] for g in groups for r in g["rules"] if "record" in r}
    for name, expr in prometheusrule.expressions(groups):
        missing = referenced_metrics(expr) - known
        assert not missing, f"{name} references metrics not in the catalogue: {missing}"


def test_every_alert_has_severity_and_summary() -> None:
    for group in prometheusrule.load_groups():
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in {"page", "ticket", "warning"}, rule["alert"]
                assert rule["annotations"]["summary"], rule["alert"]


def test_prometheusrule_manifest_is_generated_from_rules() -> None:
    assert prometheusrule.MANIFEST.read_text() == prometheusrule.render(), (
        "regenerate: python -m tokenfleet.observability.prometheusrule > "
        "observability/manifests/prometheusrule.yaml"
    )
    manifest = yaml.safe_load(prometheusrule.MANIFEST.read_text())
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["spec"]["groups"] == prometheusrule.load_groups()


def test_alertmanager_config_routes_to_defined_receivers() -> None:
    config = yaml.safe_load((prometheusrule.ROOT / "alertmanager" / "alertmanager.yaml").read_text())
    receivers = {r["name"] for r in config["receivers"]}
    routes = [config["route"], *config["route"].get("routes", [])]
    assert all(r["receiver"] in receivers for r in routes)
    severities = {
        m.split("=", 1)[1].strip('~"') for r in routes for m in r.get("matchers", []) if "severity" in m
    }
    assert {"page", "ticket|warning"} <= severities
    alerts = set(prometheusrule.alert_names())
    for rule in config["inhibit_rules"]:
        for key in ("source_matchers", "target_matchers"):
            for matcher in rule[key]:
                if matcher.startswith("alertname="):
                    assert matcher.split("=", 1)[1].strip('"') in alerts
    amtool = shutil.which("amtool")
    if amtool:  # Debian's prometheus-alertmanager package ships it; optional
        path = prometheusrule.ROOT / "alertmanager" / "alertmanager.yaml"
        result = subprocess.run([amtool, "check-config", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool missing: Debian's prometheus-alertmanager")
@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=TokenfleetSLOBurnRateFast", "severity=page"], "oncall"),
        (["alertname=TokenfleetQueueGrowing", "severity=warning"], "team"),
        (["alertname=TokenfleetSLOBurnRateSlow", "severity=ticket"], "team"),
    ],
)
def test_alertmanager_routes_by_severity(labels: list[str], receiver: str) -> None:
    path = prometheusrule.ROOT / "alertmanager" / "alertmanager.yaml"
    result = subprocess.run(
        [str(shutil.which("amtool")), "config", "routes", "test", f"--config.file={path}", *labels],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver
