"""tokenfleet's SLA-aware scheduler for vLLM 0.32: a thin adapter over `sla_policy`.

Loaded by vLLM with `--scheduling-policy priority --scheduler-cls
tokenfleet.engine.sla_scheduler.SLAScheduler` (see `launch.engine_command`), in the EngineCore
process. The classes and tenants come from `TOKENFLEET_SCHEDULER_SPEC` (`sla_contract.SPEC_ENV`:
the SchedulerSpec as JSON); each request's class and tenant from its `priority` and `vllm_xargs`
(`{"slo_class": ..., "tenant": ...}`).

What it changes in vLLM, and where (ADR 0004 lists what is fragile):

- both waiting queues are replaced by `SLAQueue` (aging, class priority, VTC, slack);
- `add_request` tags the request with a `Ticket` and applies per-class admission limits; a
  rejected request finishes at once with finish_reason `abort` and a `stop_reason` starting
  with `sla_contract.REJECT_PREFIX` (the gateway maps it to 503);
- `schedule` first preempts low-class running requests for an urgent waiting head (vLLM 0.32
  never preempts for a waiting request, issue #40004), ranks the running list so vLLM's own
  KV-pressure victim is the least valuable one, then calls vLLM's `schedule`;
- after scheduling, VTC counters are charged with the tokens just scheduled.

It subclasses `AsyncScheduler` (not `Scheduler`) so async scheduling stays on.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

from tokenfleet.engine.sla_contract import SPEC_ENV
from tokenfleet.engine.sla_metrics import SchedulerMetrics, export
from tokenfleet.engine.sla_policy import (
    PolicyConfig,
    RunningView,
    SLAPolicy,
    SLAQueue,
    StepClock,
    Ticket,
    choose_victims,
    overtook,
    running_rank,
    slo_met,
    would_miss_after,
)
from tokenfleet.spec import SchedulerSpec

TICKET_ATTR = "tf_ticket"
DEPTH_INTERVAL_S = 0.25  # how often the per-class depth gauges are recounted (O(queue))

# A child of "vllm" so it reaches the handlers vLLM configures in the EngineCore process.
logger = init_logger(f"vllm.{__name__}")


def load_spec(env: dict[str, str] | None = None) -> SchedulerSpec:
    raw = (os.environ if env is None else env).get(SPEC_ENV)
    if not raw:
        logger.warning("%s is not set: using the default scheduler classes", SPEC_ENV)
        return SchedulerSpec()
    return SchedulerSpec.model_validate_json(raw)


def _remaining_tokens(request: Any) -> int:
    """Upper bound on a running vLLM request's decode steps before it finishes on its own."""
    return max(0, int(request.max_tokens) - int(request.num_output_tokens))


class VLLMSLAQueue(SLAQueue[Any], RequestQueue):  # type: ignore[misc]  # vLLM is Any to mypy
    """`SLAQueue` registered as a vLLM `RequestQueue` (the ABC the scheduler's code expects)."""


class SLAScheduler(AsyncScheduler):  # type: ignore[misc]  # vLLM is Any to mypy
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sla_spec = load_spec()
        self.sla = SLAPolicy(PolicyConfig.from_spec(self.sla_spec))
        self.sla_clock = StepClock()
        # Replace both of vLLM's waiting queues; nothing is in them yet.
        self.waiting = VLLMSLAQueue(self.sla, self._ticket)
        self.kv_holding_waiting = VLLMSLAQueue(self.sla, self._ticket)
        self.sla_metrics = SchedulerMetrics()
        self.sla_metrics.init_classes(c.name for c in self.sla.config.classes)
        self.sla_rejected: list[tuple[Any, str]] = []
        self._last_schedule_at: float | None = None
        self._last_scheduled_tokens = 0
        self._last_scheduled_reqs = 0
        self._depths_at = 0.0
        how = export(self.sla_metrics)
        logger.info(
            "tokenfleet SLA scheduler: classes %s, metrics %s",
            [c.name for c in self.sla.config.classes],
            how,
        )

    # -- tagging --------------------------------------------------------------------------------

    def _ticket(self, request: Any) -> Ticket:
        ticket: Ticket | None = getattr(request, TICKET_ATTR, None)
        if ticket is None:
            params = request.sampling_params
            ticket = self.sla.ticket(
                request.request_id,
                int(request.priority),
                params.extra_args if params is not None else None,
                float(request.arrival_time),
                int(request.num_prompt_tokens),
                int(request.max_tokens),
            )
            setattr(request, TICKET_ATTR, ticket)
        return ticket

    def add_request(self, request: Any) -> None:
        if request.request_id in self.requests:  # a streaming-input continuation
            super().add_request(request)
            return
        ticket = self._ticket(request)
        name = ticket.slo_class.name
        tenant_waiting = self.waiting.tenant_counts(name)
        for tenant, n in self.kv_holding_waiting.tenant_counts(name).items():
            tenant_waiting[tenant] = tenant_waiting.get(tenant, 0) + n
        # O(classes × tenants + running), not O(queue): this runs for every arriving request.
        reason = self.sla.admit(ticket, sum(tenant_waiting.values()), tenant_waiting)
        if reason is not None:
            self.sla_metrics.rejections.labels(name).inc()
            self.sla_rejected.append((request, reason))
            return
        backlogged = set(tenant_waiting)  # the counts above hold only tenants with requests waiting
        backlogged |= {t.tenant for t in map(self._ticket, self.running) if t.slo_class.name == name}
        if ticket.tenant not in backlogged:
            self.sla.fair.on_backlogged(name, ticket.tenant, backlogged)
        super().add_request(request)

    def has_requests(self) -> bool:
        # Keep the engine loop stepping until pending rejections are delivered.
        return bool(super().has_requests()) or bool(self.sla_rejected)

    # -- scheduling -----------------------------------------------------------------------------

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        now = time.time()
        self._observe_step(started)
        self.sla.advance(now)
        self._preempt_for_waiting_head(now)
        self._rank_running()
        before_vllm = time.perf_counter()
        output = super().schedule(*args, **kwargs)
        after_vllm = time.perf_counter()
        self._after_schedule(output, now)
        ended = time.perf_counter()
        self.sla_metrics.schedule_time.observe(ended - started)
        self.sla_metrics.policy_time.observe((before_vllm - started) + (ended - after_vllm))
        return output

    def _observe_step(self, started: float) -> None:
        # With async scheduling the gap between schedule() calls is one engine step.
        if self._last_schedule_at is not None and self._last_scheduled_tokens:
            self.sla_clock.observe(
                started - self._last_schedule_at, self._last_scheduled_tokens, self._last_scheduled_reqs
            )
            self.sla.step_s = self.sla_clock.step_s
            self.sla.s_per_prefill_token = self.sla_clock.s_per_token
        self._last_schedule_at = started

    def _preempt_for_waiting_head(self, now: float) -> None:
        if not self.waiting or not self.running:
            return
        head = self._ticket(self.waiting.peek_request())
        if head.slo_class.ttft_s is None:
            return  # a class without a TTFT target never preempts (choose_victims agrees)
        # Older vLLMs lack max_num_active_reqs and num_waiting_for_streaming_input.
        active_cap: int = getattr(self, "max_num_active_reqs", None) or self.max_num_running_reqs
        paused_streams: int = getattr(self, "num_waiting_for_streaming_input", 0)
        free_slots = active_cap - len(self.running) - paused_streams
        block = self.block_size
        free_blocks = self.kv_cache_manager.block_pool.get_num_free_blocks()
        head_blocks = math.ceil((head.prompt_tokens + 1) / block)
        if free_slots > 0 and free_blocks >= head_blocks:
            return  # the head can start now: the common case, decided before building views
        # Under overload the slots are always full: decide "would it miss?" from the running
        # requests' remaining tokens alone, and build the views only when it would (rare).
        soonest = min(_remaining_tokens(r) for r in self.running)
        if not would_miss_after(head, now, soonest * self.sla.step_s, self.sla):
            return
        views = [
            RunningView(
                ticket=self._ticket(r),
                blocks=math.ceil(r.num_computed_tokens / block),
                remaining_tokens=_remaining_tokens(r),
            )
            for r in self.running
        ]
        victims = choose_victims(
            head,
            now,
            views,
            free_slots=free_slots,
            free_blocks=free_blocks,
            head_blocks=head_blocks,
            policy=self.sla,
        )
        timestamp = time.monotonic()
        for victim in victims:
            request = self.requests.get(victim.request_id)
            if request is None or not self._request_blocks_can_be_freed(request):
                continue
            self.running.remove(request)
            # As vLLM's own inline preemption does (scheduler.py, PRIORITY victim path).
            self._preempt_request(request, timestamp, drop_stale_output=self.requires_kv_delivery)
            # The victim may be resumed in this very step: make sure its full token list is sent.
            self.prev_step_scheduled_req_ids.discard(request.request_id)

    def _rank_running(self) -> None:
        config = self.sla.config
        for request in self.running:
            request.priority = running_rank(self._ticket(request), config)
        # Budget is handed out in list order; vLLM's PRIORITY victim is max(priority, arrival).
        self.running.sort(key=lambda r: (r.priority, r.arrival_time))

    def _after_schedule(self, output: Any, now: float) -> None:
        admitted = [new.req_id for new in output.scheduled_new_reqs]
        admitted += list(getattr(output.scheduled_cached_reqs, "resumed_req_ids", ()) or ())
        first_admitted: list[Ticket] = []
        for req_id in admitted:
            request = self.requests.get(req_id)
            if request is None:
                continue
            ticket = self._ticket(request)
            wait = self.sla.on_scheduled(ticket, now)
            if wait is not None:
                self.sla_metrics.observe_wait(ticket.slo_class.name, wait)
                first_admitted.append(ticket)
        if first_admitted:
            self._count_overtakes(first_admitted)
        for req_id in output.preempted_req_ids or ():
            request = self.requests.get(req_id)
            if request is not None:
                ticket = self._ticket(request)
                ticket.num_preemptions += 1
                self.sla_metrics.preemptions.labels(ticket.slo_class.name).inc()
        tokens = 0
        # Summed per (tenant, class) first: one counter update per series per step, not per request.
        served: dict[tuple[str, str], list[int]] = {}
        for req_id, num_new in output.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is None:
                continue
            tokens += num_new
            ticket = self._ticket(request)
            # _update_after_schedule already advanced num_computed_tokens by num_new.
            prompt_part, output_part = self.sla.charge(ticket, request.num_computed_tokens - num_new, num_new)
            if prompt_part or output_part:
                parts = served.setdefault((ticket.tenant, ticket.slo_class.name), [0, 0])
                parts[0] += prompt_part
                parts[1] += output_part
        for (tenant, slo_class), (prompt_part, output_part) in served.items():
            self.sla_metrics.add_tenant_tokens(
                self.sla.config.tenant_label(tenant), slo_class, prompt_part, output_part
            )
        self._last_scheduled_tokens = tokens
        self._last_scheduled_reqs = len(output.num_scheduled_tokens)
        if now - self._depths_at >= DEPTH_INTERVAL_S:
            self._depths_at = now
            self._update_depths()

    def _count_overtakes(self, admitted: list[Ticket]) -> None:
        queues = (self.waiting, self.kv_holding_waiting)
        highest = min(t.slo_class.priority for t in admitted)
        # The counts first (O(classes × tenants)): the queues are walked (O(waiting)) only when a
        # lower class is waiting, i.e. when an overtake is possible at all.
        if not any(q.holds_class_below(highest) for q in queues):
            return
        oldest: dict[int, float] = {}
        for queue in queues:
            for priority, arrival in queue.oldest_arrivals().items():
                oldest[priority] = min(arrival, oldest.get(priority, arrival))
        for ticket in admitted:
            if overtook(ticket, oldest):
                self.sla_metrics.overtakes.labels(ticket.slo_class.name).inc()

    def _update_depths(self) -> None:
        names = [c.name for c in self.sla.config.classes]
        waiting = dict.fromkeys(names, 0)
        running = dict.fromkeys(names, 0)
        for queue in (self.waiting, self.kv_holding_waiting):
            for name, n in queue.class_counts().items():
                waiting[name] += n
        for r in self.running:
            running[self._ticket(r).slo_class.name] += 1
        self.sla_metrics.set_depths(waiting, running)
        live = {(t.slo_class.name, t.tenant) for t in map(self._ticket, self.running)}
        for name in names:
            live |= {(name, t) for t in self.waiting.tenants_in_class(name)}
            live |= {(name, t) for t in self.kv_holding_waiting.tenants_in_class(name)}
        if len(self.sla.fair.counters_all()) > 4 * len(live) + 64:
            self.sla.fair.prune(lambda c, t: (c, t) in live)

    # -- outputs --------------------------------------------------------------------------------

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        tracked = [self.requests.get(rid) for rid in scheduler_output.num_scheduled_tokens]
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        now = time.time()
        for request in tracked:
            if request is not None:
                self._observe_slo(request, now)
        if self.sla_rejected:
            self._deliver_rejections(outputs)
        return outputs

    def _observe_slo(self, request: Any, now: float) -> None:
        ticket = self._ticket(request)
        name = ticket.slo_class.name
        n_out = int(request.num_output_tokens)
        if ticket.first_token_at is None and n_out > 0:
            ticket.first_token_at = now
            if ticket.slo_class.ttft_s is not None:
                self.sla_metrics.observe_slo(name, "ttft", now <= ticket.deadline)
        if request.is_finished():
            self.sla.on_finished(ticket, n_out)
        if request.is_finished() and ticket.first_token_at is not None and n_out > 1:
            tpot = (now - ticket.first_token_at) / (n_out - 1)
            if ticket.slo_class.tpot_s is not None:
                self.sla_metrics.observe_slo(name, "tpot", slo_met(ticket.slo_class.tpot_s, tpot))

    def _deliver_rejections(self, outputs: dict[int, Any]) -> None:
        rejected, self.sla_rejected = self.sla_rejected, []
        for request, reason in rejected:
            eco = outputs.get(request.client_index)
            if eco is None:
                eco = outputs[request.client_index] = EngineCoreOutputs()
            eco.outputs = [
                *eco.outputs,
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=[],
                    finish_reason=FinishReason.ABORT,
                    stop_reason=reason,
                ),
            ]
            if self.finished_req_ids_dict is not None:  # DP: the coordinator tracks lifetimes
                eco.finished_requests = {*(eco.finished_requests or ()), request.request_id}


class TimedScheduler(Scheduler):  # type: ignore[misc]  # vLLM is Any to mypy
    """vLLM's own scheduler, unchanged (FCFS or `priority`, per `--scheduling-policy`), with each
    `schedule()` call timed into the SLA scheduler's histogram: the benchmark's baselines report
    their scheduling cost on the same scale as ours. Not used outside the benchmark.

    It subclasses `Scheduler`, the class vLLM itself picks on CPU: vLLM 0.32's CPU platform turns
    async scheduling off (`CpuPlatform.check_and_update_config`), so the CPU baselines run exactly
    what they would run without us. (`SLAScheduler` subclasses `AsyncScheduler` for GPUs, where
    async scheduling is on; on CPU the engine drives it synchronously, which its placeholder
    bookkeeping handles: it is incremented in schedule() and settled in update_from_output.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sla_metrics = SchedulerMetrics()
        logger.info("tokenfleet timed scheduler (vLLM's own policy): metrics %s", export(self.sla_metrics))

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        output = super().schedule(*args, **kwargs)
        self.sla_metrics.schedule_time.observe(time.perf_counter() - started)
        return output
