"""A stand-in for a vLLM replica with injectable faults, for fast deterministic gateway tests.

It speaks just enough of vLLM's surface (/health, /metrics, /v1/models, /v1/completions and
/v1/chat/completions with SSE) to exercise routing, retries and the breaker; the real engine
is used wherever bytes or behaviour of vLLM itself matter.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse


@dataclass
class Faults:
    healthy: bool = True
    status_5xx: int = 0  # answer this many requests with 500 first
    die_after_chunks: int | None = None  # break the connection mid-stream after N chunks
    delay_s: float = 0.0  # before the first byte
    error_rate: float = 0.0  # answer this fraction of requests with 500, at random
    waiting: int = 0  # reported as vllm:num_requests_waiting
    reject: str | None = None  # answer as the SLA scheduler does when a class queue is full
    health_delay_s: float = 0.0  # /health answers this late (a CPU-starved engine)
    cancelled: int = 0  # requests whose client (the gateway) went away before the answer
    max_model_len: int | None = None  # refuse (400, as vLLM) a max_tokens above it
    first_token_delay_s: float = 0.0  # a stream's headers go at once, its first event this late
    seen: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


def fake_engine(name: str, model: str = "tiny", faults: Faults | None = None) -> tuple[FastAPI, Faults]:
    state = faults or Faults()
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        await asyncio.sleep(state.health_delay_s)
        return Response(status_code=200 if state.healthy else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            "# HELP vllm:num_requests_waiting x\n"
            f'vllm:num_requests_waiting{{model_name="{model}"}} {state.waiting}\n'
            f'vllm:num_requests_running{{model_name="{model}"}} 0.0\n'
            f'vllm:prefix_cache_queries_total{{model_name="{model}"}} 10.0\n'
            f'vllm:prefix_cache_hits_total{{model_name="{model}"}} 4.0\n'
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": name}]}

    async def generate(request: Request) -> Response:
        body = await request.json()
        state.seen.append(body)
        state.headers.append(dict(request.headers))
        if state.status_5xx > 0 or random.random() < state.error_rate:
            state.status_5xx = max(0, state.status_5xx - 1)
            return JSONResponse({"error": "injected"}, status_code=500)
        if state.max_model_len is not None and int(body.get("max_tokens") or 0) > state.max_model_len:
            limit = state.max_model_len
            message = f"max_tokens={body['max_tokens']} cannot be greater than max_model_len={limit}."
            error = {"message": message, "type": "BadRequestError", "param": "max_tokens", "code": 400}
            return JSONResponse({"error": error}, status_code=400)
        # Wait as vLLM's `with_cancellation` does: a client that disconnects aborts the request.
        deadline = asyncio.get_running_loop().time() + state.delay_s
        while asyncio.get_running_loop().time() < deadline:
            if await request.is_disconnected():
                state.cancelled += 1
                return Response(status_code=499)
            await asyncio.sleep(min(0.02, state.delay_s))
        n = int(body.get("max_tokens") or 4)
        if state.reject is not None:
            # vLLM's shape for a request the scheduler finished at once: 200, finish_reason abort;
            # a stream drops that event (it has no token) and ends with the usage chunk, if asked.
            choice = {"index": 0, "text": "", "finish_reason": "abort", "stop_reason": state.reject}
            if not body.get("stream"):
                return JSONResponse({"id": f"cmpl-{name}", "choices": [choice], "served_by": name})
            usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}}
            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            tail = [f"data: {json.dumps(usage)}\n\n".encode()] if wants_usage else []
            return StreamingResponse(iter([*tail, b"data: [DONE]\n\n"]), media_type="text/event-stream")
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": f"cmpl-{name}",
                    "object": "text_completion",
                    "model": model,
                    "choices": [{"index": 0, "text": "x" * n, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
                    "served_by": name,
                }
            )

        # Deterministic "greedy" tokens: the token at position k of the sequence is id 1000 + k,
        # text t<k>, so a continuation from prompt + generated ids goes on where a run stopped.
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            prompt_ids = list(prompt)
        else:
            prompt_ids = [ord(c) % 256 for c in str(prompt if prompt is not None else body.get("messages"))]

        async def events() -> AsyncIterator[bytes]:
            await asyncio.sleep(state.first_token_delay_s)  # as vLLM: queue and prefill after the headers
            for i in range(n):
                if state.die_after_chunks is not None and i >= state.die_after_chunks:
                    raise RuntimeError("injected mid-stream death")
                k = len(prompt_ids) + i
                # As vLLM: the id fields always there, null unless asked (prompt ids come first).
                asked = body.get("return_token_ids") is True
                choice: dict[str, Any] = {
                    "index": 0,
                    "text": f"t{k}",
                    "prompt_token_ids": prompt_ids if asked and i == 0 else None,
                    "token_ids": [1000 + k] if asked else None,
                }
                if i == n - 1:
                    choice["finish_reason"] = "length"
                chunk = {"id": f"cmpl-{name}", "choices": [choice], "served_by": name}
                yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
                await asyncio.sleep(0.01)
            if (body.get("stream_options") or {}).get("include_usage"):
                # vLLM's last chunk when asked: no choices, the usage (compact JSON, as vLLM's).
                usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
                last = {"id": f"cmpl-{name}", "choices": [], "usage": usage}
                yield f"data: {json.dumps(last, separators=(',', ':'))}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def set_faults(request: Request) -> dict[str, Any]:
        """Change faults of a running fake (tests make a live replica unhealthy this way)."""
        for name, value in (await request.json()).items():
            if name in ("healthy", "delay_s", "error_rate", "waiting"):
                setattr(state, name, value)
        return {"healthy": state.healthy, "delay_s": state.delay_s, "error_rate": state.error_rate}

    app.add_api_route("/fault", set_faults, methods=["POST"])
    app.add_api_route("/v1/completions", generate, methods=["POST"])
    app.add_api_route("/v1/chat/completions", generate, methods=["POST"])
    app.add_api_route("/v1/responses", generate, methods=["POST"])
    return app, state


def main(argv: list[str] | None = None) -> None:
    """`python -m tokenfleet.load.fake_engine --port N`: a fake replica as a process."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--delay-s", type=float, default=0.0, help="wait before each answer")
    parser.add_argument("--error-rate", type=float, default=0.0, help="fraction answered with 500")
    parser.add_argument("--max-model-len", type=int, default=None, help="refuse a larger max_tokens (400)")
    args = parser.parse_args(argv)
    faults = Faults(delay_s=args.delay_s, error_rate=args.error_rate, max_model_len=args.max_model_len)
    app, _ = fake_engine(args.name, args.model, faults)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
