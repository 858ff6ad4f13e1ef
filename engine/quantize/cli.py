"""`tokenfleet quantize -c pipeline.yaml`: the pipeline's command (registered by tokenfleet.cli)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cmd_quantize(args: argparse.Namespace) -> int:
    from tokenfleet.engine.quantize.config import PipelineConfigError, load_config, parse_config
    from tokenfleet.engine.quantize.pipeline import PipelineError, dry_run, prepare, run_pipeline

    try:
        config = load_config(args.config) if args.config else parse_config({}, "<defaults>")
        if args.report:
            config = config.model_copy(update={"report": args.report})
        prep = prepare(config)
    except (PipelineConfigError, PipelineError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"quantize: cannot read {args.config}: {exc.strerror}", file=sys.stderr)
        return 2
    if args.dry_run:
        for name, action in dry_run(prep, args.rerun):
            print(f"{action:4}  {name}")
        return 0
    try:
        run_pipeline(prep, progress=sys.stderr, rerun=args.rerun)
    except (RuntimeError, TimeoutError, OSError) as exc:
        # Finished steps are recorded: the same command resumes at the step that failed.
        print(f"quantize: {exc}\nrerun the same command to resume from this step", file=sys.stderr)
        return 1
    return 0


def register(subparsers: Any) -> None:
    quantize = subparsers.add_parser(
        "quantize", help="quantize a model with several techniques, evaluate side by side, report"
    )
    quantize.add_argument("-c", "--config", help="pipeline YAML (default: every CPU technique on tiny-code)")
    quantize.add_argument("--report", help="write the markdown report here (overrides the config's report)")
    quantize.add_argument("--dry-run", action="store_true", help="validate and show which steps would run")
    quantize.add_argument(
        "--rerun",
        action="append",
        default=[],
        metavar="PATTERN",
        help="run matching steps even if unchanged, e.g. 'eval:*' (repeatable)",
    )
    quantize.set_defaults(handler=cmd_quantize)
