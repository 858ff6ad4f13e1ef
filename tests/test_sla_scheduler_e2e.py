"""The SLA scheduler inside a real vLLM server (CPU build, tiny-random model), on localhost."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import StartEngine, free_port, tiny_service

from tokenfleet.builtin_model.tiny_random import CONTEXT as TINY_RANDOM_CONTEXT
from tokenfleet.engine.gateway.app import create_app
from tokenfleet.engine.gateway.server import ServerThread
from tokenfleet.engine.launch import EngineProcess, engine_command
from tokenfleet.engine.sla_contract import REJECT_PREFIX
from tokenfleet.engine.sla_policy import PolicyConfig
from tokenfleet.load.bench import run_workload
from tokenfleet.load.workload import parse_workload
from tokenfleet.models import ensure_builtin
from tokenfleet.observability import promtext
from tokenfleet.spec import LLMService

pytestmark = pytest.mark.vllm

# The batch queue holds 9 of one tenant's requests (the shared three quarters of 12), so a burst
# of 13 fills both slots and the queue and has some rejected. In the step-driven scenario each
# batch request asks for as many tokens as the tiny model's context allows, so none finishes
# while the scenario runs; over HTTP they are short, because these machines can hold the client
# off the CPU while two sequences decode (ADR 0004, "Testing on shared CPUs").
CLASSES = [
    {"name": "interactive", "priority": 0, "ttftMs": 1000, "tpotMs": 500, "maxWaitS": 5},
    {"name": "standard", "priority": 1, "ttftMs": 4000, "maxWaitS": 30},
    {"name": "batch", "priority": 2, "maxWaitS": 120, "queueLimit": 12},
]
BURST = 13
MAX_MODEL_LEN = TINY_RANDOM_CONTEXT
BATCH_TOKENS = MAX_MODEL_LEN - 16
HTTP_BATCH_TOKENS = 256
SLOTS = 2
ATTEMPTS = 4


def _sla_service() -> LLMService:
    return tiny_service(
        "tiny",
        model={"name": "tiny", "source": "builtin://tiny-random", "maxModelLen": MAX_MODEL_LEN},
        scheduler={"policy": "sla", "classes": CLASSES, "tenants": [{"name": "a"}, {"name": "b"}]},
        engine={"maxNumSeqs": SLOTS, "kvCacheGib": 1, "shutdownTimeoutS": 5},
    )


@pytest.fixture(scope="module")
def sla_engine(start_engine: StartEngine) -> Iterator[EngineProcess]:
    engine = start_engine(_sla_service())
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


def _client(engine: EngineProcess) -> httpx.AsyncClient:
    """A fresh connection per request: uvicorn closes a keep-alive connection idle for 5 s, and a
    request written on one as it closes fails (seen when the machine stalls the client)."""
    return httpx.AsyncClient(
        base_url=engine.url, timeout=120, limits=httpx.Limits(max_keepalive_connections=0)
    )


async def _post(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/completions", json=body)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


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
    """Send `count` batch requests and wait until the engine has admitted them: two
    running, the rest waiting or rejected (or, if the client was held up, some already done)."""
    body = {"model": "tiny", "prompt": "class A:", "max_tokens": HTTP_BATCH_TOKENS, "ignore_eos": True}
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


DRIVER = Path(__file__).with_name("sla_engine_driver.py")


def _drive(service: LLMService, policy_argv_drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run tests/sla_engine_driver.py on a real engine built from `engine_command`'s argv."""
    model_path = ensure_builtin("tiny-random")
    command = engine_command(service.spec, str(model_path), port=free_port())
    argv = command.argv[3:]  # after `python -m vllm.entrypoints.openai.api_server`
    for flag in policy_argv_drop:
        at = argv.index(flag)
        del argv[at : at + 2]
    config = {
        "argv": argv,
        "batch": BURST,
        "batch_tokens": BATCH_TOKENS,
        "min_run_s": PolicyConfig.min_run_s,  # the policy's default, which the spec does not override
        "max_steps": 400,
    }
    done = subprocess.run(
        [sys.executable, str(DRIVER), json.dumps(config)],
        env={**os.environ, **command.env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_interactive_preempts_batch_and_overflow_is_rejected() -> None:
    """Both slots and the batch queue full of long batch requests: an interactive request that
    arrives later is admitted in the very next step, ahead of every waiting batch request and in
    a running one's slot, and finishes before any waiting batch request starts; batch requests
    over the class's queue limit are rejected with a clear reason.

    A real vLLM engine with the SLA scheduler, driven step by step in a subprocess
    (tests/sla_engine_driver.py), because the test is about order: over HTTP on these machines the
    client can be held off the CPU for as long as the batch requests run (ADR 0004, "Testing on
    shared CPUs"), so it cannot place its request between them. The next test runs the same
    scenario under vLLM's own `priority` policy, which this behaviour is measured against.
    """
    result = _drive(_sla_service())
    rejected = result["rejected"]
    assert rejected, f"{BURST} batch requests must overflow {SLOTS} slots + the queue"
    for outcome in rejected.values():
        assert outcome["finish_reason"] == "abort"
        assert outcome["stop_reason"].startswith(REJECT_PREFIX)
        assert "'batch'" in outcome["stop_reason"]
    assert len(result["running_at_arrival"]) == SLOTS
    assert result["waiting_at_arrival"], result
    assert result["interactive"]["tokens"] == 8
    assert result["interactive_first_token_after_steps"] == 1, result
    assert result["batch_started_after_arrival"] == [], result
    assert result["preemptions"] == 1, result
    assert result["overtakes"] == 1, result


def test_vllm_priority_policy_makes_the_interactive_request_wait() -> None:
    """The same scenario under vLLM's own `priority` policy (no tokenfleet scheduler): the
    interactive request goes to the head of the queue but waits for a running batch request to
    finish — vLLM preempts only for KV pressure, never for a waiting request."""
    result = _drive(_sla_service(), policy_argv_drop=("--scheduler-cls",))
    assert result["rejected"] == {}  # no per-class queue limits either
    assert len(result["running_at_arrival"]) == SLOTS
    assert result["interactive"] is None, result  # still waiting after max_steps
    assert result["interactive_first_token_after_steps"] is None
    assert result["preemptions"] is None  # no tokenfleet series at all


def _sample(text: str, name: str, **labels: str) -> float:
    return promtext.value(text, name, **labels)


def test_scheduler_series_on_the_engine_metrics_endpoint(sla_engine: EngineProcess) -> None:
    """The scheduler's series, fed by this test's own traffic: an interactive request, and
    batch requests past their class's queue limit."""

    async def scenario() -> tuple[str, str]:
        async with _client(sla_engine) as client:
            before = (await client.get("/metrics")).text
            interactive = {"model": "tiny", "prompt": "x = ", "max_tokens": 4, "ignore_eos": True}
            await _post(client, {**interactive, **tags("interactive", "b")})
            for _ in range(ATTEMPTS):
                burst = await _fill_with_batch(client, BURST)
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
            return before, (await client.get("/metrics")).text

    before, text = asyncio.run(scenario())
    assert "vllm:num_requests_waiting" in text  # vLLM's own series survive multiprocess mode
    assert _sample(text, "tokenfleet_scheduler_wait_seconds_count", slo_class="interactive") >= 1
    assert _sample(text, "tokenfleet_scheduler_rejections_total", slo_class="batch") >= 1
    tenant_b_output = [
        _sample(t, "tokenfleet_scheduler_tenant_tokens_total", tenant="b", kind="output")
        for t in (before, text)
    ]
    # Computed positions: the 4th token of the answer is sampled, never computed on.
    assert tenant_b_output[1] - tenant_b_output[0] == 3
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
