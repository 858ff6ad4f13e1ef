"""An operator's day on the local fleet, in one bounded test (issue 18).

One `tokenfleet up` (the real CLI as a subprocess): two replicas of real vLLM on the default model
quantized to W4A16 (the pipeline's RTN checkpoint), the SLA scheduler, a gateway with API keys,
its Prometheus and Alertmanager, and traces to a local OTLP receiver. A Locust run of the load
harness sends three classes from two tenants, each with its own key, through the gateway, and
while it runs:

1. a replica's engine is SIGKILLed while it has requests in flight: the gateway retries or
   resumes them on the other replica and the control loop restarts it;
2. `tokenfleet apply` rolls an engine change out by canary and promotes it;
3. a bad canary (a context shorter than the workload's longest requests, which its vLLM refuses)
   is rolled back by the canary analysis on its own;
4. the dashboard is opened in headless Chromium over the fleet's real Prometheus.

Afterwards: the harness report exists; no request failed except the ones the bad canary refused
(each one counted by the gateway against that revision), and no stream broke; every answered
request has a trace gateway → engine; the dashboard shows the run and every alert that fired
while it was watched; every metric the dashboards and alert rules use has data in Prometheus.

It runs in every `make test` (about 9 minutes of the suite); alone: `.venv/bin/pytest tests/e2e -s`.
The pure verdicts below it are tested on fixed data.

Every wait polls observable state (the gateway's /admin/status, Prometheus) under a deadline, never
a fixed sleep (docs/adr/0004, "Testing on shared CPUs"). The durations of the phases are printed at
the end (`pytest -s`) and written to `day.json` in the test's directory.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, painted_pixels

from tokenfleet.engine.fleet import apply_spec
from tokenfleet.load.autoscale_bench import fleet_up
from tokenfleet.load.bench import BenchResult, run_workload
from tokenfleet.load.client import LLMRequest, build_http_request, read_stream
from tokenfleet.load.record import RequestRecord
from tokenfleet.load.workload import Workload, parse_workload
from tokenfleet.observability import grafana, prometheusrule
from tokenfleet.observability.catalogue import referenced_metrics
from tokenfleet.observability.dashboard import CHARTS
from tokenfleet.observability.otlp_receiver import OTLPReceiver, ReceivedSpan
from tokenfleet.observability.stack import FOR_SCALE_ENV, binaries
from tokenfleet.operator.control import revision_of
from tokenfleet.spec import LLMService, parse_service

NAME = "e2e-day"
GATEWAY_SERVICE = f"tokenfleet-gateway-{NAME}"
ENGINE_SERVICE = f"tokenfleet-engine-{NAME}"
QUANTIZATION = "rtn-w4a16"
RATE = 2.0  # req/s: light enough that a vLLM start beside the load takes tens of seconds
# The bad canary's context: the workload's batch answers (64-96 tokens after a 16-48 token prompt)
# and the longest others do not fit in it; the stable revision's 512 serves them all.
BAD_CONTEXT = 64
# Alert holds at a tenth of the rules' (2m -> 12s): the project's own rules fire in a short day.
FOR_SCALE = "0.1"
KEYS = {"acme": "e2e-acme-key", "globex": "e2e-globex-key"}
KEY_ENVS = {"acme": "E2E_ACME_API_KEY", "globex": "E2E_GLOBEX_API_KEY"}
CHROMIUM = shutil.which("chromium")
# What makes a subprocess measure itself (coverage's `patch = ["subprocess"]`, and the older way).
COVERAGE_ENVS = ("COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START")
Status = dict[str, Any]


# -- the service and the workload ----------------------------------------------------------------


def day_service(source: str, keys_file: Path, **changes: Any) -> LLMService:
    """Two replicas on the quantized default model behind an authenticating gateway; rollouts by
    canary with short steps (seconds of evidence instead of minutes)."""
    spec: dict[str, Any] = {
        "model": {"name": "tiny-code", "source": source, "quantization": QUANTIZATION, "maxModelLen": 512},
        "engine": {"maxNumSeqs": 8, "kvCacheGib": 1, "shutdownTimeoutS": 5},
        "scheduler": {
            "policy": "sla",
            "tenants": [{"name": "acme", "weight": 3}, {"name": "globex", "weight": 1}],
        },
        "replicas": {"min": 2, "max": 2},
        "rollout": {
            "strategy": "canary",
            "canarySteps": [50, 100],
            "stepDurationS": 10,
            # minRequests and warmupS stay at their defaults (20, 20 s): a fresh CPU engine's
            # first answers at a new batch shape stall for seconds, two or three at once, and 10
            # answers after 5 s judged such a stall as a slower revision.
            # Both revisions share two CPUs, so their TTFT is set by the CPU, not by the revision
            # (docs/results/control-loop.md): only a gross TTFT regression counts here.
            "maxTtftP99Ratio": 3,
            "ttftP99SlackMs": 1000,
        },
        "routing": {"policy": "least_outstanding", "probeIntervalS": 0.5},
        "gateway": {"auth": True, "apiKeysFile": str(keys_file)},
    }
    for section, values in changes.items():
        spec[section] = {**spec[section], **values}
    document = {"apiVersion": "tokenfleet.dev/v1alpha1", "kind": "LLMService", "metadata": {"name": NAME}}
    return parse_service({**document, "spec": spec}, NAME)


def day_workload() -> Workload:
    return parse_workload(
        {
            "name": "operator-day",
            "seed": 18,
            "prompts": {"kind": "synthetic", "inputTokens": {"dist": "uniform", "min": 16, "max": 48}},
            "outputTokens": {"dist": "uniform", "min": 8, "max": 32},
            "arrival": {
                "mode": "open",
                "process": "poisson",
                "maxConcurrency": 32,
                "shape": {"kind": "constant", "value": RATE},
            },
            "classes": [
                {"name": "interactive", "share": 2, "ttftMs": 2000, "tpotMs": 500},
                {"name": "standard", "share": 2, "ttftMs": 8000, "tpotMs": 1000},
                {"name": "batch", "share": 1, "outputTokens": {"dist": "uniform", "min": 64, "max": 96}},
            ],
            "tenants": [
                {"name": "acme", "share": 3, "apiKeyEnv": KEY_ENVS["acme"]},
                {"name": "globex", "share": 1, "apiKeyEnv": KEY_ENVS["globex"]},
            ],
        }
    )


def default_model() -> str:
    """The default model when this machine has it built (minutes to train otherwise); else the
    random-weight builtin of the same architecture, built in seconds. $TOKENFLEET_E2E_MODEL wins."""
    from tokenfleet.builtin_model import tiny_code
    from tokenfleet.models import builtin_path

    chosen = os.environ.get("TOKENFLEET_E2E_MODEL")
    if chosen:
        return chosen
    return (
        "builtin://tiny-code" if tiny_code.is_current(builtin_path("tiny-code")) else "builtin://tiny-random"
    )


def ensure_quantized(source: str, technique: str) -> Path:
    """The quantization pipeline's checkpoint of `source`, made now only when missing or stale: its
    environment and quantize steps, without the evaluations (each one starts vLLM)."""
    from tokenfleet.engine.quantize.config import parse_config
    from tokenfleet.engine.quantize.pipeline import STATE_NAME, build_steps, prepare
    from tokenfleet.engine.quantize.steps import run_steps

    prep = prepare(parse_config({"model": source, "techniques": [technique]}))
    wanted = {"quant-env", f"quantize:{technique}"}
    run_steps([s for s in build_steps(prep, None) if s.name in wanted], prep.out_dir / STATE_NAME)
    return prep.out_dir / technique


# -- pure verdicts over what the day recorded ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    start: float
    end: float

    def holds(self, t: float) -> bool:
        return self.start <= t <= self.end


def failures_outside(records: Sequence[RequestRecord], allowed: Window) -> list[RequestRecord]:
    """Failed requests sent outside the window where failures are expected (the bad canary's)."""
    return [r for r in records if not r.ok and not allowed.holds(r.send)]


def broken_streams(records: Sequence[RequestRecord]) -> list[RequestRecord]:
    """Streams that began (a first chunk arrived) and did not end well."""
    return [r for r in records if r.stream and r.first_chunk_s is not None and not r.ok]


VLLM_REQUEST_ID = re.compile(r"^(?:chat)?cmpl-(?P<id>.+)-\d+$")


def vllm_request_id(value: object) -> str | None:
    """The client's x-request-id inside vLLM's request id (`cmpl-<x-request-id>-<n>`)."""
    match = VLLM_REQUEST_ID.match(value) if isinstance(value, str) else None
    return match.group("id") if match else None


def untraced(records: Sequence[RequestRecord], spans: Sequence[ReceivedSpan]) -> list[str]:
    """Ids of answered requests without a trace gateway → engine: a span of the day's engines
    with the request's id whose parent is a gateway span of the same trace."""
    gateway_spans = {(s.trace_id, s.span_id) for s in spans if s.service == GATEWAY_SERVICE}
    traced = {
        rid
        for s in spans
        if s.name == "llm_request"
        and s.service == ENGINE_SERVICE
        and (s.trace_id, s.parent_span_id) in gateway_spans
        for rid in [vllm_request_id(s.attributes.get("gen_ai.request.id"))]
        if rid is not None
    }
    return [r.id for r in records if r.ok and r.id not in traced]


def lost_with_the_victim(
    missing: Sequence[str], records: Sequence[RequestRecord], killed_at: float, slack_s: float = 3.0
) -> list[str]:
    """The untraced requests a SIGKILL does not explain. An engine exports its spans in batches
    (every 0.5 s here): the victim takes the spans of the answers it gave just before the kill
    with it. Those are the only answered requests allowed no engine span."""
    ended = {r.id: r.end for r in records}
    return [
        rid
        for rid in missing
        if (end := ended.get(rid)) is None or not killed_at - slack_s <= end <= killed_at + slack_s
    ]


def fired(matrix: Sequence[Mapping[str, Any]]) -> dict[str, set[str]]:
    """alertname -> label sets (as text) of the ALERTS{alertstate="firing"} series of a range query."""
    out: dict[str, set[str]] = {}
    for series in matrix:
        labels = {k: v for k, v in series["metric"].items() if k not in ("__name__", "alertstate")}
        out.setdefault(labels.get("alertname", ""), set()).add(json.dumps(labels, sort_keys=True))
    return out


def missing_series(referenced: set[str], present: Mapping[str, bool]) -> list[str]:
    return sorted(name for name in referenced if not present.get(name, False))


def referenced_by_dashboards_and_rules() -> set[str]:
    names: set[str] = set()
    for path in sorted(grafana.OUT_DIR.glob("*.json")):
        for expr in grafana.expressions(json.loads(path.read_text())):
            names |= referenced_metrics(expr)
    for _, expr in prometheusrule.expressions():
        names |= referenced_metrics(expr)
    for chart in CHARTS:
        for expr, _ in chart.series:
            names |= referenced_metrics(expr)
    return names


# -- watching the fleet -----------------------------------------------------------------------------


@dataclass
class Phases:
    """Wall time of each phase of the day, in order."""

    started: float = field(default_factory=time.monotonic)
    marks: list[tuple[str, float]] = field(default_factory=list)

    def done(self, name: str) -> None:
        last = self.marks[-1][1] if self.marks else self.started
        self.marks.append((name, time.monotonic()))
        print(f"[e2e day] {name}: {time.monotonic() - last:.1f} s", flush=True)

    def table(self) -> dict[str, float]:
        out, last = {}, self.started
        for name, at in self.marks:
            out[name] = round(at - last, 1)
            last = at
        out["total"] = round(last - self.started, 1)
        return out


class Watcher(threading.Thread):
    """Samples /admin/status and keeps the dashboard's monitor ticking (it follows alerts, and
    remembers resolved ones, only while someone asks), until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.done = threading.Event()
        self.status: Status = {}
        self.snapshot: Status = {}
        self.started_at = time.time()

    def run(self) -> None:
        with httpx.Client(trust_env=False, timeout=10) as client:
            while not self.done.wait(1.0):
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    self.status = client.get(f"{self.url}/admin/status").json()
                    self.snapshot = client.get(f"{self.url}/dashboard/api/snapshot").json()


class Day:
    def __init__(self, url: str, workdir: Path) -> None:
        self.url = url
        self.workdir = workdir
        self.client = httpx.Client(trust_env=False, timeout=30)

    def status(self) -> Status:
        return self.client.get(f"{self.url}/admin/status").json()  # type: ignore[no-any-return]

    def wait(self, predicate: Callable[[Status], bool], what: str, timeout_s: float) -> Status:
        deadline = time.monotonic() + timeout_s
        status: Status = {}
        while True:
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError, TypeError):
                status = self.status()
                if predicate(status):
                    return status
            if time.monotonic() > deadline:
                log = (self.workdir / "up.log").read_text(errors="replace")[-3000:]
                fleet = status.get("fleet", {})
                raise AssertionError(
                    f"{what}: not within {timeout_s:.0f} s; rollout {fleet.get('rollout')}, "
                    f"slots {fleet.get('slots')}\nup.log:\n{log}"
                )
            time.sleep(0.5)

    def prometheus(self, path: str, **params: Any) -> Any:
        snapshot = self.client.get(f"{self.url}/dashboard/api/snapshot").json()
        body = self.client.get(f"{snapshot['prometheus']}{path}", params=params).json()
        assert body["status"] == "success", body
        return body["data"]


class HeldStream(threading.Thread):
    """A long stream on the victim, and the kill while it is open: the kill certainly hits a
    request in flight (the day's own answers are short: one seen in flight may end before the
    signal). It sends streams until the gateway's replica header names the victim, then calls
    `kill` itself, at once: the victim generates the whole answer in under a second, and handing
    the moment to another thread (a wake-up on a busy machine) could miss it. Then it reads that
    stream to its end with the harness's reader: `completed` when it ended with `[DONE]`, tokens
    and no error."""

    def __init__(self, url: str, victim: str, kill: Callable[[], None], timeout_s: float = 180) -> None:
        super().__init__(daemon=True)
        self.url, self.victim, self.kill, self.timeout_s = url, victim, kill, timeout_s
        self.killed = threading.Event()
        self.killed_at = 0.0
        self.completed = False
        self.error = ""

    def run(self) -> None:
        from tokenfleet.engine.gateway.forward import REPLICA_HEADER

        deadline = time.monotonic() + self.timeout_s
        with httpx.Client(trust_env=False, timeout=self.timeout_s) as client:
            for attempt in itertools.count():
                if time.monotonic() > deadline:
                    return
                key = KEYS["acme"]
                request = LLMRequest(f"held-{attempt}", "def main():", 440, tenant="acme", api_key=key)
                path, body, headers = build_http_request(request, "tiny-code")
                record = RequestRecord(request.id, request.cls, "acme", request.api, True, time.time())
                try:
                    with client.stream("POST", self.url + path, json=body, headers=headers) as answer:
                        if answer.headers.get(REPLICA_HEADER) != self.victim:
                            continue
                        self.killed_at = time.time()
                        self.kill()
                        self.killed.set()
                        read_stream(answer, time.perf_counter(), record)
                except httpx.HTTPError as exc:
                    record.error = repr(exc)
                if self.killed.is_set():
                    self.error = record.error or ""
                    self.completed = record.error is None and bool(record.output_tokens)
                    return


def slot(status: Status, rid: str) -> Status:
    return next((s for s in status["fleet"]["slots"] if s["id"] == rid), {})


def member(status: Status, rid: str) -> Status:
    return next((r for r in status["replicas"] if r["id"] == rid), {})


def on_revision(status: Status, revision: str, replicas: int = 2) -> bool:
    fleet = status["fleet"]
    slots = fleet["slots"]
    return (
        fleet["revision"] == revision
        and len(slots) == replicas
        and all(s["revision"] == revision and s["phase"] == "ready" for s in slots)
    )


@contextlib.contextmanager
def load_running(workload: Workload, url: str, out: Path) -> Iterator[Callable[[], BenchResult]]:
    """The harness's Locust run in a thread, with its web UI so the day can end it gracefully
    (Locust's /stop lets requests in flight finish; a signal would cut them off). Yields `finish`."""
    web_port = free_port()
    result: list[BenchResult] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(run_workload(workload, url, 3600, out, web=True, web_port=web_port))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def finish() -> BenchResult:
        deadline = time.monotonic() + 60
        while thread.is_alive():
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"http://127.0.0.1:{web_port}/stop", timeout=10, trust_env=False)
            thread.join(timeout=5)
            assert time.monotonic() < deadline, "Locust did not stop"
        assert not errors, errors
        return result[0]

    try:
        yield finish
    finally:
        if thread.is_alive():
            with contextlib.suppress(Exception):
                finish()


# -- the day ------------------------------------------------------------------------------------------


@dataclass
class Context:
    day: Day
    watcher: Watcher
    receiver: OTLPReceiver
    phases: Phases
    tmp_path: Path
    facts: dict[str, Any] = field(default_factory=dict)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/install.sh)")
@pytest.mark.skipif(
    binaries()["prometheus"] is None, reason="prometheus is not installed (scripts/install.sh)"
)
def test_an_operators_day(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenfleet.models import cache_dir

    pytest.importorskip("playwright.sync_api")
    phases = Phases()
    model = default_model()
    ensure_quantized(model, QUANTIZATION)
    # The fleet's own cache (logs, Prometheus data, pid file) starts empty; models are shared.
    cache = tmp_path / "cache"
    cache.mkdir()
    for shared in ("models", "quantized"):
        (cache / shared).symlink_to(cache_dir() / shared, target_is_directory=True)
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("".join(f"- {{key: {key}, tenant: {tenant}}}\n" for tenant, key in KEYS.items()))
    receiver = OTLPReceiver(capacity=100_000).start()
    for tenant, env in KEY_ENVS.items():
        monkeypatch.setenv(env, KEYS[tenant])
    monkeypatch.setenv("TOKENFLEET_CACHE", str(cache))
    monkeypatch.setenv(FOR_SCALE_ENV, FOR_SCALE)
    # The gateway and (through `tokenfleet up`) every engine export their spans to the receiver.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.removesuffix("/v1/traces"))
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "500")
    # The fleet and its engines run without coverage's tracer, which `make test` would pass them:
    # it slows vLLM's Python by about 40 % (the day took 802 s under it, 564 s without), and the
    # day's phases are timed against deadlines. Other tests measure the same code's coverage.
    for variable in COVERAGE_ENVS:
        monkeypatch.delenv(variable, raising=False)
    workdir = tmp_path / "up"
    facts: dict[str, Any] = {"model": f"{model} ({QUANTIZATION})"}
    phases.done("prepare")
    try:
        with fleet_up(day_service(model, keys_file), workdir, free_port()) as url:
            phases.done("up")
            watcher = Watcher(url)
            watcher.start()
            ctx = Context(Day(url, workdir), watcher, receiver, phases, tmp_path, facts)
            try:
                live_day(ctx, model, keys_file)
            finally:
                watcher.done.set()
                watcher.join(timeout=15)
        phases.done("teardown")
    finally:
        receiver.stop()
        facts["phases_s"] = phases.table()
        (tmp_path / "day.json").write_text(json.dumps(facts, indent=2, default=str))
        print("[e2e day] " + json.dumps(facts, default=str), flush=True)


def live_day(ctx: Context, model: str, keys_file: Path) -> None:
    day, phases, facts = ctx.day, ctx.phases, ctx.facts
    good = day_service(model, keys_file, engine={"maxNumSeqs": 6})
    bad = day_service(model, keys_file, engine={"maxNumSeqs": 6}, model={"maxModelLen": BAD_CONTEXT})
    good_rev, bad_rev = revision_of(good.spec), revision_of(bad.spec)
    # A key the gateway does not know is refused before anything runs.
    refused = day.client.post(
        f"{day.url}/v1/completions",
        json={"model": "tiny-code", "prompt": "x", "max_tokens": 2},
        headers={"authorization": "Bearer not-a-key"},
    )
    assert refused.status_code == 401, refused.text
    out = ctx.tmp_path / "load"
    with load_running(day_workload(), day.url, out) as finish:
        # The victim is killed with requests in flight, once it has answered some.
        victim = "replica-1"
        before = day.wait(
            lambda s: (
                member(s, victim).get("requests", 0) >= 3 and member(s, victim).get("in_flight", 0) >= 1
            ),
            "the victim serving the load",
            180,
        )
        phases.done("load reaches the victim")
        victim_pid = slot(before, victim)["pid"]
        held = HeldStream(day.url, victim, lambda: os.killpg(victim_pid, signal.SIGKILL))
        held.start()
        assert held.killed.wait(180), f"no long stream reached the victim: {held.error}"
        killed_at = held.killed_at
        restarted = day.wait(
            lambda s: slot(s, victim).get("restarts", 0) >= 1 and on_revision(s, s["fleet"]["revision"]),
            "the killed replica restarted and ready",
            300,
        )
        assert slot(restarted, victim)["pid"] != victim_pid
        held.join(timeout=180)
        assert held.completed, f"the stream held on the victim did not complete: {held.error}"
        phases.done("SIGKILL -> restarted")

        assert apply_spec(good, day.url) == 0
        promoted = day.wait(lambda s: on_revision(s, good_rev), "the good canary promoted", 420)
        events = [d["reason"] for d in promoted["fleet"]["decisions"] if d["kind"] == "rollout"]
        assert any(e.startswith("step 1 (50%) passed") for e in events), events
        assert f"canary promoted: all 2 replica(s) on {good_rev}" in events, events
        phases.done("good canary promoted")

        bad_applied = time.time()
        assert apply_spec(bad, day.url) == 0
        rolled_back = day.wait(
            lambda s: s["fleet"]["rollout"]["phase"] == "rolled_back" and on_revision(s, good_rev),
            "the bad canary rolled back",
            300,
        )
        reason = rolled_back["fleet"]["rollout"]["reason"]
        assert reason.startswith("canary rolled back at 50%: refused"), reason
        rolled_back_at = time.time()
        phases.done("bad canary rolled back")

        facts["dashboard"] = check_dashboard(ctx, victim)
        phases.done("dashboard")
        finish()
    phases.done("load stopped")

    for name in ("report.md", "summary.json", "latency_cdf.png", "timeline.png", "locust.html"):
        assert (out / name).stat().st_size > 0, name
    with (out / "requests.jsonl").open() as lines:
        records = [RequestRecord.from_dict(json.loads(line)) for line in lines]
    failed = [r for r in records if not r.ok]
    facts["load"] = {
        "requests": len(records),
        "failed": len(failed),
        "classes": dict(Counter(r.cls for r in records)),
        "tenants": dict(Counter(r.tenant for r in records)),
    }
    assert set(facts["load"]["classes"]) == {"interactive", "standard", "batch"}
    assert set(facts["load"]["tenants"]) == {"acme", "globex"}
    # The kill and the good canary cost no request; the only failures are the bad canary's refusals.
    assert failures_outside(records, Window(bad_applied, rolled_back_at + 30)) == []
    assert broken_streams(records) == []
    assert {r.status for r in failed} <= {400}, Counter(r.error for r in failed)
    from tokenfleet.operator.metrics import revision_totals_from_text

    per_revision = revision_totals_from_text(day.client.get(f"{day.url}/metrics").text)
    assert round(per_revision[bad_rev].refused) == len(failed) > 0, (per_revision, len(failed))
    assert per_revision[good_rev].errors == 0
    assert per_revision[good_rev].refused == 0

    facts["traces"] = check_traces(ctx, records, killed_at)
    phases.done("traces checked")
    facts["prometheus"] = check_prometheus(ctx)
    phases.done("Prometheus checked")


def check_traces(ctx: Context, records: Sequence[RequestRecord], killed_at: float) -> dict[str, int]:
    """Every answered request: one trace gateway → engine (spans leave in 0.5 s batches)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not lost_with_the_victim(untraced(records, ctx.receiver.spans()), records, killed_at):
            break
        time.sleep(0.5)
    spans = ctx.receiver.spans()
    missing = untraced(records, spans)
    unexplained = lost_with_the_victim(missing, records, killed_at)
    assert unexplained == [], f"{len(unexplained)} answered requests lack a gateway → engine trace"
    assert len(missing) <= 8, missing  # a second of the victim's answers at most
    gateway = [s for s in spans if s.service == GATEWAY_SERVICE and s.name.endswith("/v1/completions")]
    rescued = [
        s for s in gateway if s.attributes.get("tokenfleet.resumed") or s.attributes.get("tokenfleet.retries")
    ]
    # The kill hit requests in flight: each was retried or resumed on the other replica.
    assert rescued, "no request was retried or resumed after the kill"
    return {
        "spans": len(spans),
        "gateway_requests": len(gateway),
        "rescued_after_kill": len(rescued),
        "engine_spans_lost_with_the_victim": len(missing),
    }


def check_dashboard(ctx: Context, victim: str) -> dict[str, Any]:
    """The page over the fleet's Prometheus, opened while the load runs: live charts, and every
    alert Prometheus held firing for a while during the day, resolved or not."""
    day = ctx.day
    matrix = day.prometheus(
        "/api/v1/query_range",
        query='ALERTS{alertstate="firing"}',
        start=ctx.watcher.started_at,
        end=time.time(),
        step=1,
    )["result"]
    alerts = fired(matrix)
    down = {json.loads(labels).get("replica") for labels in alerts.get("TokenfleetReplicaDown", set())}
    assert victim in down, alerts
    # An alert firing for less than a few dashboard ticks may fall between them.
    lasting = fired([s for s in matrix if len(s["values"]) >= 5])
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(ctx.tmp_path / "chromium"),
            executable_path=CHROMIUM,
            headless=True,
            viewport={"width": 1500, "height": 980},
            args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"],
        )
        try:
            page = context.new_page()
            page.goto(f"{day.url}/dashboard")
            assert page.title() == "tokenfleet — live"
            board = "window.tokenfleetDashboard"
            page.wait_for_function(f"{board} && {board}.snapshots() >= 2", timeout=60_000)
            page.wait_for_function(f"({board}.latest('throughput', 'requests/s') || 0) > 0", timeout=60_000)
            page.wait_for_function(f"({board}.latest('throughput', 'tokens/s') || 0) > 0", timeout=60_000)
            assert painted_pixels(page, "chart-throughput") > 500
            for name in lasting:
                page.locator(f'.alert[data-alertname="{name}"]').first.wait_for(timeout=30_000)
            page.screenshot(path=str(ctx.tmp_path / "dashboard.png"), full_page=True)
        finally:
            context.close()
    return {"fired": {k: len(v) for k, v in alerts.items()}, "shown": sorted(lasting)}


def check_prometheus(ctx: Context) -> dict[str, Any]:
    """Every metric a dashboard or rule uses has samples in Prometheus over the day (a series only
    an event would create is there at 0 before it: the gateway's retries per route, its
    per-replica counters per member, the error ratio per route with requests); the gateway
    counted both tenants (by their keys) in every class."""
    day, start, end = ctx.day, ctx.watcher.started_at, time.time()
    names = referenced_by_dashboards_and_rules()
    present = {
        name: bool(
            day.prometheus(
                "/api/v1/series", **{"match[]": f'{{__name__="{name}"}}', "start": start, "end": end}
            )
        )
        for name in sorted(names)
    }
    missing = missing_series(names, present)
    assert not missing, missing
    pairs = day.prometheus(
        "/api/v1/query", query="sum by (tenant, class) (tokenfleet_gateway_requests_total)", time=end
    )["result"]
    seen = {(s["metric"]["tenant"], s["metric"]["class"]) for s in pairs if float(s["value"][1]) > 0}
    assert {(t, c) for t in KEYS for c in ("interactive", "standard", "batch")} <= seen, seen
    return {"metrics_checked": len(names)}


# -- the pure verdicts, on made-up records --------------------------------------------------------


def _record(rid: str, send: float, ok: bool = True, first_chunk_s: float | None = 0.1) -> RequestRecord:
    return RequestRecord(
        id=rid, cls="standard", tenant="acme", api="completions", stream=True, send=send, ok=ok,
        first_chunk_s=first_chunk_s,
    )  # fmt: skip


def _span(name: str, service: str, trace: str, span: str, parent: str, **attributes: Any) -> ReceivedSpan:
    return ReceivedSpan(trace, span, parent, name, 2, service, attributes, 0, 1)


def test_failures_are_judged_by_when_they_were_sent() -> None:
    records = [_record("a", 5, ok=False, first_chunk_s=None), _record("b", 15, ok=False), _record("c", 30)]
    assert [r.id for r in failures_outside(records, Window(10, 20))] == ["a"]
    assert [r.id for r in broken_streams(records)] == ["b"]


def test_vllm_request_ids_carry_the_clients_id() -> None:
    assert vllm_request_id("cmpl-0-17-0") == "0-17"
    assert vllm_request_id("chatcmpl-abc-2") == "abc"
    assert vllm_request_id("something-else") is None
    assert vllm_request_id(None) is None


def test_an_answered_request_needs_an_engine_span_under_a_gateway_span() -> None:
    spans = [
        _span("POST /v1/completions", GATEWAY_SERVICE, "t1", "g1", ""),
        _span("llm_request", ENGINE_SERVICE, "t1", "e1", "g1", **{"gen_ai.request.id": "cmpl-r1-0"}),
        _span("llm_request", ENGINE_SERVICE, "t2", "e2", "elsewhere", **{"gen_ai.request.id": "cmpl-r2-0"}),
        # An engine that exports under no service name of ours does not count.
        _span("llm_request", "unknown_service", "t1", "e4", "g1", **{"gen_ai.request.id": "cmpl-r4-0"}),
    ]
    records = [_record("r1", 0), _record("r2", 0), _record("r3", 0, ok=False), _record("r4", 0)]
    assert untraced(records, spans) == ["r2", "r4"]


def test_only_answers_given_just_before_the_kill_may_lack_an_engine_span() -> None:
    records = [_record("early", 10), _record("late", 99), _record("after", 150)]
    records[1].e2e_s = 0.5  # ended at 99.5, the kill at 100
    assert lost_with_the_victim(["late"], records, killed_at=100) == []
    assert lost_with_the_victim(["early", "late", "unknown"], records, killed_at=100) == ["early", "unknown"]


def test_fired_alerts_by_name_and_labels() -> None:
    matrix = [
        {"metric": {"__name__": "ALERTS", "alertname": "A", "alertstate": "firing", "replica": "r1"}},
        {"metric": {"__name__": "ALERTS", "alertname": "A", "alertstate": "firing", "replica": "r2"}},
        {"metric": {"__name__": "ALERTS", "alertname": "B", "alertstate": "firing"}},
    ]
    alerts = fired(matrix)
    assert sorted(alerts) == ["A", "B"]
    assert len(alerts["A"]) == 2
    assert missing_series({"x", "y"}, {"x": True, "y": False}) == ["y"]
