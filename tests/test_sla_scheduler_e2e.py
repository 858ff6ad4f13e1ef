"""The SLA scheduler inside a real vLLM server (CPU build, tiny-random model), on localhost."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import StartEngine, tiny_service

from tokenfleet.engine.launch import EngineProcess
from tokenfleet.engine.sla_policy import REJECT_PREFIX

pytestmark = pytest.mark.vllm

CLASSES = [
    {"name": "interactive", "priority": 0, "ttftMs": 1000, "tpotMs": 500, "maxWaitS": 5},
    {"name": "standard", "priority": 1, "ttftMs": 4000, "maxWaitS": 30},
    {"name": "batch", "priority": 2, "maxWaitS": 120, "queueLimit": 4},
]
# Long enough that, when the interactive request arrives, no batch request is about to end on
# its own: waiting would miss its deadline, so the scheduler must preempt (not just reorder).
# At 480 tokens a pair of batch requests took ~0.7 s on the tiny model, so on a starved CPU the
# interactive request could reach the engine core after a slot had already gone to the next
# queued pair (seen in a full-suite run); at 1900 a pair takes ~3 s, longer than any such delay.
BATCH_TOKENS = 1900
MAX_MODEL_LEN = 2048


@pytest.fixture(scope="module")
def sla_engine(start_engine: StartEngine) -> Iterator[EngineProcess]:
    service = tiny_service(
        "tiny",
        model={"name": "tiny", "source": "builtin://tiny-random", "maxModelLen": MAX_MODEL_LEN},
        scheduler={"policy": "sla", "classes": CLASSES, "tenants": [{"name": "a"}, {"name": "b"}]},
        # Per-request metrics: the engine's own timings in each answer (see _engine_done_s).
        engine={
            "maxNumSeqs": 2,
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


async def _timed(
    client: httpx.AsyncClient, body: dict[str, Any], started: float
) -> tuple[float, dict[str, Any]]:
    """(when the request was sent, s after `started`; the answer)."""
    sent = time.monotonic() - started
    response = await client.post("/v1/completions", json=body)
    response.raise_for_status()
    return sent, response.json()


def _engine_done_s(sent: float, body: dict[str, Any]) -> float:
    """When the engine produced the request's last token, s after `started`: the send time plus
    the engine's own queue + first-token + decode intervals (vLLM's per-request metrics).

    Not the time the client read the answer: on a starved CPU the API server can deliver answers
    that finished seconds apart in one burst, in any order, which says nothing of the schedule.
    """
    metrics = body["metrics"]
    intervals_ms = (
        metrics["queue_time_ms"],
        metrics["time_to_first_token_ms"],
        metrics["generation_time_ms"],
    )
    return sent + sum(intervals_ms) / 1000


def test_interactive_overtakes_queued_batch_and_overflow_is_rejected(sla_engine: EngineProcess) -> None:
    """Two slots, batch requests filling them and the batch queue: an interactive request that
    arrives later finishes before the queued batch work (FCFS would finish it last), and batch
    requests over the class's queue limit are rejected with a clear reason."""

    async def scenario() -> tuple[list[tuple[float, dict[str, Any]]], float]:
        async with httpx.AsyncClient(base_url=sla_engine.url, timeout=120) as client:
            started = time.monotonic()
            batch_body = {
                "model": "tiny",
                "prompt": "class A:",
                "max_tokens": BATCH_TOKENS,
                "ignore_eos": True,
            }
            batch = [
                asyncio.create_task(_timed(client, {**batch_body, **tags("batch", "a")}, started))
                for _ in range(7)
            ]
            await asyncio.sleep(1.5)
            interactive_body = {"model": "tiny", "prompt": "x = ", "max_tokens": 8, "ignore_eos": True}
            sent, body = await _timed(client, {**interactive_body, **tags("interactive", "b")}, started)
            assert body["usage"]["completion_tokens"] == 8
            return list(await asyncio.gather(*batch)), _engine_done_s(sent, body)

    batch, interactive_done = asyncio.run(scenario())
    rejected = [body for _, body in batch if body["choices"][0]["finish_reason"] == "abort"]
    served = sorted(
        _engine_done_s(sent, body) for sent, body in batch if body["choices"][0]["finish_reason"] == "length"
    )
    assert rejected, "7 batch requests into 2 slots + a queue limit of 4 must overflow"
    for body in rejected:
        assert body["choices"][0]["stop_reason"].startswith(REJECT_PREFIX)
        assert "'batch'" in body["choices"][0]["stop_reason"]
    assert len(rejected) + len(served) == 7
    for _, body in batch:
        if body["choices"][0]["finish_reason"] == "length":
            assert body["usage"]["completion_tokens"] == BATCH_TOKENS
    assert len(served) >= 3
    # At most the two batch requests that held the slots may finish first; the queued ones cannot.
    assert interactive_done < served[2], (interactive_done, served)


def _sample(text: str, name: str, **labels: str) -> float:
    pattern = re.escape(name) + r"\{([^}]*)\}\s+([0-9.eE+-]+)"
    total = 0.0
    for match in re.finditer(pattern, text):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_scheduler_series_on_the_engine_metrics_endpoint(sla_engine: EngineProcess) -> None:
    text = httpx.get(f"{sla_engine.url}/metrics", timeout=10).text
    assert "vllm:num_requests_waiting" in text  # vLLM's own series survive multiprocess mode
    assert _sample(text, "tokenfleet_scheduler_wait_seconds_count", slo_class="interactive") >= 1
    assert _sample(text, "tokenfleet_scheduler_rejections_total", slo_class="batch") >= 1
    assert (
        _sample(text, "tokenfleet_scheduler_tenant_tokens_total", tenant="a", kind="output") >= BATCH_TOKENS
    )
    assert (
        _sample(text, "tokenfleet_scheduler_slo_requests_total", slo_class="interactive", target="ttft") >= 1
    )
    assert "tokenfleet_scheduler_preemptions_total" in text
    assert "tokenfleet_scheduler_schedule_seconds_bucket" in text
