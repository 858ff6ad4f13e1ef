"""Where model weights come from: builtin:// models built on this machine, hf:// and local paths.

Builtin models are built by the project's own code and cached, so that no machine needs a model
hub: `tiny-code` is trained on the Python standard library's source (see `modelbuild`), and
`tiny-random` is a random-weight model of the same architecture, built in seconds, for tests that
do not care about output quality.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from tokenfleet.spec import ModelSpec

# A plain template so that /v1/chat/completions works on our base models (transformers has
# no default chat template any more and vLLM refuses chat requests without one).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def cache_dir() -> Path:
    """`$TOKENFLEET_CACHE`, else `~/.cache/tokenfleet`."""
    root = os.environ.get("TOKENFLEET_CACHE") or Path.home() / ".cache" / "tokenfleet"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def stdlib_source_files() -> list[Path]:
    """The corpus every machine has: the standard library's own .py files, in a stable order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo", "__pycache__"}
    files = [
        p for p in stdlib.rglob("*.py") if not skip.intersection(p.relative_to(stdlib).parts) and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> None:
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 4096
    tokenizer.save_pretrained(out_dir)


def build_tiny_random(out_dir: Path, *, seed: int = 0) -> Path:
    """A 2-layer random-weight Llama with a real BPE tokenizer; seconds to build."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    texts = [p.read_text(errors="replace") for p in stdlib_source_files()[:40]]
    train_tokenizer(texts, vocab_size=1024, out_dir=out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def builtin_path(name: str) -> Path:
    return cache_dir() / "models" / name


def ensure_builtin(name: str) -> Path:
    """Return the cached builtin model, building it first if it is missing."""
    path = builtin_path(name)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    if name == "tiny-random":
        return build_tiny_random(path)
    if name == "tiny-code":
        from tokenfleet.modelbuild import build_tiny_code

        build_tiny_code(path)
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
