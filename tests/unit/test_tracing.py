"""Tracing: on only when OTEL_* ask, exporters from the environment, the trace in log lines and
in replayed headers."""

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from worker import tracing
from worker.broker import headers
from worker.config import ConfigError
from worker.logs import JsonFormatter

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ["otlp", "console"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "TRUE"}, []),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "false"}, ["console"]),
    ],
)
def test_tracing_is_on_only_when_the_environment_asks(
    env: dict[str, str], names: list[str]
) -> None:
    assert tracing.exporter_names(env) == names
    if not names:
        assert tracing.setup(env) is None


def processors(provider: TracerProvider) -> list[Any]:
    return list(provider._active_span_processor._span_processors)


def test_console_exporter_behind_a_batch_processor() -> None:
    provider = tracing.setup({"OTEL_TRACES_EXPORTER": "console"})
    try:
        [processor] = processors(provider)
        assert isinstance(processor, BatchSpanProcessor)
        assert isinstance(processor.span_exporter, ConsoleSpanExporter)
        assert provider.resource.attributes["service.name"] == "instant-key-worker"
    finally:
        provider.shutdown()


def test_an_otlp_endpoint_means_otlp_over_http(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "keys-eu")
    provider = tracing.setup({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    try:
        [processor] = processors(provider)
        assert isinstance(processor.span_exporter, OTLPSpanExporter)
        assert provider.resource.attributes["service.name"] == "keys-eu"
    finally:
        provider.shutdown()  # no spans: nothing is sent


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER: no span exporter 'jaeger'"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"},
            "OTEL_EXPORTER_OTLP_PROTOCOL: must be http/protobuf or grpc",
        ),
    ],
)
def test_an_exporter_that_cannot_be_built_is_a_configuration_error(
    env: dict[str, str], says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        tracing.setup(env)


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    yield provider
    provider.shutdown()


def record(message: str) -> dict[str, object]:
    entry: dict[str, object] = json.loads(
        JsonFormatter().format(logging.LogRecord("t", logging.INFO, __file__, 1, message, (), None))
    )
    return entry


def test_log_lines_carry_the_current_span(provider: TracerProvider) -> None:
    assert "trace_id" not in record("outside")
    tracer = tracing.tracer(provider)
    with tracer.start_as_current_span("inside") as span:
        entry = record("inside")
    context = span.get_span_context()
    assert entry["trace_id"] == f"{context.trace_id:032x}"
    assert entry["span_id"] == f"{context.span_id:016x}"


def test_off_a_span_costs_nothing_and_keeps_the_producers_trace() -> None:
    tracer = tracing.tracer(trace.NoOpTracerProvider())
    parent = tracing.extract({"traceparent": TRACEPARENT.encode()})  # AMQP may give bytes
    with tracer.start_as_current_span("process", context=parent) as span:
        assert not span.is_recording()
        carried: dict[str, object] = {}
        tracing.inject(carried)
    assert carried == {"traceparent": TRACEPARENT}
    assert "trace_id" not in record("after")


def test_a_replay_keeps_the_trace_headers() -> None:
    dead = {
        "traceparent": TRACEPARENT,
        "tracestate": "booking=1",
        "x-ikw-reason": "seam_rejected",
        "x-ikw-routing-key": "access.granted",
        "x-ikw-publisher": "booking",
        "x-death": [{"queue": "q"}],
    }
    replayed = headers.for_replay(dead, "worker", "worker")
    assert replayed["traceparent"] == TRACEPARENT
    assert replayed["tracestate"] == "booking=1"
    assert "x-ikw-reason" not in replayed


def test_a_new_trace_is_sampled_and_valid() -> None:
    one, two = tracing.new_trace(), tracing.new_trace()
    assert one.get_span_context().is_valid and one.get_span_context().trace_flags.sampled
    assert one.get_span_context().trace_id != two.get_span_context().trace_id


def test_spans_with_tracing_off_keep_the_producers_trace_current() -> None:
    """The cheap path taken with the API's no-op tracer gives the context the no-op spans gave:
    the message's trace while it is handled, unchanged by client spans, restored after."""
    off = trace.NoOpTracerProvider().get_tracer("test")
    assert not tracing.records(off)
    assert tracing.records(TracerProvider().get_tracer("test"))
    before = trace.get_current_span().get_span_context()
    parent = tracing.extract({"traceparent": TRACEPARENT})
    with tracing.span(off, "process q", trace.SpanKind.CONSUMER, {}, parent) as consumer:
        current = trace.get_current_span().get_span_context()
        assert trace.format_trace_id(current.trace_id) == TRACEPARENT.split("-")[1]
        assert consumer.get_span_context() == current
        with tracing.client_span(off, "POST /x", {}) as client:
            assert client.get_span_context() == current
            assert trace.get_current_span().get_span_context() == current
            carrier: dict[str, Any] = {}
            tracing.inject(carrier)
            assert carrier["traceparent"] == TRACEPARENT
        assert trace.get_current_span().get_span_context() == current
    assert trace.get_current_span().get_span_context() == before


def test_a_failing_untraced_span_lets_the_error_through() -> None:
    off = trace.NoOpTracerProvider().get_tracer("test")
    with pytest.raises(ValueError), tracing.span(off, "x", trace.SpanKind.CLIENT, {}):
        raise ValueError("boom")
    assert not trace.get_current_span().get_span_context().is_valid
