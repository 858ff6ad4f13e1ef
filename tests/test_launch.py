"""The spec -> vLLM command mapping is a pure function: test it without vLLM."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import tiny_service

from tokenfleet.engine.launch import SLA_SCHEDULER_CLS, EngineCommand, EngineProcess, engine_command
from tokenfleet.spec import load_service, parse_service


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_cpu_command_maps_spec_fields() -> None:
    service = tiny_service("svc")
    command = engine_command(service.spec, "/models/x", port=9001)
    argv = command.argv
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(argv, "--model") == "/models/x"
    assert _flag(argv, "--served-model-name") == "svc"
    assert _flag(argv, "--port") == "9001"
    assert _flag(argv, "--max-model-len") == "512"
    assert _flag(argv, "--shutdown-timeout") == "5"
    assert "-O0" in argv
    assert command.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert command.env["PYTHONSAFEPATH"] == "1"


def test_default_policy_runs_the_sla_scheduler() -> None:
    # A spec that names no policy gets the SLA scheduler: what `tokenfleet up` runs out of the box.
    header = {"apiVersion": "tokenfleet.dev/v1alpha1", "kind": "LLMService", "metadata": {"name": "svc"}}
    unset = parse_service({**header, "spec": {}})
    command = engine_command(unset.spec, "/models/x", port=9001)
    assert _flag(command.argv, "--scheduler-cls") == SLA_SCHEDULER_CLS
    assert _flag(command.argv, "--scheduling-policy") == "priority"
    assert "standard" in command.env["TOKENFLEET_SCHEDULER_SPEC"]
    default = load_service(Path(__file__).resolve().parent.parent / "examples" / "default.yaml")
    assert default.spec.scheduler.policy == "sla"


def test_policies_map_to_vllm_flags() -> None:
    # fcfs (what tiny_service states) is vLLM's own order: no scheduler class of ours, no flag.
    fcfs = engine_command(tiny_service().spec, "m", port=1)
    assert "--scheduler-cls" not in fcfs.argv
    assert "--scheduling-policy" not in fcfs.argv
    assert "TOKENFLEET_SCHEDULER_SPEC" not in fcfs.env
    prio = engine_command(tiny_service(scheduler={"policy": "priority"}).spec, "m", port=1).argv
    assert _flag(prio, "--scheduling-policy") == "priority"
    sla = engine_command(tiny_service(scheduler={"policy": "sla"}).spec, "m", port=1)
    assert _flag(sla.argv, "--scheduler-cls") == SLA_SCHEDULER_CLS
    assert "interactive" in sla.env["TOKENFLEET_SCHEDULER_SPEC"]


def test_gpu_command_has_tensor_parallel_and_revision() -> None:
    service = parse_service(
        {
            "apiVersion": "tokenfleet.dev/v1alpha1",
            "kind": "LLMService",
            "metadata": {"name": "g"},
            "spec": {
                "model": {"source": "hf://org/model@v2"},
                "engine": {
                    "device": "gpu",
                    "gpusPerReplica": 2,
                    "tensorParallelSize": 2,
                    "extraArgs": ["--x"],
                },
            },
        }
    )
    command = engine_command(service.spec, "org/model", port=1)
    assert _flag(command.argv, "--tensor-parallel-size") == "2"
    assert _flag(command.argv, "--revision") == "v2"
    assert command.argv[-1] == "--x"
    assert "VLLM_CPU_KVCACHE_SPACE" not in command.env


def test_engines_see_runtime_settings_but_no_credentials() -> None:
    from tokenfleet.engine.launch import engine_environment

    env = engine_environment(
        {
            "PATH": "/bin",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "OMP_NUM_THREADS": "2",
            "HF_TOKEN": "hf_x",
            "TOKENFLEET_API_KEYS": "k1=acme",
            "OPENAI_API_KEY": "sk-x",
            "AWS_SECRET_ACCESS_KEY": "s",
            "GITHUB_TOKEN": "g",
        }
    )
    assert env == {"PATH": "/bin", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2", "HF_TOKEN": "hf_x"}


def test_an_engine_started_to_die_with_its_parent_dies_when_the_parent_is_sigkilled() -> None:
    """The fleet's engines get PR_SET_PDEATHSIG: a SIGKILLed `tokenfleet up` takes them along."""
    import os
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from tokenfleet.engine.launch import EngineCommand, EngineProcess\n"
            "child = EngineProcess(EngineCommand([sys.executable, '-c', 'import time; time.sleep(120)'], {}),"
            " port=1, die_with_parent=True)\n"
            "child.start()\n"
            "print(child.process.pid, flush=True)\n"
            "time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # running
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            state = Path(f"/proc/{child}/stat").read_text().split()[2]
        except OSError:
            break  # gone
        if state == "Z":
            break
        assert time.monotonic() < deadline, "the engine outlived its parent"
        time.sleep(0.05)


def test_engine_output_and_exit_noise_go_to_the_replica_log_not_the_terminal(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # What an engine prints, including Triton's nanobind leak report at interpreter exit, stays in
    # its log file: the terminal of `tokenfleet up` shows only the fleet's own lines.
    script = (
        "import sys; print('engine says hello', flush=True);"
        " print('nanobind: leaked 4 instances!', file=sys.stderr)"
    )
    log = tmp_path / "logs" / "r0.log"
    engine = EngineProcess(EngineCommand([sys.executable, "-c", script], {}), port=1, log_path=log)
    engine.start()
    assert engine.process is not None
    assert engine.process.wait(timeout=60) == 0
    assert engine.stop() == 0
    out, err = capfd.readouterr()
    assert "engine says hello" not in out + err
    assert "nanobind" not in out + err
    text = log.read_text()
    assert "engine says hello" in text
    assert "nanobind: leaked 4 instances!" in text
