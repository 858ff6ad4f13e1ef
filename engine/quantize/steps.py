"""Resumable steps: a step whose key (a hash of its inputs and config) is unchanged is skipped.

`plan` is the pure decision; `run_steps` applies it, records each finished step's key and result
in a JSON state file (rewritten atomically after every step, so an interrupted run resumes from
the first unfinished step), and prints one progress line per step.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

Result = dict[str, Any]
Action = Literal["run", "skip"]


def step_key(inputs: Any) -> str:
    """A stable hash of JSON-serialisable inputs (dict key order does not matter)."""
    text = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Step:
    name: str
    key: str
    run: Callable[[], Result]
    # Files the step leaves behind; a recorded step whose outputs are gone runs again.
    outputs: tuple[Path, ...] = ()


def plan(
    steps: Sequence[Step], state: Mapping[str, Mapping[str, Any]], rerun: Sequence[str] = ()
) -> list[tuple[Step, Action]]:
    """Which steps run: those never recorded, recorded with another key, missing an output, or
    matching a `rerun` pattern (shell-style, e.g. "eval:*" to measure again on a quiet machine)."""
    decisions: list[tuple[Step, Action]] = []
    for step in steps:
        recorded = state.get(step.name)
        fresh = (
            recorded is not None
            and recorded.get("key") == step.key
            and all(path.exists() for path in step.outputs)
            and not any(fnmatch.fnmatchcase(step.name, pattern) for pattern in rerun)
        )
        decisions.append((step, "skip" if fresh else "run"))
    return decisions


def load_state(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_state(path: Path, state: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def run_steps(
    steps: Sequence[Step], state_path: Path, progress: TextIO | None = None, rerun: Sequence[str] = ()
) -> dict[str, Result]:
    """Run the stale steps in order; return every step's result (recorded or fresh)."""
    state = load_state(state_path)
    results: dict[str, Result] = {}
    decisions = plan(steps, state, rerun)
    total = len(decisions)
    for index, (step, action) in enumerate(decisions, start=1):
        prefix = f"[{index}/{total}] {step.name}"
        if action == "skip":
            _say(progress, f"{prefix}: unchanged, skipped")
            results[step.name] = dict(state[step.name].get("result") or {})
            continue
        _say(progress, f"{prefix}: running")
        started = time.monotonic()
        result = step.run()
        elapsed = time.monotonic() - started
        state[step.name] = {"key": step.key, "result": result, "seconds": round(elapsed, 1)}
        save_state(state_path, state)
        results[step.name] = result
        _say(progress, f"{prefix}: done in {elapsed:.1f} s")
    return results


def _say(progress: TextIO | None, line: str) -> None:
    if progress is not None:
        progress.write(line + "\n")
        progress.flush()
