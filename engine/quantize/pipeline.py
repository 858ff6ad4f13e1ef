"""`tokenfleet quantize`: validate, create the quant venv, quantize, evaluate, report.

Every piece of work is a resumable `Step` keyed by a hash of its inputs (`step_keys`, pure), so a
rerun after an interruption or a config change redoes only what changed. Bad input is rejected by
`preflight` (pure) before any step runs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tokenfleet.engine.quantize import checks
from tokenfleet.engine.quantize.config import PipelineConfig
from tokenfleet.engine.quantize.paths import checkpoint_root
from tokenfleet.engine.quantize.steps import Result, Step, plan, run_steps, step_key
from tokenfleet.engine.quantize.techniques import Technique, lookup
from tokenfleet.engine.quantize.venv import MARKER, env_key, quant_env

WORKER = Path(__file__).resolve().parent / "worker.py"
STATE_NAME = "pipeline-state.json"
DATA_NAME = "data.json"
# SmoothQuant's migration strength: 0.8 is llm-compressor's documented choice for Llama-like models.
SMOOTHING_STRENGTH = 0.8


class PipelineError(RuntimeError):
    """The pipeline cannot run as configured; `problems` lists every reason."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("quantization pipeline rejected:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Prepared:
    """The validated inputs every step is built from."""

    config: PipelineConfig
    model_dir: Path
    out_dir: Path
    techniques: tuple[Technique, ...]
    group_size: int
    keys: dict[str, str]
    notes: tuple[str, ...] = field(default=())


def resolve_model_dir(source: str) -> Path:
    if source.startswith("builtin://"):
        from tokenfleet.models import ensure_builtin

        return ensure_builtin(source.removeprefix("builtin://"))
    path = Path(source).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise PipelineError([f"model {source!r}: no config.json in that directory"])
    return path


def preflight(
    config: PipelineConfig, model_config: dict[str, Any], cpu_flag_set: Iterable[str]
) -> tuple[list[Technique], int, list[str]]:
    """The techniques to run, the W4A16 group size, and every reason the run cannot start."""
    problems: list[str] = []
    try:
        shapes = checks.linear_shapes(model_config)
    except (ValueError, KeyError) as exc:
        return [], -1, [f"model: {exc}"]
    if model_config.get("quantization_config"):
        problems.append("model: already quantized (config.json has quantization_config); give the original")
    group_size = config.group_size if config.group_size is not None else checks.auto_group_size(shapes)
    techniques = [lookup(name) for name in config.technique_names()]
    flags = frozenset(cpu_flag_set)
    for technique in techniques:
        for reason in checks.technique_problems(
            technique, config.device, shapes, group_size=group_size, cpu_flag_set=flags
        ):
            problems.append(f"{technique.name} on {config.device}: {reason}")
    return techniques, group_size, problems


def model_fingerprint(model_dir: Path) -> str:
    """config.json's content plus each weight/tokenizer file's name, size and mtime."""
    parts: list[Any] = [(model_dir / "config.json").read_text()]
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.suffix in {".safetensors", ".json", ".bin", ".model"}:
            stat = path.stat()
            parts.append((path.name, stat.st_size, stat.st_mtime_ns))
    return step_key(parts)


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def step_keys(
    config: PipelineConfig,
    techniques: Sequence[Technique],
    group_size: int,
    *,
    model_fp: str,
    quant_env_key: str,
    worker_hash: str,
) -> dict[str, str]:
    """Each step's key from exactly the inputs that change its result (pure)."""
    cal, ev = config.calibration, config.evaluation
    # The data step writes both window sets; each consumer depends only on the set it reads, so a
    # calibration change redoes calibrated techniques but not RTN or any evaluation's windows.
    calib_key = step_key(["calibration", model_fp, cal.model_dump()])
    eval_data_key = step_key(["evaluation", model_fp, ev.seq_len, ev.ppl_windows])
    keys = {"quant-env": quant_env_key, "data": step_key([calib_key, eval_data_key])}
    eval_inputs = ev.model_dump(exclude={"start_timeout_s"})
    keys["eval:baseline"] = step_key(["eval", model_fp, eval_data_key, eval_inputs])
    for t in techniques:
        inputs: list[Any] = [model_fp, t.method, t.scheme, quant_env_key, worker_hash]
        if t.scheme in ("W4A16", "W8A16"):
            inputs.append(group_size)
        if t.method == "smoothquant+gptq":
            inputs.append(SMOOTHING_STRENGTH)
        if t.needs_calibration:
            inputs.append(calib_key)
        keys[f"quantize:{t.name}"] = step_key(inputs)
        keys[f"eval:{t.name}"] = step_key(["eval", keys[f"quantize:{t.name}"], eval_data_key, eval_inputs])
    return keys


def prepare(config: PipelineConfig, cpu_flag_set: Iterable[str] | None = None) -> Prepared:
    """Validate everything that can be validated before work starts; raise PipelineError."""
    model_dir = resolve_model_dir(config.model)
    model_config = json.loads((model_dir / "config.json").read_text())
    flags = checks.read_cpu_flags() if cpu_flag_set is None else cpu_flag_set
    techniques, group_size, problems = preflight(config, model_config, flags)
    if problems:
        raise PipelineError(problems)
    keys = step_keys(
        config,
        techniques,
        group_size,
        model_fp=model_fingerprint(model_dir),
        quant_env_key=env_key(config.quant_env.requirements, config.quant_env.extra_index_urls),
        worker_hash=file_hash(WORKER),
    )
    out_dir = Path(config.output_dir).expanduser() if config.output_dir else checkpoint_root(config.model)
    return Prepared(config, model_dir, out_dir.resolve(), tuple(techniques), group_size, keys)


def build_steps(prep: Prepared, progress: TextIO | None) -> list[Step]:
    cfg, out = prep.config, prep.out_dir
    env = quant_env(cfg.quant_env.requirements, cfg.quant_env.extra_index_urls)
    logs = out / "logs"
    data_path = out / DATA_NAME

    def make_env() -> Result:
        from tokenfleet.engine.quantize.venv import ensure_env

        logs.mkdir(parents=True, exist_ok=True)
        if not env.is_ready():
            _say(progress, f"  creating {env.path} (pip install {' '.join(env.requirements)})")
        seconds = ensure_env(env, cfg.quant_env.extra_index_urls, log=logs / "quant-env.log")
        # A reused environment reports how long its creation took (recorded in its marker).
        marker = json.loads((env.path / MARKER).read_text())
        return {"path": str(env.path), "install_s": marker.get("install_s"), "reused": seconds == 0.0}

    def make_data() -> Result:
        from tokenfleet.engine.quantize.data import build_windows

        data = build_windows(
            prep.model_dir,
            calib_samples=cfg.calibration.samples,
            calib_seq_len=cfg.calibration.seq_len,
            eval_windows=cfg.evaluation.ppl_windows,
            eval_seq_len=cfg.evaluation.seq_len,
            seed=cfg.calibration.seed,
        )
        out.mkdir(parents=True, exist_ok=True)
        data_path.write_text(json.dumps({"windows": data["calibration"], "evaluation": data["evaluation"]}))
        return {k: v if not isinstance(v, list) else len(v) for k, v in data.items()}

    def make_quantize(t: Technique) -> Step:
        def run() -> Result:
            return _quantize(prep, t, env.python, data_path if t.needs_calibration else None, logs, progress)

        return Step(
            f"quantize:{t.name}",
            prep.keys[f"quantize:{t.name}"],
            run,
            (out / t.name / "quantize_result.json",),
        )

    def make_eval(name: str, model_dir: Path) -> Step:
        def run() -> Result:
            from tokenfleet.engine.quantize.evaluate import evaluate

            windows = json.loads(data_path.read_text())["evaluation"]
            result = evaluate(model_dir, windows, cfg.evaluation, out / "eval" / name)
            _say(
                progress,
                f"  {name}: ppl {result['ppl']:.2f}, {result['weights_mb']:.2f} MB"
                + (f", {result['output_tok_per_s']:.1f} tok/s" if "output_tok_per_s" in result else ""),
            )
            return result

        return Step(f"eval:{name}", prep.keys[f"eval:{name}"], run, (model_dir / "config.json",))

    steps = [
        Step("quant-env", prep.keys["quant-env"], make_env, (env.path / MARKER,)),
        Step("data", prep.keys["data"], make_data, (data_path,)),
    ]
    steps += [make_quantize(t) for t in prep.techniques]
    steps.append(make_eval("baseline", prep.model_dir))
    steps += [make_eval(t.name, out / t.name) for t in prep.techniques]
    return steps


def _quantize(
    prep: Prepared, t: Technique, python: Path, calibration: Path | None, logs: Path, progress: TextIO | None
) -> Result:
    job = {
        "model_dir": str(prep.model_dir),
        "out_dir": str(prep.out_dir / t.name),
        "method": t.method,
        "scheme": t.scheme,
        "group_size": prep.group_size,
        "smoothing_strength": SMOOTHING_STRENGTH,
        "threads": prep.config.quant_threads,
        "seed": prep.config.calibration.seed,
        "calibration": str(calibration) if calibration else None,
    }
    logs.mkdir(parents=True, exist_ok=True)
    job_path = logs / f"quantize-{t.name}.job.json"
    job_path.write_text(json.dumps(job, indent=2))
    log_path = logs / f"quantize-{t.name}.log"
    _say(progress, f"  {t.description}; log: {log_path}")
    with log_path.open("wb") as log:
        # -P: the repository's top-level folders must not shadow modules in the quant venv.
        code = subprocess.run(
            [str(python), "-P", str(WORKER), str(job_path)], stdout=log, stderr=subprocess.STDOUT, check=False
        ).returncode
    if code != 0:
        tail = log_path.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"quantizing with {t.name} failed (exit {code}); see {log_path}:\n{tail}")
    result: Result = json.loads((prep.out_dir / t.name / "quantize_result.json").read_text())
    return result


def dry_run(prep: Prepared, rerun: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(step, run|skip) for every step, from the recorded state; nothing runs."""
    steps = build_steps(prep, None)
    from tokenfleet.engine.quantize.steps import load_state

    return [(s.name, action) for s, action in plan(steps, load_state(prep.out_dir / STATE_NAME), rerun)]


def run_pipeline(
    prep: Prepared, progress: TextIO | None = sys.stderr, rerun: Sequence[str] = ()
) -> dict[str, Result]:
    started = time.monotonic()
    _say(progress, f"quantize {prep.config.model} ({prep.model_dir}) -> {prep.out_dir}")
    _say(
        progress,
        f"  techniques: {', '.join(t.name for t in prep.techniques)}; W4A16 group size {prep.group_size}",
    )
    results = run_steps(build_steps(prep, progress), prep.out_dir / STATE_NAME, progress, rerun)
    if prep.config.report:
        from tokenfleet.engine.quantize.summary import write_summary

        files = write_summary(prep, results, Path(prep.config.report))
        _say(progress, f"report: {files[0]}")
    _say(progress, f"pipeline finished in {time.monotonic() - started:.0f} s")
    return results


def _say(progress: TextIO | None, line: str) -> None:
    if progress is not None:
        progress.write(line + "\n")
        progress.flush()
