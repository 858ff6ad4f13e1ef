"""SSE framing and stream timing on hand-made byte streams, plus derived per-request metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenfleet.load.client import LLMRequest, build_http_request
from tokenfleet.load.record import RequestRecord, itl, read_records, tpot, write_records
from tokenfleet.load.sse import SSEDecoder, StreamTimer


def sse(payload: object) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {text}\n\n".encode()


def completion_chunk(text: str, finish: str | None = None) -> dict[str, object]:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def chat_chunk(content: str | None, role: str | None = None) -> dict[str, object]:
    delta: dict[str, object] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}


def run_timer(reads: list[tuple[bytes, float]]) -> StreamTimer:
    decoder, timer = SSEDecoder(), StreamTimer()
    for raw, t in reads:
        for data in decoder.feed(raw):
            timer.on_event(data, t)
    for data in decoder.flush():
        timer.on_event(data, reads[-1][1])
    return timer


def test_decoder_splits_events_across_arbitrary_reads() -> None:
    stream = sse(completion_chunk("a")) + sse(completion_chunk("b")) + sse("[DONE]")
    decoder = SSEDecoder()
    events = [e for i in range(len(stream)) for e in decoder.feed(stream[i : i + 1])]
    assert events == [json.dumps(completion_chunk("a")), json.dumps(completion_chunk("b")), "[DONE]"]


def test_decoder_handles_crlf_comments_multiline_and_unterminated_tail() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b": keep-alive\r\n\r\nevent: x\r\ndata: one\r\ndata:two\r\n\r\ndata: tail")
    assert events == ["one\ntwo"]
    assert decoder.flush() == ["tail"]
    assert decoder.flush() == []


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_decoder_result_does_not_depend_on_read_boundaries(cuts: list[int]) -> None:
    stream = b"".join(sse(completion_chunk(str(i))) for i in range(6)) + sse("[DONE]")
    whole = SSEDecoder().feed(stream)
    decoder, pieces, pos = SSEDecoder(), [], 0
    for cut in cuts:
        pieces += decoder.feed(stream[pos : pos + cut])
        pos += cut
    pieces += decoder.feed(stream[pos:])
    assert pieces == whole


def test_multi_token_chunks_use_usage_for_token_count() -> None:
    # Two chunks carry five tokens (as with speculative decoding or stream intervals).
    timer = run_timer(
        [
            (sse(completion_chunk("ab c")), 0.10),
            (sse(completion_chunk(" de", finish="length")), 0.30),
            (sse(USAGE) + sse("[DONE]"), 0.31),
        ]
    )
    assert timer.first_token_s == pytest.approx(0.10)
    assert timer.content_times == [0.10, 0.30]
    assert timer.output_tokens == 5
    assert timer.prompt_tokens == 7
    assert timer.finish_reason == "length"
    assert timer.done
    assert timer.error is None
    assert timer.text == "ab c de"


def test_empty_first_chunk_is_first_chunk_but_not_first_token() -> None:
    # OpenAI chat streams open with a role-only delta: vLLM bench counts it as TTFT, we do not.
    timer = run_timer(
        [
            (sse(chat_chunk("", role="assistant")), 0.05),
            (sse(chat_chunk("Hi")), 0.20),
            (sse(chat_chunk(None)), 0.25),
            (sse(chat_chunk("!")), 0.40),
            (sse("[DONE]"), 0.41),
        ]
    )
    assert timer.first_chunk_s == pytest.approx(0.05)
    assert timer.first_token_s == pytest.approx(0.20)
    assert timer.content_times == [0.20, 0.40]


def test_usage_only_chunk_is_not_a_content_chunk() -> None:
    timer = run_timer([(sse(USAGE), 0.5), (sse("[DONE]"), 0.6)])
    assert timer.first_chunk_s is None
    assert timer.first_token_s is None
    assert timer.content_times == []
    assert timer.output_tokens == 5


@pytest.mark.parametrize(
    "error_event",
    [
        {"error": {"object": "error", "message": "engine died", "type": "InternalServerError", "code": 500}},
        {"object": "error", "message": "engine died"},
        {"error": "engine died"},
    ],
)
def test_error_mid_stream_is_recorded(error_event: dict[str, object]) -> None:
    timer = run_timer([(sse(completion_chunk("x")), 0.1), (sse(error_event), 0.2)])
    assert timer.error is not None
    assert "engine died" in timer.error
    assert timer.content_times == [0.1]
    assert not timer.done


def test_malformed_json_is_an_error() -> None:
    timer = run_timer([(b"data: {oops\n\n", 0.1)])
    assert timer.error is not None
    assert "malformed" in timer.error
    timer = run_timer([(b"data: [1, 2]\n\n", 0.1)])
    assert timer.error is not None


def test_derived_metrics() -> None:
    assert tpot(1.0, 0.2, 5) == pytest.approx(0.2)
    assert tpot(1.0, 0.2, 1) is None
    assert tpot(None, 0.2, 5) is None
    assert itl([0.1, 0.3, 0.6]) == pytest.approx([0.2, 0.3])
    assert itl([0.1]) == []
    record = RequestRecord(
        id="r1", cls="a", tenant="t", api="completions", stream=True, send=100.0, scheduled=99.5
    )
    record.ttft_s, record.e2e_s, record.output_tokens, record.chunk_s = 0.2, 1.0, 5, [0.2, 0.5, 1.0]
    assert record.queue_s == pytest.approx(0.5)
    assert record.end == pytest.approx(101.0)
    assert record.tpot_s == pytest.approx(0.2)
    assert record.itl_s == pytest.approx([0.3, 0.5])


def test_records_roundtrip_and_torn_line_skipped(tmp_path: Path) -> None:
    path = tmp_path / "raw.jsonl"
    records = [
        RequestRecord(id=str(i), cls="a", tenant="t", api="chat", stream=True, send=float(i), ok=True)
        for i in range(3)
    ]
    write_records(path, records)
    with path.open("a") as out:
        out.write('{"id": "torn", "cls"')
    assert [r.id for r in read_records([path])] == ["0", "1", "2"]


def test_request_carries_class_and_tenant_to_engine_and_gateway() -> None:
    request = LLMRequest(id="r1", prompt="hello", max_tokens=4, cls="interactive", tenant="acme", priority=0)
    path, body, headers = build_http_request(request, "tiny")
    assert path == "/v1/completions"
    assert body["priority"] == 0
    assert body["vllm_xargs"] == {"slo_class": "interactive", "tenant": "acme"}
    assert headers["x-tokenfleet-class"] == "interactive"
    assert "x-tokenfleet-tenant" not in headers  # a gateway knows the tenant by its API key
    assert body["stream_options"]["include_usage"] is True
    chat = LLMRequest(id="r2", prompt="hi", max_tokens=2, api="chat", stream=False)
    path, body, _ = build_http_request(chat, "tiny")
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert "stream_options" not in body
    assert "priority" not in body
