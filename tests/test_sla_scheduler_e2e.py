"""The SLA scheduler inside a real vLLM server (CPU build, tiny-random model), on localhost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import StartEngine, free_port, tiny_service

from tokenfleet.engine.gateway.app import create_app
from tokenfleet.engine.gateway.server import ServerThread
from tokenfleet.engine.launch import EngineProcess
from tokenfleet.engine.sla_contract import REJECT_PREFIX
from tokenfleet.load.bench import run_workload
from tokenfleet.load.workload import parse_workload
from tokenfleet.observability import promtext

pytestmark = pytest.mark.vllm

CLASSES = [
    {"name": "interactive", "priority": 0, "ttftMs": 1000, "tpotMs": 500, "maxWaitS": 5},
    {"name": "standard", "priority": 1, "ttftMs": 4000, "maxWaitS": 30},
    {"name": "batch", "priority": 2, "maxWaitS": 120, "queueLimit": 4},
]
# As long as the tiny model's context allows (2048 positions): a pair of batch requests runs
# ~3 s, so the queue the test builds is still there when the interactive request arrives.
BATCH_TOKENS = 2040
MAX_MODEL_LEN = 2048
SLOTS = 2
# Engine-side latency bound of the interactive request: its wait for a victim to have run
# min_run_s, plus a few steps — below one pair of batch requests' run.
INTERACTIVE_BOUND_S = 2.5
ATTEMPTS = 4


@pytest.fixture(scope="module")
def sla_engine(start_engine: StartEngine) -> Iterator[EngineProcess]:
    service = tiny_service(
        "tiny",
        model={"name": "tiny", "source": "builtin://tiny-random", "maxModelLen": MAX_MODEL_LEN},
        scheduler={"policy": "sla", "classes": CLASSES, "tenants": [{"name": "a"}, {"name": "b"}]},
        # Per-request metrics: the engine's own timings in each answer (see _engine_done_s).
        engine={
            "maxNumSeqs": SLOTS,
            "kvCacheGib": 1,
            "shutdownTimeoutS": 5,
            "extraArgs": ["--enable-per-request-metrics"],
        },
    )
    engine = start_engine(service)
    yield engine
    engine.stop(timeout_s=30)  # free the CPU for the rest of the session


def tags(slo_class: str, tenant: str = "a") -> dict[str, Any]:
    priority = {c["name"]: c["priority"] for c in CLASSES}[slo_class]
    return {"priority": priority, "vllm_xargs": {"slo_class": slo_class, "tenant": tenant}}


@pytest.mark.parametrize("slo_class", ["interactive", "standard", "batch", None])
def test_serves_every_class_streaming_and_not(sla_engine: EngineProcess, slo_class: str | None) -> None:
    client = openai.OpenAI(base_url=f"{sla_engine.url}/v1", api_key="unused")
    extra = tags(slo_class) if slo_class else {}
    completion = client.completions.create(
        model="tiny", prompt="def parse(", max_tokens=5, extra_body={**extra, "ignore_eos": True}
    )
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "import os"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={**extra, "ignore_eos": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None
    assert usage.completion_tokens == 4
    assert text


async def _post(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/completions", json=body)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def _engine_latency_s(body: dict[str, Any]) -> float:
    """Arrival at the engine core to the last token, on the engine's own clock (vLLM's
    per-request metrics): the client's clock says nothing of the schedule, because on these
    machines a client process can be kept off the CPU for seconds while the engine runs."""
    metrics = body["metrics"]
    intervals_ms = (
        metrics["queue_time_ms"],
        metrics["time_to_first_token_ms"],
        metrics["generation_time_ms"],
    )
    return float(sum(intervals_ms)) / 1000


async def _wait_for(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        await asyncio.sleep(0.1)


async def _queue_state(client: httpx.AsyncClient) -> tuple[int, int]:
    """(running, waiting) as the engine reports them."""
    text = (await client.get("/metrics")).text
    return int(_sample(text, "vllm:num_requests_running")), int(_sample(text, "vllm:num_requests_waiting"))


@dataclass
class Burst:
    """Batch requests sent at once: those still in the engine, and the answers already back."""

    in_engine: list[asyncio.Task[dict[str, Any]]]
    answered: list[dict[str, Any]]

    @property
    def rejections(self) -> list[dict[str, Any]]:
        return [body for body in self.answered if body["choices"][0]["finish_reason"] == "abort"]

    @property
    def admitted_whole(self) -> bool:
        """Every answer back is a rejection: no batch request finished before the test went on."""
        return len(self.rejections) == len(self.answered)


async def _fill_with_batch(client: httpx.AsyncClient, count: int) -> Burst:
    """Send `count` long batch requests and wait until the engine has admitted them: two
    running, the rest waiting or rejected (or, if the client was held up, some already done)."""
    body = {"model": "tiny", "prompt": "class A:", "max_tokens": BATCH_TOKENS, "ignore_eos": True}
    tasks = [asyncio.create_task(_post(client, {**body, **tags("batch", "a")})) for _ in range(count)]

    def burst() -> Burst:
        return Burst([t for t in tasks if not t.done()], [t.result() for t in tasks if t.done()])

    async def admitted() -> bool:
        running, waiting = await _queue_state(client)
        now = burst()
        return not now.admitted_whole or (running == SLOTS and running + waiting + len(now.answered) == count)

    await _wait_for(admitted, f"{count} batch requests admitted into {SLOTS} slots")
    return burst()


async def _cancel_and_drain(client: httpx.AsyncClient, tasks: list[asyncio.Task[dict[str, Any]]]) -> None:
    """Drop the batch requests (vLLM aborts a request whose client went away) and wait until
    the engine is idle, so the next test starts from an empty engine."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await _wait_for(lambda: _idle(client), "the engine to abort the dropped requests")


async def _idle(client: httpx.AsyncClient) -> bool:
    return await _queue_state(client) == (0, 0)


def test_interactive_preempts_batch_and_overflow_is_rejected(sla_engine: EngineProcess) -> None:
    """Both slots and the batch queue full of long batch requests: an interactive request that
    arrives later is served at once, a running batch request preempted for it (FCFS and vLLM's
    `priority` policy never preempt for a waiting request: it would wait behind the queue), and
    batch requests over the class's queue limit are rejected with a clear reason.

    Judged on the engine's side — its preemption counter and its own timings of the request —
    because on these machines a process can be kept off the CPU for seconds while the engine
    runs: a client (or the API server) held up that long delivers the interactive request only
    after the batch pairs finished, when a slot is free, or sends the burst so slowly that its
    first requests finish before the last arrive. Such an attempt shows nothing either way (no
    preemption, no wait; no full queue) and is repeated; waiting without a preemption fails.
    """

    async def attempt(client: httpx.AsyncClient) -> tuple[Burst, dict[str, Any], float]:
        preempted_before = await _batch_preemptions(client)
        burst = await _fill_with_batch(client, 7)
        try:
            interactive = {"model": "tiny", "prompt": "x = ", "max_tokens": 8, "ignore_eos": True}
            body = await _post(client, {**interactive, **tags("interactive", "b")})
            preempted = await _batch_preemptions(client) - preempted_before
        finally:
            await _cancel_and_drain(client, burst.in_engine)
        return burst, body, preempted

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=sla_engine.url, timeout=120) as client:
            tried: list[str] = []
            for _ in range(ATTEMPTS):
                burst, body, preempted = await attempt(client)
                tried.append(
                    f"answered before the interactive request: {len(burst.answered)} "
                    f"({len(burst.rejections)} rejected); preempted {preempted:g}; "
                    f"engine latency {_engine_latency_s(body):.2f} s"
                )
                if not burst.admitted_whole:
                    continue  # batch requests finished before the last arrived: a held-up client
                assert burst.rejections, "7 batch requests into 2 slots + a queue limit of 4 must overflow"
                for rejection in burst.rejections:
                    assert rejection["choices"][0]["stop_reason"].startswith(REJECT_PREFIX)
                    assert "'batch'" in rejection["choices"][0]["stop_reason"]
                assert body["usage"]["completion_tokens"] == 8
                latency_s = _engine_latency_s(body)
                assert latency_s < INTERACTIVE_BOUND_S, ("the interactive request waited", body["metrics"])
                if preempted >= 1:
                    return
                # Served within the bound without a preemption: it found a free slot (late).
        pytest.fail(f"in {ATTEMPTS} attempts the interactive request never met a full engine: {tried}")

    asyncio.run(scenario())


async def _batch_preemptions(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    return _sample(text, "tokenfleet_scheduler_preemptions_total", slo_class="batch")


def _sample(text: str, name: str, **labels: str) -> float:
    return promtext.value(text, name, **labels)


def test_scheduler_series_on_the_engine_metrics_endpoint(sla_engine: EngineProcess) -> None:
    """The scheduler's series, fed by this test's own traffic: an interactive request, and
    batch requests past their class's queue limit."""

    async def scenario() -> str:
        async with httpx.AsyncClient(base_url=sla_engine.url, timeout=120) as client:
            interactive = {"model": "tiny", "prompt": "x = ", "max_tokens": 4, "ignore_eos": True}
            await _post(client, {**interactive, **tags("interactive", "b")})
            for _ in range(ATTEMPTS):
                burst = await _fill_with_batch(client, 7)
                if burst.rejections:
                    break
                # Sent so slowly (a held-up client) that the queue never filled: try again.
                await _cancel_and_drain(client, burst.in_engine)
            try:
                assert burst.rejections
                await _wait_for(
                    lambda: _tenant_output_tokens(client, "a"), "tenant a's batch output tokens counted"
                )
            finally:
                await _cancel_and_drain(client, burst.in_engine)
            return (await client.get("/metrics")).text

    text = asyncio.run(scenario())
    assert "vllm:num_requests_waiting" in text  # vLLM's own series survive multiprocess mode
    assert _sample(text, "tokenfleet_scheduler_wait_seconds_count", slo_class="interactive") >= 1
    assert _sample(text, "tokenfleet_scheduler_rejections_total", slo_class="batch") >= 1
    assert _sample(text, "tokenfleet_scheduler_tenant_tokens_total", tenant="b", kind="output") >= 4
    assert (
        _sample(text, "tokenfleet_scheduler_slo_requests_total", slo_class="interactive", target="ttft") >= 1
    )
    assert "tokenfleet_scheduler_preemptions_total" in text
    assert "tokenfleet_scheduler_schedule_seconds_bucket" in text


async def _tenant_output_tokens(client: httpx.AsyncClient, tenant: str) -> bool:
    text = (await client.get("/metrics")).text
    return _sample(text, "tokenfleet_scheduler_tenant_tokens_total", tenant=tenant, kind="output") > 0


def test_two_tenants_through_an_authenticated_gateway(
    sla_engine: EngineProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load harness authenticates as each workload tenant (one key from the gateway's keys
    file, one from an environment variable); the gateway attributes by key, and both the
    gateway's per-tenant series and the engine scheduler's fair-share counters see each tenant."""
    keys = tmp_path / "keys.yaml"
    keys.write_text("key-of-a: a\nkey-of-b: b\n")
    monkeypatch.setenv("TENANT_B_KEY", "key-of-b")
    scheduler = {"policy": "sla", "classes": CLASSES, "tenants": [{"name": "a"}, {"name": "b"}]}
    service = tiny_service("tiny", gateway={"auth": True, "apiKeysFile": str(keys)}, scheduler=scheduler)
    workload = parse_workload(
        {
            "name": "tenants",
            "seed": 3,
            "prompts": {"kind": "synthetic", "inputTokens": {"dist": "fixed", "value": 16}},
            "outputTokens": {"dist": "fixed", "value": 8},
            "arrival": {"mode": "open", "maxConcurrency": 8, "shape": {"kind": "constant", "value": 3}},
            "classes": [{"name": "standard", "priority": 1}],
            "tenants": [{"name": "a"}, {"name": "b", "apiKeyEnv": "TENANT_B_KEY"}],
            "apiKeysFile": str(keys),
        }
    )
    before = httpx.get(f"{sla_engine.url}/metrics", timeout=10).text
    app = create_app(service, [("r0", sla_engine.url)])
    server = ServerThread(app, free_port()).start()
    try:
        server.wait_until("/ready", timeout_s=30)
        result = run_workload(workload, server.url, 8.0, tmp_path / "run")
        gateway_text = httpx.get(
            f"{server.url}/metrics", headers={"authorization": "Bearer key-of-a"}, timeout=10
        ).text
    finally:
        server.stop()
    after = httpx.get(f"{sla_engine.url}/metrics", timeout=10).text

    overall = result.summary["overall"]
    assert overall["failed"] == 0, overall["errors"]
    assert set(result.summary["tenants"]) == {"a", "b"}
    for tenant in ("a", "b"):
        sent = result.summary["tenants"][tenant]["requests"]
        assert sent >= 1
        answered = _sample(gateway_text, "tokenfleet_gateway_requests_total", tenant=tenant, code="2xx")
        assert answered == sent, (tenant, answered, sent)
        served = _sample(after, "tokenfleet_scheduler_tenant_tokens_total", tenant=tenant, kind="output")
        served -= _sample(before, "tokenfleet_scheduler_tenant_tokens_total", tenant=tenant, kind="output")
        # The counter charges computed positions: the 8th token is sampled, never computed on.
        assert served == 7 * sent, (tenant, served, sent)
