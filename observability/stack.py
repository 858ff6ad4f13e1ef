"""The Prometheus and Alertmanager that `tokenfleet up` runs next to its fleet.

Prometheus scrapes the gateway (which also serves the control loop's series) and every replica,
found through a file-based service discovery file this module rewrites when replicas come and go;
it evaluates the project's rule files (observability/rules/) and sends alerts to an Alertmanager
running the project's routing (observability/alertmanager/), its receivers pointed at a local
webhook. The decisions (targets, configs) are pure functions; `LocalStack` only writes files and
runs the two processes, with their data under the fleet's cache directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml

from tokenfleet.observability import prometheusrule

log = logging.getLogger(__name__)

PROMETHEUS_URL_ENV = "TOKENFLEET_PROMETHEUS_URL"
WEBHOOK_ENV = "TOKENFLEET_ALERT_WEBHOOK_URL"
# A factor on every alert rule's `for:` hold (e.g. 0.1: a 2m hold becomes 12s), so a short demo or
# an end-to-end test sees the project's own rules fire; unset, the rules run as written.
FOR_SCALE_ENV = "TOKENFLEET_ALERT_FOR_SCALE"
# Prometheus keeps its newest samples in an in-memory head block and cuts it into a persistent
# block every 2 h by default, so its memory grows for hours however healthy it is. A soak sets a
# shorter block (e.g. 15m) to see that growth level off within its run; unset, the default.
BLOCK_DURATION_ENV = "TOKENFLEET_PROMETHEUS_BLOCK_DURATION"
BLOCK_DURATION = re.compile(r"^[1-9][0-9]*[mh]$")
ALERTMANAGER_CONFIG = prometheusrule.ROOT / "alertmanager" / "alertmanager.yaml"
INSTALL_HINT = (
    "No Prometheus: install it for live charts and alerts (sudo apt-get install prometheus "
    "prometheus-alertmanager, as scripts/install.sh does), then restart `tokenfleet up`."
)
GATEWAY_JOB = "tokenfleet-gateway"
ENGINE_JOB = "tokenfleet-engine"


class StackError(RuntimeError):
    pass


# -- decisions ---------------------------------------------------------------------------------


def _address(url: str) -> str:
    parts = urlsplit(url)
    if not parts.hostname or parts.port is None:
        raise ValueError(f"a scrape target needs host and port: {url!r}")
    return f"{parts.hostname}:{parts.port}"


def scrape_targets(gateway_url: str | None, replicas: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """File-SD groups: the gateway (its /metrics also carries the control loop's series) and each
    replica, `instance` set to the replica id so series and alerts name replicas, not ports."""
    groups: list[dict[str, Any]] = []
    if gateway_url is not None:
        groups.append(
            {"targets": [_address(gateway_url)], "labels": {"job": GATEWAY_JOB, "instance": "gateway"}}
        )
    for replica_id, url in sorted(replicas):
        groups.append({"targets": [_address(url)], "labels": {"job": ENGINE_JOB, "instance": replica_id}})
    return groups


# prometheus_client 0.26 (vLLM's /metrics) writes `vllm:x` samples as `vllm_x` when Prometheus
# 2.42 negotiates OpenMetrics, and this Prometheus cannot ask for the text format: put the colon back.
VLLM_NAMES = {
    "source_labels": ["__name__"],
    "regex": "vllm_(.+)",
    "target_label": "__name__",
    "replacement": "vllm:$1",
}


def prometheus_config(
    sd_file: Path, rule_files: Iterable[Path], alertmanager: str | None, interval_s: float
) -> dict[str, Any]:
    interval = f"{max(1, round(interval_s))}s"
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": "tokenfleet",
                # The file is rewritten atomically; the refresh is only a fallback to inotify.
                "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "5s"}],
                "metric_relabel_configs": [VLLM_NAMES],
            }
        ],
    }
    if alertmanager is not None:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [_address(alertmanager)]}]}]}
    return config


def local_alertmanager_config(
    base: Mapping[str, Any], webhook_url: str | None, group_timers_s: float | None = None
) -> dict[str, Any]:
    """The project's routing with every receiver's webhook pointed at `webhook_url` (or at
    nothing: alerts still show in Alertmanager and on the dashboard); `group_timers_s` shortens
    the grouping waits, for tests that wait for a resolved notification."""
    config = copy.deepcopy(dict(base))
    for receiver in config.get("receivers", []):
        for key in [k for k in receiver if k.endswith("_configs")]:
            del receiver[key]
        if webhook_url is not None:
            receiver["webhook_configs"] = [{"url": webhook_url, "send_resolved": True}]
    if group_timers_s is not None:
        timer = f"{max(1, round(group_timers_s))}s"
        routes = [config["route"]]
        while routes:
            route = routes.pop()
            route.update(group_wait=timer, group_interval=timer)
            routes.extend(route.get("routes", []))
    return config


def scaled_rule_groups(groups: list[dict[str, Any]], for_scale: float) -> list[dict[str, Any]]:
    """The rules with every `for:` hold multiplied by `for_scale` (tests see alerts fire in seconds)."""
    out = copy.deepcopy(groups)
    for group in out:
        group.pop("interval", None)
        for rule in group["rules"]:
            if "for" in rule:
                seconds = _seconds(str(rule["for"])) * for_scale
                rule["for"] = f"{round(seconds)}s"
    return out


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    for suffix in ("ms", "s", "m", "h", "d"):
        if duration.endswith(suffix) and duration[: -len(suffix)].isdigit():
            return int(duration[: -len(suffix)]) * units[suffix]
    raise ValueError(f"unsupported duration {duration!r}")


def binaries() -> dict[str, str | None]:
    """Debian names Alertmanager `prometheus-alertmanager`; upstream tarballs `alertmanager`."""
    return {
        "prometheus": shutil.which("prometheus"),
        "alertmanager": shutil.which("alertmanager") or shutil.which("prometheus-alertmanager"),
    }


# -- processes ---------------------------------------------------------------------------------


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the fleet dies, so no Prometheus outlives it
    holding its data directory's lock."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class LocalStack:
    """Prometheus + Alertmanager on 127.0.0.1, free ports, data and logs under `data_dir`.

    Spawn from the thread that stays alive (the event loop's): the children die with it."""

    data_dir: Path
    webhook_url: str | None = None
    interval_s: float = 2.0
    rule_files: list[Path] = field(default_factory=prometheusrule.rule_files)
    group_timers_s: float | None = None
    block_duration: str | None = None  # Prometheus's TSDB block (both min and max); None: its default
    host: str = "127.0.0.1"
    prometheus_port: int = 0
    alertmanager_port: int = 0
    _processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _targets: list[dict[str, Any]] | None = None

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.host}:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://{self.host}:{self.alertmanager_port}"

    @property
    def sd_file(self) -> Path:
        return self.data_dir / "targets.json"

    def spawn(self) -> None:
        found = binaries()
        if found["prometheus"] is None:
            raise StackError(INSTALL_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.sd_file.exists():
            self.set_targets(None, [])
        alertmanager = found["alertmanager"]
        if alertmanager is not None:
            self.alertmanager_port = self.alertmanager_port or _free_port(self.host)
            base = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
            config = local_alertmanager_config(base, self.webhook_url, self.group_timers_s)
            (self.data_dir / "alertmanager.yml").write_text(yaml.safe_dump(config, sort_keys=False))
            self._spawn(
                "alertmanager",
                [
                    alertmanager,
                    f"--config.file={self.data_dir / 'alertmanager.yml'}",
                    f"--storage.path={self.data_dir / 'alertmanager'}",
                    f"--web.listen-address={self.host}:{self.alertmanager_port}",
                    "--cluster.listen-address=",  # no gossip port: one local instance
                ],
            )
        self.prometheus_port = self.prometheus_port or _free_port(self.host)
        config = prometheus_config(
            self.sd_file,
            self.rule_files,
            self.alertmanager_url if alertmanager is not None else None,
            self.interval_s,
        )
        (self.data_dir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self._spawn(
            "prometheus",
            [
                str(found["prometheus"]),
                f"--config.file={self.data_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.data_dir / 'prometheus'}",
                "--storage.tsdb.retention.time=2d",
                f"--web.listen-address={self.host}:{self.prometheus_port}",
                *block_flags(self.block_duration),
            ],
        )

    def _spawn(self, name: str, command: list[str]) -> None:
        with (self.data_dir / f"{name}.log").open("ab") as out:
            self._processes[name] = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    def _ready_urls(self) -> dict[str, str]:
        urls = {"prometheus": f"{self.prometheus_url}/-/ready"}
        if "alertmanager" in self._processes:
            urls["alertmanager"] = f"{self.alertmanager_url}/-/ready"
        return urls

    def _check_alive(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is not None:
                tail = (self.data_dir / f"{name}.log").read_text(errors="replace")[-600:]
                raise StackError(f"{name} exited with code {process.returncode}: {tail}")

    def start(self, timeout_s: float = 30.0) -> LocalStack:
        """Spawn and wait until both answer /-/ready (stopped again if they never do)."""
        self.spawn()
        try:
            asyncio.run(self.wait_ready(timeout_s))  # callers without an event loop (tests)
        except BaseException:
            self.stop()
            raise
        return self

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """`start`'s wait, on the event loop (the gateway keeps serving meanwhile)."""
        pending = self._ready_urls()
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(trust_env=False, timeout=1.0) as client:
            while pending:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise StackError(f"not ready in {timeout_s:.0f} s: {sorted(pending)}")
                for name, url in list(pending.items()):
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(url)).status_code == 200:
                            del pending[name]
                await asyncio.sleep(0.1)

    def set_targets(self, gateway_url: str | None, replicas: Iterable[tuple[str, str]]) -> bool:
        """Rewrite the file-SD file when the targets changed; True when written."""
        targets = scrape_targets(gateway_url, replicas)
        if targets == self._targets:
            return False
        self.data_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.sd_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(targets, indent=1))
        temporary.replace(self.sd_file)  # Prometheus never reads a half-written file
        self._targets = targets
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        for process in self._processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        for process in self._processes.values():
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self._processes.clear()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def local_rule_files(data_dir: Path, environ: Mapping[str, str]) -> list[Path]:
    """The rule files `tokenfleet up`'s Prometheus loads: the project's, or with
    $TOKENFLEET_ALERT_FOR_SCALE a copy with every `for:` hold scaled. Raises StackError on a
    factor that is not a non-negative number."""
    value = environ.get(FOR_SCALE_ENV)
    if not value:
        return prometheusrule.rule_files()
    try:
        scale = float(value)
    except ValueError:
        scale = -1.0
    if not scale >= 0:  # also refuses NaN
        raise StackError(f"${FOR_SCALE_ENV} must be a non-negative number, got {value!r}")
    return write_scaled_rules(data_dir / "rules", scale)


def block_duration(environ: Mapping[str, str]) -> str | None:
    """$TOKENFLEET_PROMETHEUS_BLOCK_DURATION, checked (minutes or hours, e.g. 15m); None unset.
    Raises StackError on any other value: Prometheus would not start with it."""
    value = environ.get(BLOCK_DURATION_ENV)
    if not value:
        return None
    if not BLOCK_DURATION.match(value):
        raise StackError(f"${BLOCK_DURATION_ENV} must be minutes or hours like 15m or 1h, got {value!r}")
    return value


def block_flags(duration: str | None) -> list[str]:
    # Both bounds: compaction would otherwise merge the short blocks back into long ones.
    if duration is None:
        return []
    return [f"--storage.tsdb.min-block-duration={duration}", f"--storage.tsdb.max-block-duration={duration}"]


def write_scaled_rules(directory: Path, for_scale: float) -> list[Path]:
    """A copy of the project's rules with `for:` scaled, for tests that wait for an alert."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenfleet.rules.yaml"
    groups = scaled_rule_groups(prometheusrule.load_groups(), for_scale)
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return [path]


# -- `tokenfleet up` ---------------------------------------------------------------------------


@dataclass
class FleetObservability:
    """The hook `tokenfleet up` calls: start the stack once the gateway listens, follow the
    replicas, stop with the fleet. A missing binary or a failed start never stops the fleet."""

    data_dir: Path
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    stack: LocalStack | None = None
    notice: str | None = None
    _gateway_url: str | None = None

    async def start(self, host: str, port: int, say: Callable[[str], None] = print) -> str | None:
        """Start Prometheus and Alertmanager for the gateway on host:port; Prometheus's URL, or
        None with `notice` saying why."""
        # A gateway on every interface is scraped on loopback.
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self._gateway_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        stack = self.stack = LocalStack(self.data_dir, webhook_url=self.environ.get(WEBHOOK_ENV) or None)
        try:
            stack.rule_files = local_rule_files(self.data_dir, self.environ)
            stack.block_duration = block_duration(self.environ)
            stack.spawn()
            stack.set_targets(self._gateway_url, [])
            await stack.wait_ready()
        except (StackError, OSError) as exc:
            self.stop()
            self.notice = (
                INSTALL_HINT if binaries()["prometheus"] is None else f"Prometheus did not start: {exc}"
            )
            say(f"tokenfleet: {self.notice}")
            return None
        except BaseException:  # cancelled while waiting: no Prometheus outlives the fleet
            self.stop()
            raise
        alerts = f", Alertmanager on {stack.alertmanager_url}" if stack.alertmanager_port else ""
        say(f"tokenfleet: Prometheus on {stack.prometheus_url}{alerts} (data in {self.data_dir})")
        return stack.prometheus_url

    def replicas(self, replicas: list[tuple[str, str]]) -> None:
        if self.stack is None:
            return
        try:
            self.stack.set_targets(self._gateway_url, replicas)
        except OSError as exc:  # a full disk must not fail the control loop's tick
            log.warning("could not write Prometheus targets: %s", exc)

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
            self.stack = None
