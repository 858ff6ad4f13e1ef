"""Routing policies: pure functions from replica state (and a request key) to one replica.

Every function takes only the replicas that may receive traffic (the caller filters out ejected
ones and, on a retry, the replica that just failed) and never does I/O, so the same code can
run in the local gateway and be reasoned about (and property-tested) in isolation.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

Policy = Literal["round_robin", "least_outstanding", "prefix_affinity", "session_affinity"]

# Virtual nodes per replica on the hash ring: enough that 2-8 replicas split keys evenly
# (std-dev of share ~ 1/sqrt(vnodes)), few enough that building a ring stays microseconds.
VNODES = 64


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What a routing decision may look at for one replica."""

    id: str
    in_flight: int = 0  # requests this gateway has sent and not yet finished
    queue_depth: int = 0  # the engine's own waiting queue (vllm:num_requests_waiting), scraped

    @property
    def load(self) -> int:
        return self.in_flight + self.queue_depth


@dataclass(frozen=True, slots=True)
class RouteKey:
    """The parts of a request that affinity policies hash."""

    prefix: str | None = None
    session: str | None = None


def stable_hash(text: str) -> int:
    # Python's hash() is salted per process; the ring must agree across gateway replicas.
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def round_robin(replicas: Sequence[ReplicaView], counter: int) -> ReplicaView:
    _require(replicas)
    return replicas[counter % len(replicas)]


def least_outstanding(replicas: Sequence[ReplicaView], rng: random.Random) -> ReplicaView:
    """Power of two choices: sample two, take the less loaded.

    Exponentially better max load than random, without the herding of "always the global
    minimum" when many requests arrive between two metric scrapes.
    """
    _require(replicas)
    if len(replicas) == 1:
        return replicas[0]
    first, second = rng.sample(list(replicas), 2)
    return second if second.load < first.load else first


@functools.lru_cache(maxsize=64)
def _ring(ids: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    points = sorted((stable_hash(f"{rid}#{v}"), rid) for rid in ids for v in range(VNODES))
    return tuple(p[0] for p in points), tuple(p[1] for p in points)


def load_cap(replicas: Sequence[ReplicaView], load_factor: float) -> int:
    """Consistent hashing with bounded loads (Mirrokni et al.): no replica takes more than
    `load_factor` times the average load, counting the request being placed."""
    total = sum(r.load for r in replicas) + 1
    return max(1, math.ceil(load_factor * total / len(replicas)))


def prefix_affinity(
    replicas: Sequence[ReplicaView], prefix: str | None, load_factor: float, rng: random.Random
) -> ReplicaView:
    """Same prompt prefix -> same replica (its prefix cache is warm), unless that replica is
    already above the bounded-load cap; then the next replica clockwise on the ring."""
    _require(replicas)
    if prefix is None:
        return least_outstanding(replicas, rng)
    by_id = {r.id: r for r in replicas}
    hashes, owners = _ring(tuple(sorted(by_id)))
    cap = load_cap(replicas, load_factor)
    start = bisect.bisect_left(hashes, stable_hash(prefix))
    seen: set[str] = set()
    for step in range(len(hashes)):
        rid = owners[(start + step) % len(hashes)]
        if rid in seen:
            continue
        seen.add(rid)
        if by_id[rid].load + 1 <= cap:
            return by_id[rid]
    # Unreachable in theory (the least loaded replica is always under the cap); be total anyway.
    return min(replicas, key=lambda r: r.load)


def session_affinity(replicas: Sequence[ReplicaView], session: str | None, rng: random.Random) -> ReplicaView:
    """Rendezvous (highest random weight) hashing on the session id: a session moves only when
    its replica leaves, and then only that replica's sessions move. No id -> least outstanding."""
    _require(replicas)
    if not session:
        return least_outstanding(replicas, rng)
    return max(replicas, key=lambda r: (stable_hash(f"{session}|{r.id}"), r.id))


def choose(
    policy: Policy,
    replicas: Sequence[ReplicaView],
    key: RouteKey,
    *,
    counter: int,
    rng: random.Random,
    load_factor: float,
) -> ReplicaView:
    if policy == "round_robin":
        return round_robin(replicas, counter)
    if policy == "least_outstanding":
        return least_outstanding(replicas, rng)
    if policy == "prefix_affinity":
        return prefix_affinity(replicas, key.prefix, load_factor, rng)
    return session_affinity(replicas, key.session, rng)


def prompt_prefix(body: Mapping[str, Any], prefix_chars: int) -> str | None:
    """The leading characters of a completion prompt or a chat conversation.

    Chat messages are joined role:content in order, so a shared system prompt makes a shared
    prefix, as it does in the engine's token-block prefix cache.
    """
    prompt = body.get("prompt", body.get("input"))  # /v1/responses: `input`
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        # Token ids: ~4 characters per token, as for text.
        return "ids:" + ",".join(str(t) for t in prompt[: max(1, prefix_chars // 4)])
    if isinstance(prompt, str):
        return prompt[:prefix_chars] or None
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        size = 0
        for message in messages:
            if not isinstance(message, Mapping):
                continue
            content = message.get("content")
            text = content if isinstance(content, str) else ""
            parts.append(f"{message.get('role', '')}:{text}\n")
            size += len(parts[-1])
            if size >= prefix_chars:
                break
        joined = "".join(parts)[:prefix_chars]
        return joined or None
    return None


def _require(replicas: Sequence[ReplicaView]) -> None:
    if not replicas:
        raise ValueError("no replica to route to")


R = TypeVar("R", bound="HasRevision")


class HasRevision(Protocol):
    @property
    def revision(self) -> str: ...


def by_revision_weight(candidates: Sequence[R], weights: Mapping[str, int], rng: random.Random) -> list[R]:
    """The candidates of one revision, drawn by traffic weight (a canary's share of requests).

    Only revisions with a routable replica take part, so a canary that is not ready yet (or was
    ejected) sends its share to the stable revision instead of failing it.
    """
    present = {c.revision for c in candidates}
    choices = [(rev, w) for rev, w in sorted(weights.items()) if w > 0 and rev in present]
    if not choices:
        return list(candidates)
    point = rng.random() * sum(w for _, w in choices)
    chosen = choices[-1][0]
    for rev, w in choices:
        if point < w:
            chosen = rev
            break
        point -= w
    return [c for c in candidates if c.revision == chosen]
