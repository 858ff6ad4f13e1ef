"""`tokenfleet bench scheduler`: FCFS vs vLLM `priority` vs tokenfleet `sla`, side by side.

One real vLLM CPU engine per policy (same spec otherwise, `max_num_seqs` small enough to bind),
λ_sat calibrated with FCFS (closed loop at 2 × max_num_seqs), then open-loop Poisson traffic at
0.8× and 1.2× λ_sat and a burst profile (0.7 → 1.5 → 0.5 × λ_sat), several seeds each.

The traffic driver is a bounded asyncio + httpx open loop in this process, not the Locust
harness in load/: the workload needs per-class prompt and output lengths (batch = long
outputs), which the harness's workload model (one length distribution per workload) does not
express yet, and on a 2-core machine a Locust subprocess competes with the engine for CPU.

Pure parts (workload generation, metrics) are functions over typed data, tested on their own.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tokenfleet.engine.launch import TIMED_SCHEDULER_CLS, EngineCommand
from tokenfleet.engine.sla_contract import REJECT_PREFIX
from tokenfleet.engine.sla_policy import wait_bound_s
from tokenfleet.load import stats
from tokenfleet.observability import promtext

TENANTS = ("noisy", "t2", "t3", "t4")
NOISY = TENANTS[0]
# Shares of standard + batch traffic. The noisy neighbour sends its share in on/off bursts (twice
# its mean rate while on); t2 is a heavy steady tenant, so that under overload more than one
# tenant is backlogged and fair share has something to divide; t3 and t4 are light.
TENANT_SHARES = {"noisy": 0.4, "t2": 0.35, "t3": 0.125, "t4": 0.125}
NOISY_PERIOD_S = 20.0  # on for the first half of every period, off for the second
BURST_PHASES = ((1 / 3, 0.7), (1 / 3, 1.5), (1 / 3, 0.5))  # (fraction of the run, × λ_sat)
# Fairness windows: several batch requests' service times long (~3 s each here), so that one
# request's worth of service is not a large share of a window; the short one is reported too.
FAIRNESS_WINDOW_S = 10.0
FAIRNESS_SHORT_WINDOW_S = 5.0
SCHEDULE_METRIC = "tokenfleet_scheduler_schedule_seconds"
POLICY_METRIC = "tokenfleet_scheduler_policy_seconds"
WAIT_METRIC = "tokenfleet_scheduler_wait_seconds"


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


# Scaled to the CPU build: interactive short, batch long outputs and no TTFT target.
DEFAULT_CLASSES = (
    ClassLoad("interactive", 0, 0.3, (16, 48), (8, 24), 1.0, 0.25, 5.0, 64),
    ClassLoad("standard", 1, 0.3, (64, 160), (24, 64), 4.0, 0.5, 30.0, 64),
    ClassLoad("batch", 2, 0.4, (64, 128), (96, 192), None, None, 60.0, 32),
)


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float
    slo_class: str
    tenant: str
    prompt_tokens: int
    max_tokens: int


@dataclass
class Outcome:
    arrival: Arrival
    sent: float  # seconds since the run's start
    first_token: float | None = None
    done: float | None = None
    tokens: int = 0
    chunks: list[float] = field(default_factory=list)
    rejected: bool = False
    error: str | None = None

    @property
    def served(self) -> bool:
        return self.done is not None and not self.rejected and self.error is None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.done is None or self.tokens < 2:
            return None
        return (self.done - self.first_token) / (self.tokens - 1)


# -- workload ----------------------------------------------------------------------------------


def rate_multiplier(profile: str, t: float, duration_s: float) -> float:
    """× λ_sat at time t: `0.8x`, `1.2x` (any `<f>x`), or `burst`."""
    if profile == "burst":
        start = 0.0
        for fraction, level in BURST_PHASES:
            start += fraction * duration_s
            if t < start:
                return level
        return BURST_PHASES[-1][1]
    if profile.endswith("x"):
        return float(profile[:-1])
    raise ValueError(f"unknown profile {profile!r}")


def peak_multiplier(profile: str) -> float:
    if profile == "burst":
        return max(level for _, level in BURST_PHASES)
    return rate_multiplier(profile, 0.0, 1.0)


def _poisson(rng: random.Random, rate_of: Any, peak: float, duration_s: float) -> list[float]:
    """Times of a non-homogeneous Poisson process by thinning."""
    times: list[float] = []
    if peak <= 0:
        return times
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            return times
        if rng.random() * peak < rate_of(t):
            times.append(t)


def generate(
    profile: str,
    lam: float,
    duration_s: float,
    seed: int,
    classes: Sequence[ClassLoad] = DEFAULT_CLASSES,
) -> list[Arrival]:
    """Arrivals: every class Poisson at its share of the profile's rate; interactive spread over
    all tenants evenly; standard and batch split by TENANT_SHARES, the noisy tenant's in on/off
    bursts (twice its mean rate while on, nothing while off)."""
    rng = random.Random(seed)
    peak = lam * peak_multiplier(profile)
    arrivals: list[Arrival] = []

    def add(times: Iterable[float], cls: ClassLoad, tenants: Sequence[str]) -> None:
        for t in times:
            arrivals.append(
                Arrival(
                    at=t,
                    slo_class=cls.name,
                    tenant=rng.choice(tenants),
                    prompt_tokens=rng.randint(*cls.prompt),
                    max_tokens=rng.randint(*cls.output),
                )
            )

    def noisy_on(t: float) -> bool:
        return (t % NOISY_PERIOD_S) < NOISY_PERIOD_S / 2

    for cls in classes:
        share = cls.share
        if cls.name == classes[0].name:  # the top class: all tenants, no bursts
            add(
                _poisson(
                    rng,
                    lambda t, s=share: lam * s * rate_multiplier(profile, t, duration_s),
                    peak * share,
                    duration_s,
                ),
                cls,
                TENANTS,
            )
            continue
        for tenant, tenant_share in TENANT_SHARES.items():
            bursty = tenant == NOISY
            mean = share * tenant_share

            def rate(t: float, mean: float = mean, bursty: bool = bursty) -> float:
                if bursty:
                    return 2 * mean * lam * rate_multiplier(profile, t, duration_s) if noisy_on(t) else 0.0
                return mean * lam * rate_multiplier(profile, t, duration_s)

            add(_poisson(rng, rate, peak * mean * (2 if bursty else 1), duration_s), cls, (tenant,))
    arrivals.sort(key=lambda a: a.at)
    return arrivals


# -- metrics -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), None without values."""
    return float(np.percentile(values, q)) if values else None


def jain(values: Sequence[float]) -> float | None:
    """(Σx)² / (n·Σx²): 1 when equal, 1/n when one gets everything."""
    if not values:
        return None
    squares = sum(v * v for v in values)
    if squares == 0:
        return 1.0
    return sum(values) ** 2 / (len(values) * squares)


def class_report(outcomes: Sequence[Outcome], cls: ClassLoad, end_s: float) -> dict[str, Any]:
    """SLO attainment counts every request of the class: rejected, failed or unfinished = missed.
    Max wait is the longest time a request went without its first token (until end_s if never)."""
    mine = [o for o in outcomes if o.arrival.slo_class == cls.name]
    served = [o for o in mine if o.served]

    def met(o: Outcome) -> bool:
        if not o.served:
            return False
        ttft, tpot = o.ttft, o.tpot
        if cls.ttft_s is not None and (ttft is None or ttft > cls.ttft_s):
            return False
        return not (cls.tpot_s is not None and tpot is not None and tpot > cls.tpot_s)

    ttfts = [t for o in served if (t := o.ttft) is not None]
    tpots = [t for o in served if (t := o.tpot) is not None]
    waits = [
        (o.first_token if o.first_token is not None else (o.done if o.served and o.done else end_s)) - o.sent
        for o in mine
        if not o.rejected
    ]
    return {
        "requests": len(mine),
        "served": len(served),
        "rejected": sum(o.rejected for o in mine),
        "unfinished": sum(1 for o in mine if not o.served and not o.rejected),
        "slo_attainment": (sum(met(o) for o in mine) / len(mine)) if mine else None,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
        "tpot_p50": percentile(tpots, 50),
        "tpot_p99": percentile(tpots, 99),
        "max_wait": max(waits) if waits else None,
    }


def waiting_intervals(outcomes: Sequence[Outcome], end_s: float) -> dict[str, list[tuple[float, float]]]:
    """Per tenant, the merged time intervals during which it had a request waiting for its first
    token (rejected requests never wait; unfinished ones wait until end_s)."""
    raw: dict[str, list[tuple[float, float]]] = {}
    for o in outcomes:
        if o.rejected:
            continue
        stop = o.first_token if o.first_token is not None else end_s
        raw.setdefault(o.arrival.tenant, []).append((o.sent, stop))
    merged: dict[str, list[tuple[float, float]]] = {}
    for tenant, spans in raw.items():
        out: list[tuple[float, float]] = []
        for start, stop in sorted(spans):
            if out and start <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], stop))
            else:
                out.append((start, stop))
        merged[tenant] = out
    return merged


def covers(spans: Sequence[tuple[float, float]], start: float, stop: float) -> bool:
    """Do the merged, sorted `spans` cover [start, stop) entirely?"""
    return any(a <= start and b >= stop for a, b in spans)


def fairness(outcomes: Sequence[Outcome], end_s: float, window_s: float = FAIRNESS_WINDOW_S) -> float | None:
    """Mean, over (class, window) pairs, of Jain's index of weighted service in that class (1·prompt
    + 2·output tokens, VTC's cost) among the tenants backlogged in that class throughout the
    window — a request of theirs in the class was waiting for its first token at every instant
    of it — over the pairs with at least two such tenants.

    Per class because fair share is promised inside a class (classes are strictly ordered, and a
    tenant's traffic in a class that is not backlogged is served in full whatever its volume). A
    tenant that is not backlogged got all it asked for; fairness is about dividing what the
    backlogged ones could not all get (Jain's index over allocations normalised by the max-min
    fair share reduces to this). None when no pair had two backlogged tenants.
    """
    indices: list[float] = []
    for slo_class in dict.fromkeys(o.arrival.slo_class for o in outcomes):
        mine = [o for o in outcomes if o.arrival.slo_class == slo_class]
        waiting = waiting_intervals(mine, end_s)
        start = 0.0
        while start + window_s <= end_s + 1e-9:
            stop = start + window_s
            backlogged = {t for t, spans in waiting.items() if covers(spans, start, stop)}
            if len(backlogged) >= 2:
                service = dict.fromkeys(backlogged, 0.0)
                for o in mine:
                    if o.arrival.tenant not in service:
                        continue
                    if o.first_token is not None and start <= o.first_token < stop:
                        service[o.arrival.tenant] += o.arrival.prompt_tokens
                    service[o.arrival.tenant] += 2 * sum(1 for c in o.chunks if start <= c < stop)
                value = jain(list(service.values()))
                if value is not None:
                    indices.append(value)
            start = stop
    return sum(indices) / len(indices) if indices else None


def throughput(outcomes: Sequence[Outcome], duration_s: float) -> dict[str, float]:
    """Output tokens and completed requests per second, from the first arrival until the last
    token streamed (not just the arrival window: a policy that defers batch work still serves
    it, later, and a window cut would count that as lost throughput)."""
    tokens = sum(len(o.chunks) for o in outcomes)
    done = sum(1 for o in outcomes if o.served)
    end = max([duration_s, *(c for o in outcomes for c in o.chunks)])
    return {"output_tok_per_s": tokens / end, "req_per_s": done / end}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {name{labels}: value} (labels sorted; `_created` dropped)."""
    return promtext.flat(text)


def metric_delta(before: dict[str, float], after: dict[str, float], prefix: str) -> float:
    return sum(
        v - before.get(k, 0.0)
        for k, v in after.items()
        if k.startswith(prefix) and not k.endswith("_created")
    )


def histogram_quantile_upper(
    before: dict[str, float], after: dict[str, float], metric: str, q: float = 0.99, labels: str = ""
) -> float | None:
    """Upper bound on quantile q over the run: the first bucket (delta) holding q of the count.
    `labels` is a label filter such as 'slo_class="batch"'; q = 1 gives a bound on the max."""
    buckets: list[tuple[float, float]] = []
    for key, value in after.items():
        match = re.match(re.escape(metric) + r"_bucket\{(.*)\}$", key)
        if not match or (labels and labels not in match.group(1)):
            continue
        le = re.search(r'le="([^"]+)"', match.group(1))
        if le:
            buckets.append((float(le.group(1)), value - before.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    for upper, count in buckets:
        if count >= q * total - 1e-9:
            return upper
    return None  # pragma: no cover - the +Inf bucket always holds everything


def histogram_mean(before: dict[str, float], after: dict[str, float], metric: str) -> float | None:
    """Mean of a histogram's observations over the run (Δsum / Δcount)."""
    count = metric_delta(before, after, f"{metric}_count")
    return metric_delta(before, after, f"{metric}_sum") / count if count > 0 else None


def schedule_p99_upper_s(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Upper bound on the p99 of schedule() time: the first histogram bucket holding 99%."""
    return histogram_quantile_upper(before, after, SCHEDULE_METRIC)


# -- the driver (network) ----------------------------------------------------------------------


def request_body(model: str, a: Arrival, classes: Sequence[ClassLoad], rng: random.Random) -> dict[str, Any]:
    priority = next(c.priority for c in classes if c.name == a.slo_class)
    return {
        "model": model,
        "prompt": [rng.randrange(100, 1000) for _ in range(a.prompt_tokens)],  # exact length
        "max_tokens": a.max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "priority": priority,
        "vllm_xargs": {"slo_class": a.slo_class, "tenant": a.tenant},
    }


async def send(client: httpx.AsyncClient, body: dict[str, Any], outcome: Outcome, t0: float) -> None:
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}"
                outcome.rejected = response.status_code in (429, 503)
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.monotonic() - t0
                for choice in chunk.get("choices") or []:
                    if choice.get("finish_reason") == "abort":
                        outcome.rejected = str(choice.get("stop_reason") or "").startswith(REJECT_PREFIX)
                        if not outcome.rejected:
                            outcome.error = "aborted"
                        continue
                    # vLLM holds back text that does not decode yet (partial UTF-8), so a chunk's
                    # text may be empty or cover several tokens: any chunk is a token event.
                    outcome.chunks.append(now)
                    if outcome.first_token is None:
                        outcome.first_token = now
                usage = chunk.get("usage")
                if usage:
                    outcome.tokens = int(usage.get("completion_tokens") or 0)
            outcome.done = time.monotonic() - t0
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        outcome.error = type(exc).__name__


async def drive(
    url: str,
    model: str,
    arrivals: Sequence[Arrival],
    *,
    classes: Sequence[ClassLoad] = DEFAULT_CLASSES,
    drain_s: float = 30.0,
    seed: int = 0,
    max_in_flight: int = 512,
) -> tuple[list[Outcome], float]:
    """Open loop: send each arrival at its time (never waiting for earlier ones), then give
    in-flight requests `drain_s` after the last arrival; returns the outcomes and that cutoff."""
    rng = random.Random(seed)
    bodies = [request_body(model, a, classes, rng) for a in arrivals]
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=64)
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(300, connect=10), limits=limits
    ) as client:
        t0 = time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        for a, body in zip(arrivals, bodies, strict=True):
            delay = a.at - (time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            outcome = Outcome(arrival=a, sent=time.monotonic() - t0)
            outcomes.append(outcome)
            tasks.append(asyncio.create_task(send(client, body, outcome, t0)))
        end = (arrivals[-1].at if arrivals else 0.0) + drain_s
        remaining = max(0.0, end - (time.monotonic() - t0))
        _, pending = await asyncio.wait(tasks, timeout=remaining) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        cutoff = time.monotonic() - t0
    for o in outcomes:
        if o.done is None and o.error is None and not o.rejected:
            o.error = "unfinished"
    return outcomes, cutoff


async def saturate(url: str, model: str, concurrency: int, seconds: float, seed: int) -> float:
    """Closed loop at `concurrency` with the class mix: completed requests per second = λ_sat."""
    rng = random.Random(seed)
    done = 0
    stop_at = time.monotonic() + seconds

    async def user(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            cls = rng.choices(DEFAULT_CLASSES, weights=[c.share for c in DEFAULT_CLASSES])[0]
            a = Arrival(0, cls.name, rng.choice(TENANTS), rng.randint(*cls.prompt), rng.randint(*cls.output))
            outcome = Outcome(arrival=a, sent=0)
            await send(client, request_body(model, a, DEFAULT_CLASSES, rng), outcome, time.monotonic())
            if outcome.served and time.monotonic() < stop_at:
                done += 1

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        started = time.monotonic()
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
        return done / (min(time.monotonic(), stop_at) - started)


# -- orchestration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    model_source: str = "builtin://tiny-code"
    max_num_seqs: int = 8
    duration_s: float = 40.0
    drain_s: float = 30.0
    seeds: tuple[int, ...] = (1, 2, 3)
    profiles: tuple[str, ...] = ("0.8x", "1.2x", "burst")
    policies: tuple[str, ...] = ("fcfs", "priority", "sla")
    calibrate_s: float = 30.0
    lam: float | None = None  # skip calibration when given
    # A run whose load generator sent an arrival this late is rerun (up to max_attempts in all).
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
        "model": {"name": "bench", "source": config.model_source, "maxModelLen": 512},
        "engine": {"maxNumSeqs": config.max_num_seqs, "kvCacheGib": 1, "shutdownTimeoutS": 5},
        "scheduler": {
            "policy": policy,
            "classes": classes,
            "tenants": [{"name": t} for t in TENANTS],
            "defaultClass": "standard",
        },
    }


def driver_lag_s(outcomes: Sequence[Outcome]) -> float:
    """How late the open loop sent its most delayed arrival: a stalled generator is not open loop."""
    return max((o.sent - o.arrival.at for o in outcomes), default=0.0)


def longest_service_s(outcomes: Sequence[Outcome]) -> float | None:
    """T_max of the wait bound, as measured: the longest first token → last token of the run."""
    spans = [o.done - o.first_token for o in outcomes if o.served and o.done and o.first_token is not None]
    return max(spans) if spans else None


def stated_wait_bounds(classes: Sequence[ClassLoad], slots: int, t_max_s: float) -> dict[str, float] | None:
    """ADR 0004's bound per class, W ≤ maxWait + ⌈(Q + 1) / S⌉ · T_max with Q = Σ queueLimit − 1;
    None if some class has no queue limit (then Q, and the bound, are unbounded)."""
    limits = [c.queue_limit for c in classes]
    if any(limit is None for limit in limits):
        return None
    ahead = sum(limit for limit in limits if limit is not None) - 1
    return {c.name: wait_bound_s(c.max_wait_s, ahead, slots, t_max_s) for c in classes}


def timed_baseline(policy: str, command: EngineCommand) -> EngineCommand:
    """The baselines run vLLM's own scheduler with schedule() timed (`TimedScheduler`), so every
    policy reports its scheduling cost; `sla` already times itself. (A spec's extraArgs may not
    set --scheduler-cls, so this is added to the command, for the benchmark only.)"""
    if policy == "sla":
        return command
    return replace(command, argv=[*command.argv, "--scheduler-cls", TIMED_SCHEDULER_CLS])


def summarize_run(
    outcomes: Sequence[Outcome],
    cutoff: float,
    duration_s: float,
    before: dict[str, float],
    after: dict[str, float],
) -> dict[str, Any]:
    return {
        "classes": {c.name: class_report(outcomes, c, cutoff) for c in DEFAULT_CLASSES},
        "jain": fairness(outcomes, duration_s),
        "jain_short": fairness(outcomes, duration_s, FAIRNESS_SHORT_WINDOW_S),
        **throughput(outcomes, duration_s),
        "preemptions": metric_delta(before, after, "vllm:num_preemptions_total"),
        "schedule_p99_le_s": schedule_p99_upper_s(before, after),
        "schedule_mean_s": histogram_mean(before, after, SCHEDULE_METRIC),
        "policy_p99_le_s": histogram_quantile_upper(before, after, POLICY_METRIC),
        "server_max_wait_le_s": {
            c.name: histogram_quantile_upper(before, after, WAIT_METRIC, 1.0, f'slo_class="{c.name}"')
            for c in DEFAULT_CLASSES
        },
        "requests": len(outcomes),
    }


def run_bench(
    config: BenchConfig, out_dir: Path, log: Any = print
) -> dict[str, Any]:  # pragma: no cover - engines
    """All policies' engines up at once, runs interleaved (profile → seed → policy, the policy
    order rotating), so that drift in the machine's background load hits every policy alike."""
    from tokenfleet.engine.launch import EngineProcess, engine_command
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
                timed_baseline(policy, engine_command(service.spec, model_path, port=port)),
                port=port,
                log_path=out_dir / f"engine-{policy}.log",
            )
            engine.start()
            engines[policy] = engine
        for policy, engine in engines.items():
            log(f"[{policy}] engine ready after {engine.wait_ready(900):.0f}s more")
            asyncio.run(saturate(engine.url, "bench", 2, 5, seed=0))  # warm-up
        lam = config.lam
        if lam is None:
            first = engines.get("fcfs") or next(iter(engines.values()))
            lam = asyncio.run(
                saturate(first.url, "bench", 2 * config.max_num_seqs, config.calibrate_s, seed=0)
            )
            log(f"λ_sat = {lam:.2f} req/s (FCFS, closed loop, concurrency {2 * config.max_num_seqs})")
        results["lambda_sat"] = lam
        order = list(engines)
        for profile in config.profiles:
            for seed in config.seeds:
                arrivals = generate(profile, lam, config.duration_s, seed)
                order = order[1:] + order[:1]  # rotate: no policy always runs first or last
                for policy in order:
                    engine = engines[policy]
                    lags: list[float] = []
                    while True:
                        before = parse_metrics(httpx.get(f"{engine.url}/metrics", timeout=10).text)
                        outcomes, cutoff = asyncio.run(
                            drive(engine.url, "bench", arrivals, drain_s=config.drain_s, seed=seed)
                        )
                        after = parse_metrics(httpx.get(f"{engine.url}/metrics", timeout=10).text)
                        lag = driver_lag_s(outcomes)
                        if lag <= config.max_driver_lag_s or len(lags) + 1 >= config.max_attempts:
                            break
                        # The load generator itself stalled (not the engine): the arrivals were not
                        # sent on time, so the run does not measure the policy. Run it again.
                        lags.append(lag)
                        log(f"[{policy}] {profile} seed {seed}: driver lagged {lag:.1f} s; rerunning")
                        time.sleep(2)
                    run = {
                        "driver_lag_s": lag,
                        "discarded_driver_lags_s": lags,
                        "policy": policy,
                        "profile": profile,
                        "seed": seed,
                        "started": time.time(),
                        **summarize_run(outcomes, cutoff, config.duration_s, before, after),
                    }
                    t_max = longest_service_s(outcomes)
                    run["t_max_s"] = t_max
                    run["wait_bounds"] = (
                        stated_wait_bounds(DEFAULT_CLASSES, config.max_num_seqs, t_max) if t_max else None
                    )
                    results["runs"].append(run)
                    raw = out_dir / "raw" / f"{policy}-{profile}-{seed}.jsonl"
                    raw.parent.mkdir(exist_ok=True)
                    raw.write_text("".join(json.dumps(asdict(o)) + "\n" for o in outcomes))
                    inter = run["classes"]["interactive"]
                    log(
                        f"[{policy}] {profile} seed {seed}: {len(arrivals)} req, interactive SLO "
                        f"{_pct(inter['slo_attainment'])} p99 TTFT {_ms(inter['ttft_p99'])}, "
                        f"batch max wait {_s(run['classes']['batch']['max_wait'])}, J {_num(run['jain'])}, "
                        f"{run['output_tok_per_s']:.1f} tok/s"
                    )
                    (out_dir / "scheduler.json").write_text(json.dumps(results, indent=1))
                    time.sleep(2)  # let the engine go idle before the next policy's run
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


# -- report ------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{1000 * v:.0f} ms"


def _ms2(v: float | None) -> str:
    return "–" if v is None else f"{1000 * v:.2f} ms"


def _s(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f} s"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _mean_ci(values: Sequence[float]) -> tuple[float, float] | None:
    """Mean and 95% half-width over seeds (Student t, load/stats.py)."""
    if not values:
        return None
    interval = stats.mean_ci(values)
    return interval.mean, interval.half_width if len(values) > 1 else 0.0


def aggregate(runs: Sequence[dict[str, Any]], policy: str, profile: str) -> dict[str, Any]:
    """Mean (and 95% CI) over seeds of each reported figure; max wait is the max over seeds."""
    mine = [r for r in runs if r["policy"] == policy and r["profile"] == profile]

    def values(get: Any) -> list[float]:
        return [v for r in mine if (v := get(r)) is not None]

    agg: dict[str, Any] = {"seeds": len(mine)}
    for cls in DEFAULT_CLASSES:
        n = cls.name
        for key in ("slo_attainment", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"):
            agg[f"{n}.{key}"] = _mean_ci(values(lambda r, n=n, key=key: r["classes"][n][key]))
        waits = values(lambda r, n=n: r["classes"][n]["max_wait"])
        agg[f"{n}.max_wait"] = max(waits) if waits else None
        engine_waits = values(lambda r, n=n: (r.get("server_max_wait_le_s") or {}).get(n))
        agg[f"{n}.engine_max_wait"] = max(engine_waits) if engine_waits else None
        bounds = values(lambda r, n=n: (r.get("wait_bounds") or {}).get(n))
        agg[f"{n}.wait_bound"] = min(bounds) if bounds else None  # the tightest run's bound
        agg[f"{n}.rejected"] = sum(values(lambda r, n=n: r["classes"][n]["rejected"]))
        agg[f"{n}.requests"] = sum(values(lambda r, n=n: r["classes"][n]["requests"]))
    for key in ("jain", "jain_short", "output_tok_per_s", "req_per_s", "preemptions"):
        agg[key] = _mean_ci(values(lambda r, key=key: r.get(key)))
    agg["schedule_mean_s"] = _mean_ci(values(lambda r: r.get("schedule_mean_s")))
    for key in ("schedule_p99_le_s", "policy_p99_le_s"):
        bounds = values(lambda r, key=key: r.get(key))
        agg[key] = max(bounds) if bounds else None
    return agg


def _ci(v: tuple[float, float] | None, fmt: Any) -> str:
    if v is None:
        return "–"
    mean, half = v
    return f"{fmt(mean)} ± {fmt(half).split()[0]}" if half else fmt(mean)


def _policies(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Policies in the canonical order (baselines first), whatever order the runs took."""
    canonical = ("fcfs", "priority", "sla")
    seen = list(dict.fromkeys(r["policy"] for r in runs))
    return sorted(seen, key=lambda p: (canonical.index(p) if p in canonical else len(canonical), p))


@dataclass(frozen=True, slots=True)
class TargetCheck:
    target: str
    measured: str
    met: bool | None  # None: not measurable in this run


def check_targets(results: dict[str, Any], ours: str = "sla", baseline: str = "fcfs") -> list[TargetCheck]:
    """Issue 4's targets for `ours`, from the recorded runs (means over seeds)."""
    runs = results["runs"]
    checks: list[TargetCheck] = []

    def agg(policy: str, profile: str) -> dict[str, Any] | None:
        a = aggregate(runs, policy, profile)
        return a if a["seeds"] else None

    high, high_base = agg(ours, "1.2x"), agg(baseline, "1.2x")
    if high is not None and high["interactive.slo_attainment"] is not None:
        att = high["interactive.slo_attainment"][0]
        checks.append(
            TargetCheck("1.2× λ_sat: interactive TTFT-SLO attainment ≥ 99 %", _pct(att), att >= 0.99)
        )
    if high and high_base and high["interactive.ttft_p99"] and high_base["interactive.ttft_p99"]:
        mine, theirs = high["interactive.ttft_p99"][0], high_base["interactive.ttft_p99"][0]
        cut = 1 - mine / theirs
        checks.append(
            TargetCheck(
                f"1.2× λ_sat: interactive P99 TTFT ≥ 60 % below {baseline}",
                f"{_ms(mine)} vs {_ms(theirs)} ({100 * cut:.0f} % lower)",
                cut >= 0.6,
            )
        )
    waits = [r["classes"]["batch"]["max_wait"] for r in runs if r["policy"] == ours]
    bounds = [b["batch"] for r in runs if r["policy"] == ours and (b := r.get("wait_bounds"))]
    if waits and bounds:
        worst, bound = max(w for w in waits if w is not None), min(bounds)
        checks.append(
            TargetCheck(
                "batch max wait within its stated bound (all runs)",
                f"{_s(worst)} ≤ {_s(bound)}",
                worst <= bound,
            )
        )
    for profile in ("1.2x", "burst"):
        a = agg(ours, profile)
        if a is not None:
            jain_ci = a["jain"]
            checks.append(
                TargetCheck(
                    f"{profile}: Jain's index ≥ 0.95 among backlogged tenants",
                    _num(jain_ci[0]) if jain_ci else "no window with two backlogged tenants",
                    (jain_ci[0] >= 0.95) if jain_ci else None,
                )
            )
    low, low_base = agg(ours, "0.8x"), agg(baseline, "0.8x")
    if low and low_base and low["output_tok_per_s"] and low_base["output_tok_per_s"]:
        mine, theirs = low["output_tok_per_s"][0], low_base["output_tok_per_s"][0]
        ratio = mine / theirs
        checks.append(
            TargetCheck(
                f"0.8× λ_sat: throughput ≥ 97 % of {baseline}",
                f"{mine:.1f} vs {theirs:.1f} tok/s ({100 * ratio:.1f} %)",
                ratio >= 0.97,
            )
        )
    p99s = [v for r in runs if r["policy"] == ours and (v := r.get("schedule_p99_le_s")) is not None]
    if p99s:
        checks.append(
            TargetCheck(
                "schedule() p99 ≤ 1 ms (every run)", f"≤ {_ms2(max(p99s))} (bucket bound)", max(p99s) <= 0.001
            )
        )
    return checks


def render_targets(checks: Sequence[TargetCheck]) -> str:
    lines = ["| target | measured | met? |", "|---|---|---|"]
    for c in checks:
        lines.append(
            f"| {c.target} | {c.measured} | {'yes' if c.met else 'no' if c.met is False else 'n/a'} |"
        )
    return "\n".join(lines) + "\n"


def render_markdown(results: dict[str, Any]) -> str:
    """The results tables (one per profile), FCFS and priority next to sla."""
    runs = results["runs"]
    policies = _policies(runs)
    profiles = list(dict.fromkeys(r["profile"] for r in runs))
    lines: list[str] = []
    for profile in profiles:
        lines += [f"### {profile} λ_sat" if profile != "burst" else "### burst (0.7 → 1.5 → 0.5 × λ_sat)", ""]
        lines.append("| figure | " + " | ".join(policies) + " |")
        lines.append("|---|" + "---|" * len(policies))
        aggs = {p: aggregate(runs, p, profile) for p in policies}
        rows: list[tuple[str, Any]] = []
        for cls in DEFAULT_CLASSES:
            n = cls.name
            rows += [
                (f"{n} SLO attainment", lambda a, n=n: _ci(a[f"{n}.slo_attainment"], _pct)),
                (
                    f"{n} P50 / P99 TTFT",
                    lambda a, n=n: f"{_ci(a[f'{n}.ttft_p50'], _ms)} / {_ci(a[f'{n}.ttft_p99'], _ms)}",
                ),
                (
                    f"{n} P50 / P99 TPOT",
                    lambda a, n=n: f"{_ci(a[f'{n}.tpot_p50'], _ms)} / {_ci(a[f'{n}.tpot_p99'], _ms)}",
                ),
                (f"{n} max wait to first token (all seeds)", lambda a, n=n: _s(a[f"{n}.max_wait"])),
                (
                    f"{n} max queue wait in the engine (bucket bound)",
                    lambda a, n=n: _s(a[f"{n}.engine_max_wait"]) if a[f"{n}.engine_max_wait"] else "n/a",
                ),
                (
                    f"{n} stated wait bound (tightest run)",
                    lambda a, n=n: _s(a[f"{n}.wait_bound"]),
                ),
                (
                    f"{n} rejected / requests",
                    lambda a, n=n: f"{a[f'{n}.rejected']:.0f} / {a[f'{n}.requests']:.0f}",
                ),
            ]
        rows += [
            (
                f"Jain's index (backlogged tenants, {FAIRNESS_WINDOW_S:.0f} s windows)",
                lambda a: _ci(a["jain"], _num),
            ),
            (
                f"Jain's index ({FAIRNESS_SHORT_WINDOW_S:.0f} s windows)",
                lambda a: _ci(a["jain_short"], _num),
            ),
            ("throughput (output tok/s)", lambda a: _ci(a["output_tok_per_s"], lambda v: f"{v:.1f}")),
            ("completed req/s", lambda a: _ci(a["req_per_s"], lambda v: f"{v:.2f}")),
            ("preemptions per run", lambda a: _ci(a["preemptions"], lambda v: f"{v:.1f}")),
            (
                "schedule() p99 (bucket bound, max over seeds)",
                lambda a: _ms2(a["schedule_p99_le_s"]) if a["schedule_p99_le_s"] else "n/a",
            ),
            ("schedule() mean", lambda a: _ci(a["schedule_mean_s"], _ms2)),
        ]
        for label, fmt in rows:
            lines.append(f"| {label} | " + " | ".join(fmt(aggs[p]) for p in policies) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:  # pragma: no cover - matplotlib
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    policies = _policies(runs)
    profiles = list(dict.fromkeys(r["profile"] for r in runs))
    paths: list[Path] = []
    figures = [
        ("interactive.ttft_p99", "interactive P99 TTFT (s)", "interactive-ttft-p99.png"),
        ("interactive.slo_attainment", "interactive SLO attainment", "interactive-attainment.png"),
        ("output_tok_per_s", "throughput (output tok/s)", "throughput.png"),
        ("jain", "Jain's index (backlogged tenants)", "jain.png"),
    ]
    for key, title, name in figures:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        width = 0.8 / len(policies)
        for i, policy in enumerate(policies):
            means, errs = [], []
            for profile in profiles:
                v = aggregate(runs, policy, profile)[key]
                means.append(v[0] if v else 0.0)
                errs.append(v[1] if v else 0.0)
            xs = [j + i * width for j in range(len(profiles))]
            ax.bar(xs, means, width, yerr=errs, label=policy, capsize=3)
        ax.set_xticks([j + width * (len(policies) - 1) / 2 for j in range(len(profiles))], profiles)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -- CLI ---------------------------------------------------------------------------------------


def load_outcomes(path: Path) -> list[Outcome]:
    """A raw per-request log written by run_bench back into outcomes."""
    outcomes = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        arrival = Arrival(**record.pop("arrival"))
        outcomes.append(Outcome(arrival=arrival, **record))
    return outcomes


def rescore_fairness(results: dict[str, Any], out: Path) -> None:
    """Recompute the fairness figures of every run from its raw log, with the current windows."""
    duration = results["config"]["duration_s"]
    for run in results["runs"]:
        raw = out / "raw" / f"{run['policy']}-{run['profile']}-{run['seed']}.jsonl"
        if raw.exists():
            outcomes = load_outcomes(raw)
            run["jain"] = fairness(outcomes, duration)
            run["jain_short"] = fairness(outcomes, duration, FAIRNESS_SHORT_WINDOW_S)


def write_report(results: dict[str, Any], out: Path) -> str:  # pragma: no cover - matplotlib
    """tables.md (per-profile tables and the targets) and the PNG plots, from scheduler.json."""
    tables = render_markdown(results) + "\n### Targets\n\n" + render_targets(check_targets(results))
    (out / "tables.md").write_text(tables)
    plot(results, out)
    return tables


def cmd_bench_scheduler(args: Any) -> int:  # pragma: no cover - engines
    if args.render:
        out = Path(args.render)
        results = json.loads((out / "scheduler.json").read_text())
        rescore_fairness(results, out)
        (out / "scheduler.json").write_text(json.dumps(results, indent=1))
        print(write_report(results, out))
        return 0
    # SIGTERM → SystemExit, so run_bench's `finally` stops the engines (they run in their own
    # sessions and would otherwise outlive the benchmark).
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
    results = run_bench(config, out)
    print(write_report(results, out))
    print(f"results: {out}")
    return 0


def register(bench_sub: Any) -> None:
    """Add `tokenfleet bench scheduler` next to the load harness's `bench run`."""
    p = bench_sub.add_parser("scheduler", help="FCFS vs vLLM priority vs tokenfleet sla on a real CPU engine")
    p.add_argument("--model", default="builtin://tiny-code", help="model source (default: the builtin model)")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per run")
    p.add_argument("--drain", type=float, default=30.0, help="seconds to let in-flight requests finish")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--profiles", default="0.8x,1.2x,burst")
    p.add_argument("--policies", default="fcfs,priority,sla")
    p.add_argument("--calibrate", type=float, default=30.0, help="seconds of closed-loop calibration")
    p.add_argument("--lam", type=float, help="λ_sat in req/s (skip calibration)")
    p.add_argument("--out", default="runs/scheduler")
    p.add_argument(
        "--render", metavar="RUN_DIR", help="only re-render tables.md and plots from RUN_DIR/scheduler.json"
    )
    p.set_defaults(handler=cmd_bench_scheduler)
