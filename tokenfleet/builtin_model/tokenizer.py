"""The corpus and tokenizer both builtin models share."""

from __future__ import annotations

import sysconfig
from pathlib import Path

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
