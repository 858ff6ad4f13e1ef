"""`tokenfleet kernels …` subcommands; torch and Triton load only when a command runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results"


def cmd_kernels_bench(args: argparse.Namespace) -> int:
    if args.smoke:
        # Before any kernel module is imported: triton.jit picks interpreter or compiler then.
        os.environ["TRITON_INTERPRET"] = "1"
    from tokenfleet.kernels.bench import run

    return run(Path(args.out), smoke=args.smoke, budget_s=args.budget_s, suite=args.suite)


def register(subparsers: Any) -> None:
    kernels = subparsers.add_parser("kernels", help="Triton kernels")
    sub = kernels.add_subparsers(dest="kernels_command", required=True)
    bench = sub.add_parser("bench", help="time every kernel and optimisation step (GPU; --smoke on CPU)")
    bench.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET")
    bench.add_argument("--out", default=str(DEFAULT_OUT), help="results directory (default docs/results)")
    bench.add_argument(
        "--budget-s", type=float, default=200.0, help="stop measuring after this many seconds (default 200)"
    )
    bench.add_argument(
        "--suite",
        choices=["all", "decode"],
        default="all",
        help="all kernels, or only the decode GEMV vs the 16-bit matmul and the GEMM (-decode files)",
    )
    bench.set_defaults(handler=cmd_kernels_bench)
