"""The metric catalogue: every series tokenfleet exposes, next to the vLLM series it relies on.

This module is the single source of truth. `observability/metrics.md` is rendered from it
(`python -m tokenfleet.observability.catalogue > observability/metrics.md`, checked by a test),
dashboards and alert rules are checked against it, and the gateway's and scheduler's real
registries are checked against it, so a renamed metric fails a test instead of silently
emptying a panel.

Conventions (Prometheus naming): `tokenfleet_<component>_<what>_<unit>`; base units (seconds,
bytes, ratios 0..1); counters end in `_total` as exposed; no request ids, prompts, users or URLs
in labels — every label below has a bounded value set, written in `LABELS`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]
Source = Literal["gateway", "scheduler", "control_loop", "vllm"]

# Every label any catalogued metric carries, with why its value set is bounded.
LABELS: dict[str, str] = {
    "route": "fixed set of gateway routes (/v1/completions, /v1/chat/completions, /v1/models, ...)",
    "class": "SLO class names from the spec (a handful)",
    "slo_class": "SLO class names from the spec (a handful)",
    "tenant": "tenant names from the spec; unknown keys are refused before any metric",
    "code": "status class: 2xx, 4xx, 5xx",
    "replica": "replica slot id, at most spec.replicas.max",
    "revision": "spec revision hash: the stable one, plus the target during a rollout",
    "outcome": (
        "ok | connect | timeout | status_5xx, ok | error per revision (gateway); "
        "met | missed (scheduler); ok | error (loop)"
    ),
    "kind": "small fixed enum (error kind, token kind)",
    "reason": "small fixed enum (rejection / scale / replacement reason)",
    "target": "ttft | tpot",
    "service": "LLMService names (one per deployed service)",
    "direction": "up | down | hold",
    "state": "rollout state enum: idle | progressing | paused | complete | failed | rolled_back",
    "model_name": "served model name (vLLM)",
    "engine": "engine core index inside one vLLM server (vLLM)",
    "finished_reason": "stop | length | abort | error (vLLM)",
}


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric family as PromQL sees it (counters carry their `_total`)."""

    name: str
    kind: Kind
    source: Source
    labels: tuple[str, ...]
    help: str
    unit: str = ""

    @property
    def family(self) -> str:
        """The name prometheus_client registers (counters without `_total`)."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name

    def series(self) -> tuple[str, ...]:
        """Sample names a scrape shows for this family (what PromQL may reference)."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


def _m(name: str, kind: Kind, source: Source, labels: Iterable[str], help_: str, unit: str = "") -> Metric:
    return Metric(name, kind, source, tuple(labels), help_, unit)


GW: Source = "gateway"
SCHED: Source = "scheduler"
LOOP: Source = "control_loop"
VLLM: Source = "vllm"
V_LABELS = ("model_name", "engine")

CATALOGUE: tuple[Metric, ...] = (
    # -- gateway (engine/gateway/metrics.py) ----------------------------------------------------
    _m(
        "tokenfleet_gateway_requests_total",
        "counter",
        GW,
        ("route", "class", "tenant", "code"),
        "Requests answered by the gateway.",
    ),
    _m(
        "tokenfleet_gateway_upstream_requests_total",
        "counter",
        GW,
        ("replica", "route", "outcome"),
        "Attempts sent to a replica (a retried request counts once per attempt).",
    ),
    _m(
        "tokenfleet_gateway_errors_total",
        "counter",
        GW,
        ("replica", "route", "kind"),
        "Upstream failures by kind (connect, timeout, status_5xx, mid_stream).",
    ),
    _m("tokenfleet_gateway_retries_total", "counter", GW, ("route",), "Requests retried on another replica."),
    _m(
        "tokenfleet_gateway_ejections_total",
        "counter",
        GW,
        ("replica",),
        "Replicas ejected by the circuit breaker.",
    ),
    _m(
        "tokenfleet_gateway_readmissions_total",
        "counter",
        GW,
        ("replica",),
        "Ejected replicas admitted again.",
    ),
    _m(
        "tokenfleet_gateway_rejected_total",
        "counter",
        GW,
        ("reason", "class", "tenant"),
        "Requests refused at the edge (auth, rate_limit, unavailable, upstream, invalid).",
    ),
    _m("tokenfleet_gateway_in_flight", "gauge", GW, ("replica",), "Requests in flight per replica."),
    _m("tokenfleet_gateway_queued", "gauge", GW, ("class",), "Requests waiting at the gateway per class."),
    _m(
        "tokenfleet_gateway_replica_routable",
        "gauge",
        GW,
        ("replica",),
        "1 if the replica receives traffic (breaker closed), else 0.",
    ),
    _m(
        "tokenfleet_gateway_request_duration_seconds",
        "histogram",
        GW,
        ("route", "class"),
        "Time from request to the last byte, per route and class.",
        "seconds",
    ),
    _m(
        "tokenfleet_gateway_first_byte_seconds",
        "histogram",
        GW,
        ("route", "class", "replica"),
        "Time from request to the first byte from the chosen replica (TTFT for streams).",
        "seconds",
    ),
    _m(
        "tokenfleet_gateway_revision_attempts_total",
        "counter",
        GW,
        ("revision", "outcome"),
        "Attempts sent to each revision, by outcome (ok, refused: 4xx, error): rollout analysis.",
    ),
    _m(
        "tokenfleet_gateway_revision_first_byte_seconds",
        "histogram",
        GW,
        ("revision",),
        "Time to first byte of each revision's successful attempts (TTFT for streams).",
        "seconds",
    ),
    # -- SLA scheduler, inside vLLM's engine core (engine/sla_metrics.py) -----------------------
    _m(
        "tokenfleet_scheduler_queue_depth",
        "gauge",
        SCHED,
        ("slo_class",),
        "Waiting requests per SLO class.",
    ),
    _m("tokenfleet_scheduler_running", "gauge", SCHED, ("slo_class",), "Running requests per SLO class."),
    _m(
        "tokenfleet_scheduler_wait_seconds",
        "histogram",
        SCHED,
        ("slo_class",),
        "Queue wait from arrival to first scheduling, per SLO class.",
        "seconds",
    ),
    _m(
        "tokenfleet_scheduler_max_wait_seconds",
        "gauge",
        SCHED,
        ("slo_class",),
        "Longest queue wait seen since start, per SLO class.",
        "seconds",
    ),
    _m(
        "tokenfleet_scheduler_slo_requests_total",
        "counter",
        SCHED,
        ("slo_class", "target", "outcome"),
        "Finished requests by SLO target (ttft, tpot) and outcome (met, missed): the SLI.",
    ),
    _m(
        "tokenfleet_scheduler_preemptions_total",
        "counter",
        SCHED,
        ("slo_class",),
        "Requests preempted by the SLA scheduler, per victim class.",
    ),
    _m(
        "tokenfleet_scheduler_overtakes_total",
        "counter",
        SCHED,
        ("slo_class",),
        "Requests admitted ahead of an older waiting request of a lower class (an order FCFS never takes).",
    ),
    _m(
        "tokenfleet_scheduler_rejections_total",
        "counter",
        SCHED,
        ("slo_class",),
        "Requests rejected by per-class admission control.",
    ),
    _m(
        "tokenfleet_scheduler_tenant_tokens_total",
        "counter",
        SCHED,
        ("tenant", "slo_class", "kind"),
        "Tokens served per tenant and class (kind = prompt | output): fair-share accounting.",
    ),
    _m(
        "tokenfleet_scheduler_schedule_seconds",
        "histogram",
        SCHED,
        (),
        "Wall time of one schedule() call (policy work plus vLLM's own).",
        "seconds",
    ),
    _m(
        "tokenfleet_scheduler_policy_seconds",
        "histogram",
        SCHED,
        (),
        "Wall time of the SLA policy's own work in one schedule() call (vLLM's excluded).",
        "seconds",
    ),
    # -- control loop (operator on a cluster, local loop in `tokenfleet up`) --------------------
    _m(
        "tokenfleet_control_desired_replicas",
        "gauge",
        LOOP,
        ("service",),
        "Replicas the autoscaler wants.",
    ),
    _m(
        "tokenfleet_control_ready_replicas",
        "gauge",
        LOOP,
        ("service",),
        "Replicas that passed readiness.",
    ),
    _m(
        "tokenfleet_control_scale_decisions_total",
        "counter",
        LOOP,
        ("service", "direction", "reason"),
        "Autoscaler decisions (hold included, so a stuck scaler is visible).",
    ),
    _m(
        "tokenfleet_control_replacements_total",
        "counter",
        LOOP,
        ("service", "reason"),
        "Replicas replaced by failover (crashed, unready, ejected).",
    ),
    _m(
        "tokenfleet_control_loop_iterations_total",
        "counter",
        LOOP,
        ("service", "outcome"),
        "Reconcile iterations by outcome (ok | error).",
    ),
    _m(
        "tokenfleet_control_loop_duration_seconds",
        "histogram",
        LOOP,
        ("service",),
        "Wall time of one reconcile iteration.",
        "seconds",
    ),
    _m(
        "tokenfleet_control_loop_last_success_timestamp_seconds",
        "gauge",
        LOOP,
        ("service",),
        "Unix time of the last successful reconcile.",
        "seconds",
    ),
    _m(
        "tokenfleet_control_rollout_state",
        "gauge",
        LOOP,
        ("service", "state"),
        "1 for the rollout's current state, 0 for the others.",
    ),
    _m(
        "tokenfleet_control_rollout_step",
        "gauge",
        LOOP,
        ("service",),
        "Index of the current rollout step (canary weight step or surge batch).",
    ),
    _m(
        "tokenfleet_control_rollout_last_progress_timestamp_seconds",
        "gauge",
        LOOP,
        ("service",),
        "Unix time the rollout last advanced a step.",
        "seconds",
    ),
    # -- vLLM (v1 engine, vllm/v1/metrics/loggers.py), the series tokenfleet relies on -----------
    _m(
        "vllm:num_requests_running",
        "gauge",
        VLLM,
        V_LABELS,
        "Requests in model execution batches (concurrency).",
    ),
    _m(
        "vllm:num_requests_waiting",
        "gauge",
        VLLM,
        V_LABELS,
        "Requests waiting: the default scale and saturation signal.",
    ),
    _m(
        "vllm:kv_cache_usage_perc",
        "gauge",
        VLLM,
        V_LABELS,
        "KV-cache use, 0..1 despite the name (v1; v0 called it gpu_cache_usage_perc).",
        "ratio",
    ),
    _m(
        "vllm:num_preemptions_total",
        "counter",
        VLLM,
        V_LABELS,
        "Preemptions: KV pressure.",
    ),
    _m(
        "vllm:prompt_tokens_total",
        "counter",
        VLLM,
        V_LABELS,
        "Prefill tokens processed.",
    ),
    _m(
        "vllm:generation_tokens_total",
        "counter",
        VLLM,
        V_LABELS,
        "Generated tokens.",
    ),
    _m(
        "vllm:request_success_total",
        "counter",
        VLLM,
        (*V_LABELS, "finished_reason"),
        "Finished requests by reason; idleness for scale to zero.",
    ),
    _m(
        "vllm:prefix_cache_queries_total",
        "counter",
        VLLM,
        V_LABELS,
        "Prefix-cache lookups, in tokens.",
    ),
    _m(
        "vllm:prefix_cache_hits_total",
        "counter",
        VLLM,
        V_LABELS,
        "Prefix-cache hits, in tokens; hits/queries proves affinity routing works.",
    ),
    _m(
        "vllm:time_to_first_token_seconds",
        "histogram",
        VLLM,
        V_LABELS,
        "Time to first token, engine side.",
        "seconds",
    ),
    _m(
        "vllm:inter_token_latency_seconds",
        "histogram",
        VLLM,
        V_LABELS,
        "Gap between consecutive output tokens.",
        "seconds",
    ),
    _m(
        "vllm:request_time_per_output_token_seconds",
        "histogram",
        VLLM,
        V_LABELS,
        "Per-request mean time per output token (TPOT).",
        "seconds",
    ),
    _m(
        "vllm:e2e_request_latency_seconds",
        "histogram",
        VLLM,
        V_LABELS,
        "End-to-end request latency, engine side.",
        "seconds",
    ),
    _m(
        "vllm:request_queue_time_seconds",
        "histogram",
        VLLM,
        V_LABELS,
        "Time a request spent in vLLM's waiting queue.",
        "seconds",
    ),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in CATALOGUE}
# Names vLLM used before v1; a query with one of these is a bug on the pinned build.
VLLM_RENAMED: dict[str, str] = {
    "vllm:gpu_cache_usage_perc": "vllm:kv_cache_usage_perc",
    "vllm:cpu_cache_usage_perc": "vllm:kv_cache_usage_perc",
    "vllm:gpu_prefix_cache_hit_rate": "vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total",
    "vllm:time_per_output_token_seconds": "vllm:request_time_per_output_token_seconds",
}


def series_index() -> dict[str, Metric]:
    """Every referencable sample name (histogram `_bucket`/`_sum`/`_count` too) → its family."""
    return {s: m for m in CATALOGUE for s in m.series()}


def by_source(source: Source) -> list[Metric]:
    return [m for m in CATALOGUE if m.source == source]


# -- PromQL name extraction ----------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE)
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on", "ignoring"}
)
_GRAFANA_VAR = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}?")


def referenced_metrics(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and ranges removed).

    Not a full parser: enough for the rule and dashboard subset, and it errs towards reporting a
    name, so a typo cannot slip past the catalogue test.
    """
    text = _GRAFANA_VAR.sub("5m", expr)
    text = _STRING.sub('""', text)
    text = _BRACES.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        after = text[match.end() :].lstrip()
        word = match.group(0)
        if after.startswith("(") or word.lower() in _KEYWORDS:
            continue  # a function or aggregation call, or an operator keyword
        before = text[: match.start()].rstrip()
        if before.endswith(".") or (before and before[-1].isdigit()):
            continue  # part of a number such as 1e3 or 0.5
        if re.fullmatch(r"\d*[smhdwy]", word):
            continue
        names.add(word)
    return names


# -- Markdown rendering ---------------------------------------------------------------------------

_TITLES: dict[Source, str] = {
    "gateway": "Gateway (`engine/gateway/metrics.py`, served on the gateway's `/metrics`)",
    "scheduler": "SLA scheduler (`engine/sla_metrics.py`, on the engine's `/metrics` via multiprocess mode)",
    "control_loop": "Control loop (`observability/control_metrics.py`; operator or `tokenfleet up`)",
    "vllm": "vLLM engine series relied on (v1 engine, `vllm/v1/metrics/loggers.py`, vLLM 0.32)",
}


def render_markdown() -> str:
    lines = [
        "# Metric catalogue",
        "",
        "Generated from `observability/catalogue.py` — edit that, then run",
        "`python -m tokenfleet.observability.catalogue > observability/metrics.md`.",
        "",
        "Naming: `tokenfleet_<component>_<what>_<unit>`, base units (seconds, ratios 0..1), counters",
        "end in `_total`. Label values come from bounded sets only (see *Labels*); request ids,",
        "prompts, users and URLs never become labels (they belong in traces and logs).",
        "",
    ]
    for source, title in _TITLES.items():
        lines += [f"## {title}", "", "| Metric | Type | Labels | Meaning |", "|---|---|---|---|"]
        for m in by_source(source):
            labels = ", ".join(f"`{label}`" for label in m.labels) or "—"
            lines.append(f"| `{m.name}` | {m.kind} | {labels} | {m.help} |")
        lines.append("")
    lines += [
        "## Renamed vLLM series (do not use)",
        "",
        "| Old (v0) | Use instead |",
        "|---|---|",
    ]
    lines += [f"| `{old}` | `{new}` |" for old, new in VLLM_RENAMED.items()]
    lines += ["", "## Labels", "", "| Label | Value set |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in LABELS.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
