"""The spec -> vLLM command mapping is a pure function: test it without vLLM."""

from __future__ import annotations

from conftest import tiny_service

from tokenfleet.engine.launch import SLA_SCHEDULER_CLS, engine_command
from tokenfleet.spec import parse_service


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
    assert "--scheduler-cls" not in argv
    assert command.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert command.env["PYTHONSAFEPATH"] == "1"


def test_policies_map_to_vllm_flags() -> None:
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
