"""The builtin models: tiny-code (split, baseline, tokenizer, a quick end-to-end build) and the
tiny-random cache check (seconds)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import pytest

from tokenfleet.builtin_model import tiny_code
from tokenfleet.builtin_model.tiny_code import (
    FULL,
    QUICK,
    REPORT_NAME,
    BuildReport,
    build_tiny_code,
    file_sha256,
    is_complete,
    is_current,
    lr_at,
    recipe_id,
    split_of,
    spread,
    unigram_perplexity,
)
from tokenfleet.builtin_model.tiny_random import CONTEXT as TINY_RANDOM_CONTEXT
from tokenfleet.builtin_model.tiny_random import is_current as tiny_random_is_current
from tokenfleet.models import ensure_builtin


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuildReport]:
    out = tmp_path_factory.mktemp("models") / "tiny-code"
    report = build_tiny_code(out, quick=True)
    return out, report


def test_unigram_perplexity_toy() -> None:
    # Train counts: a=3, b=1 (N=4); vocabulary of 3 (c unseen). Add-one: p(a)=4/7, p(b)=2/7, p(c)=1/7.
    train = [0, 0, 0, 1]
    ppl = unigram_perplexity(train, [0, 1, 2], vocab_size=3)
    expected = math.exp(-(math.log(4 / 7) + math.log(2 / 7) + math.log(1 / 7)) / 3)
    assert ppl == pytest.approx(expected)
    # A uniform model over V tokens has perplexity V on anything.
    assert unigram_perplexity([], [0, 1, 2, 3], vocab_size=4) == pytest.approx(4.0)


def test_unigram_perplexity_rejects_empty_eval() -> None:
    with pytest.raises(ValueError, match="empty"):
        unigram_perplexity([0], [], vocab_size=2)


def test_split_is_deterministic_and_roughly_proportional() -> None:
    paths = [f"pkg{i // 10}/mod{i}.py" for i in range(2000)]
    first = [split_of(p, 0.1) for p in paths]
    assert first == [split_of(p, 0.1) for p in paths]
    share = first.count("val") / len(paths)
    assert 0.07 < share < 0.13
    assert split_of("a.py", 0.0) == "train"
    assert split_of("a.py", 1.0) == "val"


def test_lr_schedule_warms_up_then_decays() -> None:
    peak, warmup, total = 1e-3, 10, 100
    lrs = [lr_at(s, peak=peak, warmup=warmup, total=total) for s in range(total + 5)]
    assert lrs[0] == pytest.approx(peak / warmup)
    assert lrs[warmup - 1] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :], strict=False))
    assert lrs[-1] == pytest.approx(0.1 * peak)


def test_configs_fit_vllm_cpu_kernels() -> None:
    for cfg in (FULL, QUICK):
        assert cfg.head_dim == 64
        assert cfg.hidden_size % 64 == 0
        assert cfg.intermediate_size % 64 == 0
        assert cfg.max_position_embeddings >= 2048


def test_quick_build_saves_a_loadable_model(quick_build: tuple[Path, BuildReport]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = quick_build
    assert is_complete(out)
    assert not report.cached
    assert report.steps == QUICK.max_steps
    assert report.recipe == recipe_id(QUICK, 0)
    assert report.weights_sha256 == file_sha256(out / "model.safetensors")
    assert report.train_files > 0
    assert report.val_files > 0
    assert math.isfinite(report.val_loss)
    assert report.val_ppl == pytest.approx(math.exp(report.val_loss))
    assert report.unigram_ppl > 1.0
    assert json.loads((out / REPORT_NAME).read_text())["params"] == report.params
    # No temporary or old directory is left next to the model (only the lock file).
    assert sorted(p.name for p in out.parent.iterdir()) == [".tiny-code.lock", out.name]

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == report.params
    batch = tokenizer(["def f(x):\n    return x\n", "import os\n"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))


@pytest.mark.parametrize(
    "text",
    [
        'def f(x):\n    """Return x."""\n    return x  # done\n',
        "s = 'héllo — 世界 🙂'\n\tif s:\r\n        print(s , end='')\n",
        "class A(B, metaclass=M):\n    pass\n\n\n",
    ],
)
def test_tokenizer_round_trips_source(quick_build: tuple[Path, BuildReport], text: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(quick_build[0])
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.chat_template


def test_reuse_skips_training(
    quick_build: tuple[Path, BuildReport], capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = quick_build
    start = time.perf_counter()
    again = build_tiny_code(out, quick=True)
    assert time.perf_counter() - start < 1.0
    assert again.cached
    assert again.to_json() == report.to_json()
    assert "(cached)" in capsys.readouterr().out


def test_force_rebuild_is_deterministic(tmp_path: Path, quick_build: tuple[Path, BuildReport]) -> None:
    report = quick_build[1]
    copy = tmp_path / "tiny-code"
    (tmp_path / ".tiny-code.tmp-999999").mkdir()  # left by a killed build
    rebuilt = build_tiny_code(copy, quick=True)
    assert rebuilt.val_loss == pytest.approx(report.val_loss, rel=1e-4)
    assert rebuilt.unigram_ppl == pytest.approx(report.unigram_ppl)
    # force replaces an existing complete build in place.
    forced = build_tiny_code(copy, quick=True, force=True)
    assert not forced.cached
    assert is_complete(copy)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-code.lock", "tiny-code"]


def _digests(model_dir: Path) -> dict[str, str]:
    names = ("model.safetensors", "tokenizer.json", "config.json")
    return {name: hashlib.sha256((model_dir / name).read_bytes()).hexdigest() for name in names}


def test_same_recipe_builds_identical_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two builds from scratch, three steps each: byte-identical weights, tokenizer and config.
    monkeypatch.setattr(tiny_code, "QUICK", dataclasses.replace(QUICK, max_steps=3))
    first = build_tiny_code(tmp_path / "a" / "tiny-code", quick=True)
    second = build_tiny_code(tmp_path / "b" / "tiny-code", quick=True)
    assert not first.cached
    assert not second.cached
    assert first.steps == second.steps == 3
    assert _digests(tmp_path / "a" / "tiny-code") == _digests(tmp_path / "b" / "tiny-code")
    assert first.weights_sha256 == second.weights_sha256
    assert first.val_loss == second.val_loss
    # Another seed is another recipe and other weights.
    other = build_tiny_code(tmp_path / "c" / "tiny-code", quick=True, seed=1)
    assert other.recipe != first.recipe
    assert other.weights_sha256 != first.weights_sha256


def test_recipe_changes_invalidate_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny_code, "QUICK", dataclasses.replace(QUICK, max_steps=2))
    out = tmp_path / "tiny-code"
    build_tiny_code(out, quick=True)
    assert is_current(out, quick=True)
    assert not is_current(out, quick=True, seed=1)
    # A report written by older code (no recipe) is complete but not current: it is rebuilt.
    report = json.loads((out / REPORT_NAME).read_text())
    del report["recipe"]
    (out / REPORT_NAME).write_text(json.dumps(report))
    assert is_complete(out)
    assert not is_current(out, quick=True)
    rebuilt = build_tiny_code(out, quick=True)
    assert not rebuilt.cached
    assert is_current(out, quick=True)
    # Any change of the recipe (here one more step) changes the key.
    monkeypatch.setattr(tiny_code, "QUICK", dataclasses.replace(QUICK, max_steps=3))
    assert not is_current(out, quick=True)
    assert recipe_id(tiny_code.QUICK, 0) != rebuilt.recipe


def test_spread_covers_the_range_evenly() -> None:
    assert spread(10, 5) == [0, 2, 4, 6, 8]
    assert spread(3, 5) == [0, 1, 2]
    picked = spread(1000, 64)
    assert len(set(picked)) == 64
    assert picked[0] == 0
    assert picked[-1] == 63 * 1000 // 64


def test_concurrent_builds_train_once(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path / "tiny-code"
    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = list(pool.map(lambda _: build_tiny_code(out, quick=True), range(2)))
    assert sorted(r.cached for r in reports) == [False, True]
    assert reports[0].to_json() == reports[1].to_json()


def test_tiny_random_cache_from_an_older_recipe_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENFLEET_CACHE", str(tmp_path))
    path = ensure_builtin("tiny-random")
    config = json.loads((path / "config.json").read_text())
    assert config["max_position_embeddings"] == TINY_RANDOM_CONTEXT
    config["max_position_embeddings"] = 2048  # what the cache held before the context grew
    (path / "config.json").write_text(json.dumps(config))
    assert not tiny_random_is_current(path)
    ensure_builtin("tiny-random")
    assert json.loads((path / "config.json").read_text())["max_position_embeddings"] == TINY_RANDOM_CONTEXT
