"""`tokenfleet serve`: one vLLM replica in the foreground, its logs streamed, drained on Ctrl-C."""

from __future__ import annotations

import signal
import sys
import time
from types import FrameType

from tokenfleet.engine.launch import EngineProcess, engine_command
from tokenfleet.models import resolve_model
from tokenfleet.spec import LLMService


def serve(service: LLMService, *, port: int = 8000, host: str = "127.0.0.1") -> int:
    spec = service.spec
    print(f"tokenfleet: resolving model {spec.model.source}", flush=True)
    model_path = resolve_model(spec.model)
    command = engine_command(spec, model_path, port=port, host=host)
    engine = EngineProcess(command, port=port)  # logs go straight to our stdout/stderr
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    # Ctrl-C reaches the whole foreground process group; vLLM is in its own session, so we
    # forward one SIGTERM and let it drain for engine.shutdownTimeoutS.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        engine.start()
        started = time.monotonic()
        while not stopping:
            try:
                engine.wait_ready(timeout_s=1.0)
                break
            except TimeoutError:
                if time.monotonic() - started > 600:
                    raise
        if not stopping:
            url = f"http://{host}:{port}/v1"
            ready_s = time.monotonic() - started
            print(f"tokenfleet: serving {spec.model.name} at {url} (ready in {ready_s:.1f}s)", flush=True)
        while not stopping and engine.is_running():
            time.sleep(0.2)
    except RuntimeError as exc:
        print(f"tokenfleet: {exc}", file=sys.stderr)
        return 1
    finally:
        print("tokenfleet: stopping (draining in-flight requests)", flush=True)
        code = engine.stop(timeout_s=spec.engine.shutdown_timeout_s + 30)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopping else (code or 1)
