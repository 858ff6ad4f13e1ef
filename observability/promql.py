"""A small in-memory time-series store and a PromQL evaluator for the subset tokenfleet uses.

The built-in /dashboard evaluates the *same* rule file Prometheus runs on a cluster, so a laptop
fleet shows the alerts a cluster would. Supported: selectors with `= != =~ !~` matchers, range
selectors, `rate increase delta histogram_quantile time scalar`, `sum max min avg count` with
`by`/`without`, arithmetic and comparison operators (vector/scalar and one-to-one vector
matching with `on`/`ignoring`), and `and or unless`. Anything else raises `PromQLError` at parse
time, so a rule outside the subset is caught by a test rather than silently never firing.

Differences from Prometheus, on purpose: `rate`/`increase` do not extrapolate to the window
edges (windows are short and scrapes frequent locally), and retention is bounded per series.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

Labels = frozenset[tuple[str, str]]
LOOKBACK_S = 300.0


class PromQLError(ValueError):
    pass


# -- storage ----------------------------------------------------------------------------------


@dataclass
class TSDB:
    """Series → bounded deque of (t, value)."""

    max_samples: int = 4096
    series: dict[Labels, deque[tuple[float, float]]] = field(default_factory=dict)

    def add(self, labels: dict[str, str], t: float, value: float) -> None:
        key = frozenset(labels.items())
        samples = self.series.get(key)
        if samples is None:
            samples = self.series[key] = deque(maxlen=self.max_samples)
        samples.append((float(t), float(value)))

    def ingest_text(self, text: str, t: float, extra: dict[str, str] | None = None) -> int:
        """Add every sample of a Prometheus text exposition; returns how many."""
        from prometheus_client.parser import text_string_to_metric_families

        n = 0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # creation timestamps are not series anyone queries
                self.add({"__name__": sample.name, **sample.labels, **(extra or {})}, t, float(sample.value))
                n += 1
        return n

    def names(self) -> set[str]:
        return {dict(k)["__name__"] for k in self.series}


# -- values -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    labels: Labels
    value: float

    def label(self, name: str) -> str:
        return dict(self.labels).get(name, "")


Vector = list[Sample]
Value = float | Vector


def _drop(labels: Labels, names: Iterable[str]) -> Labels:
    drop = set(names)
    return frozenset((k, v) for k, v in labels if k not in drop)


def _keep(labels: Labels, names: Iterable[str]) -> Labels:
    keep = set(names)
    return frozenset((k, v) for k, v in labels if k in keep)


# -- parsing ----------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<dur>\d+[smhdw](?:\d+[smhdw])*(?![A-Za-z0-9_:]))
    | (?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![A-Za-z0-9_:.]) | \.\d+ )
    | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^(){}\[\],=<>])
    )""",
    re.VERBOSE,
)
_DUR = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
AGGREGATIONS = frozenset({"sum", "max", "min", "avg", "count"})
FUNCTIONS = frozenset({"rate", "increase", "delta", "histogram_quantile", "time", "scalar"})
PRECEDENCE = {
    "or": 1,
    "and": 2,
    "unless": 2,
    "==": 3,
    "!=": 3,
    ">": 3,
    "<": 3,
    ">=": 3,
    "<=": 3,
    "+": 4,
    "-": 4,
    "*": 5,
    "/": 5,
    "%": 5,
    "^": 6,
}


def parse_duration(text: str) -> float:
    return float(sum(int(n) * _DUR[u] for n, u in re.findall(r"(\d+)([smhdw])", text)))


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    expr = expr.strip()
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None or match.end() == pos:
            raise PromQLError(f"cannot parse {expr[pos:]!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        pos = match.end()
        while pos < len(expr) and expr[pos].isspace():
            pos += 1
    return tokens


@dataclass(frozen=True, slots=True)
class Matcher:
    name: str
    op: str
    value: str

    def matches(self, actual: str) -> bool:
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        full = re.fullmatch(self.value, actual) is not None
        return full if self.op == "=~" else not full


@dataclass(frozen=True, slots=True)
class Selector:
    matchers: tuple[Matcher, ...]
    range_s: float | None = None


@dataclass(frozen=True, slots=True)
class Number:
    value: float


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Aggregate:
    op: str
    arg: Node
    grouping: tuple[str, ...]
    without: bool


@dataclass(frozen=True, slots=True)
class Binary:
    op: str
    lhs: Node
    rhs: Node
    on: tuple[str, ...] | None = None
    ignoring: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Negate:
    arg: Node


Node = Selector | Number | Call | Aggregate | Binary | Negate


class _Parser:
    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.tokens = tokenize(expr)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (value is not None and token[1] != value):
            raise PromQLError(f"expected {value or 'more'} in {self.expr!r}, got {token}")
        self.i += 1
        return token

    def parse(self) -> Node:
        node = self.binary(0)
        if self.peek() is not None:
            raise PromQLError(f"unexpected {self.peek()} in {self.expr!r}")
        return node

    def _operator(self) -> str | None:
        token = self.peek()
        if token is None:
            return None
        kind, value = token
        if kind == "op" and value in PRECEDENCE:
            return value
        if kind == "ident" and value.lower() in ("and", "or", "unless"):
            return value.lower()
        return None

    def binary(self, min_prec: int) -> Node:
        """Precedence climbing: operators binding at least `min_prec` extend the left side."""
        lhs = self.unary()
        while (op := self._operator()) is not None and PRECEDENCE[op] >= min_prec:
            self.i += 1
            on: tuple[str, ...] | None = None
            ignoring: tuple[str, ...] = ()
            token = self.peek()
            if token and token[1] == "bool":
                raise PromQLError("`bool` modifier is outside the supported subset")
            if token and token[1] in ("on", "ignoring"):
                self.i += 1
                names = self.label_list()
                if token[1] == "on":
                    on = names
                else:
                    ignoring = names
            token = self.peek()
            if token and token[1] in ("group_left", "group_right"):
                raise PromQLError("many-to-one matching is outside the supported subset")
            # `^` is right-associative; everything else left-associative.
            rhs = self.binary(PRECEDENCE[op] + (0 if op == "^" else 1))
            lhs = Binary(op, lhs, rhs, on, ignoring)
        return lhs

    def unary(self) -> Node:
        token = self.peek()
        if token and token == ("op", "-"):
            self.i += 1
            return Negate(self.unary())
        if token and token == ("op", "+"):
            self.i += 1
            return self.unary()
        return self.primary()

    def label_list(self) -> tuple[str, ...]:
        self.take("(")
        names: list[str] = []
        while (token := self.peek()) is not None and token[1] != ")":
            if token[0] != "ident":
                raise PromQLError(f"bad label list in {self.expr!r}")
            names.append(token[1])
            self.i += 1
            if self.peek() and self.peek() == ("op", ","):
                self.i += 1
        self.take(")")
        return tuple(names)

    def primary(self) -> Node:
        kind, value = self.take()
        if kind == "num":
            return Number(float(value))
        if value == "(":
            node = self.binary(0)
            self.take(")")
            return node
        if kind != "ident":
            raise PromQLError(f"unexpected {value!r} in {self.expr!r}")
        if value in AGGREGATIONS:
            return self.aggregate(value)
        if value in FUNCTIONS:
            self.take("(")
            args: list[Node] = []
            while self.peek() and self.peek() != ("op", ")"):
                args.append(self.binary(0))
                if self.peek() == ("op", ","):
                    self.i += 1
            self.take(")")
            return Call(value, tuple(args))
        if self.peek() == ("op", "("):
            raise PromQLError(f"function {value}() is outside the supported subset")
        matchers = [Matcher("__name__", "=", value)]
        if self.peek() == ("op", "{"):
            self.i += 1
            while self.peek() != ("op", "}"):
                name = self.take()[1]
                op = self.take()[1]
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"bad matcher operator {op!r}")
                raw = self.take()[1]
                matchers.append(Matcher(name, op, bytes(raw[1:-1], "utf-8").decode("unicode_escape")))
                if self.peek() == ("op", ","):
                    self.i += 1
            self.take("}")
        range_s = None
        if self.peek() == ("op", "["):
            self.i += 1
            range_s = parse_duration(self.take()[1])
            self.take("]")
        return Selector(tuple(matchers), range_s)

    def aggregate(self, op: str) -> Node:
        grouping: tuple[str, ...] = ()
        without = False
        token = self.peek()
        if token and token[1] in ("by", "without"):
            self.i += 1
            without = token[1] == "without"
            grouping = self.label_list()
        self.take("(")
        arg = self.binary(0)
        self.take(")")
        token = self.peek()
        if token and token[1] in ("by", "without"):
            self.i += 1
            without = token[1] == "without"
            grouping = self.label_list()
        return Aggregate(op, arg, grouping, without)


def parse(expr: str) -> Node:
    return _Parser(expr).parse()


# -- evaluation -------------------------------------------------------------------------------


def _select(db: TSDB, sel: Selector, t: float) -> list[tuple[Labels, list[tuple[float, float]]]]:
    out = []
    window = sel.range_s if sel.range_s is not None else LOOKBACK_S
    for labels, samples in db.series.items():
        d = dict(labels)
        if all(m.matches(d.get(m.name, "")) for m in sel.matchers):
            points = [(ts, v) for ts, v in samples if t - window < ts <= t]
            if points:
                out.append((labels, points))
    return out


def _increase(points: list[tuple[float, float]]) -> float:
    total = 0.0
    for (_, a), (_, b) in itertools.pairwise(points):
        total += b - a if b >= a else b  # a counter reset restarts from 0
    return total


def _range_fn(name: str, db: TSDB, arg: Node, t: float) -> Vector:
    if not isinstance(arg, Selector) or arg.range_s is None:
        raise PromQLError(f"{name}() needs a range selector")
    out: Vector = []
    for labels, points in _select(db, arg, t):
        if len(points) < 2:
            continue
        span = points[-1][0] - points[0][0]
        if name == "delta":
            value = points[-1][1] - points[0][1]
        elif name == "increase":
            value = _increase(points)
        else:
            value = _increase(points) / span if span > 0 else 0.0
        out.append(Sample(_drop(labels, ["__name__"]), value))
    return out


def histogram_quantile(q: float, buckets: Vector) -> Vector:
    groups: dict[Labels, list[tuple[float, float]]] = {}
    for s in buckets:
        bound = s.label("le")
        if not bound:
            continue
        groups.setdefault(_drop(s.labels, ["le", "__name__"]), []).append((float(bound), s.value))
    out: Vector = []
    for labels, points in groups.items():
        points.sort()
        total = points[-1][1] if points and math.isinf(points[-1][0]) else float("nan")
        if not total or math.isnan(total) or len(points) < 2:
            continue
        rank = q * total
        prev_le, prev_count = 0.0, 0.0
        value = points[-2][0]  # the highest finite bound when the rank is in +Inf
        for upper, count in points:
            if count >= rank:
                if math.isinf(upper):
                    break
                width = count - prev_count
                value = upper if width == 0 else prev_le + (upper - prev_le) * (rank - prev_count) / width
                break
            prev_le, prev_count = upper, count
        out.append(Sample(labels, value))
    return out


def _aggregate(node: Aggregate, vector: Vector) -> Vector:
    groups: dict[Labels, list[float]] = {}
    for s in vector:
        key = (
            _drop(s.labels, [*node.grouping, "__name__"]) if node.without else _keep(s.labels, node.grouping)
        )
        groups.setdefault(key, []).append(s.value)
    fn: dict[str, Callable[[list[float]], float]] = {
        "sum": math.fsum,
        "max": max,
        "min": min,
        "avg": lambda xs: math.fsum(xs) / len(xs),
        "count": lambda xs: float(len(xs)),
    }
    return [Sample(k, fn[node.op](v)) for k, v in groups.items()]


def _arith(op: str, a: float, b: float) -> float:
    try:
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "/":
            return a / b if b != 0 else (math.nan if a == 0 else math.copysign(math.inf, a))
        if op == "%":
            return math.fmod(a, b) if b != 0 else math.nan
        return float(a**b)
    except (OverflowError, ValueError):
        return math.nan


def _compare(op: str, a: float, b: float) -> bool:
    return {
        "==": a == b,
        "!=": a != b,
        ">": a > b,
        "<": a < b,
        ">=": a >= b,
        "<=": a <= b,
    }[op]


def _signature(labels: Labels, node: Binary) -> Labels:
    if node.on is not None:
        return _keep(labels, node.on)
    return _drop(labels, [*node.ignoring, "__name__"])


def _binary(node: Binary, lhs: Value, rhs: Value) -> Value:
    op = node.op
    comparison = op in ("==", "!=", ">", "<", ">=", "<=")
    if op in ("and", "or", "unless"):
        if not isinstance(lhs, list) or not isinstance(rhs, list):
            raise PromQLError(f"`{op}` needs vectors on both sides")
        right = {_signature(s.labels, node) for s in rhs}
        if op == "and":
            return [s for s in lhs if _signature(s.labels, node) in right]
        if op == "unless":
            return [s for s in lhs if _signature(s.labels, node) not in right]
        left = {_signature(s.labels, node) for s in lhs}
        return lhs + [s for s in rhs if _signature(s.labels, node) not in left]
    if isinstance(lhs, float) and isinstance(rhs, float):
        return float(_compare(op, lhs, rhs)) if comparison else _arith(op, lhs, rhs)
    if isinstance(lhs, list) and isinstance(rhs, float):
        if comparison:
            return [s for s in lhs if _compare(op, s.value, rhs)]
        return [Sample(_drop(s.labels, ["__name__"]), _arith(op, s.value, rhs)) for s in lhs]
    if isinstance(lhs, float) and isinstance(rhs, list):
        if comparison:
            return [s for s in rhs if _compare(op, lhs, s.value)]
        return [Sample(_drop(s.labels, ["__name__"]), _arith(op, lhs, s.value)) for s in rhs]
    assert isinstance(lhs, list)
    assert isinstance(rhs, list)
    right_by_sig: dict[Labels, Sample] = {}
    for s in rhs:
        sig = _signature(s.labels, node)
        if sig in right_by_sig:
            raise PromQLError(f"many-to-many match on the right of `{op}`: {dict(sig)}")
        right_by_sig[sig] = s
    out: Vector = []
    for s in lhs:
        sig = _signature(s.labels, node)
        other = right_by_sig.get(sig)
        if other is None:
            continue
        if comparison:
            if _compare(op, s.value, other.value):
                out.append(s)
        else:
            labels = sig if node.on is not None else _drop(s.labels, ["__name__"])
            out.append(Sample(labels, _arith(op, s.value, other.value)))
    return out


def evaluate(node: Node | str, db: TSDB, t: float) -> Value:
    if isinstance(node, str):
        node = parse(node)
    if isinstance(node, Number):
        return node.value
    if isinstance(node, Negate):
        value = evaluate(node.arg, db, t)
        if isinstance(value, float):
            return -value
        return [Sample(_drop(s.labels, ["__name__"]), -s.value) for s in value]
    if isinstance(node, Selector):
        if node.range_s is not None:
            raise PromQLError("a range selector must be the argument of rate/increase/delta")
        return [Sample(labels, points[-1][1]) for labels, points in _select(db, node, t)]
    if isinstance(node, Aggregate):
        inner = evaluate(node.arg, db, t)
        if not isinstance(inner, list):
            raise PromQLError(f"{node.op}() needs a vector")
        return _aggregate(node, inner)
    if isinstance(node, Binary):
        return _binary(node, evaluate(node.lhs, db, t), evaluate(node.rhs, db, t))
    assert isinstance(node, Call)
    if node.name in ("rate", "increase", "delta"):
        return _range_fn(node.name, db, node.args[0], t)
    if node.name == "time":
        return float(t)
    if node.name == "scalar":
        inner = evaluate(node.args[0], db, t)
        if isinstance(inner, float):
            return inner
        return inner[0].value if len(inner) == 1 else math.nan
    q = evaluate(node.args[0], db, t)
    buckets = evaluate(node.args[1], db, t)
    if not isinstance(q, float) or not isinstance(buckets, list):
        raise PromQLError("histogram_quantile(scalar, vector)")
    return histogram_quantile(q, buckets)


def as_vector(value: Value) -> Vector:
    return [Sample(frozenset(), value)] if isinstance(value, float) else value
