"""The server's own view: vLLM's Prometheus `/metrics`, scraped during a run on the client's clock.

`parse_prometheus` is pure (text → {series name: value summed over label sets}); `Scraper` is a
thread that polls every `interval_s` and appends each sample to a JSONL file, so a killed run
still has its server timeline. Histogram buckets are dropped (sum and count give the means).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tokenfleet.observability import promtext

KEEP_PREFIXES = ("vllm:",)
# Series the report plots, with the older spellings vLLM used for the same thing.
QUEUE = ("vllm:num_requests_waiting",)
RUNNING = ("vllm:num_requests_running",)
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
PREEMPTIONS = ("vllm:num_preemptions_total", "vllm:num_preemptions")
TTFT_SUM = "vllm:time_to_first_token_seconds_sum"
TTFT_COUNT = "vllm:time_to_first_token_seconds_count"


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum every sample of a `vllm:` series over its labels (one engine serves one model)."""
    return promtext.summed(text, KEEP_PREFIXES)


def first_of(sample: dict[str, float], names: tuple[str, ...]) -> float | None:
    return next((sample[n] for n in names if n in sample), None)


def histogram_mean(before: dict[str, float], after: dict[str, float], base: str) -> tuple[float, int] | None:
    """Mean of a histogram over a window: Δsum / Δcount (what PromQL's rate(_sum)/rate(_count) gives)."""
    try:
        count = after[f"{base}_count"] - before.get(f"{base}_count", 0.0)
        total = after[f"{base}_sum"] - before.get(f"{base}_sum", 0.0)
    except KeyError:
        return None
    if count <= 0:
        return None
    return total / count, round(count)


def scrape_once(client: httpx.Client, url: str, timeout_s: float = 5.0) -> dict[str, float]:
    response = client.get(url.rstrip("/") + "/metrics", timeout=timeout_s)
    response.raise_for_status()
    return parse_prometheus(response.text)


@dataclass
class Scraper:
    url: str
    path: Path
    interval_s: float = 1.0
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metrics-scraper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def last(self) -> dict[str, float]:
        return self.samples[-1][1] if self.samples else {}

    def record(self, t: float, sample: dict[str, float]) -> None:
        self.samples.append((t, sample))
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps({"t": t, "metrics": sample}) + "\n")

    def sample_now(self, client: httpx.Client) -> bool:
        t = time.time()
        try:
            sample = scrape_once(client, self.url)
        except (httpx.HTTPError, ValueError):
            # A busy or restarting server (or a cut-off exposition) must not end the run; the gap
            # shows in the plot.
            self.errors += 1
            return False
        self.record(t, sample)
        return True

    def _run(self) -> None:
        with httpx.Client() as client:
            while not self._stop.wait(self.interval_s):
                self.sample_now(client)


def read_samples(path: Path) -> list[tuple[float, dict[str, float]]]:
    if not path.exists():
        return []
    samples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            samples.append((float(row["t"]), {k: float(v) for k, v in row["metrics"].items()}))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return samples
