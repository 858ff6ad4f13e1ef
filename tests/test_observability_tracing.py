"""Tracing set-up, the in-memory trace store, the OTLP receiver, and JSON logs with trace ids."""

from __future__ import annotations

import io
import json
import logging

import httpx
import pytest
from opentelemetry.trace import StatusCode

from tokenfleet.observability.logs import JsonFormatter, setup_logging, trace_fields
from tokenfleet.observability.otlp_endpoint import TraceExport
from tokenfleet.observability.otlp_receiver import OTLPReceiver, decode
from tokenfleet.observability.tracing import (
    TraceStore,
    endpoint_from_env,
    otlp_traces_url,
    setup_tracing,
)


def test_otlp_url_and_env() -> None:
    assert otlp_traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert otlp_traces_url("http://c:4318/v1/traces/") == "http://c:4318/v1/traces"
    assert endpoint_from_env({}) is None
    assert endpoint_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}) == "http://x"
    assert endpoint_from_env(
        {"TOKENFLEET_OTLP_ENDPOINT": "http://a", "OTEL_EXPORTER_OTLP_ENDPOINT": "b"}
    ) == ("http://a")


def test_in_memory_store_groups_spans_into_traces() -> None:
    tracing = setup_tracing("svc")
    assert tracing.otlp_endpoint is None
    with tracing.tracer.start_as_current_span("POST /v1/completions") as root:
        root.set_attribute("tokenfleet.class", "interactive")
        with tracing.tracer.start_as_current_span("engine call"):
            pass
    with tracing.tracer.start_as_current_span("second"):
        pass
    recent = tracing.store.recent()
    assert [t["name"] for t in recent] == ["second", "POST /v1/completions"]
    first = recent[1]
    assert first["spans"] == 2
    assert first["services"] == ["svc"]
    assert first["attributes"] == {"tokenfleet.class": "interactive"}
    assert first["duration_ms"] >= 0
    assert tracing.store.get(first["trace_id"]) is not None
    tracing.shutdown()


def test_store_is_bounded() -> None:
    store = TraceStore(max_traces=3, max_spans_per_trace=2)
    tracing = setup_tracing("svc", store=store)
    for i in range(5):
        with tracing.tracer.start_as_current_span(f"t{i}"):
            for _ in range(4):
                with tracing.tracer.start_as_current_span("child"):
                    pass
    assert len(store) == 3
    assert [t["name"] for t in store.recent()] == ["t4", "t3", "t2"]
    assert all(t["spans"] == 3 for t in store.recent())  # 2 children + the root


def test_otlp_export_reaches_the_receiver_and_errors_are_marked() -> None:
    receiver = OTLPReceiver().start()
    try:
        tracing = setup_tracing("gw", receiver.endpoint.removesuffix("/v1/traces"))
        assert tracing.otlp_endpoint == receiver.endpoint
        with tracing.tracer.start_as_current_span("parent") as parent:
            parent.set_attribute("tokenfleet.replica", "r0")
            with tracing.tracer.start_as_current_span("child") as child:
                child.set_status(StatusCode.ERROR)
        assert tracing.flush()
        assert receiver.wait_for(lambda r: len(r.spans()) == 2, timeout_s=10)
        spans = {s.name: s for s in receiver.spans()}
        assert spans["child"].parent_span_id == spans["parent"].span_id
        assert spans["parent"].service == "gw"
        assert spans["parent"].attributes == {"tokenfleet.replica": "r0"}
        assert spans["child"].error
        assert not spans["parent"].error
        assert list(receiver.traces()) == [spans["parent"].trace_id]
        assert tracing.store.recent()[0]["error"] is True
        # Wrong path and garbage are refused without killing the receiver.
        assert httpx.post(receiver.endpoint.replace("traces", "logs"), content=b"x").status_code == 404
        assert httpx.post(receiver.endpoint, content=b"\xff\xff\xff").status_code == 400
        tracing.shutdown()
    finally:
        receiver.stop()


def test_decode_handles_nested_values() -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "x"
    span = rs.scope_spans.add().spans.add()
    span.name, span.trace_id, span.span_id = "s", b"\x01" * 16, b"\x02" * 8
    arr = span.attributes.add()
    arr.key = "list"
    arr.value.array_value.values.add().int_value = 3
    kvl = span.attributes.add()
    kvl.key = "map"
    inner = kvl.value.kvlist_value.values.add()
    inner.key, inner.value.bool_value = "ok", True
    span.attributes.add().key = "empty"
    (decoded,) = decode(request.SerializeToString())
    assert decoded.service == "x"
    assert decoded.trace_id == "01" * 16
    assert decoded.attributes == {"list": [3], "map": {"ok": True}, "empty": None}


def test_json_logs_carry_trace_and_span_ids() -> None:
    stream = io.StringIO()
    handler = setup_logging("gateway", stream=stream)
    again = setup_logging("gateway", stream=stream)  # idempotent: one handler, not two
    root = logging.getLogger()
    assert handler not in root.handlers
    assert again in root.handlers
    tracing = setup_tracing("gw", install_global=False)
    log = logging.getLogger("tokenfleet.test")
    try:
        log.info("outside")
        with tracing.tracer.start_as_current_span("req") as span:
            log.warning("inside %s", "span", extra={"replica": "r0"})
            ids = trace_fields()
            ctx = span.get_span_context()
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    finally:
        root.removeHandler(again)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [x["message"] for x in lines] == ["outside", "inside span", "failed"]
    assert "trace_id" not in lines[0]
    assert lines[1]["trace_id"] == format(ctx.trace_id, "032x") == ids["trace_id"]
    assert lines[1]["span_id"] == format(ctx.span_id, "016x")
    assert lines[1]["replica"] == "r0"
    assert lines[1]["level"] == "warning"
    assert lines[1]["component"] == "gateway"
    assert "RuntimeError: boom" in lines[2]["exception"]


@pytest.mark.parametrize("level", ["debug", "error"])
def test_formatter_levels(level: str) -> None:
    record = logging.LogRecord("n", getattr(logging, level.upper()), "f", 1, "m", (), None)
    assert json.loads(JsonFormatter("cli").format(record))["level"] == level


def test_cli_log_format_json(capsys: pytest.CaptureFixture[str]) -> None:
    from tokenfleet.cli import main

    root = logging.getLogger()
    before = list(root.handlers)
    try:
        assert main(["--log-format", "json", "spec", "schema"]) == 0
        logging.getLogger("tokenfleet.cli").warning("hello", extra={"service": "svc"})
    finally:
        for handler in root.handlers:
            if handler not in before:
                root.removeHandler(handler)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["component"] == "tokenfleet-spec"
    assert line["message"] == "hello"
    assert line["service"] == "svc"


def test_engine_command_passes_the_otlp_endpoint() -> None:
    from conftest import tiny_service

    from tokenfleet.engine.launch import engine_command

    spec = tiny_service().spec
    traces = TraceExport.of_engines("http://127.0.0.1:4318", "chat")
    command = engine_command(spec, "m", port=1, traces=traces)
    argv = command.argv
    assert argv[argv.index("--otlp-traces-endpoint") + 1] == "http://127.0.0.1:4318/v1/traces"
    assert command.env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    assert command.env["OTEL_SERVICE_NAME"] == "tokenfleet-engine-chat", "vLLM names no service of its own"
    assert "--otlp-traces-endpoint" not in engine_command(spec, "m", port=1).argv
