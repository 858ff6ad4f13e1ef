"""The metric catalogue matches the real registries, and everything that queries metrics uses it."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tokenfleet.engine.gateway.metrics import GatewayMetrics
from tokenfleet.engine.sla_metrics import SchedulerMetrics
from tokenfleet.observability import catalogue
from tokenfleet.observability.catalogue import CATALOGUE, LABELS, by_source, referenced_metrics
from tokenfleet.observability.control_metrics import ControlLoopMetrics

ROOT = Path(catalogue.__file__).resolve().parent


def _families(registry: CollectorRegistry) -> dict[str, tuple[str, tuple[str, ...]]]:
    """family name -> (type, label names) as the registry really exposes them."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for family in registry.collect():
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        out[family.name] = (family.type, tuple(sorted(labels)))
    return out


def _assert_matches(source: catalogue.Source, registry: CollectorRegistry) -> None:
    real = _families(registry)
    expected = {m.family: m for m in by_source(source)}
    assert set(real) == set(expected), f"{source}: catalogue and registry differ"
    for family, (kind, labels) in real.items():
        metric = expected[family]
        assert kind == metric.kind, family
        # Children created lazily have no samples yet: labels seen must be a subset.
        assert set(labels) <= set(metric.labels), family


def test_gateway_registry_matches_catalogue() -> None:
    metrics = GatewayMetrics()
    metrics.requests.labels("/v1/completions", "standard", "default", "2xx").inc()
    metrics.upstream_requests.labels("r0", "/v1/completions", "ok").inc()
    metrics.errors.labels("r0", "/v1/completions", "connect").inc()
    metrics.retries.labels("/v1/completions").inc()
    metrics.ejections.labels("r0").inc()
    metrics.readmissions.labels("r0").inc()
    metrics.rejected.labels("auth", "none", "none").inc()
    metrics.in_flight.labels("r0").set(1)
    metrics.queued.labels("standard").set(0)
    metrics.replica_up.labels("r0").set(1)
    metrics.latency.labels("/v1/completions", "standard").observe(0.1)
    metrics.first_byte.labels("/v1/completions", "standard", "r0").observe(0.1)
    metrics.revision_attempts.labels("abc123", "ok").inc()
    metrics.revision_first_byte.labels("abc123").observe(0.1)
    _assert_matches("gateway", metrics.registry)
    real = _families(metrics.registry)
    for m in by_source("gateway"):
        assert real[m.family][1] == tuple(sorted(m.labels)), m.name


def test_scheduler_registry_matches_catalogue() -> None:
    metrics = SchedulerMetrics()
    metrics.init_classes(["interactive", "batch"])
    metrics.tenant_tokens.labels("t", "interactive", "prompt").inc(3)
    metrics.schedule_time.observe(0.001)
    _assert_matches("scheduler", metrics.registry)


def test_control_loop_metrics_match_catalogue_and_record() -> None:
    now = [1000.0]
    metrics = ControlLoopMetrics(clock=lambda: now[0])
    metrics.init_service("svc")
    metrics.replicas("svc", desired=3, ready=2)
    metrics.decision("svc", "up", "queue")
    metrics.replaced("svc", "crashed")
    now[0] = 1010.0
    metrics.iteration("svc", ok=True, duration_s=0.02)
    metrics.iteration("svc", ok=False, duration_s=0.5)
    metrics.set_rollout("svc", "progressing", 1)
    _assert_matches("control_loop", metrics.registry)
    text = generate_latest(metrics.registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert (
        samples[("tokenfleet_control_loop_iterations_total", (("outcome", "error"), ("service", "svc")))] == 1
    )
    assert samples[("tokenfleet_control_loop_last_success_timestamp_seconds", (("service", "svc"),))] == 1010
    assert samples[("tokenfleet_control_rollout_state", (("service", "svc"), ("state", "progressing")))] == 1
    assert samples[("tokenfleet_control_rollout_state", (("service", "svc"), ("state", "idle")))] == 0
    # Events that never happened are series at 0, so panels and rules see them before the first.
    assert samples[("tokenfleet_control_scale_decisions_total", _svc(direction="down", reason="idle"))] == 0
    assert samples[("tokenfleet_control_replacements_total", _svc(reason="unhealthy"))] == 0
    assert samples[("tokenfleet_control_replacements_total", _svc(reason="crashed"))] == 1
    # The same step again while progressing is no progress: the timestamp must stay.
    now[0] = 2000.0
    metrics.set_rollout("svc", "progressing", 1)
    assert metrics.rollout_progress.labels("svc")._value.get() == 1010
    metrics.set_rollout("svc", "progressing", 2)
    assert metrics.rollout_progress.labels("svc")._value.get() == 2000
    with pytest.raises(ValueError, match="direction"):
        metrics.decision("svc", "sideways", "x")
    with pytest.raises(ValueError, match="rollout state"):
        metrics.set_rollout("svc", "exploded", 0)


def test_catalogue_follows_naming_conventions() -> None:
    names = [m.name for m in CATALOGUE]
    assert len(names) == len(set(names))
    for m in CATALOGUE:
        if m.kind == "counter":
            assert m.name.endswith("_total"), m.name
        else:
            assert not m.name.endswith("_total"), m.name
        if m.unit == "seconds":
            assert m.name.endswith("_seconds"), m.name
        if m.source != "vllm":
            assert m.name.startswith(f"tokenfleet_{m.source.split('_')[0]}_"), m.name
        for label in m.labels:
            assert label in LABELS, f"{m.name}: label {label} has no bounded value set documented"
        assert not {"request_id", "prompt", "user", "url"} & set(m.labels)
    assert "vllm:gpu_cache_usage_perc" not in catalogue.BY_NAME


def test_metrics_md_is_generated_from_the_catalogue() -> None:
    assert (ROOT / "metrics.md").read_text() == catalogue.render_markdown(), (
        "regenerate: python -m tokenfleet.observability.catalogue > observability/metrics.md"
    )


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (le, class) (rate(tokenfleet_gateway_first_byte_seconds_bucket{class="x"}[5m]))',
            {"tokenfleet_gateway_first_byte_seconds_bucket"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) "
            "(rate(vllm:e2e_request_latency_seconds_bucket[$__rate_interval])))",
            {"vllm:e2e_request_latency_seconds_bucket"},
        ),
        ("a:b:c > 1e3 and on (service) x_y == 1", {"a:b:c", "x_y"}),
        ("time() - foo_seconds > 300", {"foo_seconds"}),
        ('up{job=~"engine.*"} offset 5m', {"up"}),
    ],
)
def test_referenced_metrics(expr: str, names: set[str]) -> None:
    assert referenced_metrics(expr) == names


def _svc(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"service": "svc", **labels}.items()))
