"""The SLA scheduling policy, as plain data and functions (no vLLM import).

`sla_scheduler.SLAScheduler` wires this into vLLM 0.32; everything that decides anything lives
here so that it can be unit- and property-tested without an engine.

Ordering of waiting requests (smallest key first, see `SLAPolicy.key`):

1. **Aged** requests — those that have waited at least their class's `max_wait_s` — come first,
   in order of the moment they aged (`promote_at = arrival + max_wait_s`). This is what bounds
   every class's wait (see `wait_bound_s`): after a request ages, nothing that arrives later can
   overtake it.
2. Everything else by class priority (lower = more important, as in vLLM), then by the tenant's
   weighted virtual token counter inside that class (VTC: the least-served backlogged tenant
   first), then, within the tenant, requests that can still meet their TTFT target before those
   that cannot (their latest start has passed), then by deadline slack (earliest
   `deadline - estimated prefill time` first). Plain earliest-deadline-first collapses under
   overload: the requests that already missed have the earliest deadlines, go first, and make
   the next ones miss too. Late ones still age, so the wait bound is unchanged.

Keys depend on the clock and on the VTC counters, so they are read against a frozen `now`
(`SLAPolicy.advance`, once per engine step): vLLM peeks a queue and then pops it, and the two
must agree. `SLAQueue` keeps only the static parts of the key in heaps, so it never re-sorts.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tokenfleet.engine.sla_contract import REJECT_PREFIX, decide_class
from tokenfleet.spec import SchedulerSpec

# A class without `maxWaitS` still ages: an unbounded wait is never what anyone wants.
DEFAULT_MAX_WAIT_S = 300.0
# vLLM's default `priority` is 0, so a bare 0 says nothing about the class (see `resolve_class`).
VLLM_DEFAULT_PRIORITY = 0
# Metrics label for tenants the spec does not list (bounds label cardinality).
OTHER_TENANT = "other"
# Past this share of a class queue's limit, a tenant already holding its share of it is turned away.
SHARED_QUEUE_FRACTION = 0.75

Key = tuple[int, float, float, str, int, float, int]


@dataclass(frozen=True, slots=True)
class ClassPolicy:
    """One SLO class as the scheduler sees it (seconds, not milliseconds)."""

    name: str
    priority: int
    ttft_s: float | None = None
    tpot_s: float | None = None
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    queue_limit: int | None = None


@dataclass(frozen=True)
class PolicyConfig:
    """Everything the policy needs from the spec, plus the tuning knobs (documented in ADR 0004)."""

    classes: tuple[ClassPolicy, ...]
    default_class: str
    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    tenant_default_class: Mapping[str, str] = field(default_factory=dict)
    tenant_max_class: Mapping[str, str] = field(default_factory=dict)
    # VTC weights: a generated token costs more than a prompt token (the VTC paper uses 1:2).
    input_weight: float = 1.0
    output_weight: float = 2.0
    # Preemption hysteresis: a victim must have run this long since it was (re)admitted, may be
    # preempted at most this many times in its life, and at most this many victims per step.
    min_run_s: float = 1.0
    # Share of a TTFT target kept back when deciding to preempt: the head must be able to start
    # by arrival + (1 - headroom) × target. The rest absorbs what the estimate does not see (the
    # first decode step, output handling, the HTTP path, step-time jitter).
    ttft_headroom: float = 0.5
    max_preemptions_per_request: int = 2
    max_preemptions_per_step: int = 2
    _by_name: dict[str, ClassPolicy] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("at least one class is needed")
        object.__setattr__(self, "_by_name", {c.name: c for c in self.classes})
        if self.default_class not in self._by_name:
            raise ValueError(f"default class {self.default_class!r} is not a class")

    @classmethod
    def from_spec(cls, spec: SchedulerSpec, **knobs: Any) -> PolicyConfig:
        classes = tuple(
            ClassPolicy(
                name=c.name,
                priority=c.priority,
                ttft_s=c.ttft_ms / 1000 if c.ttft_ms is not None else None,
                tpot_s=c.tpot_ms / 1000 if c.tpot_ms is not None else None,
                max_wait_s=c.max_wait_s if c.max_wait_s is not None else DEFAULT_MAX_WAIT_S,
                queue_limit=c.queue_limit,
            )
            for c in spec.classes
        )
        return cls(
            classes=classes,
            default_class=spec.default_class,
            tenant_weights={t.name: t.weight for t in spec.tenants},
            tenant_default_class={t.name: t.default_class for t in spec.tenants if t.default_class},
            tenant_max_class={t.name: t.max_class for t in spec.tenants if t.max_class},
            **knobs,
        )

    def class_named(self, name: str) -> ClassPolicy:
        return self._by_name[name]

    @property
    def min_priority(self) -> int:
        return min(c.priority for c in self.classes)

    def weight(self, tenant: str) -> float:
        return self.tenant_weights.get(tenant, 1.0)

    def tenant_label(self, tenant: str) -> str:
        return tenant if tenant in self.tenant_weights else OTHER_TENANT


def resolve_class(
    config: PolicyConfig, priority: int, extra_args: Mapping[str, Any] | None
) -> tuple[ClassPolicy, str]:
    """The class and tenant of a request, from vLLM's `priority` and `vllm_xargs`.

    The class is `sla_contract.decide_class`'s, lenient (the scheduler cannot refuse a request
    for naming an unknown class: it falls back): a known `slo_class`; else a non-default
    `priority` equal to a class's; else the tenant's default class; else the spec's default
    class; capped at the tenant's `maxClass`. vLLM's `priority` defaults to 0, which is also the
    top class's priority in the default spec, so a bare 0 is not trusted: an untagged request
    must not become interactive.
    """
    xargs = extra_args or {}
    tenant_raw = xargs.get("tenant")
    tenant = str(tenant_raw)[:63] if tenant_raw else "default"
    name = xargs.get("slo_class")
    chosen = decide_class(
        config.classes,
        config.default_class,
        name=name if isinstance(name, str) else None,
        priority=priority if priority != VLLM_DEFAULT_PRIORITY else None,
        tenant_default=config.tenant_default_class.get(tenant),
        tenant_max=config.tenant_max_class.get(tenant),
    )
    return chosen, tenant


@dataclass(slots=True)
class Ticket:
    """The scheduler's view of one request: identity, class, tenant, deadlines, and history."""

    request_id: str
    slo_class: ClassPolicy
    tenant: str
    arrival: float  # wall clock, like vLLM's Request.arrival_time
    prompt_tokens: int
    max_tokens: int
    deadline: float  # arrival + TTFT target (arrival + max wait for classes without one)
    promote_at: float  # arrival + max wait: from then on it outranks every un-aged request
    seq: int  # admission order; the last tie-break, so keys are unique
    latest_start: float = 0.0  # deadline - estimated prefill time (the estimate at arrival)
    # After this moment the request cannot meet its TTFT target: its latest start, or never for a
    # request without a TTFT target (nothing to miss; it ages instead).
    hopeless_after: float = math.inf
    first_scheduled: float | None = None
    last_admitted: float | None = None
    admitted_aged: bool = False  # admitted after aging: never chosen as a preemption victim
    num_preemptions: int = 0
    charged_tokens: int = 0  # VTC high-water mark: recomputation after preemption is free
    served_tokens: int = 0  # positions actually computed at least once (for the served-tokens metric)
    prepaid: bool = False  # VTC charged for prompt + max_tokens (on_finished refunds the unused part)
    first_token_at: float | None = None

    def aged(self, now: float) -> bool:
        return now >= self.promote_at

    def hopeless(self, now: float) -> bool:
        return now > self.hopeless_after


class FairShare:
    """Weighted virtual token counters per (class, tenant) — VTC (Sheng et al., OSDI'24).

    A tenant's counter grows by `(w_in * prompt + w_out * output) / weight` for the tokens it is
    served; inside a class the backlogged tenant with the smallest counter goes first. A tenant
    that becomes backlogged is lifted to the smallest counter among the backlogged ones, so idle
    time is not banked as credit.
    """

    def __init__(self, config: PolicyConfig) -> None:
        self._config = config
        self._counters: dict[tuple[str, str], float] = {}

    def counter(self, slo_class: str, tenant: str) -> float:
        return self._counters.get((slo_class, tenant), 0.0)

    def counters(self, slo_class: str) -> dict[str, float]:
        return {t: v for (c, t), v in self._counters.items() if c == slo_class}

    def on_backlogged(self, slo_class: str, tenant: str, backlogged: Iterable[str]) -> None:
        """`tenant` has just become backlogged in `slo_class`; `backlogged` are the others."""
        others = [self.counter(slo_class, t) for t in backlogged if t != tenant]
        own = self.counter(slo_class, tenant)
        if others:
            lifted = max(own, min(others))
        else:
            # Nobody is backlogged: nothing to be fair against; forget history beyond the max.
            known = self.counters(slo_class).values()
            lifted = max([own, *known]) if known else own
        self._counters[(slo_class, tenant)] = lifted

    def cost(self, tenant: str, prompt_tokens: int, output_tokens: int) -> float:
        c = self._config
        return (c.input_weight * prompt_tokens + c.output_weight * output_tokens) / c.weight(tenant)

    def charge(self, slo_class: str, tenant: str, prompt_tokens: int, output_tokens: int) -> float:
        cost = self.cost(tenant, prompt_tokens, output_tokens)
        key = (slo_class, tenant)
        self._counters[key] = self._counters.get(key, 0.0) + cost
        return cost

    def counters_all(self) -> dict[tuple[str, str], float]:
        return dict(self._counters)

    def prune(self, keep: Callable[[str, str], bool]) -> None:
        """Drop counters of idle tenants (they are lifted on return anyway): bounded memory."""
        self._counters = {k: v for k, v in self._counters.items() if keep(*k)}


def shared_queue_slots(limit: int) -> int:
    """The part of a class queue any tenant may fill; the rest is for tenants below their share."""
    return math.ceil(SHARED_QUEUE_FRACTION * limit)


def queue_share(
    slots: int, tenant: str, tenant_waiting: Mapping[str, int], weight: Callable[[str], float]
) -> int:
    """A tenant's weighted share of `slots` queue places among the tenants waiting in the class
    (itself included): at least 1, so every tenant can always queue something."""
    present = {t for t, n in tenant_waiting.items() if n > 0} | {tenant}
    total = sum(weight(t) for t in present)
    return max(1, math.ceil(slots * weight(tenant) / total))


def split_charge(computed_before: int, num_new: int, prompt_tokens: int, high_water: int) -> tuple[int, int]:
    """(prompt, output) tokens to charge for `num_new` tokens computed from `computed_before`.

    Only positions past `high_water` (the most ever charged) count, so the recomputation that
    a preemption forces is not billed to the preempted tenant.
    """
    start = max(computed_before, high_water)
    end = computed_before + num_new
    if end <= start:
        return 0, 0
    prompt_part = max(0, min(end, prompt_tokens) - start)
    return prompt_part, (end - start) - prompt_part


class StepClock:
    """EWMA estimates of one engine step (decode) and of the per-token cost of prefill.

    Fed with the gap between consecutive schedule() calls (one step under async scheduling) and
    what that step scheduled. Gaps longer than `max_gap_s` are idle time, not steps.
    """

    def __init__(self, alpha: float = 0.2, step_s: float = 0.05, max_gap_s: float = 2.0) -> None:
        self.alpha = alpha
        self.step_s = step_s
        self.s_per_token = 0.0
        self.max_gap_s = max_gap_s

    def observe(self, gap_s: float, tokens: int, requests: int) -> None:
        if gap_s <= 0 or gap_s > self.max_gap_s or tokens <= 0:
            return
        a = self.alpha
        if tokens <= 2 * max(requests, 1):  # decode-dominated step
            self.step_s = (1 - a) * self.step_s + a * gap_s
        else:
            per_token = gap_s / tokens
            self.s_per_token = (
                per_token if self.s_per_token == 0 else (1 - a) * self.s_per_token + a * per_token
            )


class SLAPolicy:
    """The mutable policy state: config, VTC counters, clock snapshot and timing estimates."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.fair = FairShare(config)
        self.now = 0.0
        # Estimates used for slack and the "would miss" test; refreshed by the adapter.
        self.s_per_prefill_token = 0.0
        self.step_s = 0.05
        self._seq = 0

    def ticket(
        self,
        request_id: str,
        priority: int,
        extra_args: Mapping[str, Any] | None,
        arrival: float,
        prompt_tokens: int,
        max_tokens: int,
    ) -> Ticket:
        slo_class, tenant = resolve_class(self.config, priority, extra_args)
        ttft_s = slo_class.ttft_s
        override = (extra_args or {}).get("ttft_ms")
        if isinstance(override, int | float) and not isinstance(override, bool) and override > 0:
            ttft_s = float(override) / 1000
        self._seq += 1
        deadline = arrival + (ttft_s if ttft_s is not None else slo_class.max_wait_s)
        latest_start = deadline - prompt_tokens * self.s_per_prefill_token
        return Ticket(
            request_id=request_id,
            slo_class=slo_class,
            tenant=tenant,
            arrival=arrival,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            deadline=deadline,
            promote_at=arrival + slo_class.max_wait_s,
            seq=self._seq,
            # Frozen at arrival so that the key's within-tenant part never needs re-sorting.
            latest_start=latest_start,
            hopeless_after=latest_start if ttft_s is not None else math.inf,
        )

    def advance(self, now: float) -> None:
        """Freeze the clock for one scheduling step (keys depend on it)."""
        self.now = now

    def key(self, ticket: Ticket) -> Key:
        if ticket.aged(self.now):
            return (0, ticket.promote_at, 0.0, "", 0, 0.0, ticket.seq)
        return (
            1,
            float(ticket.slo_class.priority),
            self.fair.counter(ticket.slo_class.name, ticket.tenant),
            ticket.tenant,  # ties between tenants' counters: by name, as `SLAQueue` breaks them
            int(ticket.hopeless(self.now)),
            ticket.latest_start,
            ticket.seq,
        )

    def admit(
        self, ticket: Ticket, waiting_in_class: int, tenant_waiting: Mapping[str, int] | None = None
    ) -> str | None:
        """None to admit, else the rejection reason.

        A full class queue rejects everyone. Before that, once `shared_queue_slots(limit)` are
        taken, a tenant that already holds its weighted share of those slots is rejected: the rest
        of the queue is kept for tenants below their share, so a noisy tenant cannot fill it and
        have everyone else's requests turned away. `tenant_waiting` is the class's waiting
        requests per tenant.
        """
        limit = ticket.slo_class.queue_limit
        if limit is None:
            return None
        name = ticket.slo_class.name
        if waiting_in_class >= limit:
            return (
                f"{REJECT_PREFIX}: queue of class {name!r} is full "
                f"({waiting_in_class}/{limit} waiting); retry later"
            )
        shared = shared_queue_slots(limit)
        if tenant_waiting is not None and waiting_in_class >= shared:
            share = queue_share(shared, ticket.tenant, tenant_waiting, self.config.weight)
            held = tenant_waiting.get(ticket.tenant, 0)
            if held >= share:
                return (
                    f"{REJECT_PREFIX}: tenant {ticket.tenant!r} holds its share of class {name!r}'s queue "
                    f"({held}/{share} of {limit}); retry later"
                )
        return None

    def on_scheduled(self, ticket: Ticket, now: float) -> float | None:
        """A waiting request was admitted to run. Returns its queue wait if this is the first time.

        On first admission the tenant's VTC counter is charged the request's whole cost up
        front — prompt and `max_tokens` — instead of token by token as it runs: when several
        slots free at once, a tenant whose running requests have not generated much yet would
        otherwise look cheap and win every slot. `on_finished` refunds what was not generated.
        """
        ticket.last_admitted = now
        if ticket.aged(now):
            ticket.admitted_aged = True
        self.prepay(ticket)
        if ticket.first_scheduled is None:
            ticket.first_scheduled = now
            return max(0.0, now - ticket.arrival)
        return None

    def prepay(self, ticket: Ticket) -> None:
        """Charge the request's whole cost (prompt + max_tokens) once. Called when the queue hands
        the request out, so the next pick within the same schedule() call already sees it."""
        if ticket.prepaid:
            return
        ticket.prepaid = True
        self.fair.charge(ticket.slo_class.name, ticket.tenant, ticket.prompt_tokens, ticket.max_tokens)
        ticket.charged_tokens = max(ticket.charged_tokens, ticket.prompt_tokens + ticket.max_tokens)

    def charge(self, ticket: Ticket, computed_before: int, num_new: int) -> tuple[int, int]:
        """Account `num_new` tokens computed from `computed_before`; returns the (prompt, output)
        tokens served for the first time (recomputation after a preemption is not service). The
        VTC counter is charged only beyond what was prepaid at admission."""
        served = split_charge(computed_before, num_new, ticket.prompt_tokens, ticket.served_tokens)
        end = computed_before + num_new
        ticket.served_tokens = max(ticket.served_tokens, end)
        billable = split_charge(computed_before, num_new, ticket.prompt_tokens, ticket.charged_tokens)
        if billable[0] or billable[1]:
            ticket.charged_tokens = max(ticket.charged_tokens, end)
            self.fair.charge(ticket.slo_class.name, ticket.tenant, *billable)
        return served

    def on_finished(self, ticket: Ticket, output_tokens: int) -> None:
        """Refund the prepaid output tokens that were never generated (stop string, EOS)."""
        unused = ticket.charged_tokens - (ticket.prompt_tokens + output_tokens)
        if unused > 0 and ticket.prepaid:
            self.fair.charge(ticket.slo_class.name, ticket.tenant, 0, -unused)
            ticket.charged_tokens -= unused


T = TypeVar("T")


class SLAQueue(Generic[T]):
    """A waiting queue in `SLAPolicy.key` order, with vLLM's `RequestQueue` method names.

    Items are whatever the caller stores (vLLM `Request`s in the engine, tickets in tests);
    `ticket_of` maps an item to its ticket. The key changes with the clock (aging) and with the
    VTC counters, but only through two static parts, so no step ever re-sorts the queue:

    - one heap of every request by `promote_at` — its top is the oldest aged request, if any;
    - two heaps per (class, tenant) by `(latest_start, seq)` — static per ticket: the requests
      that can still meet their TTFT target, and those whose latest start has passed. A request
      moves from the first to the second when it reaches the top after its latest start (once:
      the clock only moves forward).

    The head is the aging heap's top if it has aged, else, in the most important non-empty class,
    for the tenant with the smallest counter, the top of its first heap, or of its second when
    the first is empty. O(log n) per operation (amortised), O(classes × tenants) per peek.
    Removal is lazy (entries of removed items are skipped).
    `peek_request` and the following `pop_request` agree because both read the policy's
    frozen clock and counters, which only change between steps.
    """

    def __init__(self, policy: SLAPolicy, ticket_of: Callable[[T], Ticket]) -> None:
        self._policy = policy
        self._ticket_of = ticket_of
        self._live: dict[int, tuple[int, T]] = {}  # id(item) -> (entry token, item)
        self._token = 0
        self._aging: list[tuple[float, int, int, int]] = []  # (promote_at, seq, token, id)
        self._heaps: dict[tuple[int, str, str], list[tuple[float, int, int, int]]] = {}
        self._hopeless: dict[tuple[int, str, str], list[tuple[float, int, int, int]]] = {}
        self._counts: dict[tuple[int, str, str], int] = {}

    def _alive(self, token: int, ident: int) -> bool:
        entry = self._live.get(ident)
        return entry is not None and entry[0] == token

    def _head(self) -> int | None:
        """id() of the head item, or None when empty."""
        aging = self._aging
        while aging and not self._alive(aging[0][2], aging[0][3]):
            heapq.heappop(aging)
        if not aging:
            return None
        if aging[0][0] <= self._policy.now:
            return aging[0][3]
        best: tuple[int, float, str] | None = None
        best_key: tuple[int, str, str] | None = None
        fair = self._policy.fair
        for key, count in self._counts.items():
            if count <= 0:
                continue
            rank = (key[0], fair.counter(key[1], key[2]), key[2])
            if best is None or rank < best:
                best, best_key = rank, key
        assert best_key is not None  # the aging heap holds a live item, so some count is > 0
        return self._tenant_head(best_key)

    def _tenant_head(self, key: tuple[int, str, str]) -> int:
        """id() of the first request of one (class, tenant): the most urgent that can still meet
        its TTFT target, else the most overdue of the hopeless ones. The key holds a live item."""
        heap, now = self._heaps[key], self._policy.now
        while heap:
            _, _, token, ident = heap[0]
            if not self._alive(token, ident):
                heapq.heappop(heap)
            elif self._ticket_of(self._live[ident][1]).hopeless(now):
                heapq.heappush(self._hopeless.setdefault(key, []), heapq.heappop(heap))
            else:
                return ident
        hopeless = self._hopeless[key]
        while not self._alive(hopeless[0][2], hopeless[0][3]):
            heapq.heappop(hopeless)
        return hopeless[0][3]

    def _forget(self, ident: int) -> T:
        _, item = self._live.pop(ident)
        t = self._ticket_of(item)
        self._counts[(t.slo_class.priority, t.slo_class.name, t.tenant)] -= 1
        return item

    def add_request(self, request: T) -> None:
        ident = id(request)
        if ident in self._live:
            self._forget(ident)
        self._token += 1
        t = self._ticket_of(request)
        self._live[ident] = (self._token, request)
        heapq.heappush(self._aging, (t.promote_at, t.seq, self._token, ident))
        key = (t.slo_class.priority, t.slo_class.name, t.tenant)
        heapq.heappush(self._heaps.setdefault(key, []), (t.latest_start, t.seq, self._token, ident))
        self._counts[key] = self._counts.get(key, 0) + 1

    def pop_request(self) -> T:
        ident = self._head()
        if ident is None:
            raise IndexError("pop from an empty queue")
        item = self._forget(ident)
        # vLLM pops the head to admit it (or, rarely, to skip it for this step): charge it now,
        # so that when several slots free in one step they do not all go to the same tenant.
        self._policy.prepay(self._ticket_of(item))
        return item

    def peek_request(self) -> T:
        ident = self._head()
        if ident is None:
            raise IndexError("peek from an empty queue")
        return self._live[ident][1]

    # The order is the policy's, not the caller's: "prepending" is just adding back.
    def prepend_request(self, request: T) -> None:
        self.add_request(request)

    def prepend_requests(self, requests: Iterable[T]) -> None:
        for request in requests:
            self.add_request(request)

    def remove_request(self, request: T) -> None:
        if id(request) not in self._live:
            raise ValueError("request not in queue")
        self._forget(id(request))

    def remove_requests(self, requests: Iterable[T]) -> None:
        # Absent items are ignored: vLLM removes the same list from both of its waiting queues.
        for request in requests:
            if id(request) in self._live:
                self._forget(id(request))

    def __bool__(self) -> bool:
        return bool(self._live)

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[T]:
        """In key order (O(n log n): for inspection, not for the scheduling path)."""
        key = self._policy.key
        return iter(sorted((item for _, item in self._live.values()), key=lambda i: key(self._ticket_of(i))))

    def count_class(self, slo_class: str) -> int:
        return sum(n for (_, name, _), n in self._counts.items() if name == slo_class)

    def tenant_counts(self, slo_class: str) -> dict[str, int]:
        """Waiting requests per tenant in one class."""
        return {tenant: n for (_, name, tenant), n in self._counts.items() if name == slo_class and n > 0}

    def tenants_in_class(self, slo_class: str) -> set[str]:
        return set(self.tenant_counts(slo_class))

    def class_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for (_, name, _), n in self._counts.items():
            counts[name] = counts.get(name, 0) + n
        return counts

    def holds_class_below(self, priority: int) -> bool:
        """Whether a request of a lower class (a larger priority number) is waiting."""
        return any(n > 0 and p > priority for (p, _, _), n in self._counts.items())

    def oldest_arrivals(self) -> dict[int, float]:
        """The earliest arrival among the waiting requests of each class priority (O(waiting))."""
        oldest: dict[int, float] = {}
        for _, item in self._live.values():
            t = self._ticket_of(item)
            p = t.slo_class.priority
            oldest[p] = min(t.arrival, oldest.get(p, t.arrival))
        return oldest


# ---------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunningView:
    """A running request as the preemption choice sees it."""

    ticket: Ticket
    blocks: int  # KV blocks it holds (freed if preempted, shared prefix blocks aside)
    remaining_tokens: int  # upper bound on decode steps before it finishes (max_tokens - output)


def natural_free_eta(running: Sequence[RunningView], step_s: float) -> float:
    """Seconds until some running request finishes on its own, at worst (its max_tokens)."""
    if not running:
        return 0.0
    return min(r.remaining_tokens for r in running) * step_s


def would_miss(head: Ticket, now: float, running: Sequence[RunningView], policy: SLAPolicy) -> bool:
    """Would `head` miss its TTFT deadline if it waited for a request to finish on its own?"""
    return would_miss_after(head, now, natural_free_eta(running, policy.step_s), policy)


def would_miss_after(head: Ticket, now: float, free_eta_s: float, policy: SLAPolicy) -> bool:
    """`would_miss` given the time until a slot frees on its own.

    "Miss" keeps `ttft_headroom` of the target back: the head must start by
    arrival + (1 - headroom) × (deadline - arrival).
    """
    if head.slo_class.ttft_s is None:
        return False
    prefill = head.prompt_tokens * policy.s_per_prefill_token
    start_by = head.deadline - policy.config.ttft_headroom * (head.deadline - head.arrival)
    return now + free_eta_s + prefill > start_by


def overtook(admitted: Ticket, oldest_waiting: Mapping[int, float]) -> bool:
    """Whether a request just admitted went ahead of an older request of a lower class that is
    still waiting — an order FCFS never takes. `oldest_waiting` maps each class priority to the
    earliest arrival among its waiting requests."""
    return any(
        priority > admitted.slo_class.priority and arrival < admitted.arrival
        for priority, arrival in oldest_waiting.items()
    )


def preemptible(view: RunningView, head: Ticket, now: float, config: PolicyConfig) -> bool:
    """Hysteresis: only strictly lower classes, only after min_run_s, never aged, capped per life."""
    t = view.ticket
    return (
        t.slo_class.priority > head.slo_class.priority
        and not t.admitted_aged
        and t.num_preemptions < config.max_preemptions_per_request
        and (t.last_admitted is None or now - t.last_admitted >= config.min_run_s)
    )


def victim_order(view: RunningView) -> tuple[int, int, float]:
    """Least valuable first: lowest class, then least work to redo, then the youngest."""
    return (-view.ticket.slo_class.priority, view.blocks, -view.ticket.arrival)


def choose_victims(
    head: Ticket | None,
    now: float,
    running: Sequence[RunningView],
    *,
    free_slots: int,
    free_blocks: int,
    head_blocks: int,
    policy: SLAPolicy,
) -> list[Ticket]:
    """Which running requests to preempt so that the waiting `head` can start now.

    Preempt only if the head cannot start (no slot or not enough KV blocks), would miss its
    deadline by waiting, and enough preemptible victims exist to make room within the per-step
    cap — preempting without admitting the head would only waste work.
    """
    if head is None:
        return []
    slots_needed = 0 if free_slots > 0 else 1
    blocks_needed = max(0, head_blocks - free_blocks)
    if not slots_needed and not blocks_needed:
        return []
    if not would_miss(head, now, running, policy):
        return []
    candidates = sorted((v for v in running if preemptible(v, head, now, policy.config)), key=victim_order)
    victims: list[Ticket] = []
    for view in candidates[: policy.config.max_preemptions_per_step]:
        victims.append(view.ticket)
        slots_needed = max(0, slots_needed - 1)
        blocks_needed = max(0, blocks_needed - view.blocks)
        if not slots_needed and not blocks_needed:
            return victims
    return []


def running_rank(ticket: Ticket, config: PolicyConfig) -> int:
    """The int vLLM's own KV-pressure preemption compares (it evicts the max `priority`).

    Aged-admitted requests rank above every class so vLLM evicts them last: the wait bound
    relies on them running to completion.
    """
    if ticket.admitted_aged:
        return config.min_priority - 1
    return ticket.slo_class.priority


# ---------------------------------------------------------------------------------------------
# The wait bound
# ---------------------------------------------------------------------------------------------


def wait_bound_s(max_wait_s: float, queue_ahead: int, slots: int, max_service_s: float) -> float:
    """Worst-case queue wait of a request of a class with `max_wait_s` (ADR 0004).

    When the request ages at `promote_at`, only requests already waiting with an earlier
    `promote_at` — at most `queue_ahead` of them (the per-class queue limits bound it) — can
    still start before it; nothing arriving later can. Each of the `slots` slots frees at least
    once per `max_service_s` and takes the head of the queue, so it starts within
    `ceil((queue_ahead + 1) / slots)` service times after aging.
    """
    return max_wait_s + math.ceil((queue_ahead + 1) / slots) * max_service_s


def slo_met(target_s: float | None, observed_s: float) -> bool:
    return target_s is None or observed_s <= target_s
