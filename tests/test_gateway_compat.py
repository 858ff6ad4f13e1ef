"""The gateway against a real vLLM (issue 12, item 12): every request form the OpenAI API and
vLLM accept goes through the gateway and comes back in the shape vLLM gives when called directly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import free_port, tiny_service

from tokenfleet.engine.gateway.app import Gateway, create_app
from tokenfleet.engine.gateway.server import ServerThread

GREEDY = {"model": "tiny", "temperature": 0.0, "max_tokens": 4}
FORMS: list[tuple[str, str, dict[str, Any]]] = [
    ("text", "/v1/completions", {**GREEDY, "prompt": "def f("}),
    ("texts", "/v1/completions", {**GREEDY, "prompt": ["def f(", "class A"]}),
    ("token ids", "/v1/completions", {**GREEDY, "prompt": [1, 2, 3, 4]}),
    ("token id lists", "/v1/completions", {**GREEDY, "prompt": [[1, 2, 3], [4, 5]]}),
    # vLLM refuses n > 1 with greedy sampling.
    ("n", "/v1/completions", {**GREEDY, "prompt": "x = ", "n": 2, "temperature": 1.0, "seed": 7}),
    ("stop", "/v1/completions", {**GREEDY, "prompt": "x = ", "stop": ["\n", "zz"]}),
    ("echo logprobs", "/v1/completions", {**GREEDY, "prompt": "x = ", "echo": True, "logprobs": 2}),
    (
        "chat logprobs",
        "/v1/chat/completions",
        {**GREEDY, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2},
    ),
    (
        "structured outputs",
        "/v1/chat/completions",
        {
            **GREEDY,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "yes or no?"}],
            "structured_outputs": {"choice": ["yes", "no"]},
        },
    ),
    (
        "responses",
        "/v1/responses",
        {"model": "tiny", "input": "def f(", "max_output_tokens": 4, "temperature": 0.0},
    ),
]


def shape(value: Any) -> Any:
    """The structure of a JSON answer: keys, list lengths and value types, not the values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


@pytest.fixture(scope="module")
def gateway(engine_url: str) -> Iterator[tuple[str, Gateway]]:
    # A token budget, so streams are settled from the engine's usage (item 7) on real chunks.
    tenants = [{"name": "default", "tokensPerMinute": 1_000_000}]
    service = tiny_service(scheduler={"tenants": tenants}, routing={"probeIntervalS": 0.2})
    app = create_app(service, [("r0", engine_url)])
    server = ServerThread(app, free_port()).start()
    server.wait_until("/ready", timeout_s=30)
    yield server.url, app.state.gateway
    server.stop()


@pytest.mark.parametrize(("name", "route", "body"), FORMS, ids=[f[0] for f in FORMS])
def test_answers_have_vllms_shape(
    gateway: tuple[str, Gateway], engine_url: str, name: str, route: str, body: dict[str, Any]
) -> None:
    url, _ = gateway
    direct = httpx.post(f"{engine_url}{route}", json=body, timeout=60)
    via = httpx.post(f"{url}{route}", json=body, timeout=60)
    assert direct.status_code == 200, direct.text
    assert via.status_code == 200, via.text
    assert shape(via.json()) == shape(direct.json())


def test_stream_usage_is_settled_and_stripped(gateway: tuple[str, Gateway], engine_url: str) -> None:
    url, gw = gateway
    body = {**GREEDY, "prompt": "def f(", "stream": True}
    direct = httpx.post(f"{engine_url}/v1/completions", json=body, timeout=60)
    via = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    # The same events as the engine sends a client that did not ask for usage: none added.
    assert len(via.text.split("\n\n")) == len(direct.text.split("\n\n"))
    assert '"usage"' not in via.text  # asked of the engine by the gateway, not by the client
    # Settled (just after the last chunk reached the client): what was spent is about prompt + 4
    # generated tokens, not the 512-token pre-charge. The stored value, not refilled since.
    deadline = time.monotonic() + 5
    while gw.ledger.buckets[("default", "tokens")].tokens < 1_000_000 - 60:
        assert time.monotonic() < deadline, gw.ledger.buckets[("default", "tokens")]
        time.sleep(0.02)
