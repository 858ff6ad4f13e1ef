"""Grafana dashboards, built with Grafana's typed SDK (grafana-foundation-sdk) into
observability/dashboards/.

Each panel is one `Panel` line to review; the SDK's builders and models (generated from Grafana's
own schema) assemble the JSON, so a field Grafana does not know fails here, where no Grafana runs.
The PromQL is checked against the catalogue and against a real Prometheus
(tests/test_observability_dashboards.py); `python -m tokenfleet.observability.grafana` rewrites
the files, which infra/monitoring.py ships as ConfigMaps (via `DASHBOARDS`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as models

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
RATE = "$__rate_interval"
DS = models.DataSourceRef(type_val="prometheus", uid="${datasource}")
CLASS_ROUTES = 'route=~"/v1/(chat/)?completions"'
SLO = "tokenfleet_scheduler_slo_requests_total"
TENANT_TOKENS = "tokenfleet_scheduler_tenant_tokens_total"


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    targets: tuple[tuple[str, str], ...]  # (expr, legend)
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""


def quantiles(metric: str, by: str, selector: str = "") -> tuple[tuple[str, str], ...]:
    """P50/P95/P99 of a histogram, split by `by`."""
    sel = f"{{{selector}}}" if selector else ""
    return tuple(
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{sel}[{RATE}])))",
            f"p{round(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.95, 0.99)
    )


def _panel(panel: Panel, pid: int, x: int, y: int) -> timeseries.Panel | stat.Panel:
    built: timeseries.Panel | stat.Panel
    if panel.kind == "stat":
        built = stat.Panel()
    else:
        legend = (
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        built = timeseries.Panel().legend(legend)
    built.id(pid).title(panel.title).description(panel.description).datasource(DS)
    built.grid_pos(models.GridPos(h=8, w=12, x=x, y=y)).unit(panel.unit)
    for i, (expr, legend_format) in enumerate(panel.targets):
        query = prometheus.Dataquery().ref_id(chr(ord("A") + i)).expr(expr).legend_format(legend_format)
        built.with_target(query.datasource(DS))
    return built


def dashboard(
    uid: str, title: str, panels: list[Panel], variables: list[builders.QueryVariable]
) -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (the SDK's encoder, then plain dicts for callers)."""
    built = (
        builders.Dashboard(title)
        .uid(uid)
        .tags(["tokenfleet"])
        .version(1)
        .editable()
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("utc")
        .with_variable(builders.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for variable in variables:
        built.with_variable(variable)
    for i, panel in enumerate(panels):
        built.with_panel(_panel(panel, i + 1, 12 * (i % 2), 8 * (i // 2)))
    document: dict[str, Any] = json.loads(json.dumps(built.build(), cls=JSONEncoder))
    return document


def _query_var(name: str, query: str, multi: bool = True) -> builders.QueryVariable:
    return (
        builders.QueryVariable(name)
        .datasource(DS)
        .query(query)
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(multi)
        .include_all(multi)
    )


def fleet() -> dict[str, Any]:
    panels = [
        Panel(
            "Requests/s by class",
            (
                (
                    f"sum by (class) (rate(tokenfleet_gateway_requests_total{{{CLASS_ROUTES}}}[{RATE}]))",
                    "{{class}}",
                ),
            ),
            "reqps",
        ),
        Panel(
            "Tokens/s",
            (
                (f"sum(rate(vllm:generation_tokens_total[{RATE}]))", "generated"),
                (f"sum(rate(vllm:prompt_tokens_total[{RATE}]))", "prompt"),
            ),
            "short",
        ),
        Panel(
            "TTFT per class (gateway first byte)",
            quantiles("tokenfleet_gateway_first_byte_seconds", "class", CLASS_ROUTES),
            "s",
        ),
        Panel(
            "TPOT (engine)",
            quantiles("vllm:request_time_per_output_token_seconds", "model_name"),
            "s",
            description="vLLM does not label by class; per-class TPOT attainment is in 'SLO attainment'.",
        ),
        Panel(
            "SLO attainment per class",
            (
                (
                    f'sum by (slo_class, target) (rate({SLO}{{outcome="met"}}[{RATE}]))'
                    f" / sum by (slo_class, target) (rate({SLO}[{RATE}]))",
                    "{{slo_class}} {{target}}",
                ),
            ),
            "percentunit",
        ),
        Panel(
            "Queue depth",
            (
                ("sum by (instance) (vllm:num_requests_waiting)", "engine {{instance}}"),
                ("sum by (class) (tokenfleet_gateway_queued)", "gateway {{class}}"),
            ),
        ),
        Panel(
            "KV-cache use", (("max by (instance) (vllm:kv_cache_usage_perc)", "{{instance}}"),), "percentunit"
        ),
        Panel(
            "Replicas",
            (
                ("sum(tokenfleet_gateway_replica_routable)", "routable"),
                ("sum by (service) (tokenfleet_control_ready_replicas)", "ready {{service}}"),
                ("sum by (service) (tokenfleet_control_desired_replicas)", "desired {{service}}"),
            ),
        ),
        Panel(
            "Errors/s",
            (
                (
                    f'sum by (code) (rate(tokenfleet_gateway_requests_total{{code=~"4xx|5xx"}}[{RATE}]))',
                    "{{code}}",
                ),
                (f"sum by (kind) (rate(tokenfleet_gateway_errors_total[{RATE}]))", "upstream {{kind}}"),
                (f"sum by (reason) (rate(tokenfleet_gateway_rejected_total[{RATE}]))", "rejected {{reason}}"),
            ),
            "reqps",
        ),
        Panel(
            "End-to-end latency per class",
            quantiles("tokenfleet_gateway_request_duration_seconds", "class", CLASS_ROUTES),
            "s",
        ),
    ]
    return dashboard("tokenfleet-fleet", "tokenfleet / Fleet overview", panels, [])


def replica() -> dict[str, Any]:
    sel = 'instance=~"$instance"'
    panels = [
        Panel(
            "Running and waiting",
            (
                (f"sum by (instance) (vllm:num_requests_running{{{sel}}})", "running {{instance}}"),
                (f"sum by (instance) (vllm:num_requests_waiting{{{sel}}})", "waiting {{instance}}"),
            ),
        ),
        Panel("KV-cache use", ((f"vllm:kv_cache_usage_perc{{{sel}}}", "{{instance}}"),), "percentunit"),
        Panel("TTFT (engine)", quantiles("vllm:time_to_first_token_seconds", "instance", sel), "s"),
        Panel("Inter-token latency", quantiles("vllm:inter_token_latency_seconds", "instance", sel), "s"),
        Panel(
            "End-to-end latency (engine)", quantiles("vllm:e2e_request_latency_seconds", "instance", sel), "s"
        ),
        Panel("Queue time (engine)", quantiles("vllm:request_queue_time_seconds", "instance", sel), "s"),
        Panel(
            "Tokens/s",
            (
                (
                    f"sum by (instance) (rate(vllm:generation_tokens_total{{{sel}}}[{RATE}]))",
                    "gen {{instance}}",
                ),
                (
                    f"sum by (instance) (rate(vllm:prompt_tokens_total{{{sel}}}[{RATE}]))",
                    "prompt {{instance}}",
                ),
            ),
        ),
        Panel(
            "Preemptions/s and prefix-cache hit ratio",
            (
                (
                    f"sum by (instance) (rate(vllm:num_preemptions_total{{{sel}}}[{RATE}]))",
                    "preempt {{instance}}",
                ),
                (
                    f"sum by (instance) (rate(vllm:prefix_cache_hits_total{{{sel}}}[{RATE}]))"
                    f" / sum by (instance) (rate(vllm:prefix_cache_queries_total{{{sel}}}[{RATE}]))",
                    "hit ratio {{instance}}",
                ),
            ),
        ),
        Panel(
            "Finished requests/s by reason",
            (
                (
                    f"sum by (finished_reason) (rate(vllm:request_success_total{{{sel}}}[{RATE}]))",
                    "{{finished_reason}}",
                ),
            ),
            "reqps",
        ),
        Panel(
            "Gateway view per replica",
            (
                ("sum by (replica) (tokenfleet_gateway_in_flight)", "in flight {{replica}}"),
                ("sum by (replica) (tokenfleet_gateway_replica_routable)", "routable {{replica}}"),
                (
                    f"sum by (replica) (rate(tokenfleet_gateway_ejections_total[{RATE}]))",
                    "ejections {{replica}}",
                ),
            ),
        ),
        Panel(
            "Gateway first byte per replica",
            quantiles("tokenfleet_gateway_first_byte_seconds", "replica"),
            "s",
        ),
        Panel(
            "Gateway attempts per replica",
            (
                (
                    f"sum by (replica, outcome) (rate(tokenfleet_gateway_upstream_requests_total[{RATE}]))",
                    "{{replica}} {{outcome}}",
                ),
                (f"sum by (route) (rate(tokenfleet_gateway_retries_total[{RATE}]))", "retries {{route}}"),
                (
                    f"sum by (replica) (rate(tokenfleet_gateway_readmissions_total[{RATE}]))",
                    "readmitted {{replica}}",
                ),
            ),
        ),
    ]
    return dashboard(
        "tokenfleet-replica",
        "tokenfleet / Per replica",
        panels,
        [_query_var("instance", "label_values(vllm:num_requests_running, instance)")],
    )


def scheduler() -> dict[str, Any]:
    panels = [
        Panel(
            "Waiting per class", (("sum by (slo_class) (tokenfleet_scheduler_queue_depth)", "{{slo_class}}"),)
        ),
        Panel("Running per class", (("sum by (slo_class) (tokenfleet_scheduler_running)", "{{slo_class}}"),)),
        Panel("Queue wait per class", quantiles("tokenfleet_scheduler_wait_seconds", "slo_class"), "s"),
        Panel(
            "Longest wait per class",
            (("max by (slo_class) (tokenfleet_scheduler_max_wait_seconds)", "{{slo_class}}"),),
            "s",
        ),
        Panel(
            "Preemptions, overtakes and rejections per class",
            (
                (
                    f"sum by (slo_class) (rate(tokenfleet_scheduler_preemptions_total[{RATE}]))",
                    "preempted {{slo_class}}",
                ),
                (
                    f"sum by (slo_class) (rate(tokenfleet_scheduler_overtakes_total[{RATE}]))",
                    "overtook {{slo_class}}",
                ),
                (
                    f"sum by (slo_class) (rate(tokenfleet_scheduler_rejections_total[{RATE}]))",
                    "rejected {{slo_class}}",
                ),
            ),
        ),
        Panel(
            "Tenant share of output tokens",
            (
                (
                    f'sum by (tenant) (rate({TENANT_TOKENS}{{kind="output"}}[{RATE}]))'
                    f' / scalar(sum(rate({TENANT_TOKENS}{{kind="output"}}[{RATE}])))',
                    "{{tenant}}",
                ),
            ),
            "percentunit",
        ),
        Panel(
            "SLO misses per class",
            (
                (
                    f'sum by (slo_class, target) (rate({SLO}{{outcome="missed"}}[{RATE}]))',
                    "{{slo_class}} {{target}}",
                ),
            ),
            "reqps",
        ),
        Panel(
            "Error-budget burn rate (1h)",
            (("tokenfleet:slo_miss_ratio:rate1h / 0.01", "{{slo_class}} {{target}}"),),
            description="1 = burning exactly the 1% budget; the fast-burn alert pages at 14.4.",
        ),
        Panel(
            "schedule() time, and the SLA policy's share (p95, p99)",
            quantiles("tokenfleet_scheduler_schedule_seconds", "instance")
            + tuple(
                (expr, f"policy {legend}")
                for expr, legend in quantiles("tokenfleet_scheduler_policy_seconds", "instance")[1:]
            ),
            "s",
        ),
    ]
    return dashboard("tokenfleet-scheduler", "tokenfleet / SLA scheduler", panels, [])


def control_loop() -> dict[str, Any]:
    sel = 'service=~"$service"'
    panels = [
        Panel(
            "Desired vs ready replicas",
            (
                (f"tokenfleet_control_desired_replicas{{{sel}}}", "desired {{service}}"),
                (f"tokenfleet_control_ready_replicas{{{sel}}}", "ready {{service}}"),
            ),
        ),
        Panel(
            "Scale decisions",
            (
                (
                    f"sum by (direction, reason) "
                    f"(increase(tokenfleet_control_scale_decisions_total{{{sel}}}[{RATE}]))",
                    "{{direction}} ({{reason}})",
                ),
            ),
        ),
        Panel(
            "Replacements",
            (
                (
                    f"sum by (reason) (increase(tokenfleet_control_replacements_total{{{sel}}}[{RATE}]))",
                    "{{reason}}",
                ),
            ),
        ),
        Panel(
            "Reconcile iterations/s",
            (
                (
                    f"sum by (outcome) (rate(tokenfleet_control_loop_iterations_total{{{sel}}}[{RATE}]))",
                    "{{outcome}}",
                ),
            ),
        ),
        Panel(
            "Reconcile duration", quantiles("tokenfleet_control_loop_duration_seconds", "service", sel), "s"
        ),
        Panel(
            "Seconds since last successful reconcile",
            ((f"time() - tokenfleet_control_loop_last_success_timestamp_seconds{{{sel}}}", "{{service}}"),),
            "s",
        ),
        Panel(
            "Rollout state",
            ((f"tokenfleet_control_rollout_state{{{sel}}} == 1", "{{service}}: {{state}}"),),
            kind="stat",
        ),
        Panel(
            "Per-revision attempts and first byte (rollout analysis, gateway)",
            (
                (
                    f"sum by (revision, outcome) (rate(tokenfleet_gateway_revision_attempts_total[{RATE}]))",
                    "{{revision}} {{outcome}}",
                ),
                (
                    "histogram_quantile(0.95, sum by (le, revision) "
                    f"(rate(tokenfleet_gateway_revision_first_byte_seconds_bucket[{RATE}])))",
                    "first byte p95 {{revision}}",
                ),
            ),
        ),
        Panel(
            "Rollout step and time since progress",
            (
                (f"tokenfleet_control_rollout_step{{{sel}}}", "step {{service}}"),
                (
                    f"time() - tokenfleet_control_rollout_last_progress_timestamp_seconds{{{sel}}}",
                    "s since progress {{service}}",
                ),
            ),
        ),
    ]
    return dashboard(
        "tokenfleet-control",
        "tokenfleet / Control loop",
        panels,
        [_query_var("service", "label_values(tokenfleet_control_desired_replicas, service)")],
    )


DASHBOARDS = {"fleet": fleet, "replica": replica, "scheduler": scheduler, "control-loop": control_loop}


def render_all() -> dict[str, str]:
    """file name -> JSON text."""
    return {f"{name}.json": json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def write_all(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render_all().items():
        path = out_dir / name
        path.write_text(text)
        paths.append(path)
    return paths


def expressions(document: dict[str, Any]) -> list[str]:
    """Every PromQL string in a dashboard (panel targets and query variables)."""
    exprs = [t["expr"] for p in document["panels"] for t in p.get("targets", [])]
    for var in document["templating"]["list"]:
        if var.get("type") == "query":
            query = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
            # label_values(metric, label) names a metric too.
            exprs.append(query.removeprefix("label_values(").split(",")[0])
    return exprs


if __name__ == "__main__":
    for written in write_all():
        print(written)
