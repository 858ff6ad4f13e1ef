"""`tokenfleet validate` and `tokenfleet spec` need only the base dependencies (pydantic, PyYAML).

The role command groups (operator, quantize, bench, kernels) register only when asked for, so a
machine with just `pip install tokenfleet` validates specs in a fraction of a second.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tokenfleet.cli import BASE_COMMANDS, ROLE_COMMANDS, build_parser, requested_command

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_YAML = str(ROOT / "examples" / "default.yaml")
# What an engine, a benchmark, the operator or the infra program needs, and validate must not load.
HEAVY = (
    "vllm", "torch", "triton", "transformers", "tokenizers", "locust", "matplotlib", "numpy", "scipy",
    "pulumi", "kopf", "kubernetes", "fastapi", "uvicorn", "prometheus_client", "opentelemetry",
)  # fmt: skip

# Runs one CLI command in a fresh interpreter, then prints the top-level modules it loaded.
PROBE = """
import contextlib, io, json, sys
from tokenfleet.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def _modules_after(*argv: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, done.stderr
    return set(result["modules"])


@pytest.mark.parametrize(
    "argv",
    [
        ("validate", "-f", DEFAULT_YAML),
        ("validate", "--local", "-f", DEFAULT_YAML),
        ("spec", "schema"),
        ("spec", "crd"),
        ("spec", "docs"),
    ],
)
def test_spec_commands_load_no_heavy_module(argv: tuple[str, ...]) -> None:
    loaded = _modules_after(*argv)
    assert not loaded.intersection(HEAVY), sorted(loaded.intersection(HEAVY))


def test_validate_with_json_logs_runs_without_opentelemetry() -> None:
    # A base install has no OpenTelemetry (engine extra): None in sys.modules makes its import fail.
    probe = "import sys; sys.modules['opentelemetry'] = None\n" + PROBE
    done = subprocess.run(
        [sys.executable, "-c", probe, "--log-format", "json", "validate", "-f", DEFAULT_YAML],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["code"] == 0


def test_importing_the_cli_loads_only_the_spec_model() -> None:
    loaded = _modules_after("validate", "-f", DEFAULT_YAML)
    assert {"pydantic", "yaml", "tokenfleet"} <= loaded


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["validate", "-f", "x.yaml"], "validate"),
        (["--log-format", "json", "bench", "run"], "bench"),
        (["--log-format=json", "kernels", "bench"], "kernels"),
        (["-h"], None),
        ([], None),
        (["valdiate"], None),  # a typo: every group registers, so argparse lists all choices
    ],
)
def test_requested_command(argv: list[str], command: str | None) -> None:
    assert requested_command(argv) == command


def _top_level_choices(argv: list[str] | None) -> set[str]:
    parser = build_parser(argv)
    subparsers = parser._subparsers
    assert subparsers is not None
    action = subparsers._group_actions[0]
    assert isinstance(action.choices, dict)
    return set(action.choices)


def test_full_parser_has_every_group_and_a_lazy_one_only_what_it_needs() -> None:
    assert _top_level_choices(None) == BASE_COMMANDS | ROLE_COMMANDS
    assert _top_level_choices(["validate", "-f", "x"]) == BASE_COMMANDS
    assert _top_level_choices(["bench", "run"]) == BASE_COMMANDS | {"bench"}
    assert _top_level_choices(["spec", "crd"]) == BASE_COMMANDS | {"operator"}
    # `spec crd` comes from the operator's registrar, so `spec` must still offer it.
    args = build_parser(["spec", "crd"]).parse_args(["spec", "crd"])
    assert args.spec_command == "crd"


def test_unknown_command_error_lists_every_group(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser(["valdiate"]).parse_args(["valdiate"])
    err = capsys.readouterr().err
    assert "invalid choice" in err
    for name in ROLE_COMMANDS:
        assert name in err
