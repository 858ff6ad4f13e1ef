"""`tokenfleet bench autoscale`: the analysis and the report, over a recorded-shape trace (the
run itself starts real vLLM fleets and is a benchmark command, not a test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenfleet.cli import build_parser
from tokenfleet.load.autoscale_bench import (
    Event,
    Sample,
    Trace,
    canary_response,
    constant_workload,
    failover_response,
    plot,
    render,
    reversals,
    scale_changes,
    services,
    step_response,
    step_workload,
)


def trace() -> Trace:
    samples = [Sample(float(t), 1, 1, "idle", None) for t in range(0, 60)]
    samples += [Sample(float(t), 3, 1, "idle", None) for t in range(60, 80)]
    samples += [Sample(float(t), 3, 3, "idle", None) for t in range(80, 180)]
    events = [
        Event(72.5, "scale", "queue_depth 6.10/replica vs target 2: 1 -> 3"),
        Event(150.0, "scale", "queue_depth 0.20/replica vs target 2: 3 -> 2"),
        Event(170.0, "scale", "queue_depth 0.10/replica vs target 2: 2 -> 1"),
    ]
    return Trace(samples, events)


def test_step_response_measures_decision_and_ready_times_and_flapping() -> None:
    response = step_response(trace(), step_at=60.0, down_at=120.0)
    assert response["decision_s"] == 12.5
    assert response["ready_s"] == 20.0
    assert response["changes_before_step"] == 0
    assert response["reversals"] == 1
    assert response["changes_after_down"] == [(30.0, 3, 2), (50.0, 2, 1)]
    assert scale_changes(trace().events)[0] == (72.5, 1, 3)
    assert reversals([(0, 1, 2), (1, 2, 1), (2, 1, 2)]) == 2


def test_canary_response_times_the_split_and_the_verdict() -> None:
    samples = [
        Sample(10.0, 1, 1, "progressing", {"a": 100}),
        Sample(50.0, 1, 1, "progressing", {"a": 50, "b": 50}),
        Sample(90.0, 1, 1, "rolled_back", {"a": 100}),
    ]
    events = [Event(85.0, "rollout", "canary rolled back at 50%: TTFT p99 900 ms > 1.5x stable 200 ms")]
    response = canary_response(Trace(samples, events), applied_at=5.0)
    assert response == {
        "traffic_split_s": 45.0,
        "decision_s": 80.0,
        "analysis_s": 35.0,
        "verdict": "canary rolled back at 50%: TTFT p99 900 ms > 1.5x stable 200 ms",
    }


def test_failover_response_times_the_decision_and_the_capacity() -> None:
    readiness = ((99.0, 2), (101.0, 2), (102.0, 1), (140.0, 2))
    samples = [Sample(t, 2, ready, "idle", None) for t, ready in readiness]
    events = [
        Event(50.0, "replace", "replica-0: process exited (restart 1, after 1s back-off)"),  # before
        Event(101.5, "replace", "replica-1: process exited (restart 1, after 1s back-off)"),
    ]
    response = failover_response(Trace(samples, events), killed_at=100.0, replicas=2)
    assert response == {
        "decision_s": 1.5,
        "decision": "replica-1: process exited (restart 1, after 1s back-off)",
        "unready_s": 2.0,
        "ready_again_s": 40.0,
    }
    nothing = failover_response(Trace(samples[:2], []), killed_at=100.0, replicas=2)
    assert nothing == {"decision_s": None, "decision": None, "unready_s": None, "ready_again_s": None}


def test_step_workload_doubles_the_rate_in_the_middle_phase() -> None:
    steps = step_workload(2.5, 30).arrival.shape.steps
    assert [(s.value, s.duration_s) for s in steps] == [(2.5, 30), (5.0, 30), (2.5, 30)]
    specs = services(2.5)
    assert specs["autoscaled"].spec.autoscaling.enabled
    assert specs["canary"].spec.rollout.strategy == "canary"
    # The bad canary refuses what the stable serves: its context is below the workload's longest
    # answers, the stable's is above its longest prompt plus answer.
    workload = constant_workload(2.5)
    longest = workload.output_tokens.max
    assert specs["canary-bad"].spec.model.max_model_len < longest
    assert specs["canary"].spec.model.max_model_len >= longest + workload.prompts.input_tokens.max
    assert specs["canary-good"].spec.rollout == specs["canary"].spec.rollout


def test_report_renders_from_results(tmp_path: Path) -> None:
    load = {
        "requests": 540,
        "failed": 0,
        "errors": {},
        "ttft_p99_ms": 812.0,
        "slo_attainment": 0.97,
        "goodput_req_per_s": 2.9,
        "classes": {"interactive": {"slo_attainment": 0.99, "goodput_req_per_s": 1.0}},
    }
    t = trace()
    recorded = {
        "samples": [{"t": s.t, "desired": s.desired, "ready": s.ready} for s in t.samples],
        "events": [{"t": e.t, "kind": e.kind, "reason": e.reason} for e in t.events],
    }
    step = {"load": load, "response": step_response(t, 60.0, 120.0), "trace": recorded}
    rollout = {
        "load": load,
        "phase": "complete",
        "finished_s": 95.0,
        "events": ["rolling: 2 b replica(s) ready, a drained"],
        "upstream_errors": {},
        "canary": canary_response(Trace(), 0.0),
    }
    results = {
        "services": {
            "autoscaled": {
                "spec": {
                    "autoscaling": {"metric": "in_flight", "target": 0.8},
                    "replicas": {"min": 1, "max": 3},
                }
            }
        },
        "config": {"rate": 3.0, "phase_s": 60.0, "rollout_s": 200.0, "started": 0.0},
        "machine": {"cpus": 2, "cpu_model": "x", "memory_gib": 24},
        "fixed": step,
        "autoscaled": step,
        "rolling": rollout,
        "canary": rollout,
        "failover": {
            "load": load,
            "killed": "replica-1",
            "response": failover_response(trace(), 60.0, 2),
            "upstream_errors": {"replica-1": 2.0},
            "retries": 2.0,
        },
        "bad-canary": {
            **rollout,
            "phase": "rolled_back",
            "canary": {
                "traffic_split_s": 150.0,
                "decision_s": 170.0,
                "analysis_s": 20.0,
                "verdict": "canary rolled back at 50%: refused 17.6% of requests vs stable 0.0%",
            },
            "revisions": {"stable": "aaa", "changed": "bbb"},
            "revision_outcomes": {
                "aaa": {"ok": 600, "refused": 0, "error": 0},
                "bbb": {"ok": 28, "refused": 6},
            },
        },
    }
    text = render(results)
    assert "| step → scale-up decision | - | 12.5 s | ≤ 30 s |" in text
    assert "autoscaled (1..3 replicas, in_flight target 0.8 per replica)" in text
    assert "| direction reversals (flapping) | - | 1 | 0 |" in text
    assert "- 72.5 s: queue_depth 6.10/replica vs target 2: 1 -> 3" in text
    assert "| 540 | 0 | none | complete | 95.0 s |" in text
    assert "verdict 20.0 s after the split: canary rolled back at 50%: refused 17.6%" in text
    assert "| stable `aaa` | 600 | 0 | 0 |" in text
    assert "| changed `bbb` | 28 | 6 | 0 |" in text
    assert "`replica-1`'s engine (its process group) gets SIGKILL" in text
    assert "| 540 | 0 | 2 | - | 0.0 s | 20.0 s |" in text
    plot(results, tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").stat().st_size > 10_000


def test_the_command_is_registered() -> None:
    args = build_parser().parse_args(["bench", "autoscale", "--rate", "2", "--phase-s", "30"])
    assert (args.rate, args.phase_s, args.render) == (2.0, 30.0, False)


def test_unknown_scenarios_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tokenfleet.cli import main

    assert main(["bench", "autoscale", "--out", str(tmp_path), "--scenarios", "fixed,typo"]) == 2
    assert "unknown scenario(s) ['typo']" in capsys.readouterr().err
