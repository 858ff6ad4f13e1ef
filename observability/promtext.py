"""Prometheus text exposition, read with `prometheus_client`'s own parser: the one place the
project turns `/metrics` text into numbers (benchmarks, the operator's scrapes, tests)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True, slots=True)
class Sample:
    name: str  # as exposed: counters end in `_total`, histograms in `_bucket`/`_sum`/`_count`
    labels: Mapping[str, str]
    value: float

    @property
    def key(self) -> str:
        """`name{k="v",...}` with labels sorted: a stable key for before/after deltas."""
        if not self.labels:
            return self.name
        inner = ",".join(f'{k}="{v}"' for k, v in sorted(self.labels.items()))
        return f"{self.name}{{{inner}}}"


def samples(text: str) -> Iterator[Sample]:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield Sample(sample.name, sample.labels, float(sample.value))


def flat(text: str) -> dict[str, float]:
    """Every sample by `Sample.key`, `_created` timestamps left out (they are not values)."""
    return {s.key: s.value for s in samples(text) if not s.name.endswith("_created")}


def value(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    return sum(
        s.value
        for s in samples(text)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def summed(text: str, prefixes: Iterable[str]) -> dict[str, float]:
    """{series name: value summed over its label sets} for names starting with `prefixes`;
    histogram buckets and `_created` timestamps are dropped (sum and count give the means)."""
    wanted = tuple(prefixes)
    out: dict[str, float] = {}
    for s in samples(text):
        if not s.name.startswith(wanted) or s.name.endswith(("_bucket", "_created")):
            continue
        out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def by_label(text: str, name: str, label: str, **where: str) -> dict[str, float]:
    """{value of `label`: sum of `name`'s samples} over samples whose labels include `where`."""
    out: dict[str, float] = {}
    for s in samples(text):
        if s.name != name or label not in s.labels or any(s.labels.get(k) != v for k, v in where.items()):
            continue
        out[s.labels[label]] = out.get(s.labels[label], 0.0) + s.value
    return out
