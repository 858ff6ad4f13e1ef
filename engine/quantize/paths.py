"""Where the pipeline puts checkpoints, so that `model.quantization: <technique>` finds them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenfleet.models import cache_dir


def model_key(source: str) -> str:
    """A folder name for a model source: the builtin's name, or a local dir's name + path hash."""
    if source.startswith("builtin://"):
        return source.removeprefix("builtin://")
    if source.startswith("hf://"):
        return source.removeprefix("hf://").replace("/", "--").replace("@", "--")
    path = Path(source).expanduser().resolve()
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    return f"{path.name}-{digest}"


def checkpoint_root(source: str) -> Path:
    return cache_dir() / "quantized" / model_key(source)


def quantized_checkpoint(source: str, quantization: str) -> Path:
    """The checkpoint directory `model.quantization` names, checked to be a quantized checkpoint.

    A technique name means the pipeline's output for this source; anything path-like is a
    directory. Raises FileNotFoundError saying how to produce a missing checkpoint.
    """
    from tokenfleet.engine.quantize.techniques import is_checkpoint_path

    if is_checkpoint_path(quantization):
        path = Path(quantization).expanduser().resolve()
        how = "give a directory with a compressed-tensors checkpoint"
    else:
        path = checkpoint_root(source) / quantization
        how = f"run `tokenfleet quantize` with model: {source} and techniques: [{quantization}] first"
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"model.quantization {quantization!r}: no checkpoint at {path}; {how}")
    if "quantization_config" not in json.loads(config.read_text()):
        raise ValueError(f"model.quantization {quantization!r}: {path} is not a quantized checkpoint")
    return path
