"""`tokenfleet bench scheduler`: FCFS vs vLLM `priority` vs tokenfleet `sla`, side by side.

One real vLLM CPU engine per policy (same spec otherwise, `max_num_seqs` small enough to bind),
λ_sat calibrated with FCFS (closed loop at 2 × max_num_seqs users), then open-loop Poisson
traffic at multiples of λ_sat (`0.8x`, `1.2x`, …), a burst profile (0.7 → 1.5 → 0.5 × λ_sat) and
two scenarios where a priority queue is known to fail (`SCENARIOS`): `starvation` (the top class
alone at 1.1 × λ_sat beside a trickle of batch work) and `noisy` (one tenant sending 5× its share
of a class beside a modest victim), several seeds each.

The engine, not the front end, must be what saturates, or the policies are not what is compared:
each engine's processes share the cores vLLM binds its worker to, and vLLM's API server and the
load generator get the cores vLLM reserves for them (`cpu_partition`); answers stream in chunks
(`STREAM_INTERVAL`) so the API server's per-token work stays small. The calibration records how
full the engine's slots were (`mean_running`) and says whether λ_sat is the engine's.

Every run goes through the load harness (`load/bench.py::run_workload`, Locust in a subprocess;
this process only waits meanwhile) as a Workload (`bench_workload`): token-id prompts of exact
per-class lengths, per-class output lengths, tenants' shares with a noisy tenant bursting on the
standard and batch classes, sent straight to the engine (class and tenant in `priority` and
`vllm_xargs`, as the gateway sets them). The figures are computed from the run's harness
directory (`runs/<policy>-<profile>-<seed>/`: `requests.jsonl` of RequestRecords, the summary,
report and plots) and the engine's /metrics before and after it, which `--render` recomputes them
from. Results of the earlier, self-driven version of this bench (its own outcome logs in `raw/`)
still render from scheduler.json, but cannot be recomputed.

Pure parts (workloads, metrics over records) are functions over typed data, tested on their own;
the tables, target checks and plots are `load/scheduler_report.py`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from tokenfleet.engine.launch import TIMED_SCHEDULER_CLS, EngineCommand
from tokenfleet.engine.sla_policy import wait_bound_s
from tokenfleet.load.record import RequestRecord, read_records
from tokenfleet.load.report import meets_slo
from tokenfleet.load.scrape import QUEUE, RUNNING, first_of, read_samples
from tokenfleet.load.stats import describe
from tokenfleet.load.workload import (
    Arrival,
    ClassMix,
    ConstantShape,
    Step,
    StepShape,
    TenantBurst,
    TenantMix,
    TokenIds,
    Uniform,
    Workload,
)
from tokenfleet.observability import promtext

TENANTS = ("noisy", "t2", "t3", "t4")
NOISY = TENANTS[0]
# Shares of standard + batch traffic. The noisy neighbour sends its share in on/off bursts (twice
# its mean rate while on); t2 is a heavy steady tenant, so that under overload more than one
# tenant is backlogged and fair share has something to divide; t3 and t4 are light.
TENANT_SHARES = {"noisy": 0.4, "t2": 0.35, "t3": 0.125, "t4": 0.125}
NOISY_PERIOD_S = 20.0  # on for the first half of every period, off for the second
BURST_PHASES = ((1 / 3, 0.7), (1 / 3, 1.5), (1 / 3, 0.5))  # (fraction of the run, × λ_sat)
# Fairness windows: several batch requests' service times long, so that one request's worth of
# service is not a large share of a window; the short one is reported too.
FAIRNESS_WINDOW_S = 10.0
FAIRNESS_SHORT_WINDOW_S = 5.0
SCHEDULE_METRIC = "tokenfleet_scheduler_schedule_seconds"
POLICY_METRIC = "tokenfleet_scheduler_policy_seconds"
WAIT_METRIC = "tokenfleet_scheduler_wait_seconds"
# Open-loop users, so the most requests in flight: above the backlog an overloaded baseline (no
# queue limits) builds in a run, so that a late send means the load generator stalled.
MAX_IN_FLIGHT = 512
REQUEST_TIMEOUT_S = 300.0
# The harness's /metrics scrape costs the engine's API server CPU on a 2-core machine; the
# bench needs only the samples before and after a run, so the timeline is kept coarse.
SCRAPE_INTERVAL_S = 5.0
METRICS_BEFORE, METRICS_AFTER = "engine-metrics-before.prom", "engine-metrics-after.prom"
# vLLM sends the first token at once and then every this many: the API server's per-token work
# (detokenise, one SSE event) would otherwise compete with the engine on a 2-core machine.
STREAM_INTERVAL = 16
RUNNING_TIME = "vllm:request_inference_time_seconds_sum"  # Σ seconds requests spent running
# The calibration measured the engine's capacity only if its slots were this full on average.
ENGINE_BOUND_FRACTION = 0.85


@dataclass(frozen=True, slots=True)
class ClassLoad:
    name: str
    priority: int
    share: float
    prompt: tuple[int, int]  # uniform token range
    output: tuple[int, int]
    ttft_s: float | None
    tpot_s: float | None
    max_wait_s: float
    queue_limit: int | None
    # The engine class asked for, when the load's class is not one: its own TTFT target then
    # travels with each request as the request's deadline.
    server_class: str | None = None


# Scaled to the CPU build: interactive short, batch long outputs and no TTFT target. Answers are
# long enough that an engine's few slots, not the per-request work of its API server, bind.
# Queue limits hold what a class receives within its maxWaitS at the sweep's top level (batch:
# 0.4 × 1.4 × λ_sat × 20 s ≈ 53 at λ_sat 4.7): a smaller queue refuses work before aging can act.
DEFAULT_CLASSES = (
    ClassLoad("interactive", 0, 0.3, (16, 48), (8, 24), 1.0, 0.25, 5.0, 64),
    ClassLoad("standard", 1, 0.3, (64, 160), (150, 250), 4.0, 0.5, 30.0, 64),
    ClassLoad("batch", 2, 0.4, (64, 128), (400, 600), None, None, 20.0, 64),
)
INTERACTIVE, STANDARD, BATCH = DEFAULT_CLASSES
MAX_MODEL_LEN = 1024  # the longest prompt + answer above, with room
SCENARIOS = ("starvation", "noisy", "deadlines")
# The scenarios, then the SLO-capacity sweep over load levels of the standard mix: from where
# FCFS still holds to past where priority starves batch (`burst` and other levels on request).
DEFAULT_PROFILES = (*SCENARIOS, "0.4x", "0.8x", "1.2x", "1.4x")
# starvation: the top class alone slightly over capacity, with answers as long as the mix's mean
# (so 1.1 × λ_sat of the mix is ~1.1 × this traffic's capacity), and a trickle of batch work.
STARVATION_LOAD = 1.1
# A queue that grows by a tenth of the rate needs a while to stay non-empty: twice the others' window.
STARVATION_DURATION_FACTOR = 2.0
STARVATION_CLASSES = (
    replace(INTERACTIVE, share=0.95, output=(200, 330)),
    replace(BATCH, share=0.05, output=(100, 200)),
)
# noisy: two tenants of equal weight in one class; the noisy one sends 5× its share of λ_sat.
NOISY_LOAD, VICTIM_LOAD = 2.5, 0.2
VICTIM = "victim"
# deadlines: two kinds of request in the top class, one tenant, one priority level: chat answers
# due in 0.5 s, agent steps in 2 s. A priority queue serves them in arrival order; the SLA
# scheduler by deadline slack. Answers average the mix's mean, at 0.9 × λ_sat: queues form.
DEADLINES_LOAD = 0.9
DEADLINE_CLASSES = (
    replace(
        INTERACTIVE, name="chat", share=0.5, output=(150, 250), ttft_s=0.5, server_class=INTERACTIVE.name
    ),
    replace(
        INTERACTIVE, name="agent", share=0.5, output=(250, 410), ttft_s=2.0, server_class=INTERACTIVE.name
    ),
)
# Every class a report may show, in the order it shows them.
REPORT_CLASSES = (INTERACTIVE, *DEADLINE_CLASSES, STANDARD, BATCH)


# -- workloads ---------------------------------------------------------------------------------


def cpu_partition(worker_cpus: set[int], all_cpus: set[int]) -> tuple[set[int], set[int]] | None:
    """(the engine's cores, the front end's cores): the engine's other processes join the cores
    vLLM bound its worker to, everything else gets the rest. None when vLLM reserved no core."""
    front = all_cpus - worker_cpus
    if not worker_cpus or not front:
        return None
    return set(worker_cpus), front


def profile_shape(profile: str, lam: float, duration_s: float) -> ConstantShape | StepShape:
    """Arrival rate over the run: `<f>x` is f × λ_sat throughout, `burst` the three phases."""
    if profile == "burst":
        steps = [
            Step(value=level * lam, duration_s=fraction * duration_s) for fraction, level in BURST_PHASES
        ]
        return StepShape(kind="step", steps=steps)
    if profile.endswith("x"):
        return ConstantShape(kind="constant", value=float(profile[:-1]) * lam)
    raise ValueError(f"unknown profile {profile!r}")


def _uniform(bounds: tuple[int, int]) -> Uniform:
    return Uniform(dist="uniform", min=bounds[0], max=bounds[1])


def class_mix(cls: ClassLoad) -> ClassMix:
    return ClassMix(
        name=cls.name,
        share=cls.share,
        priority=cls.priority,
        ttft_ms=None if cls.ttft_s is None else 1000 * cls.ttft_s,
        tpot_ms=None if cls.tpot_s is None else 1000 * cls.tpot_s,
        input_tokens=_uniform(cls.prompt),
        output_tokens=_uniform(cls.output),
        server_class=cls.server_class,
    )


def bench_tenants(classes: Sequence[ClassLoad] = DEFAULT_CLASSES) -> list[TenantMix]:
    """The noisy tenant bursts in the classes below the top one (its mean share kept, sent while
    on, adding to the others' load); the others send every class, steadily."""
    noisy_burst = TenantBurst(on_s=NOISY_PERIOD_S / 2, off_s=NOISY_PERIOD_S / 2, mode="add")
    background = [c.name for c in classes[1:]]
    return [
        TenantMix(name=name, share=share, burst=noisy_burst, classes=background)
        if name == NOISY
        else TenantMix(name=name, share=share)
        for name, share in TENANT_SHARES.items()
    ]


def bench_workload(
    shape: ConstantShape | StepShape,
    seed: int,
    *,
    closed: bool = False,
    classes: Sequence[ClassLoad] = DEFAULT_CLASSES,
    tenants: list[TenantMix] | None = None,
) -> Workload:
    """One run's traffic: open loop at `shape`'s rate, or closed loop with `shape`'s users."""
    return Workload(
        name="scheduler-bench",
        seed=seed,
        timeout_s=REQUEST_TIMEOUT_S,
        # Token ids: exact prompt lengths, which the scheduler's costs (prefill, VTC) count. Every
        # class has its own lengths; the workload's are only the fallback the model requires.
        prompts=TokenIds(kind="tokenIds", input_tokens=_uniform(classes[0].prompt)),
        arrival=Arrival(mode="closed" if closed else "open", max_concurrency=MAX_IN_FLIGHT, shape=shape),
        classes=[class_mix(c) for c in classes],
        tenants=bench_tenants(classes) if tenants is None else tenants,
    )


def profile_classes(profile: str) -> tuple[ClassLoad, ...]:
    """The classes a profile's traffic comes in (what its runs are summarised by)."""
    if profile == "starvation":
        return STARVATION_CLASSES
    if profile == "noisy":
        return (replace(STANDARD, share=1.0),)
    if profile == "deadlines":
        return DEADLINE_CLASSES
    return DEFAULT_CLASSES


def profile_duration(profile: str, duration_s: float) -> float:
    """Seconds of arrivals in one run of `profile`, given the bench's run length."""
    return duration_s * STARVATION_DURATION_FACTOR if profile == "starvation" else duration_s


def profile_workload(profile: str, lam: float, duration_s: float, seed: int) -> Workload:
    """A profile's whole workload: a load level of the standard mix, or a scenario's own mix."""
    constant = ConstantShape(kind="constant", value=0.0)
    classes = profile_classes(profile)
    if profile == "deadlines":
        shape = constant.model_copy(update={"value": DEADLINES_LOAD * lam})
        return bench_workload(shape, seed, classes=classes, tenants=[TenantMix(name="t2")])
    if profile == "starvation":
        shape = constant.model_copy(update={"value": STARVATION_LOAD * lam})
        return bench_workload(shape, seed, classes=classes, tenants=[TenantMix(name="t2")])
    if profile == "noisy":
        # Shares of the one class's traffic: the noisy tenant's 5× its half of λ_sat, the victim's
        # modest Poisson rate; equal weights, so a fair scheduler owes the victim half the engine.
        shape = constant.model_copy(update={"value": (NOISY_LOAD + VICTIM_LOAD) * lam})
        tenants = [TenantMix(name=NOISY, share=NOISY_LOAD), TenantMix(name=VICTIM, share=VICTIM_LOAD)]
        return bench_workload(shape, seed, classes=classes, tenants=tenants)
    return bench_workload(profile_shape(profile, lam, duration_s), seed)


# -- metrics over the harness's records --------------------------------------------------------


def jain(values: Sequence[float]) -> float | None:
    """(Σx)² / (n·Σx²): 1 when equal, 1/n when one gets everything."""
    if not values:
        return None
    squares = sum(v * v for v in values)
    if squares == 0:
        return 1.0
    return sum(values) ** 2 / (len(values) * squares)


def wait_s(record: RequestRecord) -> float:
    """How long a request went without a token: until its first, else until it ended (answered
    without content, failed, or cut off unfinished at the end of the run)."""
    return record.ttft_s if record.ttft_s is not None else (record.e2e_s or 0.0)


def class_report(records: Sequence[RequestRecord], cls: ClassMix) -> dict[str, Any]:
    """SLO attainment counts every request of the class: rejected, failed or unfinished = missed.
    Max wait is the longest time an admitted request went without its first token."""
    mine = [r for r in records if r.cls == cls.name]
    served = [r for r in mine if r.ok]
    ttft = describe([r.ttft_s for r in served if r.ttft_s is not None])
    tpot = describe([t for r in served if (t := r.tpot_s) is not None])
    waits = [wait_s(r) for r in mine if not r.rejected]
    return {
        "requests": len(mine),
        "served": len(served),
        "rejected": sum(r.rejected for r in mine),
        "unfinished": sum(1 for r in mine if not r.ok and not r.rejected),
        "slo_attainment": (sum(meets_slo(r, cls) for r in mine) / len(mine)) if mine else None,
        "ttft_p50": ttft["p50"],
        "ttft_p99": ttft["p99"],
        "tpot_p50": tpot["p50"],
        "tpot_p99": tpot["p99"],
        "max_wait": max(waits) if waits else None,
        "wait_p99": describe(waits)["p99"],
    }


def tenant_report(records: Sequence[RequestRecord], cls: ClassMix) -> dict[str, dict[str, Any]]:
    """Per tenant, its requests of class `cls`: SLO attainment and TTFT percentiles (a noisy
    neighbour's victim is judged by its own figures, not the class's)."""
    mine = [r for r in records if r.cls == cls.name]
    out: dict[str, dict[str, Any]] = {}
    for tenant in sorted({r.tenant for r in mine}):
        theirs = [r for r in mine if r.tenant == tenant]
        ttft = describe([r.ttft_s for r in theirs if r.ok and r.ttft_s is not None])
        out[tenant] = {
            "requests": len(theirs),
            "rejected": sum(r.rejected for r in theirs),
            "slo_attainment": sum(meets_slo(r, cls) for r in theirs) / len(theirs),
            "ttft_p50": ttft["p50"],
            "ttft_p99": ttft["p99"],
        }
    return out


def waiting_intervals(records: Sequence[RequestRecord], start: float) -> dict[str, list[tuple[float, float]]]:
    """Per tenant, the merged intervals (seconds since `start`) during which it had a request
    waiting for its first token; rejected requests never wait."""
    raw: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if not r.rejected:
            sent = r.send - start
            raw.setdefault(r.tenant, []).append((sent, sent + wait_s(r)))
    merged: dict[str, list[tuple[float, float]]] = {}
    for tenant, spans in raw.items():
        out: list[tuple[float, float]] = []
        for a, b in sorted(spans):
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
        merged[tenant] = out
    return merged


def covers(spans: Sequence[tuple[float, float]], start: float, stop: float) -> bool:
    """Do the merged, sorted `spans` cover [start, stop) entirely?"""
    return any(a <= start and b >= stop for a, b in spans)


def output_tokens_between(record: RequestRecord, start: float, lo: float, hi: float) -> float:
    """Output tokens streamed in [lo, hi) (seconds since `start`): the answer's tokens spread
    evenly over its content chunks, since a chunk may carry several."""
    chunks = [record.send - start + c for c in record.chunk_s]
    if not chunks:
        return 0.0
    per_chunk = (record.output_tokens or len(chunks)) / len(chunks)
    return per_chunk * sum(1 for c in chunks if lo <= c < hi)


def fairness(
    records: Sequence[RequestRecord], start: float, end_s: float, window_s: float = FAIRNESS_WINDOW_S
) -> float | None:
    """Mean, over (class, window) pairs, of Jain's index of weighted service in that class (1·prompt
    + 2·output tokens, VTC's cost) among the tenants backlogged in that class throughout the
    window — a request of theirs in the class was waiting for its first token at every instant
    of it — over the pairs with at least two such tenants. Windows tile [0, end_s) from `start`.

    Per class because fair share is promised inside a class (classes are strictly ordered, and a
    tenant's traffic in a class that is not backlogged is served in full whatever its volume). A
    tenant that is not backlogged got all it asked for; fairness is about dividing what the
    backlogged ones could not all get (Jain's index over allocations normalised by the max-min
    fair share reduces to this). None when no pair had two backlogged tenants.
    """
    indices: list[float] = []
    for slo_class in dict.fromkeys(r.cls for r in records):
        mine = [r for r in records if r.cls == slo_class]
        waiting = waiting_intervals(mine, start)
        lo = 0.0
        while lo + window_s <= end_s + 1e-9:
            hi = lo + window_s
            backlogged = {t for t, spans in waiting.items() if covers(spans, lo, hi)}
            if len(backlogged) >= 2:
                service = dict.fromkeys(backlogged, 0.0)
                for r in mine:
                    if r.tenant not in service:
                        continue
                    if r.ttft_s is not None and lo <= r.send - start + r.ttft_s < hi:
                        service[r.tenant] += r.prompt_tokens or 0
                    service[r.tenant] += 2 * output_tokens_between(r, start, lo, hi)
                value = jain(list(service.values()))
                if value is not None:
                    indices.append(value)
            lo = hi
    return sum(indices) / len(indices) if indices else None


def served_until_s(records: Sequence[RequestRecord], start: float, duration_s: float) -> float:
    """Seconds from the start until the last token streamed, at least the arrival window: what
    rates are taken over (a policy that defers batch work still serves it, later, and a window
    cut would count that as lost)."""
    return max([duration_s, *(r.send - start + r.chunk_s[-1] for r in records if r.chunk_s)])


def throughput(records: Sequence[RequestRecord], start: float, duration_s: float) -> dict[str, float]:
    """Output tokens and completed requests per second over `served_until_s`."""
    tokens = sum(r.output_tokens if r.ok and r.output_tokens is not None else len(r.chunk_s) for r in records)
    done = sum(r.ok for r in records)
    end = served_until_s(records, start, duration_s)
    return {"output_tok_per_s": tokens / end, "req_per_s": done / end}


def driver_lag_s(records: Sequence[RequestRecord]) -> float:
    """How late the open loop sent its most delayed request: a stalled generator is not open loop."""
    return max((q for r in records if (q := r.queue_s) is not None), default=0.0)


def longest_service_s(records: Sequence[RequestRecord]) -> float | None:
    """T_max of the wait bound, as measured: the longest first token → last token of the run."""
    spans = [r.e2e_s - r.ttft_s for r in records if r.ok and r.e2e_s is not None and r.ttft_s is not None]
    return max(spans) if spans else None


def stated_wait_bounds(classes: Sequence[ClassLoad], slots: int, t_max_s: float) -> dict[str, float] | None:
    """ADR 0004's bound per class, W ≤ maxWait + ⌈(Q + 1) / S⌉ · T_max with Q = Σ queueLimit − 1;
    None if some class has no queue limit (then Q, and the bound, are unbounded)."""
    limits = [c.queue_limit for c in classes]
    if any(limit is None for limit in limits):
        return None
    ahead = sum(limit for limit in limits if limit is not None) - 1
    return {c.name: wait_bound_s(c.max_wait_s, ahead, slots, t_max_s) for c in classes}


# -- the engine's own metrics (/metrics text before and after a run) --------------------------


def counter_delta(before: str, after: str, name: str) -> float:
    """A series' change over the run, summed over its label sets."""
    return promtext.value(after, name) - promtext.value(before, name)


def histogram_upper(before: str, after: str, metric: str, q: float = 0.99, **where: str) -> float | None:
    """Upper bound on quantile q over the run: the first bucket (delta) holding q of the count,
    over the samples whose labels include `where`; q = 1 gives a bound on the max."""
    old = promtext.by_label(before, f"{metric}_bucket", "le", **where)
    new = promtext.by_label(after, f"{metric}_bucket", "le", **where)
    buckets = sorted((float(le), count - old.get(le, 0.0)) for le, count in new.items())
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    return next(upper for upper, count in buckets if count >= q * total - 1e-9)


def histogram_mean(before: str, after: str, metric: str) -> float | None:
    """Mean of a histogram's observations over the run (Δsum / Δcount)."""
    count = counter_delta(before, after, f"{metric}_count")
    return counter_delta(before, after, f"{metric}_sum") / count if count > 0 else None


@dataclass(frozen=True)
class RunData:
    """What one run left in its harness directory: everything its figures are computed from."""

    records: list[RequestRecord]
    start: float  # Unix time the load started
    before: str  # the engine's /metrics text before and after the run
    after: str
    # The harness's scrapes of the engine during the run: (Unix time, running, waiting).
    queue_samples: list[tuple[float, float, float]] = field(default_factory=list)


def read_run(run_dir: Path) -> RunData | None:
    """A run directory written by `run_one`; None when its files are missing."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        before, after = (run_dir / METRICS_BEFORE).read_text(), (run_dir / METRICS_AFTER).read_text()
    except (OSError, ValueError):
        return None
    records = list(read_records([run_dir / "requests.jsonl"]))
    queue_samples = [
        (t, running, waiting)
        for t, sample in read_samples(run_dir / "server_metrics.jsonl")
        if (running := first_of(sample, RUNNING)) is not None
        and (waiting := first_of(sample, QUEUE)) is not None
    ]
    return RunData(records, float(summary["run"]["window_start"]), before, after, queue_samples)


def engine_occupancy(
    samples: Sequence[tuple[float, float, float]], start: float, duration_s: float
) -> tuple[float, float] | None:
    """Mean (running, waiting) over the engine's gauges sampled while arrivals came: whether the
    engine, rather than the front end, was the bottleneck. (vLLM's running-time histogram would be
    exact, but a request the scheduler refused before running adds its age since boot to it.)"""
    inside = [(r, w) for t, r, w in samples if start <= t <= start + duration_s]
    if not inside:
        return None
    return sum(r for r, _ in inside) / len(inside), sum(w for _, w in inside) / len(inside)


def summarize_run(
    run: RunData, duration_s: float, slots: int, classes: Sequence[ClassLoad] = DEFAULT_CLASSES
) -> dict[str, Any]:
    """Every figure of one run (the results JSON's per-run entry, less its identity)."""
    records, before, after = run.records, run.before, run.after
    t_max = longest_service_s(records)
    end_s = served_until_s(records, run.start, duration_s)
    mixes = {c.name: class_mix(c) for c in classes}
    occupancy = engine_occupancy(run.queue_samples, run.start, duration_s)
    return {
        "classes": {name: class_report(records, mix) for name, mix in mixes.items()},
        # DistServe's goodput: requests that met every target of their class, per second.
        "goodput_req_per_s": sum(meets_slo(r, mixes.get(r.cls)) for r in records if r.cls in mixes) / end_s,
        "tenants": {name: tenant_report(records, mix) for name, mix in mixes.items()},
        "mean_running": occupancy[0] if occupancy else None,
        "mean_waiting": occupancy[1] if occupancy else None,
        "jain": fairness(records, run.start, duration_s),
        "jain_short": fairness(records, run.start, duration_s, FAIRNESS_SHORT_WINDOW_S),
        **throughput(records, run.start, duration_s),
        "preemptions": counter_delta(before, after, "vllm:num_preemptions_total"),
        "schedule_p99_le_s": histogram_upper(before, after, SCHEDULE_METRIC),
        "schedule_mean_s": histogram_mean(before, after, SCHEDULE_METRIC),
        "policy_p99_le_s": histogram_upper(before, after, POLICY_METRIC),
        "server_max_wait_le_s": {
            c.name: histogram_upper(before, after, WAIT_METRIC, 1.0, slo_class=c.name) for c in classes
        },
        "requests": len(records),
        "t_max_s": t_max,
        "wait_bounds": stated_wait_bounds(classes, slots, t_max) if t_max else None,
    }


# -- orchestration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    model_source: str = "builtin://tiny-code"
    max_num_seqs: int = 2
    duration_s: float = 30.0
    drain_s: float = 20.0
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    profiles: tuple[str, ...] = DEFAULT_PROFILES
    policies: tuple[str, ...] = ("fcfs", "priority", "sla")
    calibrate_s: float = 30.0
    lam: float | None = None  # skip calibration when given
    # A run whose load generator sent a request this late is rerun (up to max_attempts in all).
    max_driver_lag_s: float = 1.0
    max_attempts: int = 3


def service_spec(policy: str, config: BenchConfig) -> dict[str, Any]:
    classes = [
        {
            "name": c.name,
            "priority": c.priority,
            **({"ttftMs": c.ttft_s * 1000} if c.ttft_s is not None else {}),
            **({"tpotMs": c.tpot_s * 1000} if c.tpot_s is not None else {}),
            "maxWaitS": c.max_wait_s,
            **({"queueLimit": c.queue_limit} if c.queue_limit is not None else {}),
        }
        for c in DEFAULT_CLASSES
    ]
    return {
        "model": {"name": "bench", "source": config.model_source, "maxModelLen": MAX_MODEL_LEN},
        "engine": {"maxNumSeqs": config.max_num_seqs, "kvCacheGib": 1, "shutdownTimeoutS": 5},
        "scheduler": {
            "policy": policy,
            "classes": classes,
            "tenants": [{"name": t} for t in (*TENANTS, VICTIM)],
            "defaultClass": "standard",
        },
    }


def bench_command(policy: str, command: EngineCommand) -> EngineCommand:
    """Every policy streams in chunks (`STREAM_INTERVAL`); the baselines run vLLM's own scheduler
    with schedule() timed (`TimedScheduler`), so every policy reports its scheduling cost (`sla`
    already times itself). A spec's extraArgs may not set --scheduler-cls, so this is added to
    the command, for the benchmark only."""
    argv = [*command.argv, "--stream-interval", str(STREAM_INTERVAL)]
    if policy != "sla":
        argv += ["--scheduler-cls", TIMED_SCHEDULER_CLS]
    return replace(command, argv=argv)


def _descendants(pid: int) -> list[int]:  # pragma: no cover - engines
    """Every process below `pid` (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def _pin(pid: int, cpus: set[int]) -> None:  # pragma: no cover - engines
    """Every thread of `pid` onto `cpus` (a process's affinity is per thread on Linux)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def partition_engine_cpus(api_server_pid: int) -> str:  # pragma: no cover - engines
    """Apply `cpu_partition` to one engine and to this process (Locust, started later, inherits
    it); returns what was done, for the log."""
    children = _descendants(api_server_pid)
    workers = [c for c in children if Path(f"/proc/{c}/comm").read_text().startswith("VLLM::Worker")]
    if not workers:
        return "no worker process found; cores left as they are"
    split = cpu_partition(os.sched_getaffinity(workers[0]), set(range(os.cpu_count() or 1)))
    if split is None:
        return "vLLM reserved no core for the front end; cores left as they are"
    engine_cpus, front_cpus = split
    for child in children:
        _pin(child, engine_cpus)
    _pin(api_server_pid, front_cpus)
    _pin(os.getpid(), front_cpus)
    return f"engine on cores {sorted(engine_cpus)}, API server and load generator on {sorted(front_cpus)}"


def save_workload(workload: Workload, path: Path) -> None:
    """The workload file of a run, for `tokenfleet bench run --workload` against any server."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    document = workload.model_dump(mode="json", by_alias=True, exclude_none=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def run_one(
    url: str, workload: Workload, duration_s: float, drain_s: float, out: Path
) -> RunData:  # pragma: no cover - engines
    """One run through the load harness, with the engine's /metrics read before and after."""
    from tokenfleet.load.bench import run_workload

    before = httpx.get(f"{url}/metrics", timeout=10).text
    run_workload(workload, url, duration_s, out, stop_timeout_s=drain_s, scrape_interval_s=SCRAPE_INTERVAL_S)
    (out / METRICS_BEFORE).write_text(before)
    (out / METRICS_AFTER).write_text(httpx.get(f"{url}/metrics", timeout=10).text)
    run = read_run(out)
    if run is None:
        raise RuntimeError(f"{out}: the load harness left no results")
    return run


def closed_loop_rate(
    url: str, users: int, seconds: float, out: Path
) -> tuple[float, float]:  # pragma: no cover
    """Completed requests per second at `users` back-to-back users with the bench's class mix,
    and the engine's mean number of running requests meanwhile."""
    workload = bench_workload(ConstantShape(kind="constant", value=users), seed=0, closed=True)
    run = run_one(url, workload, seconds, 0.0, out)
    done = [r for r in run.records if r.ok and r.end is not None and r.end <= run.start + seconds]
    return len(done) / seconds, counter_delta(run.before, run.after, RUNNING_TIME) / seconds


def calibration_verdict(mean_running: float, slots: int) -> bool:
    """Was λ_sat the engine's capacity? Only if the engine's slots were (nearly) always full."""
    return mean_running >= ENGINE_BOUND_FRACTION * slots


def run_bench(
    config: BenchConfig, out_dir: Path, log: Callable[[str], None] = print
) -> dict[str, Any]:  # pragma: no cover - engines
    """All policies' engines up at once, runs interleaved (profile → seed → policy, the policy
    order rotating), so that drift in the machine's background load hits every policy alike."""
    from tokenfleet.engine.launch import EngineProcess, engine_command
    from tokenfleet.load.scheduler_report import run_line
    from tokenfleet.models import resolve_model
    from tokenfleet.spec import parse_service

    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": asdict(config), "runs": []}
    engines: dict[str, EngineProcess] = {}
    try:
        for policy in config.policies:
            service = parse_service(
                {
                    "apiVersion": "tokenfleet.dev/v1alpha1",
                    "kind": "LLMService",
                    "metadata": {"name": "bench"},
                    "spec": service_spec(policy, config),
                }
            )
            model_path = resolve_model(service.spec.model)
            port = _free_port()
            engine = EngineProcess(
                bench_command(policy, engine_command(service.spec, model_path, port=port)),
                port=port,
                log_path=out_dir / f"engine-{policy}.log",
            )
            engine.start()
            engines[policy] = engine
        for policy, engine in engines.items():
            log(f"[{policy}] engine ready after {engine.wait_ready(900):.0f}s more")
            if engine.process is not None:
                log(f"[{policy}] {partition_engine_cpus(engine.process.pid)}")
            closed_loop_rate(engine.url, 2, 5.0, out_dir / "warmup" / policy)
        lam = config.lam
        if lam is None:
            first = engines.get("fcfs") or next(iter(engines.values()))
            users = 2 * config.max_num_seqs
            lam, running = closed_loop_rate(first.url, users, config.calibrate_s, out_dir / "calibration")
            engine_bound = calibration_verdict(running, config.max_num_seqs)
            results["calibration"] = {"users": users, "mean_running": running, "engine_bound": engine_bound}
            log(
                f"λ_sat = {lam:.2f} req/s (FCFS, closed loop, {users} users; {running:.2f} of "
                f"{config.max_num_seqs} slots busy on average: "
                + (
                    "the engine's capacity)"
                    if engine_bound
                    else "NOT the engine's capacity: the front end binds)"
                )
            )
        results["lambda_sat"] = lam
        order = list(engines)
        for profile in config.profiles:
            for seed in config.seeds:
                duration_s = profile_duration(profile, config.duration_s)
                workload = profile_workload(profile, lam, duration_s, seed)
                if seed == config.seeds[0]:
                    save_workload(workload, out_dir / "workloads" / f"{profile}.yaml")
                order = order[1:] + order[:1]  # rotate: no policy always runs first or last
                for policy in order:
                    name = f"{policy}-{profile}-{seed}"
                    lags: list[float] = []
                    while True:
                        run = run_one(
                            engines[policy].url,
                            workload,
                            duration_s,
                            config.drain_s,
                            out_dir / "runs" / name,
                        )
                        lag = driver_lag_s(run.records)
                        if lag <= config.max_driver_lag_s or len(lags) + 1 >= config.max_attempts:
                            break
                        # The load generator itself stalled (not the engine): the requests were
                        # not sent on time, so the run does not measure the policy. Run it again.
                        lags.append(lag)
                        log(f"[{policy}] {profile} seed {seed}: driver lagged {lag:.1f} s; rerunning")
                    entry = {
                        "driver_lag_s": lag,
                        "discarded_driver_lags_s": lags,
                        "policy": policy,
                        "profile": profile,
                        "seed": seed,
                        "started": run.start,
                        "run_dir": f"runs/{name}",
                        **summarize_run(run, duration_s, config.max_num_seqs, profile_classes(profile)),
                    }
                    results["runs"].append(entry)
                    log(run_line(entry))
                    (out_dir / "scheduler.json").write_text(json.dumps(results, indent=1))
    finally:
        for engine in engines.values():
            engine.stop(timeout_s=30)
    return results


def _free_port() -> int:  # pragma: no cover - engines
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- CLI ---------------------------------------------------------------------------------------


def rescore(results: dict[str, Any], out: Path) -> int:
    """Recompute every run's figures from its harness directory, with the current definitions;
    runs without one (the earlier bench's) are left as recorded. Returns how many were redone."""
    config = results["config"]
    redone = 0
    for run in results["runs"]:
        data = read_run(out / run["run_dir"]) if "run_dir" in run else None
        if data is not None:
            classes = profile_classes(run["profile"])
            duration_s = profile_duration(run["profile"], config["duration_s"])
            run.update(summarize_run(data, duration_s, config["max_num_seqs"], classes))
            redone += 1
    return redone


def cmd_bench_scheduler(args: Any) -> int:  # pragma: no cover - engines
    from tokenfleet.load.scheduler_report import write_report

    if args.render:
        out = Path(args.render)
        results = json.loads((out / "scheduler.json").read_text())
        rescore(results, out)
        (out / "scheduler.json").write_text(json.dumps(results, indent=1))
        print(write_report(results, out))
        return 0
    # SIGTERM → SystemExit, so run_bench's `finally` stops the engines (they run in their own
    # sessions and would otherwise outlive the benchmark) and run_workload stops Locust.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    config = BenchConfig(
        model_source=args.model,
        max_num_seqs=args.max_num_seqs,
        duration_s=args.duration,
        drain_s=args.drain,
        seeds=tuple(range(1, args.seeds + 1)),
        profiles=tuple(args.profiles.split(",")),
        policies=tuple(args.policies.split(",")),
        calibrate_s=args.calibrate,
        lam=args.lam,
    )
    out = Path(args.out)
    started = time.monotonic()
    results = run_bench(config, out)
    print(write_report(results, out))
    print(f"results: {out} ({(time.monotonic() - started) / 60:.0f} min)")
    return 0


def register(bench_sub: Any) -> None:
    """Add `tokenfleet bench scheduler` next to the load harness's `bench run`."""
    p = bench_sub.add_parser("scheduler", help="FCFS vs vLLM priority vs tokenfleet sla on a real CPU engine")
    p.add_argument("--model", default="builtin://tiny-code", help="model source (default: the builtin model)")
    p.add_argument("--max-num-seqs", type=int, default=2)
    p.add_argument(
        "--duration", type=float, default=30.0, help="seconds of arrivals per run (starvation: twice)"
    )
    p.add_argument("--drain", type=float, default=20.0, help="seconds to let in-flight requests finish")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument(
        "--profiles",
        default=",".join(DEFAULT_PROFILES),
        help="load levels of the standard mix (`<f>x` × λ_sat), `burst`, and the scenarios "
        + ", ".join(SCENARIOS),
    )
    p.add_argument("--policies", default="fcfs,priority,sla")
    p.add_argument("--calibrate", type=float, default=30.0, help="seconds of closed-loop calibration")
    p.add_argument("--lam", type=float, help="λ_sat in req/s (skip calibration)")
    p.add_argument("--out", default="runs/scheduler")
    p.add_argument(
        "--render",
        metavar="RUN_DIR",
        help="recompute the figures from RUN_DIR's run directories and re-render tables.md and plots",
    )
    p.set_defaults(handler=cmd_bench_scheduler)
