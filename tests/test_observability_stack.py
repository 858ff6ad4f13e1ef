"""`tokenfleet up`'s Prometheus and Alertmanager: the configs and targets they get (pure), the
real binaries scraping a small exposition, an alert going through Alertmanager to a webhook and
back resolved, and a fleet with fake replicas whose targets follow its replicas."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import free_port, tiny_service
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from test_fleet import fake_launcher

from tokenfleet.engine.fleet import serve_fleet
from tokenfleet.observability import prometheusrule, stack
from tokenfleet.observability.stack import (
    BLOCK_DURATION_ENV,
    FOR_SCALE_ENV,
    INSTALL_HINT,
    FleetObservability,
    LocalStack,
    block_duration,
    block_flags,
    local_alertmanager_config,
    local_rule_files,
    prometheus_config,
    scaled_rule_groups,
    scrape_targets,
    write_scaled_rules,
)

BINARIES = stack.binaries()
needs_prometheus = pytest.mark.skipif(
    BINARIES["prometheus"] is None or BINARIES["alertmanager"] is None,
    reason="prometheus/alertmanager missing: scripts/install.sh installs Debian's packages",
)
BASE_ALERTMANAGER = yaml.safe_load(stack.ALERTMANAGER_CONFIG.read_text())


# -- pure -------------------------------------------------------------------------------------


def test_scrape_targets_name_the_gateway_and_each_replica() -> None:
    groups = scrape_targets(
        "http://127.0.0.1:8000",
        [("replica-1", "http://127.0.0.1:9002"), ("replica-0", "http://127.0.0.1:9001")],
    )
    assert groups == [
        {"targets": ["127.0.0.1:8000"], "labels": {"job": "tokenfleet-gateway", "instance": "gateway"}},
        {"targets": ["127.0.0.1:9001"], "labels": {"job": "tokenfleet-engine", "instance": "replica-0"}},
        {"targets": ["127.0.0.1:9002"], "labels": {"job": "tokenfleet-engine", "instance": "replica-1"}},
    ]
    assert scrape_targets(None, []) == []
    with pytest.raises(ValueError, match="host and port"):
        scrape_targets("http://127.0.0.1", [])


def test_prometheus_config_reads_the_sd_file_rules_and_alertmanager(tmp_path: Path) -> None:
    rules = prometheusrule.rule_files()
    config = prometheus_config(tmp_path / "t.json", rules, "http://127.0.0.1:9093", 2.0)
    assert config["global"]["scrape_interval"] == "2s"
    assert config["rule_files"] == [str(p) for p in rules]
    assert config["scrape_configs"][0]["file_sd_configs"][0]["files"] == [str(tmp_path / "t.json")]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]
    assert "alerting" not in prometheus_config(tmp_path / "t.json", rules, None, 1.0)


def test_local_alertmanager_config_keeps_routing_and_points_receivers_at_the_webhook() -> None:
    local = local_alertmanager_config(BASE_ALERTMANAGER, "http://127.0.0.1:5001/hook")
    assert local["route"] == BASE_ALERTMANAGER["route"]
    assert local["inhibit_rules"] == BASE_ALERTMANAGER["inhibit_rules"]
    assert {r["name"] for r in local["receivers"]} == {r["name"] for r in BASE_ALERTMANAGER["receivers"]}
    for receiver in local["receivers"]:
        assert receiver["webhook_configs"] == [{"url": "http://127.0.0.1:5001/hook", "send_resolved": True}]
    silent = local_alertmanager_config(BASE_ALERTMANAGER, None, group_timers_s=1)
    assert all(set(r) == {"name"} for r in silent["receivers"])
    assert silent["route"]["group_interval"] == "1s"
    assert all(r["group_wait"] == "1s" for r in silent["route"]["routes"])
    assert "alert-bridge" in json.dumps(BASE_ALERTMANAGER)  # the project's file is not changed


def test_scaled_rules_shorten_every_hold() -> None:
    groups = prometheusrule.load_groups()
    scaled = scaled_rule_groups(groups, 0.5)
    holds = [
        (r["for"], s["for"])
        for g, h in zip(groups, scaled, strict=True)
        for r, s in zip(g["rules"], h["rules"], strict=True)
        if "for" in r
    ]
    assert ("2m", "60s") in holds
    assert all(s != r for r, s in holds)
    assert all("interval" not in g for g in scaled)


def test_the_block_duration_is_prometheus_default_unless_set() -> None:
    assert block_duration({}) is None
    assert block_flags(None) == []
    assert block_duration({BLOCK_DURATION_ENV: "15m"}) == "15m"
    both = ["--storage.tsdb.min-block-duration=1h", "--storage.tsdb.max-block-duration=1h"]
    assert block_flags("1h") == both
    for bad in ("15", "0m", "15 m", "2d", "-1h", "15m; rm"):
        with pytest.raises(stack.StackError, match=BLOCK_DURATION_ENV):
            block_duration({BLOCK_DURATION_ENV: bad})


def test_tokenfleet_up_scales_the_rules_holds_only_when_asked(tmp_path: Path) -> None:
    assert local_rule_files(tmp_path, {}) == prometheusrule.rule_files()
    (scaled,) = local_rule_files(tmp_path, {FOR_SCALE_ENV: "0.1"})
    assert scaled.parent == tmp_path / "rules"
    rules = {r["alert"]: r for g in prometheusrule.load_groups([scaled]) for r in g["rules"] if "alert" in r}
    assert rules["TokenfleetReplicaDown"]["for"] == "12s"  # 2m as written
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(stack.StackError, match=FOR_SCALE_ENV):
            local_rule_files(tmp_path, {FOR_SCALE_ENV: bad})


@pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("amtool") is None, reason="promtool/amtool missing"
)
def test_generated_configs_pass_promtool_and_amtool(tmp_path: Path) -> None:
    rules = write_scaled_rules(tmp_path / "rules", 0.0)
    config = prometheus_config(tmp_path / "targets.json", rules, "http://127.0.0.1:9093", 1.0)
    (tmp_path / "targets.json").write_text(json.dumps(scrape_targets("http://127.0.0.1:8000", [])))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (tmp_path / "am.yml").write_text(
        yaml.safe_dump(local_alertmanager_config(BASE_ALERTMANAGER, "http://127.0.0.1:1/x"))
    )
    checked = subprocess.run(
        ["amtool", "check-config", str(tmp_path / "am.yml")], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_without_prometheus_the_fleet_hook_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack, "binaries", lambda: {"prometheus": None, "alertmanager": None})
    said: list[str] = []
    observe = FleetObservability(tmp_path, environ={})
    assert asyncio.run(observe.start("127.0.0.1", 8000, say=said.append)) is None
    assert observe.notice == INSTALL_HINT
    assert said == [f"tokenfleet: {INSTALL_HINT}"]
    observe.replicas([("replica-0", "http://127.0.0.1:9001")])  # no stack: nothing to update
    observe.stop()


# -- the real binaries ------------------------------------------------------------------------


class Hook:
    """A webhook receiver: what Alertmanager posts."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                hook.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.2)


def query(url: str, expr: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5, trust_env=False).json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


@pytest.fixture
def exposition() -> Iterator[tuple[str, Gauge]]:
    registry = CollectorRegistry()
    routable = Gauge("tokenfleet_gateway_replica_routable", "routable", ["replica"], registry=registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"http://127.0.0.1:{server.server_port}", routable
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@needs_prometheus
def test_replica_down_fires_and_resolves_through_alertmanager(
    tmp_path: Path, exposition: tuple[str, Gauge]
) -> None:
    url, routable = exposition
    routable.labels("r1").set(0)
    hook = Hook()
    local = LocalStack(
        tmp_path / "stack",
        webhook_url=hook.url,
        interval_s=1,
        rule_files=write_scaled_rules(tmp_path / "rules", 0.0),
        group_timers_s=1,
        block_duration="15m",
    )
    try:
        local.start()
        flags = httpx.get(f"{local.prometheus_url}/api/v1/status/flags", timeout=10, trust_env=False).json()
        assert flags["data"]["storage.tsdb.min-block-duration"] == "15m"
        assert flags["data"]["storage.tsdb.max-block-duration"] == "15m"
        assert local.set_targets(None, [("r1", url)])
        assert not local.set_targets(None, [("r1", url)])  # unchanged: not rewritten

        def notified(status: str) -> bool:
            return any(
                a["status"] == status and a["labels"]["alertname"] == "TokenfleetReplicaDown"
                for body in hook.bodies
                for a in body["alerts"]
            )

        wait_for(lambda: notified("firing"), "the firing alert reached the webhook")
        firing = next(a for b in hook.bodies for a in b["alerts"] if a["status"] == "firing")
        assert firing["labels"]["replica"] == "r1"
        assert firing["labels"]["instance"] == "r1"
        assert firing["annotations"]["summary"] == "Replica r1 receives no traffic"
        assert hook.bodies[0]["receiver"] == "team"  # severity=warning, by the project's routing
        routable.labels("r1").set(1)
        wait_for(lambda: notified("resolved"), "the resolved alert reached the webhook")
    finally:
        local.stop()
        hook.close()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{local.prometheus_url}/-/ready", timeout=1, trust_env=False)


@needs_prometheus
def test_tokenfleet_up_runs_prometheus_over_its_replicas_and_stops_it(tmp_path: Path) -> None:
    """serve_fleet with fake replicas: Prometheus scrapes the gateway and each replica, follows a
    replaced replica to its new port, and stops with the fleet."""
    service = tiny_service(routing={"policy": "round_robin", "probeIntervalS": 0.1, "ejectCooldownS": 0.2})
    port = free_port()
    gateway = f"http://127.0.0.1:{port}"
    logs: list[str] = []
    data = tmp_path / "observability"

    def prometheus_url() -> str | None:
        line = next((x for x in logs if x.startswith("tokenfleet: Prometheus on ")), None)
        return line.split()[3].rstrip(",") if line else None

    def up(url: str) -> dict[str, float]:
        return {s["metric"]["instance"]: float(s["value"][1]) for s in query(url, "up")}

    def targets() -> dict[str, str]:
        return {
            g["labels"]["instance"]: g["targets"][0] for g in json.loads((data / "targets.json").read_text())
        }

    async def scenario() -> str:
        stop = asyncio.Event()
        fleet = asyncio.create_task(
            serve_fleet(
                service,
                fake_launcher(tmp_path),
                replicas=2,
                port=port,
                stop=stop,
                tick_s=0.1,
                log=logs.append,
                observability_dir=data,
            )
        )
        try:
            url = None
            while url is None:
                assert not fleet.done(), logs
                await asyncio.sleep(0.1)
                url = prometheus_url()

            async def until(predicate: Callable[[], bool], what: str) -> None:
                deadline = time.monotonic() + 60
                while not predicate():
                    assert time.monotonic() < deadline, f"{what}; logs: {logs[-5:]}"
                    await asyncio.sleep(0.2)

            both = {"gateway": 1.0, "replica-0": 1.0, "replica-1": 1.0}
            await until(lambda: up(url) == both, "Prometheus never scraped the gateway and both replicas")
            # The control loop's series come from the gateway's /metrics target.
            assert query(url, 'tokenfleet_control_desired_replicas{instance="gateway"}')
            # The gateway runs on this loop: ask it asynchronously.
            async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
                snapshot = (await client.get(f"{gateway}/dashboard/api/snapshot")).json()
                status = (await client.get(f"{gateway}/admin/status")).json()
            assert snapshot["prometheus"] == url
            assert snapshot["notice"] is None
            assert snapshot["targets"] == {"gateway": True, "replica-0": True, "replica-1": True}
            old = targets()["replica-1"]
            os.kill(
                next(s["pid"] for s in status["fleet"]["slots"] if s["id"] == "replica-1"), signal.SIGKILL
            )
            await until(
                lambda: targets()["replica-1"] != old,
                "the replaced replica's new port never reached the targets",
            )
            await until(lambda: up(url).get("replica-1") == 1.0, "the replaced replica was not scraped again")
            return url
        finally:
            stop.set()
            await fleet

    url = asyncio.run(scenario())
    assert logs[-1] == "tokenfleet: stopped"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/-/ready", timeout=1, trust_env=False)
    assert (data / "prometheus").is_dir()  # its data lives under the fleet's directory
