"""The harness records refusals as rejections, not answers, and keeps what it measured of a request
cut off mid-stream (httpx MockTransport: no sockets, no server)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tokenfleet.engine.sla_contract import REJECT_PREFIX
from tokenfleet.load.client import EMPTY_STREAM, UNFINISHED, LLMRequest, build_http_request, rejection, send
from tokenfleet.load.record import RequestRecord

REASON = f"{REJECT_PREFIX}: queue of class 'batch' is full (4/4 waiting); retry later"


def sse(chunks: list[dict[str, Any]]) -> Iterator[bytes]:
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n".encode()
    yield b"data: [DONE]\n\n"


def streamed(chunks: list[dict[str, Any]]) -> httpx.Response:
    """A streamed answer (a byte iterator: the client reads it as it comes, as from a socket)."""
    return httpx.Response(200, content=sse(chunks))


def tokens(n: int) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = [{"choices": [{"text": "x", "finish_reason": None}]} for _ in range(n)]
    return [*chunks, {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}}]


def run(handler: Callable[[httpx.Request], httpx.Response], **request: Any) -> RequestRecord:
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        return send(
            client, "http://engine", LLMRequest(id="r", prompt=[5, 6, 7], max_tokens=4, **request), "m"
        )


def test_the_schedulers_in_band_rejection_is_a_rejection() -> None:
    abort = {"choices": [{"index": 0, "text": "", "finish_reason": "abort", "stop_reason": REASON}]}
    record = run(lambda _: streamed([abort]))
    assert record.status == 200
    assert record.rejected
    assert not record.ok
    assert record.error == REASON
    assert record.ttft_s is None


def test_a_stream_without_a_single_choice_is_the_engines_refusal() -> None:
    # vLLM 0.32's serving layer drops an event with no token and no text before the first token,
    # so the scheduler's refusal reaches a streaming client as [DONE] (and the usage chunk) alone.
    usage_only = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 0}}
    for chunks in ([], [usage_only]):
        record = run(lambda _, c=chunks: streamed(c))
        assert record.status == 200
        assert record.rejected
        assert not record.ok
        assert record.error == EMPTY_STREAM


def test_a_non_streamed_rejection_is_a_rejection() -> None:
    body = {"choices": [{"text": "", "finish_reason": "abort", "stop_reason": REASON}], "usage": {}}
    record = run(lambda _: httpx.Response(200, json=body), stream=False)
    assert record.rejected
    assert not record.ok


@pytest.mark.parametrize(("status", "refused"), [(429, True), (503, True), (500, False), (400, False)])
def test_a_gateways_refusal_statuses_are_rejections(status: int, refused: bool) -> None:
    record = run(lambda _: httpx.Response(status, json={"error": "no"}))
    assert record.rejected is refused
    assert not record.ok
    assert (record.error or "").startswith(f"HTTP {status}")


def test_an_answer_and_an_other_abort_are_not_rejections() -> None:
    record = run(lambda _: streamed(tokens(4)))
    assert record.ok
    assert not record.rejected
    assert record.output_tokens == 4
    other = {"choices": [{"text": "", "finish_reason": "abort", "stop_reason": None}]}
    record = run(lambda _: streamed([*tokens(2)[:2], other]))
    assert not record.ok
    assert not record.rejected
    assert record.error == "aborted by the server"


def test_rejection_reads_only_the_schedulers_reason() -> None:
    assert rejection("[DONE]") is None
    assert rejection(json.dumps({"choices": [{"finish_reason": "stop", "stop_reason": REASON}]})) is None
    assert rejection(json.dumps({"text": REJECT_PREFIX})) is None  # the prefix in the text only
    assert rejection("not json " + REJECT_PREFIX) is None
    assert rejection(json.dumps({"choices": [{"finish_reason": "abort", "stop_reason": REASON}]})) == REASON


class Killed(BaseException):
    """What gevent raises in a greenlet that Locust kills (GreenletExit is a BaseException)."""


def test_a_request_cut_off_mid_stream_is_handed_back_unfinished() -> None:
    def chunks() -> Iterator[bytes]:
        yield from list(sse(tokens(4)))[:2]
        raise Killed

    handed: list[RequestRecord] = []
    with (
        httpx.Client(
            transport=httpx.MockTransport(lambda _: httpx.Response(200, content=chunks()))
        ) as client,
        pytest.raises(Killed),
    ):
        send(
            client,
            "http://engine",
            LLMRequest(id="r", prompt="hi", max_tokens=4),
            "m",
            on_cancel=handed.append,
        )
    (record,) = handed
    assert record.error == UNFINISHED
    assert not record.ok
    assert not record.rejected
    assert record.ttft_s is not None  # the two tokens that arrived are kept
    assert len(record.chunk_s) == 2
    assert record.e2e_s is not None
    assert record.e2e_s >= record.ttft_s


def test_token_id_prompts_go_as_ids_with_class_and_tenant_for_the_engine() -> None:
    request = LLMRequest(id="r", prompt=[5, 6], max_tokens=4, cls="batch", tenant="t2", priority=2)
    path, body, headers = build_http_request(request, "m")
    assert path == "/v1/completions"
    assert body["prompt"] == [5, 6]
    # A raw engine's SLA scheduler reads these; a gateway reads the header and the API key.
    assert body["priority"] == 2
    assert body["vllm_xargs"] == {"slo_class": "batch", "tenant": "t2"}
    assert headers["x-tokenfleet-class"] == "batch"
    with pytest.raises(ValueError, match="completions API"):
        build_http_request(LLMRequest(id="r", prompt=[5], max_tokens=1, api="chat"), "m")
