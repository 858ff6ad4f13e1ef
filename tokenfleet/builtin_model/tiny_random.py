"""`builtin://tiny-random`: random weights of the default model's architecture, built in seconds."""

from __future__ import annotations

import json
from pathlib import Path

from tokenfleet.builtin_model.tokenizer import stdlib_source_files, train_tokenizer

# Long enough for requests that cannot finish while a test's scenario runs (the scheduler's
# step-driven test keeps two batch requests running past the preemption hysteresis); KV per
# position is tiny.
CONTEXT = 16384


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
        max_position_embeddings=CONTEXT,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def is_current(path: Path) -> bool:
    """Whether `path` holds a tiny-random built by this recipe (a cache from older code is not)."""
    config = path / "config.json"
    if not config.exists() or not (path / "tokenizer.json").exists():
        return False
    return bool(json.loads(config.read_text()).get("max_position_embeddings") == CONTEXT)
