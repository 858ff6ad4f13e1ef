"""Drive one real vLLM engine step by step through the "interactive meets a full engine" scenario
and print what happened as JSON (last line of stdout).

Run by `tests/test_sla_scheduler_e2e.py` in a subprocess, with the argv `launch.engine_command`
gives the API server and the same environment. vLLM's own `LLMEngine` runs the engine core in
this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the scheduler, the model and the KV cache are
vLLM's, only the driving is synchronous — so the order of arrivals is exact and no client can be
held up between them, which an HTTP client on a shared 2-vCPU machine can be for the whole life of
a batch request (ADR 0004, "Testing on shared CPUs").

Scenario: `batch` long batch requests arrive; the engine steps until two of them have run for
`min_run_s` (the SLA policy's preemption hysteresis: before it, a running request may not be
preempted); then one interactive request arrives and the engine steps until it finishes (at most
`max_steps`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def main(config: dict[str, Any]) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.llm_engine import LLMEngine

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(config["argv"])
    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    scheduler = engine.engine_core.engine_core.scheduler

    def params(slo_class: str, tenant: str, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, extra_args={"slo_class": slo_class, "tenant": tenant}
        )

    produced: dict[str, int] = {}  # request id -> tokens so far
    first_token_step: dict[str, int] = {}
    finished: dict[str, dict[str, Any]] = {}
    steps = 0

    def step() -> None:
        nonlocal steps
        steps += 1
        for out in engine.step():
            completion = out.outputs[0]
            produced[out.request_id] = len(completion.token_ids)
            if completion.token_ids and out.request_id not in first_token_step:
                first_token_step[out.request_id] = steps
            if out.finished:
                finished[out.request_id] = {
                    "finish_reason": completion.finish_reason,
                    "stop_reason": completion.stop_reason,
                    "tokens": len(completion.token_ids),
                }

    batch_ids = [f"batch-{i}" for i in range(config["batch"])]
    for request_id in batch_ids:
        engine.add_request(request_id, "class A:", params("batch", "a", config["batch_tokens"]), priority=2)
    while sum(1 for r in batch_ids if r in first_token_step) < 2:
        step()
    # Both were admitted before this point, so from here on each has run at least this long.
    started = time.monotonic()
    while time.monotonic() - started < config["min_run_s"]:
        step()

    running_at_arrival = sorted(r.request_id for r in scheduler.running)
    waiting_at_arrival = sorted(r.request_id for r in scheduler.waiting)
    arrival_step = steps
    engine.add_request("interactive", "x = ", params("interactive", "b", 8), priority=0)
    while "interactive" not in finished and steps - arrival_step < config["max_steps"]:
        step()

    metrics = getattr(scheduler, "sla_metrics", None)

    def sample(name: str, slo_class: str) -> float | None:
        if metrics is None:
            return None  # vLLM's own scheduler: no tokenfleet series
        value = metrics.registry.get_sample_value(
            f"tokenfleet_scheduler_{name}_total", {"slo_class": slo_class}
        )
        return 0.0 if value is None else value

    result = {
        "rejected": {r: finished[r] for r in batch_ids if r in finished},
        "running_at_arrival": running_at_arrival,
        "waiting_at_arrival": waiting_at_arrival,
        "interactive": finished.get("interactive"),
        "interactive_first_token_after_steps": (
            first_token_step["interactive"] - arrival_step if "interactive" in first_token_step else None
        ),
        "batch_started_after_arrival": sorted(
            r for r in batch_ids if first_token_step.get(r, 0) > arrival_step
        ),
        "preemptions": sample("preemptions", "batch"),
        "overtakes": sample("overtakes", "interactive"),
        "steps_after_arrival": steps - arrival_step,
    }
    engine.abort_request([r for r in [*batch_ids, "interactive"] if r not in finished])
    return result


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
