"""Build the default model, `builtin://tiny-code`: a small Llama trained on the stdlib's source.

The project needs a model whose output, perplexity and quantization accuracy mean something, yet
that every machine can build without a model hub. So `build_tiny_code`:

1. splits the Python standard library's .py files into train and validation *by file* (a hash of
   the relative path, so the split is the same everywhere and no file leaks across);
2. trains a byte-level BPE tokenizer on the train files only;
3. trains a `LlamaForCausalLM` (head_dim 64 and hidden/intermediate sizes that are multiples of 64,
   as vLLM's CPU attention and 4-bit CPU kernels require) for a fixed number of steps on 2 threads,
   with a seeded initialisation and data order: no wall-clock budget, so a slow or busy machine
   takes longer but builds the same weights (`weights_sha256` in the report says which);
4. evaluates train and validation loss on fixed windows, and the unigram baseline on the very same
   validation targets;
5. saves everything in Hugging Face format into a temporary directory next to `out_dir`, writes
   `build_report.json` last, and renames the directory into place, so a reader never sees half a
   model and a complete one is recognised by its report.

`quick=True` uses a tiny configuration and a handful of steps so tests run in seconds.

The cache is keyed by `recipe_id` (config, seed, Python version, `RECIPE_VERSION`): a build made by
another recipe is not reused but rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import sysconfig
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tokenfleet.builtin_model.tokenizer import EOS_TOKEN, PAD_TOKEN, stdlib_source_files, train_tokenizer

if TYPE_CHECKING:
    import torch

REPORT_NAME = "build_report.json"
# A fixed thread count, whatever the machine has: it fixes how CPU kernels split their sums (so the
# weights do not depend on the core count), and leaves the rest of a shared box alone.
NUM_THREADS = 2
# Bump when the training code changes what a build produces: older caches are then rebuilt.
# 2: fixed step count (no time budget), weights hash in the report.
RECIPE_VERSION = 2

Split = Literal["train", "val"]


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the result of a build (besides the seed and the corpus)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    seq_len: int
    batch_size: int
    max_steps: int
    lr: float
    warmup_steps: int
    eval_windows: int
    val_fraction: float
    tie_embeddings: bool
    # Limit the corpus (number of files) for quick builds; None = all of it.
    max_files: int | None = None
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# ~5.8M parameters, chosen by measurement (docs/results/model-build.md): on 2 CPU threads the
# build is compute-bound, and validation loss depended on steps x tokens per step far more than on
# depth, so 2 layers (~0.7 s per step of 8 x 256 tokens on a 2-core EPYC) beat 4 layers at equal
# wall time. Untied input embeddings add 2.1M parameters at no per-token compute; the output
# projection is the same matrix size either way. head_dim is 64 (vLLM's CPU attention), hidden
# and intermediate sizes are multiples of 64 (4-bit CPU kernels).
FULL = BuildConfig(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=704,
    num_layers=2,
    num_heads=4,
    seq_len=256,
    batch_size=8,
    # ~0.65 s a step on 2 quiet EPYC cores: about 3.5 minutes for the whole build.
    max_steps=280,
    lr=3e-3,
    warmup_steps=15,
    eval_windows=64,
    val_fraction=0.05,
    tie_embeddings=False,
)

# Seconds, for tests: same code path, toy sizes (head_dim still 64).
QUICK = BuildConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=1,
    num_heads=1,
    seq_len=64,
    batch_size=4,
    max_steps=6,
    lr=3e-3,
    warmup_steps=2,
    eval_windows=4,
    val_fraction=0.2,
    tie_embeddings=False,
    max_files=30,
)


@dataclass
class BuildReport:
    """What `build_report.json` holds; the numbers the build prints at the end."""

    name: str
    quick: bool
    seed: int
    config: dict[str, Any]
    params: int
    size_mb: float
    train_files: int
    val_files: int
    train_tokens: int
    val_tokens: int
    eval_tokens: int
    steps: int
    tokens_seen: int
    final_batch_loss: float
    train_loss: float
    val_loss: float
    val_ppl: float
    unigram_ppl: float
    tokenizer_s: float
    train_s: float
    eval_s: float
    wall_s: float
    # What the cache is keyed by, and the digest of model.safetensors: equal on every machine that
    # builds the same recipe with the same torch.
    recipe: str = ""
    weights_sha256: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("cached")  # a property of how the report was obtained, not of the build
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> BuildReport:
        data = json.loads(text)
        return cls(**data)

    def summary(self) -> str:
        ratio = self.unigram_ppl / self.val_ppl if self.val_ppl > 0 else math.inf
        lines = [
            f"tiny-code{' (quick)' if self.quick else ''}{' (cached)' if self.cached else ''}: "
            f"{self.params / 1e6:.2f}M params, {self.size_mb:.1f} MB",
            f"  steps {self.steps}, {self.tokens_seen} tokens seen, weights {self.weights_sha256[:16]}",
            f"  train loss {self.train_loss:.3f}   val loss {self.val_loss:.3f}",
            f"  val ppl {self.val_ppl:.1f}   unigram ppl {self.unigram_ppl:.1f}   ({ratio:.1f}x better)",
            f"  wall {self.wall_s:.1f} s (tokenizer {self.tokenizer_s:.1f} s, train {self.train_s:.1f} s, "
            f"eval {self.eval_s:.1f} s)",
        ]
        return "\n".join(lines)


# --- pure helpers -------------------------------------------------------------------------------


def split_of(rel_path: str, val_fraction: float) -> Split:
    """Assign a file to train or val from a hash of its relative path.

    A content-independent, platform-independent hash (not Python's salted `hash`) makes the split
    identical on every machine and stable when other files are added or removed.
    """
    digest = hashlib.sha256(rel_path.encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if bucket < val_fraction else "train"


def unigram_perplexity(train_ids: Iterable[int], eval_ids: Sequence[int], vocab_size: int) -> float:
    """Perplexity on `eval_ids` of a unigram model estimated on `train_ids` with add-one smoothing.

    p(t) = (count(t) + 1) / (N + V): every token of the vocabulary gets a non-zero probability,
    so tokens unseen in train do not make the perplexity infinite.
    """
    if not eval_ids:
        raise ValueError("eval_ids is empty")
    counts = Counter(train_ids)
    total = sum(counts.values()) + vocab_size
    nll = -sum(math.log((counts[t] + 1) / total) for t in eval_ids) / len(eval_ids)
    return math.exp(nll)


def lr_at(step: int, *, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak at `total` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def recipe_id(cfg: BuildConfig, seed: int) -> str:
    """What determines a build's result, as a short digest: the cache key of a built model.

    The corpus is this Python's standard library, so its version is part of the recipe.
    """
    recipe = {
        "version": RECIPE_VERSION,
        "config": asdict(cfg),
        "seed": seed,
        "threads": NUM_THREADS,
        "python": platform.python_version(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def is_complete(out_dir: Path) -> bool:
    """A model directory is complete when its report exists: the report is written last."""
    return all(
        (out_dir / name).is_file()
        for name in (REPORT_NAME, "config.json", "tokenizer.json", "model.safetensors")
    )


def load_report(out_dir: Path) -> BuildReport:
    return BuildReport.from_json((out_dir / REPORT_NAME).read_text())


def is_current(out_dir: Path, *, quick: bool = False, seed: int = 0) -> bool:
    """Complete and built by today's recipe; a report from older code has another (or no) recipe."""
    if not is_complete(out_dir):
        return False
    try:
        report = json.loads((out_dir / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("recipe") == recipe_id(QUICK if quick else FULL, seed)


# --- the build ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """Serialise builds of one directory across processes: two engines started together on a
    fresh machine would otherwise both train, and the second rename would replace the first."""
    import fcntl

    lock_path = out_dir.with_name(f".{out_dir.name}.lock")
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _corpus(cfg: BuildConfig) -> tuple[list[str], list[str]]:
    files = stdlib_source_files()
    if cfg.max_files is not None:
        files = files[: cfg.max_files]
    root = Path(sysconfig.get_paths()["stdlib"])
    train: list[str] = []
    val: list[str] = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        (val if split_of(rel, cfg.val_fraction) == "val" else train).append(text)
    if not train or not val:
        raise RuntimeError(f"empty split: {len(train)} train / {len(val)} val files")
    return train, val


def _encode(tokenizer: Any, texts: list[str], eos_id: int) -> list[int]:
    """One token stream, each file followed by the end-of-text token (a document boundary)."""
    ids: list[int] = []
    backend = tokenizer.backend_tokenizer
    # encode_batch_fast skips character offsets, which we do not need (~30% faster).
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    for enc in encode(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return ids


def _windows(ids: list[int], seq_len: int) -> torch.Tensor:
    """All non-overlapping windows of `seq_len` tokens, in stream order."""
    import torch

    n = len(ids) // seq_len
    if n == 0:
        raise RuntimeError(f"{len(ids)} tokens are fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def spread(n: int, k: int) -> list[int]:
    """`k` indices spread evenly over range(n) (all of them if k >= n).

    Evaluating on windows from across the whole split, not its first files only, keeps the
    estimate from depending on which module happens to sort first.
    """
    if k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]


def _mean_loss(model: Any, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over all targets of `windows` (positions 1..seq_len-1 of each)."""
    import torch

    model.eval()
    total = 0.0
    count = 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size]
            loss = model(input_ids=batch, labels=batch).loss
            targets = batch.shape[0] * (batch.shape[1] - 1)
            total += float(loss) * targets
            count += targets
    model.train()
    return total / count


def _dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def _install(tmp: Path, out_dir: Path) -> None:
    """Move a finished build into place; an older build is removed only after the rename."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def build_tiny_code(out_dir: Path, *, quick: bool = False, force: bool = False, seed: int = 0) -> BuildReport:
    """Train (or reuse) the tiny-code model in `out_dir`; return and print its build report."""
    out_dir = Path(out_dir)
    if not force and is_current(out_dir, quick=quick, seed=seed):
        report = load_report(out_dir)
        report.cached = True
        print(report.summary())
        return report

    cfg = QUICK if quick else FULL
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out_dir):
        # Another process (a test session, a second replica) may have built it while we waited.
        if not force and is_current(out_dir, quick=quick, seed=seed):
            report = load_report(out_dir)
            report.cached = True
            print(report.summary())
            return report
        # Holding the lock, any temporary directory left here is from a build that was killed.
        for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        tmp.mkdir()
        try:
            with _torch_threads(NUM_THREADS):
                report = _train(tmp, cfg, quick=quick, seed=seed)
            _install(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(report.summary())
    return report


def _train(tmp: Path, cfg: BuildConfig, *, quick: bool, seed: int) -> BuildReport:
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(seed)

    train_texts, val_texts = _corpus(cfg)
    # The tokenizer sees only the train files, so validation text is new to it as well.
    train_tokenizer(train_texts, vocab_size=cfg.vocab_size, out_dir=tmp)
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    vocab_size = len(tokenizer)
    train_ids = _encode(tokenizer, train_texts, eos_id)
    val_ids = _encode(tokenizer, val_texts, eos_id)
    t_tok = time.perf_counter()

    model_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=cfg.tie_embeddings,
        dtype="float32",
    )
    model = LlamaForCausalLM(model_config)
    params = sum(p.numel() for p in model.parameters())

    # A fixed permutation of all train windows: the data order depends only on the seed.
    train_windows = _windows(train_ids, cfg.seq_len)
    order = torch.randperm(train_windows.shape[0], generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)

    model.train()
    steps = 0
    last_loss = math.nan
    with tqdm(total=cfg.max_steps, desc="training tiny-code", unit="step") as bar:
        while steps < cfg.max_steps:
            first = (steps * cfg.batch_size) % order.shape[0]
            idx = order[first : first + cfg.batch_size]
            batch = train_windows[idx]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(steps, peak=cfg.lr, warmup=cfg.warmup_steps, total=cfg.max_steps)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = loss.detach().item()
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}")
    t_train = time.perf_counter()

    # Validation and train loss on the same number of fixed windows; the unigram baseline is
    # scored on exactly the targets the model's validation loss is averaged over.
    all_val = _windows(val_ids, cfg.seq_len)
    val_windows = all_val[spread(all_val.shape[0], cfg.eval_windows)]
    val_loss = _mean_loss(model, val_windows, cfg.batch_size)
    train_loss = _mean_loss(model, train_windows[order[: cfg.eval_windows]], cfg.batch_size)
    unigram = unigram_perplexity(train_ids, val_windows[:, 1:].reshape(-1).tolist(), vocab_size)
    t_eval = time.perf_counter()

    model.save_pretrained(tmp, safe_serialization=True)
    report = BuildReport(
        name="tiny-code",
        quick=quick,
        seed=seed,
        config=asdict(cfg),
        params=params,
        size_mb=0.0,
        train_files=len(train_texts),
        val_files=len(val_texts),
        train_tokens=len(train_ids),
        val_tokens=len(val_ids),
        eval_tokens=int(val_windows.shape[0] * (val_windows.shape[1] - 1)),
        steps=steps,
        tokens_seen=steps * cfg.batch_size * cfg.seq_len,
        final_batch_loss=last_loss,
        train_loss=train_loss,
        val_loss=val_loss,
        val_ppl=math.exp(val_loss),
        unigram_ppl=unigram,
        tokenizer_s=round(t_tok - t0, 2),
        train_s=round(t_train - t_tok, 2),
        eval_s=round(t_eval - t_train, 2),
        wall_s=0.0,
        recipe=recipe_id(cfg, seed),
        weights_sha256=file_sha256(tmp / "model.safetensors"),
        machine=machine_info(),
    )
    report.size_mb = round(_dir_size_mb(tmp), 2)
    report.wall_s = round(time.perf_counter() - t0, 2)
    # Written last: its presence marks the directory as a complete build.
    (tmp / REPORT_NAME).write_text(report.to_json())
    return report
