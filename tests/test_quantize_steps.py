"""Quantization pipeline: resumable steps, step keys, data splits, recommendation (pure, fast)."""

from __future__ import annotations

import io
import json
import sysconfig
from collections import Counter
from pathlib import Path

import pytest

from tokenfleet.builtin_model.tiny_code import split_of
from tokenfleet.engine.quantize.config import ConstraintConfig, parse_config
from tokenfleet.engine.quantize.data import pick_calibration, pick_evaluation, split_files, windows_of
from tokenfleet.engine.quantize.evaluate import nll_of
from tokenfleet.engine.quantize.pipeline import step_keys
from tokenfleet.engine.quantize.report import BASELINE, Row, recommend, rows_from
from tokenfleet.engine.quantize.steps import Result, Step, load_state, plan, run_steps
from tokenfleet.engine.quantize.summary import check_targets
from tokenfleet.engine.quantize.techniques import lookup


class FakeSteps:
    """Steps that count their runs and can be told to fail."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.runs: Counter[str] = Counter()
        self.failing: set[str] = set()

    def step(self, name: str, key: str, output: bool = False) -> Step:
        path = self.tmp / f"{name}.out"

        def run() -> Result:
            if name in self.failing:
                raise RuntimeError(f"{name} failed")
            self.runs[name] += 1
            if output:
                path.write_text("x")
            return {"value": f"{name}@{key}"}

        return Step(name, key, run, (path,) if output else ())


def test_unchanged_steps_are_skipped_and_changed_ones_rerun(tmp_path: Path) -> None:
    fake = FakeSteps(tmp_path)
    state = tmp_path / "state.json"
    progress = io.StringIO()
    first = run_steps([fake.step("a", "k1"), fake.step("b", "k1")], state, progress)
    assert fake.runs == {"a": 1, "b": 1}
    assert first["b"] == {"value": "b@k1"}

    second = run_steps([fake.step("a", "k1"), fake.step("b", "k2")], state, progress)
    assert fake.runs == {"a": 1, "b": 2}  # a skipped, b's config changed
    assert second["a"] == {"value": "a@k1"}  # a skipped step still yields its recorded result
    assert "[1/2] a: unchanged, skipped" in progress.getvalue()
    assert "[2/2] b: running" in progress.getvalue()


def test_a_step_whose_output_is_gone_runs_again(tmp_path: Path) -> None:
    fake = FakeSteps(tmp_path)
    state = tmp_path / "state.json"
    run_steps([fake.step("a", "k", output=True)], state)
    run_steps([fake.step("a", "k", output=True)], state)
    assert fake.runs["a"] == 1
    (tmp_path / "a.out").unlink()
    run_steps([fake.step("a", "k", output=True)], state)
    assert fake.runs["a"] == 2


def test_an_interrupted_run_resumes_at_the_failed_step(tmp_path: Path) -> None:
    fake = FakeSteps(tmp_path)
    state = tmp_path / "state.json"
    steps = [fake.step("a", "k"), fake.step("b", "k"), fake.step("c", "k")]
    fake.failing = {"b"}
    with pytest.raises(RuntimeError, match="b failed"):
        run_steps(steps, state)
    assert set(load_state(state)) == {"a"}  # recorded as soon as it finished
    fake.failing = set()
    run_steps(steps, state)
    assert fake.runs == {"a": 1, "b": 1, "c": 1}


def test_plan_is_a_pure_decision(tmp_path: Path) -> None:
    fake = FakeSteps(tmp_path)
    steps = [fake.step("a", "k1"), fake.step("b", "k1"), fake.step("c", "k1")]
    recorded = {"a": {"key": "k1"}, "b": {"key": "old"}}
    assert [(s.name, action) for s, action in plan(steps, recorded)] == [
        ("a", "skip"),
        ("b", "run"),
        ("c", "run"),
    ]
    assert fake.runs == {}
    forced = plan(steps, {"a": {"key": "k1"}, "c": {"key": "k1"}}, rerun=["c*"])
    assert [action for _, action in forced] == ["skip", "run", "run"]


def _keys(**config: object) -> dict[str, str]:
    cfg = parse_config(config)
    techniques = [lookup(n) for n in cfg.technique_names()]
    return step_keys(cfg, techniques, 64, model_fp="m", quant_env_key="e", worker_hash="w")


def test_step_keys_change_exactly_where_the_inputs_do() -> None:
    base = _keys()
    more_calibration = _keys(calibration={"samples": 128})
    changed = {name for name in base if base[name] != more_calibration[name]}
    # RTN needs no calibration data, and evaluation windows do not depend on it.
    assert changed == {
        "data",
        "quantize:gptq-w4a16",
        "quantize:awq-w4a16",
        "quantize:smoothquant-gptq-w8a8",
        "eval:gptq-w4a16",
        "eval:awq-w4a16",
        "eval:smoothquant-gptq-w8a8",
    }
    longer_bench = _keys(evaluation={"benchDurationS": 30})
    assert {n for n in base if base[n] != longer_bench[n]} == {n for n in base if n.startswith("eval:")}
    assert _keys() == base  # deterministic


def test_calibration_and_evaluation_come_from_disjoint_files() -> None:
    train, val = split_files(0.2, max_files=60)
    assert train
    assert val
    assert len(set(train) | set(val)) == 60
    assert not set(train) & set(val)
    # The model build's own split: the same function of each file's relative path.
    root = Path(sysconfig.get_paths()["stdlib"])
    assert all(split_of(p.relative_to(root).as_posix(), 0.2) == "val" for p in val)


def test_window_selection() -> None:
    ids = list(range(10))
    assert windows_of(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    windows = [[i] for i in range(100)]
    picked = pick_calibration(windows, 10, seed=1)
    assert picked == pick_calibration(windows, 10, seed=1)
    assert picked != pick_calibration(windows, 10, seed=2)
    assert len({w[0] for w in picked}) == 10
    assert pick_evaluation(windows, 4) == [[0], [25], [50], [75]]


def test_perplexity_uses_each_prompt_tokens_own_logprob() -> None:
    ids = [5, 7, 9]
    logprobs = [None, {"7": {"logprob": -1.0, "rank": 1}}, {"9": {"logprob": -3.0, "rank": 4}}]
    assert nll_of(logprobs, ids) == (4.0, 2)
    with pytest.raises(KeyError):
        nll_of([None, {"8": {"logprob": -1.0}}, {"9": {"logprob": -1.0}}], ids)


def _row(name: str, mb: float, recovery: float, tok_s: float | None = 100.0) -> Row:
    t = lookup(name) if name != BASELINE else None
    return Row(
        name,
        t.method if t else "-",
        t.scheme if t else "unquantized",
        mb,
        10 / recovery,
        recovery,
        tok_s,
        None,
        None,
        None,
    )


ROWS = [
    _row(BASELINE, 24.0, 1.0, 100.0),
    _row("rtn-w4a16", 10.0, 0.90, 120.0),
    _row("gptq-w4a16", 10.0, 0.96, 118.0),
    _row("awq-w4a16", 10.0, 0.97, 119.0),
    _row("rtn-w8a8", 14.0, 0.995, 130.0),
]


def test_recommendation_follows_the_constraint() -> None:
    assert recommend(ROWS, ConstraintConfig(max_recovery_loss=0.05)).choice == "awq-w4a16"
    assert recommend(ROWS, ConstraintConfig(max_recovery_loss=0.01)).choice == "rtn-w8a8"
    fastest = recommend(ROWS, ConstraintConfig(max_recovery_loss=0.05, optimize="throughput"))
    assert fastest.choice == "rtn-w8a8"
    none = recommend(ROWS, ConstraintConfig(max_recovery_loss=0.001))
    assert none.choice == BASELINE
    assert "rtn-w8a8 at 99.50%" in none.reason


def test_targets_are_checked_against_the_measured_rows() -> None:
    checked = {c.target: c.met for c in check_targets(ROWS)}
    assert checked == {
        "rtn-w8a8 recovery ≥ 98%": True,
        "gptq-w4a16 recovery ≥ 95%": True,
        "gptq-w4a16 better than rtn-w4a16": True,
        "awq-w4a16 recovery ≥ 95%": True,
        "awq-w4a16 better than rtn-w4a16": True,
    }


def test_rows_compute_recovery_from_the_baseline() -> None:
    evaluations = {
        "rtn-w4a16": {"ppl": 12.5, "weights_mb": 1.0},
        BASELINE: {"ppl": 10.0, "weights_mb": 4.0, "output_tok_per_s": 50.0},
    }
    rows = rows_from(evaluations, {"rtn-w4a16": {"quantize_s": 1.5}})
    assert [r.name for r in rows] == [BASELINE, "rtn-w4a16"]
    assert rows[1].recovery == pytest.approx(0.8)
    assert rows[1].quantize_s == 1.5
    assert json.dumps(rows[0].output_tok_per_s) == "50.0"


def test_worker_writes_the_group_size_the_pipeline_chose() -> None:
    from tokenfleet.engine.quantize.worker import config_groups, weight_args

    # W4A16: explicit groups (the preset's 128 does not divide the default model's 704).
    assert config_groups("W4A16", 64) == {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 64,
            },
        }
    }
    assert weight_args("W4A16", -1)["strategy"] == "channel"
    # W8A16's preset also uses groups of 128: explicit groups for it too.
    assert config_groups("W8A16", 64)["group_0"]["weights"]["num_bits"] == 8
    assert config_groups("W8A16", 64)["group_0"]["weights"]["group_size"] == 64
    # The 8-bit schemes use llm-compressor's presets (per-channel weights).
    assert config_groups("W8A8", 64) is None
    assert weight_args("W8A8", 64) == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    with pytest.raises(ValueError, match="FP8_DYNAMIC"):
        weight_args("FP8_DYNAMIC", 64)
