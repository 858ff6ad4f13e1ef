"""`tokenfleet bench ...`: the load harness's subcommands.

`register(subparsers)` adds the `bench` group and returns its sub-parsers, so other benchmarks
(`bench scheduler`, `bench gateway`) add their own commands next to `run` and `compare`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tokenfleet.load.workload import WorkloadError

DEFAULT_WORKLOAD = Path(__file__).resolve().parent / "workloads" / "default.yaml"


def cmd_bench_run(args: argparse.Namespace) -> int:
    from tokenfleet.load.bench import BenchError, run_repeated

    try:
        result = run_repeated(
            args.workload,
            args.target,
            args.duration,
            args.out,
            repeat=args.repeat,
            web=args.web,
            web_port=args.web_port,
            workers=args.workers,
            progress=None if args.quiet else sys.stderr,
        )
    except WorkloadError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 3
    print((result.dir / "report.md").read_text(encoding="utf-8"))
    print(f"results: {result.dir}" + (" (interrupted: partial results)" if result.interrupted else ""))
    return 130 if result.interrupted else 0


def cmd_bench_compare(args: argparse.Namespace) -> int:
    from tokenfleet.load.compare import compare, load_summary, render_comparison

    try:
        a, b = load_summary(args.run_a), load_summary(args.run_b)
    except (OSError, ValueError) as exc:
        print(f"bench compare: cannot read a run: {exc}", file=sys.stderr)
        return 2
    print(render_comparison(compare(a, b), args.run_a, args.run_b), end="")
    return 0


def register(subparsers: Any) -> Any:
    """Add `bench run` and `bench compare`; return the `bench` sub-parsers for other commands."""
    bench = subparsers.add_parser("bench", help="load tests and benchmarks (Locust harness)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)

    run = bench_sub.add_parser("run", help="run a workload against an OpenAI-compatible target")
    run.add_argument(
        "-w", "--workload", default=str(DEFAULT_WORKLOAD), help="workload YAML (default: the builtin)"
    )
    run.add_argument("--target", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    run.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    run.add_argument("--out", default="runs/latest", help="results directory (default runs/latest)")
    run.add_argument("--web", action="store_true", help="serve Locust's web UI on localhost while running")
    run.add_argument("--web-port", type=int, default=8089)
    run.add_argument(
        "--workers", type=int, default=1, help="Locust worker processes (master/workers locally)"
    )
    run.add_argument("--repeat", type=int, default=1, help="repeat N times; report mean ± 95%% CI")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    run.set_defaults(handler=cmd_bench_run)

    comp = bench_sub.add_parser("compare", help="compare two result directories (B − A, 95%% CIs)")
    comp.add_argument("run_a")
    comp.add_argument("run_b")
    comp.set_defaults(handler=cmd_bench_compare)
    return bench_sub
