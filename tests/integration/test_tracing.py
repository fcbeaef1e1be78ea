"""Tracing end to end: one grant's spans across a retry and a dead-letter replay, recorded by an
in-memory exporter on a TracerProvider handed to the worker (the global one stays a no-op)."""

import asyncio
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.builders import grant
from tests.helpers import AMQP_URL, BROKER_USER, Publish, StartWorker
from worker.broker.topology import Names
from worker.cli import main
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PRODUCER_SPAN = 0xB7AD6B7169203331
HEADERS = {
    "traceparent": f"00-{TRACE_ID:032x}-{PRODUCER_SPAN:016x}-01",
    "tracestate": "booking=t61rcWkgMzE",
}
MESSAGE_ATTRIBUTES = (
    "messaging.system",
    "messaging.operation.type",
    "messaging.message.id",
    "grant_id",
    "event_id",
    "ikw.attempt",
)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    yield spans
    spans.shutdown()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def consumed(spans: Sequence[ReadableSpan], queue: str) -> list[ReadableSpan]:
    found = [
        s
        for s in spans
        if s.kind is SpanKind.CONSUMER and s.attributes
        if s.attributes.get("messaging.destination.name") == queue
    ]
    return sorted(found, key=lambda s: s.start_time or 0)


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


def children(spans: Sequence[ReadableSpan], of: ReadableSpan, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is kind and parent_id(s) == of.context.span_id]


def everything_said(spans: Sequence[ReadableSpan]) -> str:
    """Every name, attribute, status and event of the spans, as one text."""
    parts: list[str] = []
    for span in spans:
        parts += [span.name, json.dumps(dict(span.attributes or {}), default=str)]
        parts.append(span.status.description or "")
        for event in span.events:
            parts += [event.name, json.dumps(dict(event.attributes or {}), default=str)]
    return "\n".join(parts)


@dataclass
class Retried:
    """One grant handled in two attempts (Seam answered 503 to the first), as traced."""

    event: dict[str, Any]
    spans: Sequence[ReadableSpan]
    first: ReadableSpan
    second: ReadableSpan
    retry: ReadableSpan  # the first attempt's publish of the retry
    sandbox: Sandbox
    log_lines: list[str]


@pytest.fixture
async def retried(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    names: Names,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    log_lines: list[str],
) -> Retried:
    await start_worker(tracer_provider=provider)
    # After the key is generated: the retry finds it and delivers it.
    sandbox.seam.fail_next(503, path="/instant_keys/list")
    event = grant()
    await publish(event, headers=HEADERS, message_id=event["event_id"])

    def outcomes() -> list[Any]:
        grants = consumed(exporter.get_finished_spans(), names.grants)
        return [attr(s, "ikw.outcome") for s in grants]

    await wait_for(lambda: outcomes() == ["retried", "acked"], 20, "both attempts' spans")
    spans = exporter.get_finished_spans()
    first, second = consumed(spans, names.grants)
    [retry] = [
        s
        for s in children(spans, first, SpanKind.PRODUCER)
        if str(routing_key(s)).endswith("." + names.grants)
    ]
    return Retried(event, spans, first, second, retry, sandbox, log_lines)


def attr(span: ReadableSpan, name: str) -> Any:
    return (span.attributes or {}).get(name)


def routing_key(span: ReadableSpan) -> Any:
    return attr(span, "messaging.rabbitmq.destination.routing_key")


async def test_a_retry_stays_in_the_producers_trace(retried: Retried) -> None:
    first, second, event = retried.first, retried.second, retried.event
    assert {first.context.trace_id, second.context.trace_id} == {TRACE_ID}
    assert parent_id(first) == PRODUCER_SPAN
    assert parent_id(second) == retried.retry.context.span_id
    assert second.context.trace_state.get("booking") == "t61rcWkgMzE"

    for span, attempt in ((first, 1), (second, 2)):
        assert {name: attr(span, name) for name in MESSAGE_ATTRIBUTES} == {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.message.id": event["event_id"],
            "grant_id": event["grant_id"],
            "event_id": event["event_id"],
            "ikw.attempt": attempt,
        }
        assert routing_key(span) in ("access.granted", routing_key(retried.retry))
    assert first.status.status_code is StatusCode.ERROR
    assert "503" in (first.status.description or "")
    assert second.status.status_code is StatusCode.UNSET


async def test_seam_calls_are_children_of_their_attempt(retried: Retried) -> None:
    spans, first, second = retried.spans, retried.first, retried.second
    # Seam calls are CLIENT spans of the message span that made them (the worker's credentials
    # check at start is a trace of its own).
    seam = [
        s
        for s in spans
        if s.kind is SpanKind.CLIENT
        and s.name.startswith("POST /")
        and s.context.trace_id == TRACE_ID
    ]
    assert seam and all(
        parent_id(s) in (first.context.span_id, second.context.span_id) for s in seam
    )
    [failed] = [s for s in seam if attr(s, "http.response.status_code") == 503]
    assert parent_id(failed) == first.context.span_id
    assert [
        attr(failed, name) for name in ("url.path", "http.request.method", "server.address")
    ] == [
        "/instant_keys/list",
        "POST",
        "127.0.0.1",
    ]
    assert [s.name for s in children(spans, second, SpanKind.CLIENT) if "POST" in s.name] == [
        "POST /user_identities/get",
        "POST /instant_keys/list",
    ]


async def test_the_sms_and_the_timer_are_children_of_their_attempt(retried: Retried) -> None:
    spans, first, second = retried.spans, retried.first, retried.second
    # The SMS went out in the second attempt; the cleanup timer was set in the first.
    [sms] = [s for s in children(spans, second, SpanKind.CLIENT) if s.name == "twilio send"]
    assert attr(sms, "http.response.status_code") == 201
    assert any(
        str(attr(s, "messaging.message.id")).startswith("cleanup-")
        for s in children(spans, first, SpanKind.PRODUCER)
    )
    assert f"{BROKER_USER}.access.delivered" in [
        routing_key(s) for s in children(spans, second, SpanKind.PRODUCER)
    ]


async def test_no_span_holds_the_link_or_the_contacts(retried: Retried) -> None:
    said = everything_said(retried.spans)
    [key] = retried.sandbox.seam.keys.values()
    assert key["instant_key_url"] not in said
    assert retried.event["user_identity"]["phone_number"] not in said
    assert retried.event["user_identity"]["email_address"] not in said


async def test_log_lines_carry_the_trace_and_the_message_span(
    retried: Retried, names: Names
) -> None:
    lines = [json.loads(line) for line in retried.log_lines]
    handled = [line for line in lines if line.get("queue") == names.grants]
    assert [line["msg"] for line in handled if line["msg"].startswith("message ")] == [
        "message retried",
        "message acked",
    ]
    assert {line.get("trace_id") for line in handled} == {f"{TRACE_ID:032x}"}
    assert {line["span_id"] for line in handled} == {
        f"{s.context.span_id:016x}" for s in (retried.first, retried.second)
    }


async def test_a_replayed_dead_letter_stays_in_the_producers_trace(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    names: Names,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await start_worker(tracer_provider=provider)
    sandbox.seam.fail_next(400, "invalid_input", path="/user_identities/get")
    event = grant()
    await publish(event, headers=HEADERS, message_id=event["event_id"])
    await wait_for(
        lambda: (
            [
                (s.attributes or {}).get("ikw.outcome")
                for s in consumed(exporter.get_finished_spans(), names.grants)
            ]
            == ["dead_lettered"]
        ),
        15,
        "the dead letter",
    )
    # `ikw dlq replay`, with tracing off: the headers it replays carry the trace.
    monkeypatch.setenv("IKW_NAMESPACE", names.namespace)
    monkeypatch.setenv("AMQP_URL", AMQP_URL)
    assert await asyncio.to_thread(main, ["dlq", "replay", event["event_id"], "--yes"]) == 0

    await wait_for(lambda: len(consumed(exporter.get_finished_spans(), names.grants)) == 2, 15)
    first, replayed = consumed(exporter.get_finished_spans(), names.grants)
    assert (first.attributes or {})["ikw.outcome"] == "dead_lettered"
    assert (first.attributes or {})["ikw.reason"] == "seam_rejected"
    assert first.context.trace_id == replayed.context.trace_id == TRACE_ID
    [dead_letter] = [
        s
        for s in children(exporter.get_finished_spans(), first, SpanKind.PRODUCER)
        if (s.attributes or {}).get("messaging.rabbitmq.destination.routing_key") == names.dead
    ]
    assert parent_id(replayed) == dead_letter.context.span_id


async def test_ikw_publish_starts_a_trace(
    names: Names, amqp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IKW_NAMESPACE", names.namespace)
    monkeypatch.setenv("AMQP_URL", AMQP_URL)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)  # tracing off in the command
    args = ["publish", "grant", "--key", "guest-traced", "--phone", "+14155550100"]
    assert await asyncio.to_thread(main, args) == 0

    channel = await amqp.channel()
    queue = await channel.get_queue(names.grants)
    message = await queue.get(fail=False, timeout=5)
    assert message is not None
    await message.ack()
    await channel.close()
    version, trace_id, span_id, flags = message.headers["traceparent"].split("-")
    assert (version, flags) == ("00", "01")
    assert int(trace_id, 16) and int(span_id, 16)
