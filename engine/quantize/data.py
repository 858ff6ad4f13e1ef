"""Calibration and evaluation token windows from the model corpus's train and validation splits.

The default model is trained on the standard library's source, split into train and validation by
file (`builtin_model.tiny_code.split_of`). Calibration windows come from the train files only, perplexity
windows from the validation files only, chosen exactly as the model build chose its validation
windows (non-overlapping, spread evenly), so a technique is never calibrated on what it is scored
on. A model that was not built here is calibrated and scored on the same stdlib split.
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path
from typing import Any

from tokenfleet.builtin_model.tiny_code import REPORT_NAME, split_of, spread
from tokenfleet.builtin_model.tokenizer import EOS_TOKEN, stdlib_source_files

DEFAULT_VAL_FRACTION = 0.05


def val_fraction_of(model_dir: Path) -> float:
    """The validation fraction the model was built with (the default model's build report)."""
    try:
        report = json.loads((model_dir / REPORT_NAME).read_text())
        return float(report["config"]["val_fraction"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_VAL_FRACTION


def split_files(val_fraction: float, max_files: int | None = None) -> tuple[list[Path], list[Path]]:
    """The corpus files of the train and validation splits, split as the model build splits them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_source_files()
    if max_files is not None:
        files = files[:max_files]
    train: list[Path] = []
    val: list[Path] = []
    for path in files:
        (val if split_of(path.relative_to(root).as_posix(), val_fraction) == "val" else train).append(path)
    return train, val


def split_texts(val_fraction: float, max_files: int | None = None) -> tuple[list[str], list[str]]:
    train, val = split_files(val_fraction, max_files)
    return [_read(p) for p in train], [_read(p) for p in val]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def windows_of(ids: list[int], seq_len: int) -> list[list[int]]:
    """All non-overlapping windows of `seq_len` tokens, in stream order."""
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def pick_calibration(windows: list[list[int]], samples: int, seed: int) -> list[list[int]]:
    """`samples` windows drawn without replacement by a seeded shuffle (all of them if fewer)."""
    order = list(range(len(windows)))
    random.Random(seed).shuffle(order)
    return [windows[i] for i in sorted(order[:samples])]


def pick_evaluation(windows: list[list[int]], count: int) -> list[list[int]]:
    return [windows[i] for i in spread(len(windows), count)]


def _encode(tokenizer: Any, texts: list[str]) -> list[int]:
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if not isinstance(eos, int) or eos == tokenizer.unk_token_id:
        eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        if eos is not None:
            ids.append(int(eos))
    return ids


def build_windows(
    model_dir: Path,
    *,
    calib_samples: int,
    calib_seq_len: int,
    eval_windows: int,
    eval_seq_len: int,
    seed: int,
    max_files: int | None = None,
) -> dict[str, Any]:
    """Tokenize the corpus with the model's own tokenizer; return calibration and evaluation windows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fraction = val_fraction_of(model_dir)
    train, val = split_texts(fraction, max_files)
    if not train or not val:
        raise RuntimeError(f"empty corpus split: {len(train)} train / {len(val)} validation files")
    calibration = pick_calibration(windows_of(_encode(tokenizer, train), calib_seq_len), calib_samples, seed)
    evaluation = pick_evaluation(windows_of(_encode(tokenizer, val), eval_seq_len), eval_windows)
    if not calibration or not evaluation:
        raise RuntimeError("the corpus is too small for one calibration or evaluation window")
    return {
        "val_fraction": fraction,
        "train_files": len(train),
        "val_files": len(val),
        "calibration": calibration,
        "evaluation": evaluation,
    }
