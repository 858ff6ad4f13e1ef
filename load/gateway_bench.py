"""`tokenfleet bench gateway`: what the gateway costs and what its policies and failover buy.

Three measurements, each against real processes on 127.0.0.1 (the gateway in its own process,
so the client's and the gateway's Python do not share a GIL):

1. **Added latency** — paired, sequential requests alternating direct-to-engine and through the
   gateway (order randomised per pair), against a fake replica (pure proxy cost) and against a
   real vLLM replica. Reported: p50/p99 of each side and of the per-pair difference.
2. **Policies** — round robin, least outstanding and prefix affinity with 2 vLLM replicas on the
   load harness's shared-prefix workload (a fresh seed per policy, so no policy inherits a warm
   prefix cache): mean TTFT from the harness, prefix-cache hit rate from the engines' counters.
3. **Failover** — a bounded streaming load from the load harness (closed loop, 4 users) over 2
   replicas, one SIGKILLed (process group) mid-run and restarted: requests lost before streaming
   (target 0), streams broken, time until the replica is routable again.

The policy and failover loads come from the load harness (Locust). The added latency does not: it
is a paired microbenchmark of a proxy's cost in microseconds, one request at a time, where a load
generator's own per-request work would be most of what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tokenfleet.engine.fleet import free_port
from tokenfleet.engine.launch import EngineCommand, EngineProcess, engine_command
from tokenfleet.load import stats
from tokenfleet.load.client import UNFINISHED
from tokenfleet.load.record import RequestRecord, read_records
from tokenfleet.load.workload import Workload
from tokenfleet.observability import promtext
from tokenfleet.spec import LLMService, parse_service

Log = Callable[[str], None]
# The victim is killed this long after its first request, while it has streams in flight.
KILL_AFTER_S = 3.0


def bench_service(
    policy: str = "least_outstanding", name: str = "tiny", *, resume: bool = True
) -> LLMService:
    return parse_service(
        {
            "apiVersion": "tokenfleet.dev/v1alpha1",
            "kind": "LLMService",
            "metadata": {"name": "bench"},
            "spec": {
                "model": {"name": name, "source": "builtin://tiny-random", "maxModelLen": 512},
                "engine": {"maxNumSeqs": 8, "kvCacheGib": 1, "shutdownTimeoutS": 5},
                "routing": {
                    "policy": policy,
                    "probeIntervalS": 0.5,
                    "ejectCooldownS": 1.0,
                    "ejectAfterFailures": 1,
                    "resumeStreams": resume,
                },
                "gateway": {"maxQueuePerClass": 256},
            },
        }
    )


def describe_ms(values: Sequence[float]) -> dict[str, float]:
    summary = stats.describe([v * 1000 for v in values])

    def rounded(key: str) -> float:
        value = summary[key]
        return round(float(value), 3) if value is not None else float("nan")

    return {
        "n": len(values),
        "p50_ms": rounded("p50"),
        "p90_ms": rounded("p90"),
        "p99_ms": rounded("p99"),
        "mean_ms": rounded("mean"),
    }


# -- processes -----------------------------------------------------------------------------------


def wait_http(url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")


class Handle(str):
    """A server's base URL that also knows its process id (for CPU accounting)."""

    pid: int = 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def gateway_process(service: LLMService, replicas: Sequence[tuple[str, str]], work: Path) -> Iterator[Handle]:
    spec = work / f"gateway-{service.spec.routing.policy}.yaml"
    spec.write_text(yaml.safe_dump(service.model_dump(by_alias=True, exclude_none=True, mode="json")))
    port = free_port()
    argv = [sys.executable, "-m", "tokenfleet.engine.gateway", "-f", str(spec), "--port", str(port)]
    for rid, url in replicas:
        argv += ["--replica", f"{rid}={url}"]
    process = subprocess.Popen(argv, env={**os.environ, "PYTHONSAFEPATH": "1"}, cwd=work)
    url = Handle(f"http://127.0.0.1:{port}")
    url.pid = process.pid
    try:
        wait_http(f"{url}/ready", 60, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def fake_process(work: Path) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "tokenfleet.load.fake_engine", "--port", str(port)]
    process = subprocess.Popen(argv, env={**os.environ, "PYTHONSAFEPATH": "1"}, cwd=work)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 30, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def start_engine(service: LLMService, model_path: str, work: Path, port: int | None = None) -> EngineProcess:
    port = port or free_port()
    command: EngineCommand = engine_command(service.spec, model_path, port=port)
    engine = EngineProcess(command, port=port, log_path=work / f"engine-{port}.log", cwd=work)
    engine.start()
    return engine


# -- 1. added latency ----------------------------------------------------------------------------


def paired_latency(
    direct: str, via: str, body: dict[str, Any], pairs: int, warmup: int = 10
) -> dict[str, Any]:
    """Alternate direct and gateway calls (random order per pair) so drift hits both equally."""
    rng = random.Random(0)
    samples: dict[str, list[float]] = {"direct": [], "gateway": []}
    pid = getattr(via, "pid", 0)
    cpu_start = 0.0
    with httpx.Client(trust_env=False, timeout=60) as client:
        for i in range(warmup + pairs):
            if i == warmup and pid:
                cpu_start = cpu_seconds(pid)
            order = [("direct", direct), ("gateway", via)]
            rng.shuffle(order)
            for side, base in order:
                started = time.perf_counter()
                reply = client.post(f"{base}/v1/completions", json=body)
                elapsed = time.perf_counter() - started
                if reply.status_code != 200:
                    raise RuntimeError(f"{side} answered {reply.status_code}: {reply.text[:200]}")
                if i >= warmup:
                    samples[side].append(elapsed)
    # CPU the gateway process spent per request: independent of how busy the machine is,
    # unlike wall-clock latency on a shared 2-core box.
    cpu_ms = round((cpu_seconds(pid) - cpu_start) * 1000 / pairs, 3) if pid else None
    diffs = [g - d for g, d in zip(samples["gateway"], samples["direct"], strict=True)]
    straight, proxied = describe_ms(samples["direct"]), describe_ms(samples["gateway"])
    return {
        "gateway_cpu_ms_per_request": cpu_ms,
        "load_average": os.getloadavg()[0],
        "direct": straight,
        "gateway": proxied,
        "added": describe_ms(diffs),
        "added_p50_ms": round(proxied["p50_ms"] - straight["p50_ms"], 3),
        "added_p99_ms": round(proxied["p99_ms"] - straight["p99_ms"], 3),
    }


# -- 2. policies ---------------------------------------------------------------------------------


def prefix_counters(urls: Sequence[str]) -> tuple[float, float]:
    from tokenfleet.engine.gateway.replicas import parse_engine_metrics

    hits = queries = 0.0
    for url in urls:
        stats = parse_engine_metrics(httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text)
        hits += stats.prefix_hits
        queries += stats.prefix_queries
    return hits, queries


def compare_policies(
    engines: Sequence[str], work: Path, duration_s: float, log: Log, workload_path: Path
) -> dict[str, Any]:
    from tokenfleet.load.bench import run_workload
    from tokenfleet.load.workload import load_workload

    base = load_workload(workload_path)
    results: dict[str, Any] = {}
    for index, policy in enumerate(("round_robin", "least_outstanding", "prefix_affinity")):
        # A fresh seed per policy: new prefixes, so no policy starts with a cache another warmed.
        workload = base.model_copy(update={"seed": base.seed + 1000 * (index + 1)})
        members = [(f"r{i}", url) for i, url in enumerate(engines)]
        with gateway_process(bench_service(policy), members, work) as url:
            hits0, queries0 = prefix_counters(engines)
            log(f"bench gateway: policy {policy}, {duration_s:.0f}s of {base.name}")
            result = run_workload(workload, url, duration_s, work / f"policy-{policy}")
            hits1, queries1 = prefix_counters(engines)
        overall = result.summary["overall"]
        queries = queries1 - queries0
        results[policy] = {
            "ttft": overall.get("ttft"),
            "requests": overall.get("requests", overall.get("count")),
            "errors": overall.get("failed"),
            "prefix_cache_hit_rate": round((hits1 - hits0) / queries, 4) if queries else None,
            "load_average": os.getloadavg()[0],
            "results_dir": str(result.dir),
        }
    return results


# -- 3. failover ---------------------------------------------------------------------------------


def failover_workload() -> Workload:
    """Four closed-loop users streaming answers long enough that the kill lands mid-stream."""
    from tokenfleet.load.workload import parse_workload

    document = {
        "name": "failover",
        "seed": 5,
        "stream": True,
        "ignoreEos": True,
        "prompts": {"kind": "synthetic", "inputTokens": {"dist": "fixed", "value": 8}},
        "outputTokens": {"dist": "fixed", "value": 128},
        "arrival": {"mode": "closed", "shape": {"kind": "constant", "value": 4}},
    }
    return parse_workload(document, "failover")


def stream_outcomes(records: Iterable[RequestRecord]) -> dict[str, int]:
    """How each request of the failover load ended: lost before its first token (refused, reset,
    timed out), broken after it, or completed. Requests the harness cut at its own stop are not
    the gateway's doing and are counted apart."""
    counts = {
        "requests": 0,
        "lost_before_streaming": 0,
        "broken_mid_stream": 0,
        "completed": 0,
        "cut_at_stop": 0,
    }
    for record in records:
        counts["requests"] += 1
        if record.ok:
            counts["completed"] += 1
        elif record.error == UNFINISHED:
            counts["cut_at_stop"] += 1
        elif record.first_chunk_s is None:
            counts["lost_before_streaming"] += 1
        else:
            counts["broken_mid_stream"] += 1
    return counts


def _replica_state(url: str, replica: str) -> dict[str, Any]:
    """One replica's row of the gateway's /admin/status ({} when the gateway does not answer)."""
    try:
        status = httpx.get(f"{url}/admin/status", timeout=5, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return {}
    rows: dict[str, dict[str, Any]] = {r["id"]: r for r in status.get("replicas", [])}
    return rows.get(replica, {})


def failover_run(
    service: LLMService, model_path: str, work: Path, duration_s: float, log: Log, *, resume: bool = True
) -> dict[str, Any]:
    from tokenfleet.load.bench import run_workload

    engines = [start_engine(service, model_path, work), start_engine(service, model_path, work)]
    mode = "with" if resume else "without"
    try:
        for engine in engines:
            engine.wait_ready(600)
        members = [("keep", engines[0].url), ("victim", engines[1].url)]
        with gateway_process(bench_service("round_robin", resume=resume), members, work) as url:
            victim = engines[1]
            timeline: dict[str, float] = {}

            def kill_then_restart() -> None:
                # Counted from the victim's first request, not from the call: Locust takes seconds
                # to start, and a kill before the load would break nothing. It lands while the
                # victim has streams in flight.
                deadline = time.monotonic() + 120
                first: float | None = None
                while time.monotonic() < deadline:
                    state = _replica_state(url, "victim")
                    if first is None and state.get("requests", 0):
                        first = time.monotonic()
                    if (
                        first is not None
                        and time.monotonic() - first >= KILL_AFTER_S
                        and state.get("in_flight")
                    ):
                        break
                    time.sleep(0.05)
                assert victim.process is not None
                os.killpg(victim.process.pid, signal.SIGKILL)
                timeline["killed"] = time.monotonic()
                victim.process.wait()
                victim.start()
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    if _replica_state(url, "victim").get("state") == "ready":
                        timeline["readmitted"] = time.monotonic()
                        return
                    time.sleep(0.2)

            log(
                f"bench gateway: failover {mode} resume, {duration_s:.0f}s load, SIGKILL at {KILL_AFTER_S:g}s"
            )
            chaos = threading.Thread(target=kill_then_restart)
            chaos.start()
            result = run_workload(failover_workload(), url, duration_s, work / f"failover-{mode}-resume")
            chaos.join()
            metrics = httpx.get(f"{url}/metrics", timeout=5, trust_env=False).text
    finally:
        for engine in engines:
            engine.stop(timeout_s=20)
    outcomes = stream_outcomes(read_records([result.dir / "requests.jsonl"]))
    return {
        **outcomes,
        "load_s": duration_s,
        "retries": promtext.value(metrics, "tokenfleet_gateway_retries_total"),
        "capacity_back_s": round(timeline["readmitted"] - timeline["killed"], 1)
        if "readmitted" in timeline and "killed" in timeline
        else None,
    }


# -- report --------------------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    lines = ["# Gateway benchmark", "", f"Machine: {results['machine']}. Date: {results['date']}.", ""]
    lines += [
        "## Added latency (paired, sequential, non-streaming, max_tokens=1)",
        "",
        "| upstream | direct p50 | gateway p50 | added p50 | direct p99 | gateway p99 | added p99 | "
        "per-pair diff p50 / p99 | gateway CPU / request | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.get("overhead", {}).items():
        lines.append(
            f"| {name} | {row['direct']['p50_ms']:.2f} ms | {row['gateway']['p50_ms']:.2f} ms | "
            f"**{row['added_p50_ms']:.2f} ms** | {row['direct']['p99_ms']:.2f} ms | "
            f"{row['gateway']['p99_ms']:.2f} ms | **{row['added_p99_ms']:.2f} ms** | "
            f"{row['added']['p50_ms']:.2f} / {row['added']['p99_ms']:.2f} ms | "
            f"{row.get('gateway_cpu_ms_per_request')} ms | {row.get('load_average', 0):.1f} |"
        )
    policies = results.get("policies")
    if policies:
        lines += [
            "",
            "## Routing policies, 2 replicas, prefix workload (48 prefixes of ~320 tokens)",
            "",
            "| policy | requests | errors | mean TTFT | p50 TTFT | p99 TTFT | prefix-cache hit rate "
            "| load avg |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for policy, row in policies.items():
            ttft = row.get("ttft") or {}
            hit = row.get("prefix_cache_hit_rate")
            lines.append(
                f"| {policy} | {row.get('requests')} | {row.get('errors')} | {_ms(ttft.get('mean'))} | "
                f"{_ms(ttft.get('p50'))} | {_ms(ttft.get('p99'))} | {'-' if hit is None else f'{hit:.1%}'} | "
                f"{row.get('load_average', 0):.1f} |"
            )
    for key, title in (("failover", "without stream resume"), ("failover_resume", "with stream resume")):
        failover = results.get(key)
        if failover:
            lines += [
                "",
                f"## Failover {title} (SIGKILL of one of 2 replicas under streaming load, then restart)",
                "",
            ]
            lines += [f"- {name.replace('_', ' ')}: {value}" for name, value in failover.items()]
    lines += ["", "Raw numbers: `gateway.json` next to this file.", ""]
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def run_bench(
    out_dir: Path,
    *,
    pairs: int = 1000,
    policy_duration_s: float = 40.0,
    failover_s: float = 20.0,
    skip: Sequence[str] = (),
    log: Log = print,
) -> dict[str, Any]:
    import platform

    from tokenfleet.models import ensure_builtin

    model_path = str(ensure_builtin("tiny-random"))
    service = bench_service()
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "overhead": {},
    }
    body = {"model": "tiny", "prompt": "def f(", "max_tokens": 1}
    with tempfile.TemporaryDirectory(prefix="tokenfleet-bench-") as tmp:
        work = Path(tmp)
        if "overhead" not in skip:
            with fake_process(work) as fake, gateway_process(service, [("r0", fake)], work) as via:
                log(f"bench gateway: added latency vs a fake replica, {pairs} pairs")
                results["overhead"]["fake replica (proxy cost only)"] = paired_latency(fake, via, body, pairs)
        engines: list[EngineProcess] = []
        try:
            if "overhead" not in skip or "policies" not in skip:
                # The latency part needs one replica; only the policy comparison needs two.
                count = 2 if "policies" not in skip else 1
                engines = [start_engine(service, model_path, work) for _ in range(count)]
                for engine in engines:
                    engine.wait_ready(600)
            if "overhead" not in skip:
                with gateway_process(service, [("r0", engines[0].url)], work) as via:
                    log(f"bench gateway: added latency vs vLLM (tiny-random), {pairs} pairs")
                    results["overhead"]["vLLM replica"] = paired_latency(engines[0].url, via, body, pairs)
            if "policies" not in skip:
                workload = Path(__file__).resolve().parent / "workloads" / "prefix-affinity.yaml"
                results["policies"] = compare_policies(
                    [e.url for e in engines], work, policy_duration_s, log, workload
                )
        finally:
            for engine in engines:
                engine.stop(timeout_s=20)
        if "failover" not in skip:
            # Broken streams without and with resume (issue 12: 0 broken, 0 failed with it).
            results["failover"] = failover_run(service, model_path, work, failover_s, log, resume=False)
            results["failover_resume"] = failover_run(service, model_path, work, failover_s, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gateway.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "gateway.md").write_text(render(results))
    return results


def cmd_bench_gateway(args: argparse.Namespace) -> int:
    results = run_bench(
        Path(args.out),
        pairs=args.pairs,
        policy_duration_s=args.duration,
        failover_s=args.failover_s,
        skip=args.skip or (),
    )
    print(render(results))
    return 0


def register(bench_sub: Any) -> None:
    parser = bench_sub.add_parser("gateway", help="gateway overhead, routing policies and failover")
    parser.add_argument("--out", default="docs/results", help="directory for gateway.md and gateway.json")
    parser.add_argument(
        "--pairs",
        type=int,
        default=1000,
        help="paired requests per latency measurement (p99 from the top 10)",
    )
    parser.add_argument("--duration", type=float, default=40.0, help="seconds per policy run")
    parser.add_argument(
        "--failover-s", type=float, default=20.0, help="seconds of streaming load per failover run"
    )
    parser.add_argument("--skip", action="append", choices=["overhead", "policies", "failover"])
    parser.set_defaults(handler=cmd_bench_gateway)
