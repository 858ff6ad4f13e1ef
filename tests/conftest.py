"""Shared fixtures. A real vLLM server (CPU build, tiny-random model) starts once per session."""

from __future__ import annotations

import asyncio
import atexit
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tokenfleet.engine.fleet import free_port
from tokenfleet.engine.launch import EngineProcess, engine_command
from tokenfleet.models import ensure_builtin
from tokenfleet.spec import LLMService, parse_service

# Where the test process's interpreter-exit diagnostics go once Triton was loaded (see below).
EXIT_STDERR_LOG = Path(__file__).resolve().parent.parent / "build" / "pytest-exit-stderr.log"

# Overridable: on a shared 2-core machine under load a CPU engine can take several minutes.
ENGINE_START_TIMEOUT_S = float(os.environ.get("TOKENFLEET_ENGINE_START_TIMEOUT_S", "600"))


def tiny_service(name: str = "tiny", **spec_overrides: object) -> LLMService:
    """A small CPU service on the random-weight builtin model: fast to start, cheap to run.

    It states `scheduler.policy: fcfs` (the spec's default is `sla`): the shared engine serves the
    plumbing tests (gateway vs direct byte comparisons, resume, load) in vLLM's own order; the
    SLA scheduler's tests ask for `sla` themselves (a `scheduler=` override without a policy keeps
    fcfs).
    """
    overrides = dict(spec_overrides)
    scheduler = overrides.pop("scheduler", {})
    assert isinstance(scheduler, dict)
    spec: dict[str, object] = {
        "model": {"name": name, "source": "builtin://tiny-random", "maxModelLen": 512},
        "engine": {"maxNumSeqs": 8, "kvCacheGib": 1, "shutdownTimeoutS": 5},
        "scheduler": {"policy": "fcfs", **scheduler},
    }
    spec.update(overrides)
    return parse_service(
        {
            "apiVersion": "tokenfleet.dev/v1alpha1",
            "kind": "LLMService",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


StartEngine = Callable[..., EngineProcess]


@pytest.fixture(scope="session")
def start_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartEngine]:
    """Factory: start a real vLLM server for a service; every one started is stopped at the end."""
    started: list[EngineProcess] = []
    logs = tmp_path_factory.mktemp("engine-logs")

    def start(service: LLMService | None = None, port: int | None = None) -> EngineProcess:
        service = service or tiny_service()
        model_path = ensure_builtin(service.spec.model.source.removeprefix("builtin://"))
        port = port or free_port()
        command = engine_command(service.spec, str(model_path), port=port)
        engine = EngineProcess(command, port=port, log_path=logs / f"engine-{port}.log", cwd=logs)
        engine.start()
        started.append(engine)
        engine.wait_ready(ENGINE_START_TIMEOUT_S)
        return engine

    yield start
    for engine in started:
        engine.stop(timeout_s=30)


@pytest.fixture(scope="session")
def engine(start_engine: StartEngine) -> EngineProcess:
    """The one shared vLLM server (model name `tiny`). Tests must not stop it."""
    return start_engine(tiny_service())


@pytest.fixture(scope="session")
def engine_url(engine: EngineProcess) -> str:
    return engine.url


@pytest.fixture(scope="module")
def event_loop_for_pulumi() -> Iterator[None]:
    """Pulumi's SDK (mocks included) calls asyncio.get_event_loop(); after any asyncio.run() in
    the same process there is none (run() unsets it), so Pulumi tests bring their own."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()


def _stderr_to_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


def pytest_unconfigure(config: pytest.Config) -> None:
    """After the summary, send the interpreter's exit diagnostics to a file, if Triton was loaded.

    Tests that load vLLM or our kernels import Triton, whose nanobind bindings print hundreds of
    "nanobind: leaked ..." lines while the interpreter shuts down (nanobind offers no switch for
    it outside C++, and Triton silences the same report in its own workers). Kept, not dropped:
    CI's log says where they are.
    """
    if "triton" not in sys.modules:
        return
    print(f"\n(interpreter-exit diagnostics of this test process: {EXIT_STDERR_LOG})", file=sys.stderr)
    atexit.register(_stderr_to_file, EXIT_STDERR_LOG)


def painted_pixels(page: Any, canvas_id: str) -> int:
    """Non-transparent pixels of a canvas in a Playwright page: whether a chart was drawn."""
    script = """(id) => { const c = document.getElementById(id);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""
    return int(page.evaluate(script, canvas_id))
