"""End to end against a real vLLM server (CPU build) started from an LLMService spec."""

from __future__ import annotations

import httpx
import openai
import pytest

from tokenfleet.engine.launch import EngineProcess

pytestmark = pytest.mark.vllm


def test_completion_through_openai_client(engine: EngineProcess) -> None:
    client = openai.OpenAI(base_url=f"{engine.url}/v1", api_key="unused")
    models = [m.id for m in client.models.list()]
    assert models == ["tiny"]
    completion = client.completions.create(model="tiny", prompt="def parse(", max_tokens=8, temperature=0)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8
    assert completion.choices[0].text


def test_streaming_chat_through_openai_client(engine: EngineProcess) -> None:
    client = openai.OpenAI(base_url=f"{engine.url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "import os"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None
    assert usage.completion_tokens == 6
    assert text


def test_metrics_expose_vllm_series(engine: EngineProcess) -> None:
    body = httpx.get(f"{engine.url}/metrics", timeout=10).text
    for name in ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds"):
        assert name in body


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b'{"model": "tiny", "prompt": "x", "max_tokens": -1}',
        b'{"model": "no-such-model", "prompt": "x", "max_tokens": 2}',
        b'{"model": "tiny", "prompt": "x", "max_tokens": "many"}',
    ],
)
def test_malformed_request_gets_4xx_and_server_keeps_serving(engine: EngineProcess, payload: bytes) -> None:
    response = httpx.post(
        f"{engine.url}/v1/completions",
        content=payload,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.text
    ok = httpx.post(
        f"{engine.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1}, timeout=30
    )
    assert ok.status_code == 200
