"""Where model weights come from: builtin:// models built on this machine, hf:// and local paths.

Builtin models are built by the project's own code (`tokenfleet.builtin_model`) and cached here:
`tiny-code` is trained on the Python standard library's source, and `tiny-random` is a
random-weight model of the same architecture, built in seconds, for tests that do not care about
output quality.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenfleet.spec import ModelSpec


def cache_dir() -> Path:
    """`$TOKENFLEET_CACHE`, else `~/.cache/tokenfleet`."""
    root = os.environ.get("TOKENFLEET_CACHE") or Path.home() / ".cache" / "tokenfleet"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def builtin_path(name: str) -> Path:
    return cache_dir() / "models" / name


def ensure_builtin(name: str) -> Path:
    """Return the cached builtin model, building it first if it is missing or from an older recipe."""
    path = builtin_path(name)
    if name == "tiny-random":
        from tokenfleet.builtin_model import tiny_random

        if not tiny_random.is_current(path):
            tiny_random.build_tiny_random(path)
        return path
    if name == "tiny-code":
        from tokenfleet.builtin_model import tiny_code

        # A cache built by another recipe (older code, other settings) is rebuilt, not served.
        if not tiny_code.is_current(path):
            tiny_code.build_tiny_code(path)
        return path
    raise ValueError(f"unknown builtin model {name!r}")


def resolve_model(model: ModelSpec) -> str:
    """What to pass to vLLM's --model: a local directory or a hub id.

    With `model.quantization` set, the quantized checkpoint (the pipeline's output for this
    source, or the directory given) is served instead of the source itself.
    """
    source = model.source
    if model.quantization != "none":
        from tokenfleet.engine.quantize.paths import quantized_checkpoint

        return str(quantized_checkpoint(source, model.quantization))
    if source.startswith("builtin://"):
        return str(ensure_builtin(source.removeprefix("builtin://")))
    if source.startswith("hf://"):
        return source.removeprefix("hf://").split("@", 1)[0]
    path = Path(source).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model.source {source!r}: no config.json in that directory")
    return str(path.resolve())
