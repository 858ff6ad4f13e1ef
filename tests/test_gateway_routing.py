"""Pure gateway decisions: routing policies, circuit breaker, token buckets, admission, classes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfleet.engine.gateway import breaker, limits, routing
from tokenfleet.engine.gateway.admission import AdmissionQueue, ShedError, decide
from tokenfleet.engine.gateway.replicas import parse_engine_metrics
from tokenfleet.engine.gateway.routing import ReplicaView, RouteKey
from tokenfleet.engine.gateway.tenancy import (
    KeyFileError,
    KeyRing,
    bearer_key,
    engine_fields,
    load_keys,
    parse_keys,
    parse_keys_env,
    resolve_class,
    with_fields,
)
from tokenfleet.engine.sla_contract import ClassError
from tokenfleet.spec import SchedulerSpec, Tenant

replica_lists = st.lists(
    st.builds(
        ReplicaView,
        id=st.text(alphabet="abcdefgh0123456789", min_size=1, max_size=6),
        in_flight=st.integers(0, 50),
        queue_depth=st.integers(0, 50),
    ),
    min_size=1,
    max_size=8,
    unique_by=lambda r: r.id,
)


# -- routing -------------------------------------------------------------------------------------


def test_round_robin_cycles_through_every_replica() -> None:
    replicas = [ReplicaView("a"), ReplicaView("b"), ReplicaView("c")]
    picks = [routing.round_robin(replicas, i).id for i in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_least_outstanding_prefers_less_loaded_of_two() -> None:
    replicas = [ReplicaView("busy", in_flight=5, queue_depth=3), ReplicaView("idle")]
    rng = random.Random(0)
    assert {routing.least_outstanding(replicas, rng).id for _ in range(50)} == {"idle"}


@given(replica_lists, st.integers(0, 2**32))
def test_least_outstanding_never_picks_the_unique_maximum(replicas: list[ReplicaView], seed: int) -> None:
    chosen = routing.least_outstanding(replicas, random.Random(seed))
    assert chosen in replicas
    loads = sorted(r.load for r in replicas)
    if len(replicas) > 1 and loads[-1] > loads[-2]:
        assert chosen.load < loads[-1]


@given(replica_lists, st.text(min_size=1, max_size=40), st.floats(1.01, 3.0))
def test_prefix_affinity_respects_the_load_bound(
    replicas: list[ReplicaView], prefix: str, factor: float
) -> None:
    chosen = routing.prefix_affinity(replicas, prefix, factor, random.Random(0))
    assert chosen in replicas
    assert chosen.load + 1 <= routing.load_cap(replicas, factor)


@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=30))
def test_prefix_affinity_is_sticky_when_load_is_even(prefixes: list[str]) -> None:
    replicas = [ReplicaView(f"r{i}") for i in range(4)]
    rng = random.Random(0)
    for prefix in prefixes:
        first = routing.prefix_affinity(replicas, prefix, 1.25, rng)
        assert routing.prefix_affinity(list(reversed(replicas)), prefix, 1.25, rng) == first


def test_prefix_affinity_moves_only_keys_of_a_removed_replica() -> None:
    replicas = [ReplicaView(f"r{i}") for i in range(4)]
    rng = random.Random(0)
    keys = [f"system prompt {i}" for i in range(400)]
    before = {k: routing.prefix_affinity(replicas, k, 10.0, rng).id for k in keys}
    after = {k: routing.prefix_affinity(replicas[:3], k, 10.0, rng).id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "r3" for k in moved)
    # and the ring spreads keys over all replicas
    assert set(before.values()) == {"r0", "r1", "r2", "r3"}


def test_prefix_affinity_overflows_a_hot_replica() -> None:
    replicas = [ReplicaView("r0"), ReplicaView("r1")]
    rng = random.Random(0)
    home = routing.prefix_affinity(replicas, "hot prefix", 1.25, rng).id
    loaded = [ReplicaView(r.id, in_flight=10 if r.id == home else 0) for r in replicas]
    assert routing.prefix_affinity(loaded, "hot prefix", 1.25, rng).id != home


@given(replica_lists, st.text(min_size=1, max_size=30))
def test_session_affinity_is_deterministic_and_stable_under_removal(
    replicas: list[ReplicaView], session: str
) -> None:
    rng = random.Random(0)
    chosen = routing.session_affinity(replicas, session, rng)
    assert routing.session_affinity(list(reversed(replicas)), session, rng) == chosen
    others = [r for r in replicas if r.id != chosen.id and r.id != replicas[0].id]
    if chosen.id != replicas[0].id and others:
        # removing some other replica never moves this session
        assert routing.session_affinity([chosen, *others], session, rng) == chosen


def test_session_without_id_falls_back_to_load() -> None:
    replicas = [ReplicaView("busy", in_flight=9), ReplicaView("idle")]
    assert routing.session_affinity(replicas, None, random.Random(1)).id == "idle"


@pytest.mark.parametrize(
    "policy", ["round_robin", "least_outstanding", "prefix_affinity", "session_affinity"]
)
def test_choose_dispatches_every_policy(policy: routing.Policy) -> None:
    replicas = [ReplicaView("a"), ReplicaView("b")]
    picked = routing.choose(
        policy, replicas, RouteKey("p", "s"), counter=1, rng=random.Random(0), load_factor=1.25
    )
    assert picked in replicas


def test_no_replica_is_an_error() -> None:
    with pytest.raises(ValueError, match="no replica"):
        routing.round_robin([], 0)


def test_prompt_prefix_from_prompt_and_messages() -> None:
    assert routing.prompt_prefix({"prompt": "abcdef"}, 3) == "abc"
    assert routing.prompt_prefix({"prompt": ["xyz", "q"]}, 16) == "xyz"
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    assert routing.prompt_prefix(chat, 16) == "system:be brief\n"
    assert routing.prompt_prefix({"messages": ["junk"]}, 16) is None
    assert routing.prompt_prefix({}, 16) is None


def test_round_robin_spreads_evenly_over_many_requests() -> None:
    replicas = [ReplicaView("a"), ReplicaView("b")]
    counts = Counter(routing.round_robin(replicas, i).id for i in range(100))
    assert counts == {"a": 50, "b": 50}


# -- breaker -------------------------------------------------------------------------------------


def test_breaker_lifecycle() -> None:
    b = breaker.Breaker()
    assert not b.admits  # a starting replica gets no traffic
    b = breaker.on_probe(b, True, now=0, cooldown_s=5)
    assert b.admits
    b = breaker.on_request_failure(b, now=1, threshold=2)
    assert b.admits
    assert b.failures == 1
    b = breaker.on_request_success(b)
    assert b.failures == 0
    b = breaker.on_request_failure(breaker.on_request_failure(b, 1, 2), 1, 2)
    assert b.state == "open"
    assert b.ejections == 1
    assert breaker.on_request_failure(b, 2, 2) == b
    assert not breaker.on_probe(b, True, now=3, cooldown_s=5).admits  # still cooling down
    assert breaker.on_probe(b, True, now=6.5, cooldown_s=5).admits
    assert breaker.on_probe(b, False, now=7, cooldown_s=5) == b


def test_failed_probe_ejects_at_once_but_never_counts_a_starting_replica() -> None:
    up = breaker.on_probe(breaker.Breaker(), True, 0, 1)
    assert breaker.on_probe(up, False, 1, 1).ejections == 1
    assert breaker.on_probe(breaker.Breaker(), False, 1, 1) == breaker.Breaker()


@given(st.lists(st.tuples(st.sampled_from(["ok", "fail", "probe_ok", "probe_fail"]), st.floats(0, 5))))
def test_breaker_ejections_only_grow_and_open_never_admits(events: list[tuple[str, float]]) -> None:
    b, now = breaker.Breaker(), 0.0
    for event, dt in events:
        now += dt
        before = b
        if event == "ok":
            b = breaker.on_request_success(b)
        elif event == "fail":
            b = breaker.on_request_failure(b, now, 3)
        else:
            b = breaker.on_probe(b, event == "probe_ok", now, 2.0)
        assert b.ejections >= before.ejections
        assert b.admits == (b.state == "closed")
        if event == "probe_fail":
            assert not b.admits


# -- token buckets -------------------------------------------------------------------------------


def test_bucket_takes_refills_and_says_when() -> None:
    b = limits.Bucket.full(60, now=0)  # one per second
    for _ in range(60):
        result = limits.take(b, 1, now=0)
        assert result.ok
        b = result.bucket
    refused = limits.take(b, 1, now=0)
    assert not refused.ok
    assert refused.retry_after_s == pytest.approx(1.0)
    assert limits.take(b, 1, now=1.0).ok


def test_bucket_admits_an_oversized_request_when_full_and_goes_into_debt() -> None:
    b = limits.Bucket.full(100, now=0)
    result = limits.take(b, 250, now=0)
    assert result.ok
    assert result.bucket.tokens == -150
    assert not limits.take(result.bucket, 1, now=60).ok  # debt first
    assert limits.adjust(result.bucket, -200, now=0).tokens == 50  # refund


@given(st.lists(st.tuples(st.floats(0, 10), st.integers(1, 50)), max_size=60), st.integers(1, 500))
def test_bucket_never_grants_more_than_rate_allows(steps: list[tuple[float, int]], per_minute: int) -> None:
    b, now, granted = limits.Bucket.full(per_minute, 0.0), 0.0, 0
    for dt, amount in steps:
        now += dt
        result = limits.take(b, amount, now)
        b = result.bucket
        if result.ok:
            granted += amount
        else:
            assert result.retry_after_s > 0
    # Capacity plus refill, plus at most one oversized request admitted in debt.
    assert granted <= per_minute + now * per_minute / 60 + 50 + 1e-6


# -- admission -----------------------------------------------------------------------------------

ORDER = ["interactive", "standard", "batch"]
LIMITS = dict.fromkeys(ORDER, 2)


def test_decide_runs_queues_displaces_and_rejects() -> None:
    base = {"running": 4, "slots": 4, "order": ORDER, "per_class_limit": LIMITS, "total_limit": 3}
    assert decide("batch", **{**base, "running": 0}, queued={}).action == "run"  # type: ignore[arg-type]
    assert decide("standard", queued={"batch": 1}, **base).action == "enqueue"  # type: ignore[arg-type]
    full = {"interactive": 1, "standard": 1, "batch": 1}
    d = decide("interactive", queued=full, **base)  # type: ignore[arg-type]
    assert (d.action, d.victim_class) == ("displace", "batch")
    assert decide("batch", queued=full, **base).action == "reject"  # type: ignore[arg-type]
    assert decide("standard", queued={"standard": 2}, **base).action == "reject"  # type: ignore[arg-type]


@given(
    st.sampled_from(ORDER),
    st.fixed_dictionaries({c: st.integers(0, 2) for c in ORDER}),
    st.integers(0, 5),
    st.integers(1, 6),
)
def test_decide_never_sheds_a_more_important_class(
    cls: str, queued: dict[str, int], running: int, total: int
) -> None:
    d = decide(
        cls, running=running, slots=4, queued=queued, order=ORDER, per_class_limit=LIMITS, total_limit=total
    )
    if d.action == "displace":
        assert d.victim_class is not None
        assert ORDER.index(d.victim_class) > ORDER.index(cls)
        assert queued[d.victim_class] > 0
    if d.action == "enqueue":
        assert queued[cls] < LIMITS[cls]
        assert sum(queued.values()) < total


def test_admission_queue_serves_important_classes_first_and_sheds_batch() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        q = AdmissionQueue(ORDER, LIMITS, total_limit=2, max_wait_s=dict.fromkeys(ORDER, 5.0))
        q.set_slots(1)
        await q.acquire("standard")  # takes the only slot
        order: list[str] = []
        shed: list[str] = []

        async def wait(cls: str) -> None:
            try:
                await q.acquire(cls)
                order.append(cls)
            except ShedError:
                shed.append(cls)

        batch = asyncio.create_task(wait("batch"))
        await asyncio.sleep(0)
        std = asyncio.create_task(wait("standard"))
        await asyncio.sleep(0)
        inter = asyncio.create_task(wait("interactive"))  # queue full: displaces batch
        await asyncio.sleep(0.01)
        assert q.queued() == {"interactive": 1, "standard": 1, "batch": 0}
        for _ in range(2):
            q.release()
            await asyncio.sleep(0.01)
        q.release()
        await asyncio.gather(batch, std, inter)
        return order, shed

    order, shed = asyncio.run(scenario())
    assert order == ["interactive", "standard"]
    assert shed == ["batch"]


def test_admission_wait_is_bounded() -> None:
    async def scenario() -> float:
        q = AdmissionQueue(ORDER, LIMITS, total_limit=6, max_wait_s=dict.fromkeys(ORDER, 0.05))
        q.set_slots(0)
        with pytest.raises(ShedError) as info:
            await q.acquire("batch")
        assert q.queued()["batch"] == 0
        return info.value.retry_after_s

    assert asyncio.run(scenario()) == 3.0


def test_cancelled_waiter_leaves_the_queue() -> None:
    async def scenario() -> dict[str, int]:
        q = AdmissionQueue(ORDER, LIMITS, total_limit=6, max_wait_s=dict.fromkeys(ORDER, 5.0))
        task = asyncio.create_task(q.acquire("standard"))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return q.queued()

    assert asyncio.run(scenario())["standard"] == 0


# -- tenants and classes -------------------------------------------------------------------------

SCHED = SchedulerSpec.model_validate(
    {
        "tenants": [
            {"name": "free", "maxClass": "standard", "defaultClass": "batch"},
            {"name": "pro"},
        ]
    }
)


def test_class_capping_never_exceeds_max_class() -> None:
    free, pro = SCHED.tenants
    assert resolve_class(SCHED, free, requested_name=None, requested_priority=None).name == "batch"
    assert (
        resolve_class(SCHED, free, requested_name="interactive", requested_priority=None).name == "standard"
    )
    assert resolve_class(SCHED, free, requested_name=None, requested_priority=0).name == "standard"
    assert (
        resolve_class(SCHED, pro, requested_name="interactive", requested_priority=None).name == "interactive"
    )
    assert resolve_class(SCHED, pro, requested_name=None, requested_priority=None).name == "standard"
    with pytest.raises(ClassError, match="unknown class"):
        resolve_class(SCHED, pro, requested_name="vip", requested_priority=None)
    with pytest.raises(ClassError, match="not a class priority"):
        resolve_class(SCHED, pro, requested_name=None, requested_priority=7)


@given(
    st.sampled_from(["interactive", "standard", "batch"]),
    st.sampled_from(["interactive", "standard", "batch"]),
)
def test_capped_class_is_never_above_the_ceiling(requested: str, ceiling: str) -> None:
    tenant = Tenant(name="t", max_class=ceiling)
    got = resolve_class(SchedulerSpec(), tenant, requested_name=requested, requested_priority=None)
    assert got.priority >= SchedulerSpec().class_named(ceiling).priority


def test_engine_fields_replace_client_values() -> None:
    cls = SCHED.class_named("batch")
    assert engine_fields(cls, "free", "sla") == {
        "vllm_xargs": {"slo_class": "batch", "tenant": "free"},
        "priority": 2,
    }
    assert engine_fields(cls, "free", "fcfs")["priority"] == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@given(
    document=st.dictionaries(
        st.sampled_from(["model", "prompt", "priority", "vllm_xargs", "é"]), json_values
    ),
    spaces=st.sampled_from(["", " ", "\n\t "]),
    ensure_ascii=st.booleans(),
)
def test_with_fields_sets_exactly_the_engine_fields(
    document: dict[str, object], spaces: str, ensure_ascii: bool
) -> None:
    fields = engine_fields(SCHED.class_named("batch"), "free", "sla")
    raw = (
        spaces + json.dumps(document, ensure_ascii=ensure_ascii, indent=1 if spaces else None) + spaces
    ).encode()
    forwarded = with_fields(raw, document, fields)
    assert json.loads(forwarded) == {**document, **fields}
    if "priority" not in document and "vllm_xargs" not in document and document:
        assert forwarded.startswith(raw.strip()[:-1])  # the client's bytes, appended to


def test_with_fields_reserialises_what_it_cannot_append_to() -> None:
    fields = {"priority": 0}
    utf16 = json.dumps({"model": "tiny"}).encode("utf-16")
    assert json.loads(with_fields(utf16, {"model": "tiny"}, fields)) == {"model": "tiny", "priority": 0}
    assert with_fields(b"{}", {}, fields) == b'{"priority":0}'
    # a client's own priority is replaced, never forwarded next to ours
    assert with_fields(b'{"priority": 7}', {"priority": 7}, fields) == b'{"priority":0}'


def test_keys_from_file_env_and_secret_formats(tmp_path: pytest.TempPathFactory) -> None:
    assert parse_keys("k1: free\nk2: pro\n") == {"k1": "free", "k2": "pro"}
    assert parse_keys('[{"key": "k3", "tenant": "pro"}]') == {"k3": "pro"}
    assert parse_keys("") == {}
    assert parse_keys_env("a=free, b=pro,") == {"a": "free", "b": "pro"}
    for bad in ("[1, 2]", "just a string", "{unclosed"):
        with pytest.raises(KeyFileError):
            parse_keys(bad)
    with pytest.raises(KeyFileError, match="key=tenant"):
        parse_keys_env("novalue")
    path = tmp_path / "keys.yaml"  # type: ignore[operator]
    path.write_text("k1: free\n")
    assert load_keys(str(path), {"TOKENFLEET_API_KEYS": "k2=pro"}) == {"k1": "free", "k2": "pro"}


def test_keyring_maps_keys_and_rejects_unknown_tenants() -> None:
    ring = KeyRing.of({"secret-1": "free"}, {"free", "pro"})
    assert ring.tenant_of("secret-1") == "free"
    assert ring.tenant_of("secret-2") is None
    assert all(b"secret" not in digest for digest, _ in ring.digests)
    with pytest.raises(KeyFileError, match="unknown tenants"):
        KeyRing.of({"k": "nobody"}, {"free"})


def test_bearer_key_parsing() -> None:
    assert bearer_key("Bearer abc", None) == "abc"
    assert bearer_key("bearer  abc ", None) == "abc"
    assert bearer_key("Basic abc", "xyz") == "xyz"
    assert bearer_key(None, None) is None
    assert bearer_key("Bearer ", None) is None


# -- engine metrics ------------------------------------------------------------------------------


def test_parse_engine_metrics_sums_series_and_skips_junk() -> None:
    text = (
        "# HELP vllm:num_requests_waiting Waiting.\n"
        'vllm:num_requests_waiting{engine="0",model_name="tiny"} 3.0\n'
        'vllm:num_requests_waiting{engine="1",model_name="tiny"} 2.0\n'
        "vllm:num_requests_running 1.0\n"
        'vllm:kv_cache_usage_perc{model_name="tiny"} 0.25\n'
        'vllm:prefix_cache_queries_total{model_name="tiny"} 100.0\n'
        'vllm:prefix_cache_hits_total{model_name="tiny"} 40.0\n'
        "vllm:num_requests_waiting garbage\n"
        "lonely_token\n"
    )
    stats = parse_engine_metrics(text)
    assert (stats.waiting, stats.running, stats.kv_usage) == (5.0, 1.0, 0.25)
    assert (stats.prefix_queries, stats.prefix_hits) == (100.0, 40.0)


@settings(max_examples=50)
@given(st.text(max_size=300))
def test_parse_engine_metrics_never_raises(text: str) -> None:
    parse_engine_metrics(text)


def reference_parse(text: str) -> tuple[float, ...]:
    """The obvious line-by-line reading that the regex scan must agree with."""
    names = [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ]
    sums = dict.fromkeys(names, 0.0)
    for line in text.split("\n"):
        for name in names:
            if line.startswith((name + "{", name + " ")):
                rest = line[len(name) :]
                if rest.startswith("{"):
                    rest = rest[rest.index("}") + 1 :]
                # The value is the first field after the labels; a timestamp may follow it.
                with contextlib.suppress(ValueError, IndexError):
                    sums[name] += float(rest.split()[0])
    return tuple(sums.values())


metric_lines = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "vllm:num_requests_waiting",
                "vllm:kv_cache_usage_perc",
                "vllm:prefix_cache_hits_total",
                "vllm:num_requests_waiting_x",
                "# HELP vllm:num_requests_running",
                "other",
            ]
        ),
        st.sampled_from(["", '{model_name="tiny"}', '{a="b c"}']),
        st.sampled_from([" 1.5", " 2", " nan_not", " 3 1700000000", ""]),
    ).map("".join),
    max_size=12,
)


@settings(max_examples=100)
@given(metric_lines)
def test_parse_engine_metrics_reads_only_the_series_it_names(lines: list[str]) -> None:
    text = "\n".join(lines)
    stats = parse_engine_metrics(text)
    got = (stats.waiting, stats.running, stats.kv_usage, stats.prefix_queries, stats.prefix_hits)
    assert got == pytest.approx(reference_parse(text), nan_ok=True)
