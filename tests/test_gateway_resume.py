"""Streams that survive a dead replica (issue 12, item 14), on two real vLLM replicas: one is
SIGKILLed mid-stream, the gateway resumes the stream on the other, and with greedy decoding the
client's text is the unbroken run's, with the whole request's usage.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import httpx
from conftest import StartEngine, free_port, tiny_service

from tokenfleet.engine.gateway.app import create_app
from tokenfleet.engine.gateway.server import ServerThread

TOKENS = 400  # long enough that the kill lands mid-stream (the context is 512)


def events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def test_stream_resumes_on_another_replica_after_sigkill(start_engine: StartEngine, engine_url: str) -> None:
    victim = start_engine(tiny_service())
    greedy = {
        "model": "tiny",
        "prompt": "def f(",
        "max_tokens": TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    unbroken = httpx.post(f"{engine_url}/v1/completions", json=greedy, timeout=120).json()

    service = tiny_service(routing={"policy": "round_robin", "probeIntervalS": 0.2})
    app = create_app(service, [("victim", victim.url), ("survivor", engine_url)])
    gateway = app.state.gateway
    server = ServerThread(app, free_port()).start()
    try:
        deadline = time.monotonic() + 30
        while len(gateway.replicas.routable()) < 2:
            assert time.monotonic() < deadline, "replicas never became ready"
            time.sleep(0.05)
        body = {**greedy, "stream": True, "stream_options": {"include_usage": True}}
        lines: list[str] = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as reply:
            assert reply.headers["x-tokenfleet-replica"] == "victim"  # round robin's first pick
            for line in reply.iter_lines():
                lines.append(line)
                # At the first token: vLLM generates the rest of a tiny model's 400 in well under
                # a second, and the gateway reads ahead of this client.
                if len(events(lines)) == 1 and victim.process is not None:
                    os.killpg(victim.process.pid, signal.SIGKILL)
    finally:
        server.stop()

    received = events(lines)
    assert not any("error" in e for e in received), lines[-3:]
    assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
    text = "".join(c["text"] for e in received for c in e["choices"])
    assert text == unbroken["choices"][0]["text"]  # greedy: the resumed text is the unbroken run's
    usage = received[-1]["usage"]
    assert usage["prompt_tokens"] == unbroken["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == TOKENS
    assert {e["id"] for e in received} == {received[0]["id"]}  # one stream, as the client sees it
    assert all(c.get("token_ids") is None for e in received for c in e["choices"])  # not asked for
    assert gateway.metrics.retries.labels("/v1/completions")._value.get() == 1  # it was resumed
