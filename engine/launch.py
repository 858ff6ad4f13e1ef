"""Map an LLMService spec to the stock vLLM OpenAI server: its argv and environment.

`engine_command` is a pure function of the spec (tested without vLLM); `EngineProcess` is the
thin layer that starts the process, waits until it serves, and drains it on shutdown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from tokenfleet.engine.sla_contract import SPEC_ENV
from tokenfleet.kernels.names import KERNELS_ENV, custom_ops_for
from tokenfleet.observability.otlp_endpoint import TraceExport
from tokenfleet.spec import LLMServiceSpec

SLA_SCHEDULER_CLS = "tokenfleet.engine.sla_scheduler.SLAScheduler"
TIMED_SCHEDULER_CLS = "tokenfleet.engine.sla_scheduler.TimedScheduler"
PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True, slots=True)
class EngineCommand:
    argv: list[str]
    env: dict[str, str]


def engine_command(
    spec: LLMServiceSpec,
    model_path: str,
    *,
    port: int,
    host: str = "127.0.0.1",
    python: str = sys.executable,
    traces: TraceExport | None = None,
) -> EngineCommand:
    """The vLLM server command line for one replica of `spec` serving `model_path`.

    With `traces` vLLM exports one `llm_request` span per request there, parented by the
    gateway's `traceparent` header.
    """
    model, engine = spec.model, spec.engine
    argv = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_path,
        "--served-model-name",
        model.name,
        "--host",
        host,
        "--port",
        str(port),
        "--max-model-len",
        str(model.max_model_len),
        "--dtype",
        model.dtype,
        "--max-num-seqs",
        str(engine.max_num_seqs),
        "--gpu-memory-utilization",
        str(engine.gpu_memory_utilization),
        "--shutdown-timeout",
        str(engine.shutdown_timeout_s),
        "--disable-uvicorn-access-log",
        f"-O{engine.optimization_level}",
    ]
    if model.quantization != "none":
        # model_path is then a local compressed-tensors checkpoint (models.resolve_model), so a
        # source revision does not apply; naming the method makes vLLM refuse a directory that
        # is not such a checkpoint instead of silently serving full precision.
        argv += ["--quantization", "compressed-tensors"]
    elif model.source.startswith("hf://") and "@" in model.source:
        argv += ["--revision", model.source.split("@", 1)[1]]
    if engine.device == "gpu":
        argv += ["--tensor-parallel-size", str(engine.tensor_parallel_size)]
    policy = spec.scheduler.policy
    if policy == "priority":
        argv += ["--scheduling-policy", "priority"]
    elif policy == "sla":
        # The SLA scheduler orders by its own keys but relies on vLLM's priority-mode victim choice.
        argv += ["--scheduling-policy", "priority", "--scheduler-cls", SLA_SCHEDULER_CLS]
    if traces:
        argv += ["--otlp-traces-endpoint", traces.url]
    if custom_ops := custom_ops_for(engine.kernels):
        # The kernels plugin swaps these layers for ours; custom_ops switches them on.
        argv += ["--compilation-config", json.dumps({"custom_ops": custom_ops})]
    argv += list(engine.extra_args)

    env = {
        # -P semantics: never put the working directory on sys.path, so no folder of ours can
        # shadow a module (the repo has top-level folders named `operator` and `kernels`).
        "PYTHONSAFEPATH": "1",
        "VLLM_LOGGING_LEVEL": "INFO",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1" if not model.source.startswith("hf://") else "0",
    }
    if engine.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = _gib_str(engine.kv_cache_gib)
    if traces:
        # vLLM defaults to OTLP/gRPC; the collector and the gateway speak OTLP/HTTP protobuf.
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
        # vLLM names no service: without this its spans say `unknown_service`.
        env["OTEL_SERVICE_NAME"] = traces.service_name
    if engine.kernels:
        env[KERNELS_ENV] = ",".join(engine.kernels)
    if policy == "sla":
        env[SPEC_ENV] = spec.scheduler.model_dump_json(by_alias=True)
    return EngineCommand(argv=argv, env=env)


def _gib_str(gib: float) -> str:
    # VLLM_CPU_KVCACHE_SPACE is an integer number of GiB.
    return str(max(1, round(gib)))


# What an engine process may see of its parent's environment: runtime and library settings, not
# credentials (API keys of the gateway, cloud keys) that a model's code could read.
ENV_PREFIXES = (
    "VLLM_", "OMP_", "KMP_", "MKL_", "OPENBLAS_", "TORCH", "CUDA", "NVIDIA_", "NCCL_", "TRITON_",
    "HF_HOME", "HF_HUB_", "TRANSFORMERS_", "PYTHON", "COVERAGE", "LC_", "OTEL_", "XDG_", "TOKENFLEET_",
)  # fmt: skip
ENV_NAMES = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "TERM", "SHELL", "VIRTUAL_ENV",
        "LD_LIBRARY_PATH", "LD_PRELOAD", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy",
        "https_proxy", "no_proxy", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", PROMETHEUS_MULTIPROC_ENV,
    }
)  # fmt: skip
ENV_SECRETS = frozenset({"TOKENFLEET_API_KEYS"})


def engine_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment less everything an engine does not need (secrets above all)."""
    return {
        name: value
        for name, value in environ.items()
        if name not in ENV_SECRETS and (name in ENV_NAMES or name.startswith(ENV_PREFIXES))
    }


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux PR_SET_PDEATHSIG), so a
    SIGKILLed `tokenfleet up` cannot leave engines holding ports, CPU and memory."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


@dataclass
class EngineProcess:
    """One vLLM server process: start, wait until ready, drain on stop."""

    command: EngineCommand
    port: int
    log_path: Path | None = None
    cwd: Path | None = None
    # Only for processes started from a thread that lives as long as the parent (the fleet's
    # event loop): the kernel sends the signal when the *thread* that forked exits.
    die_with_parent: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log: IO[bytes] | None = field(default=None, init=False)
    _metrics_dir: str | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, extra_env: Mapping[str, str] | None = None) -> None:
        env = {**engine_environment(os.environ), **self.command.env, **(extra_env or {})}
        ours = SPEC_ENV in env or TIMED_SCHEDULER_CLS in self.command.argv
        if ours and PROMETHEUS_MULTIPROC_ENV not in env:
            # Our schedulers' metrics live in the EngineCore process; in prometheus_client's
            # multiprocess mode vLLM's /metrics aggregates them (ADR 0004). Fresh dir per start.
            self._metrics_dir = tempfile.mkdtemp(prefix="tokenfleet-prom-")
            env[PROMETHEUS_MULTIPROC_ENV] = self._metrics_dir
        stdout: int | IO[bytes] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("ab")
            stdout = self._log
        self.process = subprocess.Popen(
            self.command.argv,
            env=env,
            cwd=self.cwd,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            start_new_session=True,
            preexec_fn=_die_with_parent if self.die_with_parent and sys.platform == "linux" else None,
        )

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Block until /v1/models answers; return seconds waited. Raise if the process died."""
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if not self.is_running():
                code = self.process.returncode if self.process else None
                raise RuntimeError(f"vLLM exited with code {code} before it was ready{self._log_hint()}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2.0).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM not ready after {timeout_s:.0f}s{self._log_hint()}")

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM (vLLM drains for --shutdown-timeout), then SIGKILL the group if it overstays."""
        if self.process is None:
            return None
        stop_process_group(self.process, signal.SIGTERM, timeout_s if timeout_s is not None else 60)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._metrics_dir = None
        return self.process.returncode

    def _log_hint(self) -> str:
        return f"; see {self.log_path}" if self.log_path else ""


def stop_process_group(process: subprocess.Popen[bytes], sig: int, timeout_s: float) -> None:
    """Send `sig` to a child that leads its own session, if it still runs, and wait up to
    `timeout_s` for it; SIGKILL its whole process group if it overstays."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
