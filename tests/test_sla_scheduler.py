"""The vLLM adapter, in-process: the hooks it relies on, and its behaviour on synthetic requests.

The real engine runs the scheduler in its EngineCore subprocess; here it is built directly on a
vLLM 0.32 config (CPU, no model weights) and driven step by step with fake model outputs, so
the adapter's code runs under pytest (and its coverage) and its decisions are deterministic.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from typing import Any

import httpx
import pytest
from conftest import free_port

pytest.importorskip("vllm")

import torch
import vllm
from prometheus_client import generate_latest
from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, FinishReason
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from tokenfleet.engine import sla_metrics
from tokenfleet.engine.sla_contract import REJECT_PREFIX, SPEC_ENV
from tokenfleet.engine.sla_metrics import SchedulerMetrics, export
from tokenfleet.engine.sla_policy import SLAQueue
from tokenfleet.engine.sla_scheduler import SLAScheduler, VLLMSLAQueue, load_spec
from tokenfleet.models import ensure_builtin
from tokenfleet.spec import SchedulerSpec

BLOCK = 16
SPEC = {
    "policy": "sla",
    "classes": [
        {"name": "interactive", "priority": 0, "ttftMs": 1000, "tpotMs": 1000, "maxWaitS": 5},
        {"name": "standard", "priority": 1, "ttftMs": 4000, "maxWaitS": 30},
        {"name": "batch", "priority": 2, "maxWaitS": 60, "queueLimit": 3},
    ],
    "tenants": [{"name": "a"}, {"name": "b"}],
}


# -- the hooks: fail loudly when vLLM changes them ----------------------------------------------


def _params(func: Any) -> list[str]:
    return list(inspect.signature(func).parameters)


def test_vllm_version_is_the_one_the_adapter_was_written_for() -> None:
    # Not a hard pin (the hook checks below are); a reminder to re-read scheduler.md on upgrade.
    assert vllm.__version__.startswith("0.32"), f"re-verify ADR 0004 against vLLM {vllm.__version__}"


def test_scheduler_hooks_keep_their_signatures() -> None:
    assert issubclass(SLAScheduler, AsyncScheduler)
    assert _params(Scheduler.__init__)[:5] == [
        "self",
        "vllm_config",
        "kv_cache_config",
        "structured_output_manager",
        "block_size",
    ]
    assert _params(Scheduler.schedule) == ["self", "throttle_prefills"]
    assert _params(Scheduler.add_request) == ["self", "request"]
    assert _params(Scheduler.update_from_output) == ["self", "scheduler_output", "model_runner_output"]
    assert _params(Scheduler.has_requests) == ["self"]
    assert _params(Scheduler._preempt_request) == ["self", "request", "timestamp", "drop_stale_output"]
    assert _params(Scheduler._request_blocks_can_be_freed) == ["self", "request"]
    assert _params(Scheduler.finish_requests) == ["self", "request_ids", "finished_status"]


def test_request_queue_interface_is_what_our_queue_implements() -> None:
    abstract = set(RequestQueue.__abstractmethods__)
    assert abstract == {
        "add_request",
        "pop_request",
        "peek_request",
        "prepend_request",
        "prepend_requests",
        "remove_request",
        "remove_requests",
        "__bool__",
        "__len__",
        "__iter__",
    }
    assert abstract <= set(vars(SLAQueue))
    assert not VLLMSLAQueue.__abstractmethods__


def test_data_fields_the_adapter_reads_exist() -> None:
    output_fields = {f.name for f in dataclasses.fields(SchedulerOutput)}
    assert {"scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens", "preempted_req_ids"} <= (
        output_fields
    )
    assert "resumed_req_ids" in {f.name for f in dataclasses.fields(CachedRequestData)}
    assert {"finish_reason", "stop_reason", "new_token_ids"} <= set(EngineCoreOutput.__struct_fields__)
    assert FinishReason.ABORT.name == "ABORT"
    request = make_request("x", "batch", "a")
    for attr in ("arrival_time", "priority", "num_prompt_tokens", "max_tokens", "num_output_tokens"):
        assert hasattr(request, attr), attr
    assert request.sampling_params.extra_args == {"slo_class": "batch", "tenant": "a"}


# -- an in-process scheduler --------------------------------------------------------------------


def make_request(
    request_id: str, slo_class: str, tenant: str, *, prompt: int = 20, max_tokens: int = 8, priority: int = 0
) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=list(range(1, prompt + 1)),
        sampling_params=SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, extra_args={"slo_class": slo_class, "tenant": tenant}
        ),
        pooling_params=None,
        priority=priority,
    )


@pytest.fixture(scope="module")
def vllm_config() -> VllmConfig:
    model = ModelConfig(model=str(ensure_builtin("tiny-random")), max_model_len=512, dtype="float32")
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=False)
    cache.num_gpu_blocks = 64
    return VllmConfig(
        model_config=model,
        scheduler_config=SchedulerConfig(
            max_num_seqs=2,
            max_num_batched_tokens=512,
            max_model_len=512,
            policy="priority",
            async_scheduling=True,
            is_encoder_decoder=False,
        ),
        cache_config=cache,
        device_config=DeviceConfig("cpu"),
    )


def kv_cache_config() -> KVCacheConfig:
    return KVCacheConfig(
        num_blocks=64,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer"],
                FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=16, dtype=torch.float32),
            )
        ],
    )


@pytest.fixture
def sched(vllm_config: VllmConfig, monkeypatch: pytest.MonkeyPatch) -> SLAScheduler:
    monkeypatch.setenv(SPEC_ENV, json.dumps(SPEC))
    monkeypatch.delenv(sla_metrics.MULTIPROC_ENV, raising=False)
    monkeypatch.delenv(sla_metrics.PORT_ENV, raising=False)
    kv = kv_cache_config()
    return SLAScheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK,
    )


def step(s: SLAScheduler) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    """One engine step with a fake model that samples token 7 for every finished prefill."""
    out = s.schedule()
    ids = list(out.num_scheduled_tokens)
    sampled = [[] if s.requests[rid].is_prefill_chunk else [7] for rid in ids]
    runner = ModelRunnerOutput(
        req_ids=ids, req_id_to_index={rid: i for i, rid in enumerate(ids)}, sampled_token_ids=sampled
    )
    results = s.update_from_output(out, runner)
    return out, [o for eco in results.values() for o in eco.outputs]


def run_until_idle(s: SLAScheduler, max_steps: int = 500) -> dict[str, EngineCoreOutput]:
    finished: dict[str, EngineCoreOutput] = {}
    for _ in range(max_steps):
        if not s.has_requests():
            return finished
        _, outputs = step(s)
        finished.update({o.request_id: o for o in outputs if o.finish_reason is not None})
    raise AssertionError("scheduler did not drain")


def metric(s: SLAScheduler, name: str, **labels: str) -> float:
    value = s.sla_metrics.registry.get_sample_value(f"tokenfleet_scheduler_{name}", labels)
    return 0.0 if value is None else value


def test_replaces_both_waiting_queues_and_reads_the_spec(sched: SLAScheduler) -> None:
    assert isinstance(sched.waiting, VLLMSLAQueue)
    assert isinstance(sched.kv_holding_waiting, VLLMSLAQueue)
    assert [c.name for c in sched.sla.config.classes] == ["interactive", "standard", "batch"]
    text = generate_latest(sched.sla_metrics.registry).decode()
    assert 'tokenfleet_scheduler_queue_depth{slo_class="batch"} 0.0' in text


def test_over_the_class_limit_is_rejected_with_a_clear_reason(sched: SLAScheduler) -> None:
    for i in range(4):
        sched.add_request(make_request(f"b{i}", "batch", "a"))
    sched.add_request(make_request("i0", "interactive", "a"))  # other classes are not limited
    assert [r.request_id for r, _ in sched.sla_rejected] == ["b3"]
    assert sched.has_requests()
    out, outputs = step(sched)
    assert "b3" not in out.num_scheduled_tokens
    rejected = [o for o in outputs if o.request_id == "b3"]
    assert len(rejected) == 1
    assert rejected[0].finish_reason == FinishReason.ABORT
    assert str(rejected[0].stop_reason).startswith(REJECT_PREFIX)
    assert "'batch'" in str(rejected[0].stop_reason)
    assert metric(sched, "rejections_total", slo_class="batch") == 1
    finished = run_until_idle(sched)
    assert {f"b{i}" for i in range(3)} | {"i0"} == set(finished)
    assert all(o.finish_reason == FinishReason.LENGTH for o in finished.values())


def test_interactive_overtakes_queued_batch(sched: SLAScheduler) -> None:
    for i in range(3):
        sched.add_request(make_request(f"b{i}", "batch", "a", max_tokens=4))
    sched.add_request(make_request("i0", "interactive", "b", max_tokens=4))
    out, _ = step(sched)
    assert [r.req_id for r in out.scheduled_new_reqs] == ["i0", "b0"]
    assert metric(sched, "wait_seconds_count", slo_class="interactive") == 1
    # i0 went ahead of b1 and b2, which arrived before it and still wait; b0 overtook no one.
    assert metric(sched, "overtakes_total", slo_class="interactive") == 1
    assert metric(sched, "overtakes_total", slo_class="batch") == 0
    run_until_idle(sched)
    assert metric(sched, "slo_requests_total", slo_class="interactive", target="ttft", outcome="met") == 1
    assert metric(sched, "slo_requests_total", slo_class="interactive", target="tpot", outcome="met") == 1
    assert metric(sched, "wait_seconds_count", slo_class="batch") == 3
    assert metric(sched, "max_wait_seconds", slo_class="batch") > 0


def test_preempts_running_batch_for_an_urgent_interactive(sched: SLAScheduler) -> None:
    sched.sla.config = dataclasses.replace(sched.sla.config, min_run_s=0.0)
    sched.add_request(make_request("b0", "batch", "a", max_tokens=200))
    sched.add_request(make_request("b1", "batch", "a", max_tokens=200))
    step(sched)
    step(sched)
    assert {r.request_id for r in sched.running} == {"b0", "b1"}
    sched.add_request(make_request("i0", "interactive", "b", max_tokens=3))
    out, _ = step(sched)
    assert "i0" in out.num_scheduled_tokens  # admitted at once: vLLM alone would wait for a slot
    assert out.preempted_req_ids
    (victim,) = out.preempted_req_ids
    assert victim in {"b0", "b1"}
    assert metric(sched, "preemptions_total", slo_class="batch") == 1
    assert metric(sched, "overtakes_total", slo_class="interactive") == 1  # ahead of the victim
    assert sched.requests[victim].tf_ticket.num_preemptions == 1
    finished = run_until_idle(sched, max_steps=2000)
    assert set(finished) == {"b0", "b1", "i0"}
    assert sched.requests == {}
    # The victim recomputed its prefix after preemption; VTC billed tenant a once per request,
    # prompt and max_tokens up front (20 + 200 at weights 1 and 2), nothing for the recompute.
    assert sched.sla.fair.counter("batch", "a") == pytest.approx(2 * (20 + 2 * 200))
    assert metric(sched, "tenant_tokens_total", tenant="a", slo_class="batch", kind="output") == 2 * 199


def test_no_preemption_without_urgency_or_within_min_run(sched: SLAScheduler) -> None:
    sched.add_request(make_request("b0", "batch", "a", max_tokens=200))
    sched.add_request(make_request("b1", "batch", "a", max_tokens=200))
    step(sched)
    sched.add_request(make_request("i0", "interactive", "b", max_tokens=3))
    out, _ = step(sched)  # the batch requests have run for less than min_run_s (1 s)
    assert not out.preempted_req_ids
    assert "i0" not in out.num_scheduled_tokens
    # The running list is ranked for vLLM's own victim choice: priority = class priority.
    assert [r.priority for r in sched.running] == [2, 2]
    sched.add_request(make_request("s0", "standard", "b", max_tokens=3))
    assert [r.request_id for r in sched.waiting] == ["i0", "s0"]
    sched.finish_requests(["b0", "b1", "i0", "s0"], RequestStatus.FINISHED_ABORTED)
    assert not sched.waiting
    assert not sched.running


def test_tenant_fair_share_inside_a_class(sched: SLAScheduler) -> None:
    # Tenant a floods `standard`; b arrives later with fewer requests, and still gets every other slot.
    for i in range(6):
        sched.add_request(make_request(f"a{i}", "standard", "a", max_tokens=2))
    out, _ = step(sched)
    order = [r.req_id for r in out.scheduled_new_reqs]
    for i in range(3):
        sched.add_request(make_request(f"b{i}", "standard", "b", max_tokens=2))
    for _ in range(200):
        if not sched.has_requests():
            break
        out, _ = step(sched)
        order += [r.req_id for r in out.scheduled_new_reqs]
    assert order[:2] == ["a0", "a1"]
    later = order[2:]
    assert later.index("b2") < later.index("a5")  # b is not behind all of a's backlog
    assert metric(sched, "tenant_tokens_total", tenant="b", slo_class="standard", kind="prompt") == 60


def test_load_spec_defaults_without_env() -> None:
    assert load_spec({}) == SchedulerSpec()
    assert load_spec({SPEC_ENV: json.dumps(SPEC)}).classes[2].queue_limit == 3


def test_metrics_export_modes(tmp_path: Any) -> None:
    metrics = SchedulerMetrics()
    metrics.init_classes(["c"])
    metrics.observe_wait("c", 2.0)
    metrics.observe_wait("c", 1.0)
    metrics.observe_slo("c", "ttft", met=False)
    metrics.set_depths({"c": 3}, {"c": 1})
    reg = metrics.registry
    assert reg.get_sample_value("tokenfleet_scheduler_max_wait_seconds", {"slo_class": "c"}) == 2.0
    assert reg.get_sample_value("tokenfleet_scheduler_queue_depth", {"slo_class": "c"}) == 3
    labels = {"slo_class": "c", "target": "ttft", "outcome": "missed"}
    assert reg.get_sample_value("tokenfleet_scheduler_slo_requests_total", labels) == 1
    assert export(metrics, {}) == "in-process"
    assert export(metrics, {sla_metrics.MULTIPROC_ENV: str(tmp_path)}) == f"multiprocess:{tmp_path}"
    port = free_port()
    where = export(metrics, {sla_metrics.PORT_ENV: str(port)})
    assert where == f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 5
    while True:
        try:
            body = httpx.get(where, timeout=2).text
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert 'tokenfleet_scheduler_queue_depth{slo_class="c"} 3.0' in body


def test_timed_scheduler_is_vllms_own_with_schedule_timed(
    vllm_config: VllmConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenfleet.engine.sla_scheduler import TimedScheduler

    monkeypatch.delenv(sla_metrics.MULTIPROC_ENV, raising=False)
    monkeypatch.delenv(sla_metrics.PORT_ENV, raising=False)
    kv = kv_cache_config()
    timed = TimedScheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK,
    )
    assert type(timed).__mro__[1] is Scheduler  # nothing of ours between it and vLLM's scheduler
    timed.add_request(make_request("r0", "batch", "a", max_tokens=2))
    out = timed.schedule()
    assert list(out.num_scheduled_tokens) == ["r0"]
    count = timed.sla_metrics.registry.get_sample_value("tokenfleet_scheduler_schedule_seconds_count")
    assert count == 1
