"""Prometheus text exposition: the one place the project turns `/metrics` text into numbers.

Two readers. `samples` and the helpers over it use `prometheus_client`'s own parser (benchmarks,
the operator's scrapes, tests). `series_sums` and `series_samples` are a targeted line scan for
the gateway's hot path: it reads every replica's ~40 KB vLLM page every probe interval, and the
full parser over it costs more than the rest of a probe; the scan reads only the named series'
sample lines (label values with escaped quotes are not supported, as no series read here has one).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

_LABEL = re.compile(r'(\w+)="([^"]*)"')


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


@functools.lru_cache(maxsize=16)
def _lines_of(names: tuple[str, ...]) -> re.Pattern[str]:
    # Starts with a literal (the names' common prefix), so `re` skips ahead with a fast substring
    # search; anchoring with `^` instead makes it try every position. A name must be followed by
    # its labels or the space before the value, so a longer name that starts alike never matches.
    prefix = _common_prefix(names)
    alternatives = "|".join(re.escape(n[len(prefix) :]) for n in names)
    return re.compile(f"({re.escape(prefix)}(?:{alternatives}))" + r"(?:\{([^}]*)\})? (\S+)", re.MULTILINE)


def _common_prefix(names: tuple[str, ...]) -> str:
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    return prefix


def _scan(text: str, names: Iterable[str]) -> Iterator[tuple[str, str, float]]:
    """(name, raw label text, value) of each sample line of the `names` series."""
    wanted = tuple(sorted(set(names), key=len, reverse=True))  # longest first: no prefix shadows
    if not wanted:
        return
    for match in _lines_of(wanted).finditer(text):
        start = match.start()
        if start and text[start - 1] != "\n":
            continue  # inside another line (a # HELP comment names the series too)
        try:
            number = float(match.group(3))
        except ValueError:
            continue
        yield match.group(1), match.group(2) or "", number


def series_samples(text: str, names: Iterable[str]) -> Iterator[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample line of the `names` series, by a line scan."""
    for name, labels, number in _scan(text, names):
        yield name, dict(_LABEL.findall(labels)), number


def series_sums(text: str, names: Iterable[str]) -> dict[str, float]:
    """{name: value summed over its label sets} for `names` (0 for one that is absent); the
    labels are not parsed, as sums need none."""
    wanted = tuple(names)
    sums = dict.fromkeys(wanted, 0.0)
    for name, _, number in _scan(text, wanted):
        sums[name] += number
    return sums
