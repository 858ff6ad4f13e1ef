"""Measure the HTTP path outside vLLM's TTFT histogram, one request at a time on an idle server.

For N sequential streaming completions: the client's TTFT (request start → first bytes), the
part of it spent in httpx before the request's first byte was written (httpx's `trace`
extension), and the server histogram's mean over the same requests (`/metrics` before and after).
Used for docs/results/load-accuracy.md:

    .venv/bin/python scripts/ttft_gap_probe.py --target http://127.0.0.1:8011 --model tiny-code
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx


def ttft_histogram(client: httpx.Client, target: str) -> tuple[float, float]:
    total = count = 0.0
    for line in client.get(f"{target}/metrics").text.splitlines():
        if line.startswith("vllm:time_to_first_token_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("vllm:time_to_first_token_seconds_count"):
            count = float(line.split()[-1])
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="http://127.0.0.1:8011")
    parser.add_argument("--model", default="tiny-code")
    parser.add_argument("-n", type=int, default=40)
    args = parser.parse_args()
    client = httpx.Client()
    body = {
        "model": args.model,
        "prompt": "def foo(x):\n    return " * 10,
        "max_tokens": 8,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    client_ttft, before_write = [], []
    sum0, count0 = ttft_histogram(client, args.target)
    for _ in range(args.n):
        events: dict[str, float] = {}

        def trace(name: str, info: object, events: dict[str, float] = events) -> None:
            events.setdefault(name, time.perf_counter())

        start = time.perf_counter()
        first = None
        with client.stream(
            "POST", f"{args.target}/v1/completions", json=body, extensions={"trace": trace}
        ) as response:
            for _chunk in response.iter_raw():
                first = first or time.perf_counter()
        assert first is not None
        client_ttft.append(first - start)
        before_write.append(events["http11.send_request_headers.started"] - start)
        time.sleep(0.2)  # idle between requests: no queueing on either side
    sum1, count1 = ttft_histogram(client, args.target)
    server_ms = 1000 * (sum1 - sum0) / (count1 - count0)
    client_ms = 1000 * statistics.mean(client_ttft)
    print(f"requests {count1 - count0:.0f}  client TTFT mean {client_ms:.1f} ms  server {server_ms:.1f} ms")
    print(
        f"gap {client_ms - server_ms:.1f} ms, of which in httpx before the write "
        f"{1000 * statistics.mean(before_write):.2f} ms"
    )


if __name__ == "__main__":
    main()
