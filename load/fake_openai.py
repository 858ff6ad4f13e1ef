"""A calibrated fake OpenAI server: known TTFT and inter-token delays, exact server-side timings.

It streams `/v1/completions` and `/v1/chat/completions` with a fixed delay before the first token
and between tokens, and exports the TTFT it actually produced (time from reading the request to
writing the first token) as a vLLM-style histogram sum/count on /metrics. Against it, the
harness's error is measurable on its own, without vLLM's internal overheads — and other tests
can drive the harness without starting vLLM. Standard library only; one thread per connection.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "fake"


@dataclass
class FakeConfig:
    ttft_s: float = 0.05
    itl_s: float = 0.01
    fail_after_tokens: int | None = None  # send an error event mid-stream after this many tokens
    status: int = 200  # answer every generation request with this status (e.g. 500)
    capacity: int | None = None  # at most this many generations at once; others queue (saturation)
    ttft_sum: float = 0.0
    ttft_count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    slots: threading.Semaphore | None = None

    def __post_init__(self) -> None:
        if self.capacity is not None:
            self.slots = threading.Semaphore(self.capacity)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _json(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        config = self.server.config
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        elif self.path == "/metrics":
            with config.lock:
                text = (
                    "# TYPE vllm:time_to_first_token_seconds histogram\n"
                    f'vllm:time_to_first_token_seconds_sum{{model_name="{MODEL}"}} {config.ttft_sum}\n'
                    f'vllm:time_to_first_token_seconds_count{{model_name="{MODEL}"}} {config.ttft_count}\n'
                    "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
                )
            body = text.encode()
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        arrival = time.perf_counter()
        config = self.server.config
        length = int(self.headers.get("content-length", "0"))
        request = json.loads(self.rfile.read(length) or b"{}")
        if config.status != 200:
            self._json(config.status, {"error": {"message": f"fake status {config.status}"}})
            return
        if config.slots is None:
            self._generate(config, request, arrival)
            return
        with config.slots:
            self._generate(config, request, arrival)

    def _generate(self, config: FakeConfig, request: dict[str, Any], arrival: float) -> None:
        n = int(request.get("max_tokens", 16))
        chat = self.path.endswith("/chat/completions")
        if not request.get("stream"):
            time.sleep(config.ttft_s + config.itl_s * (n - 1))
            text = "x" * n
            choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
            self._json(200, {"choices": [{"index": 0, **choice, "finish_reason": "length"}], "usage": usage})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        time.sleep(config.ttft_s)
        for i in range(n):
            if config.fail_after_tokens is not None and i == config.fail_after_tokens:
                self._event({"error": {"object": "error", "message": "fake failure", "code": 500}})
                break
            delta = {"delta": {"content": f"t{i} "}} if chat else {"text": f"t{i} "}
            self._event({"choices": [{"index": 0, **delta, "finish_reason": None}]})
            if i == 0:
                with config.lock:
                    config.ttft_sum += time.perf_counter() - arrival
                    config.ttft_count += 1
            if i < n - 1:
                time.sleep(config.itl_s)
        else:
            self._event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}})
            self._raw(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _event(self, payload: object) -> None:
        self._raw(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _raw(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 drops SYNs when many users connect at once: a 1 s TCP retry
    # that would show up as TTFT outside the server's own timing.
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout test, Ctrl-C) closes mid-stream: not worth a traceback.
        return

    config: FakeConfig


@dataclass
class FakeOpenAI:
    """`with FakeOpenAI(FakeConfig(...)) as fake:` serves on 127.0.0.1 at `fake.url`."""

    config: FakeConfig = field(default_factory=FakeConfig)
    port: int = 0
    _server: _Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeOpenAI:
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.config = self.config
        threading.Thread(target=self._server.serve_forever, name="fake-openai", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--ttft", type=float, default=0.05)
    parser.add_argument("--itl", type=float, default=0.01)
    args = parser.parse_args()
    with FakeOpenAI(FakeConfig(ttft_s=args.ttft, itl_s=args.itl), port=args.port) as fake:
        print(f"fake OpenAI server on {fake.url}", flush=True)
        threading.Event().wait()
