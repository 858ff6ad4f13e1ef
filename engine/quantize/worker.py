"""Quantize one model with one technique: runs inside the quantization venv, not the engine's.

Started by the pipeline as `<quant venv>/bin/python worker.py job.json`. It imports only the
standard library, torch, transformers, datasets and llm-compressor (tokenfleet is not installed in
that environment); the job file says everything, and the result is a compressed-tensors
checkpoint directory plus `quantize_result.json` in it, written last.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

RESULT_NAME = "quantize_result.json"


WEIGHT_ONLY_BITS = {"W4A16": 4, "W8A16": 8}


def weight_args(scheme: str, group_size: int) -> dict[str, Any]:
    """compressed-tensors quantization args for the weights of `scheme`."""
    if scheme in WEIGHT_ONLY_BITS:
        strategy = "channel" if group_size == -1 else "group"
        bits = WEIGHT_ONLY_BITS[scheme]
        args: dict[str, Any] = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy}
        if strategy == "group":
            args["group_size"] = group_size
        return args
    if scheme == "W8A8":
        return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    raise ValueError(f"no custom weight args for {scheme}")


def config_groups(scheme: str, group_size: int) -> dict[str, Any] | None:
    """Explicit groups for the weight-only schemes, whose presets use groups of 128 (which need
    not divide the model's layers; the pipeline chose a size that does); None = use the preset."""
    if scheme in WEIGHT_ONLY_BITS:
        return {"group_0": {"targets": ["Linear"], "weights": weight_args(scheme, group_size)}}
    return None


def build_recipe(method: str, scheme: str, group_size: int, smoothing_strength: float) -> list[Any]:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    groups = config_groups(scheme, group_size)
    quant: dict[str, Any] = {"ignore": ["lm_head"]}
    if groups is None:
        quant |= {"scheme": scheme, "targets": ["Linear"]}
    else:
        quant["config_groups"] = groups
    if method == "rtn":
        return [QuantizationModifier(**quant)]
    if method == "gptq":
        return [GPTQModifier(**quant)]
    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # AWQ only rescales channels; the quantization modifier after it writes the scheme.
        return [AWQModifier(), QuantizationModifier(**quant)]
    if method == "smoothquant+gptq":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=smoothing_strength), GPTQModifier(**quant)]
    raise ValueError(f"unknown method {method!r}")


def skip_pinning_without_accelerator() -> None:
    """Make llm-compressor's cache pinning a no-op on a machine with no accelerator.

    llm-compressor 0.14.0.1's AWQ pins cached activations before its grid search so that copies to
    the GPU can be asynchronous; torch refuses `pin_memory()` without an accelerator ("Cannot
    access accelerator device when none is available"). On a CPU-only machine there is no copy to
    speed up, so not pinning changes nothing but the crash.
    """
    import torch

    if torch.accelerator.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    def no_pin(self: Any, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    IntermediatesCache.pin_memory = no_pin


def run(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    skip_pinning_without_accelerator()
    torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(int(job.get("seed", 0)))
    started = time.perf_counter()
    model_dir, out_dir = Path(job["model_dir"]), Path(job["out_dir"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=job.get("dtype", "auto"))
    recipe = build_recipe(
        job["method"], job["scheme"], int(job["group_size"]), float(job["smoothing_strength"])
    )
    kwargs: dict[str, Any] = {"model": model, "recipe": recipe, "tokenizer": tokenizer}
    windows: list[list[int]] = []
    if job.get("calibration"):
        from datasets import Dataset

        windows = json.loads(Path(job["calibration"]).read_text())["windows"]
        dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
        kwargs |= {
            "dataset": dataset,
            "num_calibration_samples": len(windows),
            "max_seq_length": max(len(w) for w in windows),
            "shuffle_calibration_samples": False,
        }
    oneshot(**kwargs)
    quantized = time.perf_counter()

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, save_compressed=True)
    tokenizer.save_pretrained(tmp)
    result = {
        "method": job["method"],
        "scheme": job["scheme"],
        "group_size": int(job["group_size"]),
        "calibration_windows": len(windows),
        "quantize_s": round(quantized - started, 2),
        "total_s": round(time.perf_counter() - started, 2),
        "torch": torch.__version__,
        "llmcompressor": _version("llmcompressor"),
        "compressed_tensors": _version("compressed-tensors"),
        "transformers": _version("transformers"),
    }
    # Written last, then the directory is renamed into place: a reader never sees half a checkpoint.
    (tmp / RESULT_NAME).write_text(json.dumps(result, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return result


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: worker.py JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[1]).read_text())
    result = run(job)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
