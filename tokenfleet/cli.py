"""`tokenfleet` — the one console script.

Each subcommand is a small function; heavy imports (vLLM, torch, locust) happen inside the
command that needs them, and the command groups of the roles (operator, quantize, bench, kernels)
are registered only when their command is asked for (or for help), so `tokenfleet validate` and
`tokenfleet spec` load the spec model and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tokenfleet.spec import LLMService, SpecError, default_service, json_schema, load_service, local_problems

Handler = Callable[[argparse.Namespace], int]


def _load(path: str | None) -> LLMService:
    return load_service(path) if path else default_service()


def cmd_validate(args: argparse.Namespace) -> int:
    ok = True
    for path in args.file:
        try:
            service = load_service(path)
        except SpecError as exc:
            ok = False
            print(f"{path}: invalid ({len(exc.errors)} error(s))", file=sys.stderr)
            for field_path, reason in exc.errors:
                print(f"  {field_path}: {reason}", file=sys.stderr)
        except OSError as exc:
            ok = False
            print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
        else:
            problems = local_problems(service) if args.local else []
            if problems:
                ok = False
                print(f"{path}: not runnable by tokenfleet up ({len(problems)} error(s))", file=sys.stderr)
                for field_path, reason in problems:
                    print(f"  {field_path}: {reason}", file=sys.stderr)
            else:
                print(f"{path}: valid LLMService {service.metadata.namespace}/{service.metadata.name}")
    return 0 if ok else 1


def cmd_spec_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_spec_docs(args: argparse.Namespace) -> int:
    from tokenfleet.specdoc import render

    text = render()
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text)
    return 0


def cmd_model_build(args: argparse.Namespace) -> int:
    from tokenfleet.builtin_model.tiny_random import build_tiny_random
    from tokenfleet.models import builtin_path

    out = Path(args.output) if args.output else builtin_path(args.name)
    if args.name == "tiny-random":
        build_tiny_random(out)
        print(f"built tiny-random at {out}")
        return 0
    from tokenfleet.builtin_model.tiny_code import build_tiny_code

    build_tiny_code(out, quick=args.quick, force=args.force)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tokenfleet.engine.serve import serve

    return serve(_load(args.file), port=args.port, host=args.host)


def _default_example() -> str | None:
    # The repository's examples/default.yaml (this file is tokenfleet/cli.py in a checkout).
    path = Path(__file__).resolve().parent.parent / "examples" / "default.yaml"
    return str(path) if path.exists() else None


def cmd_up(args: argparse.Namespace) -> int:
    from tokenfleet.engine.fleet import run_up

    service = _load(args.file)
    problems = local_problems(service)
    if problems:
        for field_path, reason in problems:
            print(f"{field_path}: {reason}", file=sys.stderr)
        return 2
    return run_up(service, replicas=args.replicas, host=args.host, port=args.port)


def cmd_apply(args: argparse.Namespace) -> int:
    from tokenfleet.engine.fleet import apply_spec

    return apply_spec(load_service(args.file), f"http://{args.host}:{args.port}")


def cmd_status(args: argparse.Namespace) -> int:
    from tokenfleet.engine.fleet import print_status

    return print_status(f"http://{args.host}:{args.port}", as_json=args.json)


# Top-level commands defined in this module, and those a role's module registers (lazily).
BASE_COMMANDS = frozenset({"validate", "spec", "model", "serve", "up", "apply", "status"})
ROLE_COMMANDS = frozenset({"operator", "quantize", "bench", "kernels", "soak"})
# Commands that need only the base dependencies (pydantic, PyYAML).
SPEC_ONLY_COMMANDS = frozenset({"validate", "spec"})


def _add_log_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("TOKENFLEET_LOG_FORMAT", "text"),
        help="json: JSON log lines with trace/span ids (default: $TOKENFLEET_LOG_FORMAT or text)",
    )


def requested_command(argv: Sequence[str]) -> str | None:
    """The top-level command `argv` asks for; None for help, no command or an unknown word.

    None means "register every group", so help and argparse's "invalid choice" list them all.
    """
    pre = argparse.ArgumentParser(add_help=False)
    _add_log_format(pre)
    _, rest = pre.parse_known_args(list(argv))
    for arg in rest:
        if arg.startswith("-"):
            return None
        return arg if arg in BASE_COMMANDS | ROLE_COMMANDS else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `argv` only the groups its command needs (plus the base ones)."""
    command = requested_command(argv) if argv is not None else None

    def wants(*names: str) -> bool:
        return command is None or command in names

    parser = argparse.ArgumentParser(prog="tokenfleet", description=__doc__.splitlines()[0])
    _add_log_format(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="validate LLMService files; print every error with its field")
    validate.add_argument("-f", "--file", action="append", required=True, help="service YAML (repeatable)")
    validate.add_argument(
        "--local", action="store_true", help="also refuse fields `tokenfleet up` cannot honour locally"
    )
    validate.set_defaults(handler=cmd_validate)

    spec = sub.add_parser("spec", help="the LLMService spec")
    spec_sub = spec.add_subparsers(dest="spec_command", required=True)
    spec_sub.add_parser("schema", help="print the JSON schema").set_defaults(handler=cmd_spec_schema)
    docs = spec_sub.add_parser("docs", help="render the spec reference (markdown)")
    docs.add_argument("-o", "--output", help="write to this file instead of stdout")
    docs.set_defaults(handler=cmd_spec_docs)
    if wants("spec", "operator"):
        from tokenfleet.operator.cli import register as register_operator

        register_operator(sub, spec_sub)

    model = sub.add_parser("model", help="builtin models")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    build = model_sub.add_parser("build", help="train (tiny-code) or create (tiny-random) a builtin model")
    build.add_argument("--name", choices=["tiny-code", "tiny-random"], default="tiny-code")
    build.add_argument("--output", help="directory (default: the cache)")
    build.add_argument("--quick", action="store_true", help="a few steps only, for tests")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(handler=cmd_model_build)

    serve = sub.add_parser("serve", help="serve one replica of a service with vLLM's OpenAI server")
    serve.add_argument("-f", "--file", help="service YAML (default: the builtin default service)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1")
    serve.set_defaults(handler=cmd_serve)

    up = sub.add_parser("up", help="run the service locally: engine replicas + gateway (Ctrl-C stops)")
    up.add_argument(
        "-f", "--file", default=_default_example(), help="service YAML (default: examples/default.yaml)"
    )
    up.add_argument("--replicas", type=int, help="replica count (default: replicas.min)")
    up.add_argument("--port", type=int, help="gateway port (default: gateway.port)")
    up.add_argument("--host", default="127.0.0.1")
    up.set_defaults(handler=cmd_up)

    apply = sub.add_parser(
        "apply", help="send a changed spec to a running `tokenfleet up`; engine changes roll out"
    )
    apply.add_argument("-f", "--file", required=True, help="service YAML")
    apply.add_argument("--port", type=int, default=8000, help="the gateway's port")
    apply.add_argument("--host", default="127.0.0.1")
    apply.set_defaults(handler=cmd_apply)

    status = sub.add_parser("status", help="replicas and their state, from a running `tokenfleet up`")
    status.add_argument("--port", type=int, default=8000)
    status.add_argument("--host", default="127.0.0.1")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)

    if wants("quantize"):
        from tokenfleet.engine.quantize.cli import register as register_quantize

        register_quantize(sub)
    if wants("bench"):
        # The benchmark modules import their drivers at module level: only `bench` pays for them.
        from tokenfleet.load.autoscale_bench import register as register_autoscale_bench
        from tokenfleet.load.cli import register as register_bench
        from tokenfleet.load.gateway_bench import register as register_gateway_bench
        from tokenfleet.load.scheduler_bench import register as register_scheduler_bench

        bench_sub = register_bench(sub)
        register_scheduler_bench(bench_sub)
        register_gateway_bench(bench_sub)
        register_autoscale_bench(bench_sub)
    if wants("kernels"):
        from tokenfleet.kernels.cli import register as register_kernels

        register_kernels(sub)
    if wants("soak"):
        from tokenfleet.load.soak import register as register_soak

        register_soak(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    if args.log_format == "json":
        try:
            from tokenfleet.observability.logs import setup_logging
        except ImportError:
            # JSON logs need OpenTelemetry (the engine extra); validate and spec print their
            # results and must run on a base install even with $TOKENFLEET_LOG_FORMAT=json.
            if args.command not in SPEC_ONLY_COMMANDS:
                raise
        else:
            # `up` runs the gateway and the control loop in this process: their logs go JSON too.
            setup_logging(f"tokenfleet-{args.command}")
    handler: Handler = args.handler
    try:
        return handler(args)
    except SpecError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
