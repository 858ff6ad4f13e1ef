"""The SLA policy on its own: ordering, aging and its wait bound, VTC fair share, preemption."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfleet.engine.sla_contract import REJECT_PREFIX
from tokenfleet.engine.sla_policy import (
    DEFAULT_MAX_WAIT_S,
    OTHER_TENANT,
    ClassPolicy,
    FairShare,
    PolicyConfig,
    RunningView,
    SLAPolicy,
    SLAQueue,
    StepClock,
    Ticket,
    choose_victims,
    natural_free_eta,
    overtook,
    queue_share,
    resolve_class,
    running_rank,
    shared_queue_slots,
    slo_met,
    split_charge,
    wait_bound_s,
    would_miss,
    would_miss_after,
)
from tokenfleet.spec import SchedulerSpec

INTERACTIVE = ClassPolicy("interactive", 0, ttft_s=1.0, tpot_s=0.2, max_wait_s=5, queue_limit=8)
STANDARD = ClassPolicy("standard", 1, ttft_s=4.0, tpot_s=0.4, max_wait_s=30, queue_limit=8)
BATCH = ClassPolicy("batch", 2, ttft_s=None, max_wait_s=60, queue_limit=8)


def make_config(**knobs: object) -> PolicyConfig:
    return PolicyConfig(
        classes=(INTERACTIVE, STANDARD, BATCH),
        default_class="standard",
        tenant_weights={"a": 1.0, "b": 1.0, "heavy": 2.0},
        tenant_default_class={"b": "batch"},
        tenant_max_class={"capped": "standard"},
        **knobs,  # type: ignore[arg-type]
    )


def new_ticket(
    policy: SLAPolicy,
    slo_class: str,
    arrival: float,
    tenant: str = "a",
    prompt_tokens: int = 10,
    max_tokens: int = 16,
    request_id: str | None = None,
) -> Ticket:
    return policy.ticket(
        request_id or f"r{policy._seq}",
        0,
        {"slo_class": slo_class, "tenant": tenant},
        arrival,
        prompt_tokens,
        max_tokens,
    )


def ticket_queue(policy: SLAPolicy) -> SLAQueue[Ticket]:
    return SLAQueue(policy, lambda t: t)


# -- configuration and tagging ------------------------------------------------------------------


def test_from_spec_converts_units_and_defaults_max_wait() -> None:
    spec = SchedulerSpec.model_validate(
        {
            "policy": "sla",
            "classes": [
                {"name": "fast", "priority": 0, "ttftMs": 500, "tpotMs": 50, "queueLimit": 3},
                {"name": "slow", "priority": 5},
            ],
            "defaultClass": "slow",
            "tenants": [{"name": "t", "weight": 3, "defaultClass": "fast", "maxClass": "slow"}],
        }
    )
    config = PolicyConfig.from_spec(spec, min_run_s=2.0)
    fast = config.class_named("fast")
    assert (fast.ttft_s, fast.tpot_s, fast.queue_limit) == (0.5, 0.05, 3)
    assert config.class_named("slow").max_wait_s == DEFAULT_MAX_WAIT_S
    assert config.weight("t") == 3
    assert config.weight("unknown") == 1.0
    assert config.min_run_s == 2.0
    assert config.tenant_label("t") == "t"
    assert config.tenant_label("zzz") == OTHER_TENANT


def test_config_rejects_bad_default_and_empty() -> None:
    with pytest.raises(ValueError, match="default class"):
        PolicyConfig(classes=(BATCH,), default_class="nope")
    with pytest.raises(ValueError, match="at least one"):
        PolicyConfig(classes=(), default_class="batch")


@pytest.mark.parametrize(
    ("priority", "xargs", "expected"),
    [
        (0, {"slo_class": "batch", "tenant": "a"}, ("batch", "a")),  # explicit class wins
        (2, {"slo_class": "interactive"}, ("interactive", "default")),
        (1, None, ("standard", "default")),  # priority maps to the class with that priority
        (2, {}, ("batch", "default")),
        (0, None, ("standard", "default")),  # vLLM's default 0 is not trusted: default class
        (0, {"tenant": "b"}, ("batch", "b")),  # the tenant's default class
        (7, {"slo_class": "no-such"}, ("standard", "default")),  # unknown both ways: default
        (0, {"slo_class": "interactive", "tenant": "capped"}, ("standard", "capped")),  # maxClass
        (0, {"slo_class": "batch", "tenant": "capped"}, ("batch", "capped")),  # below cap: kept
    ],
)
def test_resolve_class(priority: int, xargs: dict[str, str] | None, expected: tuple[str, str]) -> None:
    slo_class, tenant = resolve_class(make_config(), priority, xargs)
    assert (slo_class.name, tenant) == expected


def test_ticket_deadlines_and_ttft_override() -> None:
    policy = SLAPolicy(make_config())
    t = new_ticket(policy, "interactive", 100.0)
    assert (t.deadline, t.promote_at) == (101.0, 105.0)
    b = new_ticket(policy, "batch", 100.0)
    assert b.deadline == b.promote_at == 160.0  # no TTFT target: the max wait is the deadline
    o = policy.ticket("x", 0, {"slo_class": "interactive", "ttft_ms": 250}, 100.0, 1, 1)
    assert o.deadline == pytest.approx(100.25)
    bad = policy.ticket("y", 0, {"slo_class": "interactive", "ttft_ms": True}, 100.0, 1, 1)
    assert bad.deadline == 101.0
    assert o.seq > t.seq


def test_admission_limit_message() -> None:
    policy = SLAPolicy(make_config())
    t = new_ticket(policy, "batch", 0.0)
    assert policy.admit(t, 7) is None
    reason = policy.admit(t, 8)
    assert reason is not None
    assert reason.startswith(REJECT_PREFIX)
    assert "'batch'" in reason
    unlimited = SLAPolicy(PolicyConfig(classes=(ClassPolicy("only", 0),), default_class="only"))
    assert unlimited.admit(new_ticket(unlimited, "only", 0.0), 10_000) is None


def test_admission_keeps_the_last_quarter_of_a_queue_for_tenants_below_their_share() -> None:
    policy = SLAPolicy(make_config())  # batch queue limit 8: 6 places shared, 2 kept
    a = new_ticket(policy, "batch", 0.0, tenant="a")
    b = new_ticket(policy, "batch", 0.0, tenant="b")
    assert policy.admit(a, 5, {"a": 5}) is None  # fewer than 6 waiting: anyone
    reason = policy.admit(a, 6, {"a": 6})  # alone, a's share of the 6 is all 6: it has it
    assert reason is not None
    assert "tenant 'a' holds its share" in reason
    assert "(6/6 of 8)" in reason
    assert policy.admit(b, 6, {"a": 6}) is None  # b holds nothing: the reserve is for it
    assert policy.admit(a, 6, {"a": 2, "b": 4}) is None  # a's share among {a, b} is 3
    assert policy.admit(a, 7, {"a": 3, "b": 4}) is not None
    assert policy.admit(b, 8, {"a": 7, "b": 1}) is not None  # full is full


def test_queue_share_is_weighted_and_never_zero() -> None:
    config = make_config()
    assert queue_share(8, "heavy", {"a": 3}, config.weight) == 6  # weight 2 of 3
    assert queue_share(8, "a", {"heavy": 5}, config.weight) == 3
    assert queue_share(8, "a", {}, config.weight) == 8
    assert queue_share(1, "a", {"b": 1, "c": 1, "d": 1}, config.weight) == 1


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["a", "b", "heavy", "x"]), st.integers(0, 12), max_size=4),
    st.sampled_from(["a", "b", "heavy", "x"]),
)
def test_a_tenant_below_its_share_is_only_turned_away_by_a_full_queue(
    waiting: dict[str, int], tenant: str
) -> None:
    policy = SLAPolicy(make_config())
    limit = 8
    total = sum(waiting.values())
    t = new_ticket(policy, "batch", 0.0, tenant=tenant)
    reason = policy.admit(t, total, waiting)
    below_share = waiting.get(tenant, 0) < queue_share(
        shared_queue_slots(limit), tenant, waiting, policy.config.weight
    )
    if below_share and total < limit:
        assert reason is None
    if total >= limit:
        assert reason is not None


# -- ordering -----------------------------------------------------------------------------------


def test_class_priority_then_vtc_then_slack() -> None:
    policy = SLAPolicy(make_config())
    q = ticket_queue(policy)
    batch = new_ticket(policy, "batch", 0.0)
    std_a = new_ticket(policy, "standard", 1.0, tenant="a")
    std_b_late = new_ticket(policy, "standard", 2.0, tenant="b")
    inter = new_ticket(policy, "interactive", 3.0)
    for t in (batch, std_a, std_b_late, inter):
        q.add_request(t)
    policy.advance(3.0)
    assert list(q) == [inter, std_a, std_b_late, batch]
    # Tenant a has been served a lot in `standard`: b goes first there, despite arriving later.
    policy.fair.charge("standard", "a", 100, 100)
    policy.advance(3.1)
    assert list(q) == [inter, std_b_late, std_a, batch]


def test_slack_orders_by_latest_start_within_a_tenant() -> None:
    policy = SLAPolicy(make_config())
    q = ticket_queue(policy)
    short = new_ticket(policy, "standard", 0.0, prompt_tokens=10)
    long = new_ticket(policy, "standard", 0.5, prompt_tokens=4000)
    q.add_request(short)
    q.add_request(long)
    policy.advance(1.0)
    assert q.peek_request() is short  # no prefill estimate yet: EDF
    # With an estimate (taken at arrival), 4000 tokens = 4 s of prefill: the long one first.
    policy.s_per_prefill_token = 0.001
    q2 = ticket_queue(policy)
    short2 = new_ticket(policy, "standard", 0.0, prompt_tokens=10)
    long2 = new_ticket(policy, "standard", 0.5, prompt_tokens=4000)
    q2.add_request(short2)
    q2.add_request(long2)
    policy.advance(0.4)  # before the long one's latest start (at 1.0 it could no longer make it)
    assert q2.peek_request() is long2
    assert long2.latest_start == pytest.approx(4.5 - 4.0)


def test_within_a_tenant_requests_that_can_still_meet_their_target_go_before_hopeless_ones() -> None:
    """Earliest-deadline-first under overload: the overdue request would go first and make the
    next one miss too. Feasible first, the overdue ones after them, most overdue first."""
    policy = SLAPolicy(make_config())
    q = ticket_queue(policy)
    overdue = new_ticket(policy, "interactive", 0.0)  # TTFT 1 s: latest start 1.0
    more_overdue = new_ticket(policy, "interactive", -0.5)  # latest start 0.5
    fresh = new_ticket(policy, "interactive", 1.5)  # latest start 2.5
    batch = new_ticket(policy, "batch", -50.0)  # no TTFT target: never hopeless (ages at 10)
    for t in (overdue, more_overdue, fresh, batch):
        q.add_request(t)
    policy.advance(0.2)
    assert list(q) == [more_overdue, overdue, fresh, batch]  # nobody is late yet: EDF
    assert q.peek_request() is more_overdue
    policy.advance(1.2)
    assert not batch.hopeless(1.2)
    assert list(q) == [fresh, more_overdue, overdue, batch]
    assert q.peek_request() is fresh
    q.remove_request(fresh)
    assert q.pop_request() is more_overdue
    # A hopeless request still ages (at 5 s), ahead of everything un-aged: its wait bound holds.
    policy.advance(6.0)
    assert list(q) == [overdue, batch]
    assert q.pop_request() is overdue
    assert q.pop_request() is batch
    assert not q


def test_a_ttft_override_makes_a_request_of_a_class_without_one_hopeless_in_time() -> None:
    policy = SLAPolicy(make_config())
    timed = policy.ticket("r1", 0, {"slo_class": "batch", "ttft_ms": 500}, 0.0, 10, 16)
    untimed = new_ticket(policy, "batch", 0.0)
    assert timed.hopeless_after == pytest.approx(0.5)
    assert untimed.hopeless_after == math.inf
    assert timed.hopeless(0.6)
    assert not untimed.hopeless(59.0)


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(
        st.tuples(
            st.sampled_from(["interactive", "standard", "batch"]),
            st.floats(0, 100),
            st.sampled_from("ab"),
            st.one_of(st.none(), st.integers(100, 5000)),
            st.integers(1, 400),
        ),
        min_size=1,
        max_size=40,
    ),
    steps=st.lists(st.floats(0, 20), min_size=1, max_size=40),
    charges=st.lists(
        st.tuples(
            st.sampled_from(["interactive", "standard", "batch"]), st.sampled_from("ab"), st.integers(0, 500)
        ),
        max_size=6,
    ),
    prefill_s=st.sampled_from([0.0, 0.001, 0.01]),
)
def test_the_queue_head_is_always_the_smallest_key_as_the_clock_moves(
    items: list[tuple[str, float, str, int | None, int]],
    steps: list[float],
    charges: list[tuple[str, str, int]],
    prefill_s: float,
) -> None:
    policy = SLAPolicy(make_config())
    policy.s_per_prefill_token = prefill_s
    q = ticket_queue(policy)
    tickets: list[Ticket] = []
    for slo_class, arrival, tenant, ttft_ms, prompt in items:
        xargs: dict[str, object] = {"slo_class": slo_class, "tenant": tenant}
        if ttft_ms is not None:
            xargs["ttft_ms"] = ttft_ms
        tickets.append(policy.ticket(f"r{len(tickets)}", 0, xargs, arrival, prompt, 16))
    for t in tickets:
        q.add_request(t)
    for slo_class, tenant, tokens in charges:
        policy.fair.charge(slo_class, tenant, tokens, 0)
    now, remaining = 0.0, list(tickets)
    for step in steps:
        if not remaining:
            break
        now += step
        policy.advance(now)
        head = q.peek_request()
        assert head is min(remaining, key=policy.key)
        # remove (no prepay) keeps the counters fixed, so the next peek checks the moved heaps.
        q.remove_request(head)
        remaining.remove(head)
    assert len(q) == len(remaining)


def test_aged_requests_outrank_everything_in_promotion_order() -> None:
    policy = SLAPolicy(make_config())
    q = ticket_queue(policy)
    old_batch = new_ticket(policy, "batch", 0.0)  # ages at 60
    std = new_ticket(policy, "standard", 31.0)  # ages at 61
    inter = new_ticket(policy, "interactive", 59.0)  # ages at 64
    for t in (inter, std, old_batch):
        q.add_request(t)
    policy.advance(59.5)
    assert list(q) == [inter, std, old_batch]
    policy.advance(62.0)
    assert list(q) == [old_batch, std, inter]  # both aged, in promote order; inter not aged yet
    policy.advance(70.0)
    assert list(q) == [old_batch, std, inter]


def test_peek_then_pop_agree_and_queue_api() -> None:
    policy = SLAPolicy(make_config())
    q = ticket_queue(policy)
    assert not q
    assert len(q) == 0
    with pytest.raises(IndexError):
        q.peek_request()
    with pytest.raises(IndexError):
        q.pop_request()
    a, b, c = (new_ticket(policy, "standard", float(i)) for i in range(3))
    q.prepend_requests([c, a])
    q.prepend_request(b)
    assert len(q) == 3
    assert q.count_class("standard") == 3
    assert q.count_class("batch") == 0
    head = q.peek_request()
    assert q.pop_request() is head is a
    q.remove_requests([c, new_ticket(policy, "batch", 9.0)])  # absent items are ignored
    assert list(q) == [b]
    with pytest.raises(ValueError, match="not in queue"):
        q.remove_request(a)
    q.remove_request(b)
    assert not q


def test_an_overtake_is_going_ahead_of_an_older_waiting_request_of_a_lower_class() -> None:
    policy = SLAPolicy(make_config())
    q = ticket_queue(policy)
    old_batch, old_standard = new_ticket(policy, "batch", 1.0), new_ticket(policy, "standard", 2.0)
    q.add_request(old_batch)
    q.add_request(old_standard)
    assert q.oldest_arrivals() == {2: 1.0, 1: 2.0}
    assert q.holds_class_below(0)
    assert q.holds_class_below(1)
    assert not q.holds_class_below(2)
    oldest = q.oldest_arrivals()
    assert overtook(new_ticket(policy, "interactive", 3.0), oldest)
    assert overtook(new_ticket(policy, "standard", 3.0), oldest)  # ahead of the older batch one
    # Not an overtake: the same class (fair share may reorder it), or lower classes that came later.
    assert not overtook(new_ticket(policy, "batch", 3.0), oldest)
    assert not overtook(new_ticket(policy, "interactive", 0.5), oldest)
    q.remove_request(old_batch)
    assert q.oldest_arrivals() == {1: 2.0}
    assert not q.holds_class_below(1)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["interactive", "standard", "batch"]), st.floats(0, 100), st.sampled_from("ab")
        ),
        min_size=1,
        max_size=40,
    ),
    st.floats(0, 200),
)
def test_popping_yields_aged_first_then_class_order(items: list[tuple[str, float, str]], now: float) -> None:
    policy = SLAPolicy(make_config())
    q = ticket_queue(policy)
    tickets = [new_ticket(policy, c, min(arrival, now), tenant) for c, arrival, tenant in items]
    for t in tickets:
        q.add_request(t)
    policy.advance(now)
    popped = [q.pop_request() for _ in range(len(tickets))]
    assert sorted(id(t) for t in popped) == sorted(id(t) for t in tickets)
    aged = [t.aged(now) for t in popped]
    assert aged == sorted(aged, reverse=True)  # every aged request before every un-aged one
    promote = [t.promote_at for t in popped if t.aged(now)]
    assert promote == sorted(promote)
    fresh_classes = [t.slo_class.priority for t in popped if not t.aged(now)]
    assert fresh_classes == sorted(fresh_classes)


# -- VTC ----------------------------------------------------------------------------------------


def test_split_charge_skips_recomputation() -> None:
    assert split_charge(0, 8, prompt_tokens=10, high_water=0) == (8, 0)
    assert split_charge(8, 4, prompt_tokens=10, high_water=8) == (2, 2)
    assert split_charge(12, 1, prompt_tokens=10, high_water=12) == (0, 1)
    # Preempted at 13, recomputing from 0: nothing is charged until position 13 is passed.
    assert split_charge(0, 13, prompt_tokens=10, high_water=13) == (0, 0)
    assert split_charge(13, 1, prompt_tokens=10, high_water=13) == (0, 1)


def test_policy_charge_moves_high_water_and_counter() -> None:
    policy = SLAPolicy(make_config(input_weight=1.0, output_weight=2.0))
    t = new_ticket(policy, "standard", 0.0, tenant="heavy", prompt_tokens=10)
    assert policy.charge(t, 0, 10) == (10, 0)
    assert policy.charge(t, 10, 1) == (0, 1)
    assert t.charged_tokens == 11
    # weight 2: (10 * 1 + 1 * 2) / 2
    assert policy.fair.counter("standard", "heavy") == pytest.approx(6.0)
    assert policy.charge(t, 0, 11) == (0, 0)  # recompute after preemption
    assert policy.fair.counter("standard", "heavy") == pytest.approx(6.0)


def test_admission_prepays_the_whole_request_and_finishing_refunds_the_rest() -> None:
    policy = SLAPolicy(make_config(input_weight=1.0, output_weight=2.0))
    t = new_ticket(policy, "standard", 0.0, tenant="a", prompt_tokens=10, max_tokens=16)
    assert policy.on_scheduled(t, 1.0) == pytest.approx(1.0)
    assert policy.fair.counter("standard", "a") == pytest.approx(10 + 2 * 16)  # charged up front
    assert policy.charge(t, 0, 10) == (10, 0)  # served (for the metric), but already paid for
    assert policy.charge(t, 10, 1) == (0, 1)
    assert policy.fair.counter("standard", "a") == pytest.approx(42.0)
    assert policy.on_scheduled(t, 5.0) is None  # resumed after a preemption: no second charge
    policy.prepay(t)  # the queue prepays when it hands a request out: once only
    assert policy.fair.counter("standard", "a") == pytest.approx(42.0)
    assert policy.charge(t, 0, 11) == (0, 0)  # recomputation is not service
    policy.on_finished(t, output_tokens=4)  # stopped early: 12 output tokens never generated
    assert policy.fair.counter("standard", "a") == pytest.approx(42.0 - 2 * 12)
    policy.on_finished(t, output_tokens=4)  # idempotent
    assert policy.fair.counter("standard", "a") == pytest.approx(18.0)
    never = new_ticket(policy, "standard", 0.0, tenant="b")
    policy.on_finished(never, output_tokens=0)  # never admitted, never charged: nothing to refund
    assert policy.fair.counter("standard", "b") == 0.0


def test_vtc_lifts_a_returning_tenant() -> None:
    fair = FairShare(make_config())
    fair.charge("batch", "a", 1000, 0)
    fair.charge("batch", "b", 50, 0)
    fair.on_backlogged("batch", "new", ["a", "b"])
    assert fair.counter("batch", "new") == 50  # lifted to the least-served backlogged tenant
    fair.on_backlogged("batch", "a", ["b", "new"])
    assert fair.counter("batch", "a") == 1000  # never lowered
    fair.on_backlogged("batch", "c", [])
    assert fair.counter("batch", "c") == 1000  # nobody backlogged: no banked credit
    fair.on_backlogged("standard", "x", [])
    assert fair.counter("standard", "x") == 0.0
    fair.prune(lambda c, t: t != "a")
    assert fair.counter("batch", "a") == 0.0
    assert ("batch", "a") not in fair.counters_all()
    assert fair.counters("batch") == {"b": 50.0, "new": 50.0, "c": 1000.0}


@settings(max_examples=150)
@given(
    st.lists(st.tuples(st.integers(1, 200), st.integers(1, 100)), min_size=1, max_size=12),
    st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=2, max_size=4),
    st.integers(30, 150),
)
def test_vtc_drift_between_backlogged_tenants_is_bounded(
    shapes: list[tuple[int, int]], weights: list[float], steps: int
) -> None:
    """Tenants always backlogged, served one whole request at a time by the queue's order:
    their weighted counters never drift apart by more than one request's cost (VTC's bound)."""
    tenants = [f"t{i}" for i in range(len(weights))]
    config = PolicyConfig(
        classes=(ClassPolicy("c", 0, max_wait_s=1e9),),
        default_class="c",
        tenant_weights=dict(zip(tenants, weights, strict=True)),
    )
    policy = SLAPolicy(config)
    q = ticket_queue(policy)
    # Each tenant keeps one request queued (backlogged); its shapes cycle through `shapes`.
    next_shape = dict.fromkeys(tenants, 0)

    def enqueue(tenant: str) -> None:
        prompt, output = shapes[(next_shape[tenant] + len(tenant)) % len(shapes)]
        next_shape[tenant] += 1
        q.add_request(new_ticket(policy, "c", 0.0, tenant=tenant, prompt_tokens=prompt, max_tokens=output))

    for tenant in tenants:
        enqueue(tenant)
    max_cost = max(policy.fair.cost(t, p, o) for t in tenants for p, o in shapes)
    for step in range(steps):
        policy.advance(float(step))
        served = q.pop_request()
        policy.charge(served, 0, served.prompt_tokens + served.max_tokens)
        enqueue(served.tenant)
        counters = [policy.fair.counter("c", t) for t in tenants]
        assert max(counters) - min(counters) <= max_cost + 1e-9


# -- the wait bound -----------------------------------------------------------------------------


@dataclass
class SimResult:
    waits: list[tuple[Ticket, float]]
    rejected: int


def simulate(policy: SLAPolicy, arrivals: list[tuple[float, str, str, float]], slots: int) -> SimResult:
    """Non-preemptive discrete-event run of the real queue: `slots` servers, each request
    occupies one for its service time; at every event free slots take the queue's head."""
    q = ticket_queue(policy)
    completions: list[tuple[float, int]] = []
    free = slots
    waits: list[tuple[Ticket, float]] = []
    rejected = 0
    service: dict[int, float] = {}
    pending = sorted(arrivals)
    i = 0
    seq = 0
    while i < len(pending) or completions:
        next_arrival = pending[i][0] if i < len(pending) else math.inf
        next_done = completions[0][0] if completions else math.inf
        now = min(next_arrival, next_done)
        while completions and completions[0][0] <= now:
            heapq.heappop(completions)
            free += 1
        while i < len(pending) and pending[i][0] <= now:
            at, slo_class, tenant, service_s = pending[i]
            i += 1
            t = new_ticket(policy, slo_class, at, tenant=tenant)
            waiting = q.count_class(slo_class)
            if policy.admit(t, waiting, q.tenant_counts(slo_class)) is not None:
                rejected += 1
                continue
            service[id(t)] = service_s
            q.add_request(t)
        policy.advance(now)
        while free and q:
            t = q.pop_request()
            wait = policy.on_scheduled(t, now)
            assert wait is not None
            waits.append((t, wait))
            policy.charge(t, 0, t.prompt_tokens + t.max_tokens)
            free -= 1
            seq += 1
            heapq.heappush(completions, (now + service[id(t)], seq))
    return SimResult(waits, rejected)


@settings(max_examples=200, deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(
            st.floats(0, 300, allow_nan=False),
            st.sampled_from(["interactive", "standard", "batch"]),
            st.sampled_from(["a", "b", "heavy"]),
            st.floats(0.1, 20.0),
        ),
        min_size=1,
        max_size=120,
    ),
    slots=st.integers(1, 4),
    limit=st.integers(1, 6),
)
def test_every_admitted_request_starts_within_the_stated_bound(
    arrivals: list[tuple[float, str, str, float]], slots: int, limit: int
) -> None:
    classes = tuple(
        ClassPolicy(c.name, c.priority, c.ttft_s, c.tpot_s, c.max_wait_s, queue_limit=limit)
        for c in (INTERACTIVE, STANDARD, BATCH)
    )
    policy = SLAPolicy(PolicyConfig(classes=classes, default_class="batch"))
    max_service = max(a[3] for a in arrivals)
    queue_total = limit * len(classes)
    result = simulate(policy, arrivals, slots)
    assert len(result.waits) + result.rejected == len(arrivals)
    for ticket, wait in result.waits:
        bound = wait_bound_s(ticket.slo_class.max_wait_s, queue_total - 1, slots, max_service)
        assert wait <= bound + 1e-9, (ticket, wait, bound)


def test_strict_priority_without_aging_starves_batch_but_aging_does_not() -> None:
    """The reason aging exists: a steady interactive stream that alone fills the one slot."""
    arrivals = [(0.0, "batch", "a", 1.0)] + [(0.5 * k, "interactive", "b", 1.0) for k in range(400)]
    no_aging = PolicyConfig(
        classes=(
            ClassPolicy("interactive", 0, ttft_s=1.0, max_wait_s=1e9),
            ClassPolicy("batch", 2, max_wait_s=1e9),
        ),
        default_class="batch",
    )
    starved = simulate(SLAPolicy(no_aging), arrivals, slots=1)
    batch_wait = next(w for t, w in starved.waits if t.slo_class.name == "batch")
    assert batch_wait > 150  # served only once the interactive stream ends
    aging = PolicyConfig(
        classes=(
            ClassPolicy("interactive", 0, ttft_s=1.0, max_wait_s=5),
            ClassPolicy("batch", 2, max_wait_s=20),
        ),
        default_class="batch",
    )
    fair = simulate(SLAPolicy(aging), arrivals, slots=1)
    batch_wait = next(w for t, w in fair.waits if t.slo_class.name == "batch")
    # It ages at 20 s; ahead of it then are only the interactive requests that aged earlier
    # (arrived before 15 s) and are still waiting: ~10 of them, 1 s each (the bound's argument).
    assert batch_wait <= wait_bound_s(20, 10, 1, 1.0)


def test_wait_bound_formula() -> None:
    assert wait_bound_s(60, 0, 1, 10) == 70
    assert wait_bound_s(60, 7, 4, 10) == 80
    assert wait_bound_s(60, 8, 4, 10) == 90


# -- preemption ---------------------------------------------------------------------------------


def running(
    policy: SLAPolicy, slo_class: str, *, admitted: float, blocks: int, remaining: int
) -> RunningView:
    t = new_ticket(policy, slo_class, admitted - 1)
    policy.on_scheduled(t, admitted)
    return RunningView(ticket=t, blocks=blocks, remaining_tokens=remaining)


def test_preempts_lowest_class_with_least_work_for_an_urgent_head() -> None:
    policy = SLAPolicy(make_config(min_run_s=1.0))
    policy.step_s = 0.1
    views = [
        running(policy, "standard", admitted=0, blocks=1, remaining=100),
        running(policy, "batch", admitted=0, blocks=9, remaining=100),
        running(policy, "batch", admitted=0, blocks=2, remaining=100),
    ]
    head = new_ticket(policy, "interactive", 10.0)
    victims = choose_victims(head, 10.0, views, free_slots=0, free_blocks=100, head_blocks=1, policy=policy)
    assert victims == [views[2].ticket]


def test_no_preemption_when_room_or_time_or_no_victim() -> None:
    policy = SLAPolicy(make_config(min_run_s=1.0))
    policy.step_s = 0.1
    views = [running(policy, "batch", admitted=0, blocks=2, remaining=100)]
    head = new_ticket(policy, "interactive", 10.0)
    kw = {"free_blocks": 100, "head_blocks": 1, "policy": policy}
    assert choose_victims(None, 10.0, views, free_slots=0, **kw) == []  # type: ignore[arg-type]
    assert choose_victims(head, 10.0, views, free_slots=1, **kw) == []  # a slot is free
    # A slot frees within 0.4 s on its own, the head must start within 0.5 s (half of 1 s is
    # headroom): wait instead. 0.6 s would be too late.
    soon = [running(policy, "batch", admitted=0, blocks=2, remaining=4)]
    assert not would_miss(head, 10.0, soon, policy)
    assert would_miss(head, 10.0, [running(policy, "batch", admitted=0, blocks=2, remaining=6)], policy)
    no_headroom = SLAPolicy(make_config(min_run_s=1.0, ttft_headroom=0.0))
    no_headroom.step_s = 0.1
    assert not would_miss(
        head, 10.0, [running(policy, "batch", admitted=0, blocks=2, remaining=6)], no_headroom
    )
    assert choose_victims(head, 10.0, soon, free_slots=0, **kw) == []
    # Same class is never a victim; a class without a TTFT target never preempts.
    same = [running(policy, "interactive", admitted=0, blocks=2, remaining=100)]
    assert choose_victims(head, 10.0, same, free_slots=0, **kw) == []
    batch_head = new_ticket(policy, "batch", 10.0)
    assert choose_victims(batch_head, 10.0, views, free_slots=0, **kw) == []
    assert natural_free_eta([], 0.1) == 0.0
    # The adapter's shortcut agrees with the view-based test.
    assert would_miss_after(head, 10.0, natural_free_eta(soon, 0.1), policy) == would_miss(
        head, 10.0, soon, policy
    )
    assert not would_miss_after(batch_head, 10.0, 100.0, policy)  # no TTFT target: never


def test_hysteresis_protects_recent_aged_and_repeatedly_preempted() -> None:
    policy = SLAPolicy(make_config(min_run_s=1.0, max_preemptions_per_request=2))
    policy.step_s = 0.1
    head = new_ticket(policy, "interactive", 10.0)
    kw = {"free_slots": 0, "free_blocks": 100, "head_blocks": 1, "policy": policy}
    recent = running(policy, "batch", admitted=9.5, blocks=1, remaining=100)
    assert choose_victims(head, 10.0, [recent], **kw) == []  # ran only 0.5 s
    aged = running(policy, "batch", admitted=0, blocks=1, remaining=100)
    aged.ticket.admitted_aged = True
    assert choose_victims(head, 10.0, [aged], **kw) == []
    tired = running(policy, "batch", admitted=0, blocks=1, remaining=100)
    tired.ticket.num_preemptions = 2
    assert choose_victims(head, 10.0, [tired], **kw) == []
    fresh = running(policy, "batch", admitted=0, blocks=1, remaining=100)
    assert choose_victims(head, 10.0, [recent, aged, tired, fresh], **kw) == [fresh.ticket]


def test_kv_shortage_takes_enough_victims_or_none() -> None:
    policy = SLAPolicy(make_config(max_preemptions_per_step=2))
    policy.step_s = 0.1
    head = new_ticket(policy, "interactive", 10.0, prompt_tokens=100)
    small = [running(policy, "batch", admitted=0, blocks=3, remaining=100) for _ in range(3)]
    kw = {"free_slots": 1, "free_blocks": 0, "policy": policy}
    assert len(choose_victims(head, 10.0, small, head_blocks=6, **kw)) == 2
    # 9 blocks would need 3 victims, over the per-step cap of 2: preempting would be waste.
    assert choose_victims(head, 10.0, small, head_blocks=9, **kw) == []


def test_running_rank_keeps_aged_admissions_last_to_evict() -> None:
    config = make_config()
    policy = SLAPolicy(config)
    t = new_ticket(policy, "batch", 0.0)
    assert running_rank(t, config) == 2
    assert policy.on_scheduled(t, 100.0) == pytest.approx(100.0)
    assert t.admitted_aged
    assert running_rank(t, config) == -1
    assert policy.on_scheduled(t, 200.0) is None  # only the first admission is a queue wait


def test_step_clock_separates_decode_steps_from_prefill() -> None:
    clock = StepClock(alpha=0.5, step_s=0.1)
    clock.observe(0.2, tokens=4, requests=4)
    assert clock.step_s == pytest.approx(0.15)
    clock.observe(1.0, tokens=1000, requests=2)
    assert clock.s_per_token == pytest.approx(0.001)
    clock.observe(1.0, tokens=500, requests=2)
    assert clock.s_per_token == pytest.approx(0.0015)
    clock.observe(30.0, tokens=4, requests=4)  # idle gap, not a step
    clock.observe(0.1, tokens=0, requests=0)
    assert clock.step_s == pytest.approx(0.15)


def test_slo_met() -> None:
    assert slo_met(None, 99.0)
    assert slo_met(1.0, 1.0)
    assert not slo_met(1.0, 1.01)
