"""`tokenfleet serve`: real vLLM from a spec file; SIGTERM drains an in-flight stream before exit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port, tiny_service

pytestmark = pytest.mark.vllm


def _stream_tokens(
    url: str, max_tokens: int, first_chunk: threading.Event, result: dict[str, object]
) -> None:
    body = {
        "model": "served",
        "prompt": "def main(",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            result["status"] = response.status_code
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    result["done"] = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result["completion_tokens"] = chunk["usage"]["completion_tokens"]
                first_chunk.set()
    except httpx.HTTPError as exc:
        result["error"] = repr(exc)
    finally:
        first_chunk.set()


def test_serve_prints_url_and_drains_on_sigterm(tmp_path: Path) -> None:
    service = tiny_service("served", engine={"maxNumSeqs": 2, "shutdownTimeoutS": 60})
    spec_file = tmp_path / "service.yaml"
    spec_file.write_text(yaml.safe_dump(service.model_dump(by_alias=True, mode="json")))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenfleet.cli", "serve", "-f", str(spec_file), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + 300
        ready_line = ""
        for line in proc.stdout:
            if "tokenfleet: serving" in line:
                ready_line = line
                break
            assert time.monotonic() < deadline, "serve did not become ready"
        assert f"http://127.0.0.1:{port}/v1" in ready_line
        # Keep draining stdout so vLLM never blocks on a full pipe.
        tail: list[str] = []
        reader = threading.Thread(target=lambda: tail.extend(proc.stdout or []), daemon=True)
        reader.start()

        url = f"http://127.0.0.1:{port}"
        first_chunk, result = threading.Event(), {}
        client = threading.Thread(target=_stream_tokens, args=(url, 200, first_chunk, result))
        client.start()
        assert first_chunk.wait(60)
        proc.send_signal(signal.SIGTERM)
        client.join(120)
        assert proc.wait(timeout=120) == 0
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert result.get("status") == 200, result
    assert result.get("done") is True, result
    assert result.get("completion_tokens") == 200, result
    assert any("draining" in line for line in tail)
