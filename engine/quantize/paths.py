"""Where the pipeline puts checkpoints, so that `model.quantization: <technique>` finds them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenfleet.models import cache_dir


def model_key(source: str) -> str:
    """A folder name for a model source: the builtin's name, or a local dir's name + path hash."""
    if source.startswith("builtin://"):
        return source.removeprefix("builtin://")
    path = Path(source).expanduser().resolve()
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    return f"{path.name}-{digest}"


def checkpoint_root(source: str) -> Path:
    return cache_dir() / "quantized" / model_key(source)
