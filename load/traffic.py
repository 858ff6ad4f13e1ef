"""Turn a workload into a reproducible stream of requests: prompts, lengths, class and tenant.

Everything is drawn from one numpy Generator seeded by (workload seed, worker index), so the same
workload and seed send the same prompts in the same order on every run. `mix_weights` and
`offered_level` are the pure rules for who sends what, and how fast, at a given time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

from tokenfleet.load.client import LLMRequest
from tokenfleet.load.workload import (
    ClassMix,
    Fixed,
    Length,
    LogNormal,
    SharedPrefix,
    ShareGPT,
    Synthetic,
    TenantMix,
    TokenIds,
    Uniform,
    Workload,
    shape_of,
)

# Short common words. `inputTokens` counts words: one to two tokens each depending on the tokenizer
# (about 2 on the builtin models); the report's input tokens come from the server's usage.
WORDS = (  # noqa: SIM905 (a word list reads better as text)
    "the of and to in is it you that he was for on are with as his they be at one have this from or "
    "had by word but what some we can out other were all there when up use your how said an each "
    "she which do their time if will way about many then them write would like so these her long "
    "make thing see him two has look more day could go come did number sound no most people my over "
    "know water than call first who may down side been now find any new work part take get place "
    "made live where after back little only round man year came show every good me give our under "
    "name very through just form sentence great think say help low line differ turn cause much mean "
    "before move right boy old too same tell does set three want air well also play small end put "
    "home read hand port large spell add even land here must"
).split()
CHARS_PER_TOKEN = 4.0  # for lengths of dataset text when no tokenizer is at hand


def sample_length(rng: np.random.Generator, length: Length) -> int:
    if isinstance(length, Fixed):
        return length.value
    if isinstance(length, Uniform):
        return int(rng.integers(length.min, length.max + 1))
    assert isinstance(length, LogNormal)
    value = rng.lognormal(mean=float(np.log(length.median)), sigma=length.sigma)
    return int(np.clip(round(value), length.min, length.max))


def random_text(rng: np.random.Generator, tokens: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=tokens))


def estimate_tokens(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def load_sharegpt(path: str | Path, max_input_tokens: int, limit: int | None = None) -> list[tuple[str, int]]:
    """(prompt, reply tokens) pairs from a ShareGPT JSON list: each entry's first human turn and
    the gpt turn after it; entries without such a pair, or with a prompt that is too long, are skipped."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")
    pairs: list[tuple[str, int]] = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        for first, second in pairwise(turns):
            if not (isinstance(first, dict) and isinstance(second, dict)):
                continue
            asks = first.get("from") in ("human", "user")
            if asks and second.get("from") in ("gpt", "assistant", "chatgpt"):
                prompt, reply = str(first.get("value", "")), str(second.get("value", ""))
                if prompt and reply and estimate_tokens(prompt) <= max_input_tokens:
                    pairs.append((prompt, estimate_tokens(reply)))
                break
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise ValueError(f"{path}: no usable human→gpt pair in the dataset")
    return pairs


def pick(rng: np.random.Generator, weights: list[float]) -> int:
    total = sum(weights)
    if total <= 0:
        return int(rng.integers(0, len(weights)))
    return int(rng.choice(len(weights), p=np.asarray(weights) / total))


def tenant_active(tenant: TenantMix, t: float) -> bool:
    if tenant.burst is None:
        return True
    return t % (tenant.burst.on_s + tenant.burst.off_s) < tenant.burst.on_s


def sends(tenant: TenantMix, cls: ClassMix) -> bool:
    return tenant.classes is None or cls.name in tenant.classes


def tenant_weights(tenants: list[TenantMix], cls: ClassMix, t: float) -> list[float]:
    """Each tenant's rate in class `cls` at time t, as a fraction of the class's mean rate.

    The tenants that send the class split it by share. An `add`-mode bursty tenant sends its
    share only while on, at period/on times its mean; the other tenants keep their combined
    share, divided among those that are on (a `shift`-mode tenant's share moves to the others
    while it is off). The fractions sum to 1 without `add` bursts, and to 1 on average with them.
    """
    allowed = [x for x in tenants if sends(x, cls)]
    total = sum(x.share for x in allowed)

    def adds(x: TenantMix) -> bool:
        return x.burst is not None and x.burst.mode == "add"

    kept = sum(x.share for x in allowed if not adds(x))
    kept_on = sum(x.share for x in allowed if not adds(x) and tenant_active(x, t))
    weights = []
    for x in tenants:
        if not sends(x, cls) or not tenant_active(x, t):
            weights.append(0.0)
        elif x.burst is not None and adds(x):
            weights.append(x.share * (x.burst.on_s + x.burst.off_s) / x.burst.on_s / total)
        else:
            weights.append(x.share * kept / kept_on / total)
    return weights


def mix_weights(workload: Workload, t: float) -> list[tuple[ClassMix, list[float]]]:
    """Per class, each tenant's rate at time t as a fraction of the workload's mean rate."""
    total = sum(c.share for c in workload.classes)
    return [
        (c, [c.share / total * w for w in tenant_weights(workload.tenants, c, t)]) for c in workload.classes
    ]


def rate_factor(workload: Workload, t: float) -> float:
    """The offered rate at time t over the shape's level: 1 unless `add`-mode tenants burst."""
    return sum(sum(weights) for _, weights in mix_weights(workload, t))


def offered_level(workload: Workload) -> Callable[[float], float | None]:
    """The open loop's arrival rate over time (the shape's level × `rate_factor`); in closed
    loop the shape's level, a number of users, which tenant bursts do not change."""
    shape = shape_of(workload)
    if workload.arrival.mode == "closed":
        return shape.level

    def level(t: float) -> float | None:
        value = shape.level(t)
        return None if value is None else value * rate_factor(workload, t)

    return level


@dataclass
class RequestFactory:
    """`next(t)` gives the next request to send at run time `t` (seconds since start)."""

    workload: Workload
    worker: int = 0
    keys: Mapping[str, str] = field(default_factory=dict)  # tenant -> API key (load/keys.py)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng([self.workload.seed, self.worker])
        self._count = 0
        self._pairs: list[tuple[str, int]] = []
        self._prefixes: list[str] = []
        prompts = self.workload.prompts
        if isinstance(prompts, ShareGPT):
            self._pairs = load_sharegpt(prompts.path, prompts.max_input_tokens, prompts.max_conversations)
        elif isinstance(prompts, SharedPrefix):
            # Prefixes are the same on every worker (seeded by the workload seed only), so the
            # server sees N prefixes in total, not N per worker.
            prefix_rng = np.random.default_rng([self.workload.seed, 1_000_003])
            self._prefixes = [
                random_text(prefix_rng, prompts.prefix_tokens) for _ in range(prompts.num_prefixes)
            ]

    def _prompt(self, cls: ClassMix) -> tuple[str | list[int], int | None]:
        prompts = self.workload.prompts
        if isinstance(prompts, Synthetic):
            length = sample_length(self._rng, cls.input_tokens or prompts.input_tokens)
            return random_text(self._rng, length), None
        if isinstance(prompts, TokenIds):
            length = sample_length(self._rng, cls.input_tokens or prompts.input_tokens)
            return self._rng.integers(prompts.min_id, prompts.max_id + 1, size=length).tolist(), None
        if isinstance(prompts, ShareGPT):
            prompt, reply_tokens = self._pairs[int(self._rng.integers(0, len(self._pairs)))]
            return prompt, reply_tokens if prompts.use_reply_length else None
        assert isinstance(prompts, SharedPrefix)
        p = int(self._rng.integers(0, prompts.num_prefixes))
        s = int(self._rng.integers(0, prompts.suffixes_per_prefix))
        suffix = random_text(np.random.default_rng([self.workload.seed, p, s]), prompts.suffix_tokens)
        return f"{self._prefixes[p]} {suffix}", None

    def choose(self, t: float) -> tuple[ClassMix, TenantMix]:
        """Class and tenant of a request sent at time t, by their rates then (`mix_weights`)."""
        mix = mix_weights(self.workload, t)
        slo_class, weights = mix[pick(self._rng, [sum(w) for _, w in mix])]
        return slo_class, self.workload.tenants[pick(self._rng, weights)]

    def next(self, t: float = 0.0) -> LLMRequest:
        slo_class, tenant = self.choose(t)
        prompt, dataset_tokens = self._prompt(slo_class)
        if slo_class.output_tokens is not None:
            max_tokens = sample_length(self._rng, slo_class.output_tokens)
        elif dataset_tokens is not None:
            max_tokens = dataset_tokens
        else:
            max_tokens = sample_length(self._rng, self.workload.output_tokens)
        self._count += 1
        return LLMRequest(
            id=f"w{self.worker}-{self._count}",
            prompt=prompt,
            max_tokens=max_tokens,
            cls=slo_class.name,
            tenant=tenant.name,
            api_key=self.keys.get(tenant.name),
            priority=slo_class.priority,
            server_class=slo_class.server_class,
            ttft_ms=slo_class.ttft_ms if slo_class.server_class is not None else None,
            api=self.workload.api,
            stream=self.workload.stream,
            ignore_eos=self.workload.ignore_eos,
            temperature=self.workload.temperature,
        )
