"""What watches the consumer: tracing, metrics and the log line of each message, as hooks around
its handling (``watch``), once its event is accepted, and once it is settled."""

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, assert_never

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer

from worker import tracing
from worker.actions import STAY_ACTIONS, Action, Outcome
from worker.broker.activity import Entry, entry
from worker.broker.decision import DeadLetter, Retry, Settled
from worker.broker.settle import Handling, printable
from worker.events import (
    AccessGranted,
    AccessRevoked,
    Event,
    KeyCleanup,
    StayDelivery,
    StayEnd,
    occurred_at,
)
from worker.metrics import Metrics

log = logging.getLogger("worker.consumer")


class Observer:
    """Does nothing; an observer overrides the hooks it needs. A hook must not raise."""

    def watch(self, h: Handling) -> AbstractContextManager[None]:
        """Around the handling and settling of one message."""
        return nullcontext()

    def accepted(self, h: Handling) -> None:
        """Its event passed the trust checks and goes to its flow."""

    def settled(self, h: Handling) -> None:
        """It is settled (``h.settled``)."""


class Tracing(Observer):
    """A CONSUMER span around each message, in the trace its ``traceparent`` names (a
    producer's, or the retry's or cleanup's PRODUCER span), else in a new one."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def watch(self, h: Handling) -> AbstractContextManager[None]:
        message = h.message
        attributes = (
            {
                "messaging.system": "rabbitmq",
                "messaging.destination.name": h.queue,
                "messaging.operation": "process",
                "messaging.operation.type": "process",
                "messaging.message.id": printable(message.message_id),
                "messaging.rabbitmq.destination.routing_key": printable(message.routing_key),
            }
            if tracing.records(self.tracer)
            else {}
        )
        return self._span(h.queue, attributes, message.headers)

    @contextmanager
    def _span(self, queue: str, attributes: dict[str, str], carrier: Any) -> Iterator[None]:
        parent = tracing.extract(carrier)
        with tracing.span(self.tracer, f"process {queue}", SpanKind.CONSUMER, attributes, parent):
            yield

    def settled(self, h: Handling) -> None:
        """The message span's result: its event, the attempt, the outcome, why it failed."""
        span = trace.get_current_span()
        if not span.is_recording():
            return
        if h.event is not None:
            span.set_attributes(_event_attributes(h.event))
        span.set_attributes({"ikw.attempt": h.book.attempt, "ikw.outcome": str(h.settled)})
        if h.outcome is not None:
            span.set_attribute("ikw.action", str(h.outcome.action))
            if h.outcome.channel:
                span.set_attribute("ikw.channel", h.outcome.channel)
            if h.outcome.key_id:
                span.set_attribute("ikw.instant_key_id", h.outcome.key_id)
        if isinstance(h.decided, DeadLetter):
            span.set_attribute("ikw.reason", h.decided.reason)
        if isinstance(h.decided, Retry | DeadLetter):
            # The worker's one-line error: written to hold no link or contact (dead-letter
            # headers carry the same text).
            tracing.fail(span, type(h.error).__name__, h.decided.error)
        elif h.settled is Settled.NACKED:
            tracing.fail(span, "settle_failed")


class Measures(Observer):
    """The ``ikw_*`` metrics of each message."""

    def __init__(self, metrics: Metrics, patient: set[str]) -> None:
        self.metrics = metrics
        for queue in patient:
            metrics.retry_age.labels(queue)  # exported from the start, at 0

    @contextmanager
    def _watch(self, h: Handling) -> Iterator[None]:
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.metrics.in_flight.dec()
            self.metrics.seconds.labels(h.queue).observe(time_since(h))

    def watch(self, h: Handling) -> AbstractContextManager[None]:
        return self._watch(h)

    def accepted(self, h: Handling) -> None:
        # From the parsed event, for a producer we trust only: nobody else can skew it.
        assert h.event is not None
        self.metrics.observe_wait(h.queue, h.message, occurred_at(h.event))

    def settled(self, h: Handling) -> None:
        metrics = self.metrics
        if h.decided is not None:
            metrics.waited(h.queue, h.decided, h.book.first_failed_at)
        if h.settled is Settled.DEAD_LETTERED and isinstance(h.decided, DeadLetter):
            metrics.dead_letters.labels(h.decided.reason).inc()
        if h.outcome is not None:
            if h.outcome.action is Action.GRANTED:
                metrics.keys.labels("minted" if h.outcome.minted else "reused").inc()
                if h.outcome.channel:
                    metrics.deliveries.labels(h.outcome.channel).inc()
            metrics.keys.labels("deleted").inc(h.outcome.deleted)
            if h.outcome.action in STAY_ACTIONS:
                metrics.stays.labels(h.outcome.action).inc()
        metrics.messages.labels(h.queue, h.settled).inc()


class Activity(Observer):
    """An entry in the activity stream per settled message (``ikw activity``)."""

    def __init__(self, record: Callable[[Entry], None]) -> None:
        self.record = record

    def settled(self, h: Handling) -> None:
        self.record(entry(h))


class Logs(Observer):
    """One line per message: how it ended, with what it did."""

    def settled(self, h: Handling) -> None:
        done = {} if h.outcome is None else _describe(h.outcome)
        ms = round(time_since(h) * 1000, 1)
        fields = h.fields() | done | {"outcome": str(h.settled), "ms": ms}
        log.info("message %s", h.settled, extra={"ctx": fields})


def time_since(h: Handling) -> float:
    return time.monotonic() - h.started


def _event_attributes(event: Event) -> dict[str, str]:
    """Ids only: never a link or a contact."""
    match event:
        case AccessGranted() | AccessRevoked():
            return {
                "ikw.event_type": event.type,
                "event_id": event.event_id,
                "grant_id": event.grant_id,
            }
        case KeyCleanup():
            return {"ikw.event_type": event.type, "ikw.instant_key_id": event.instant_key_id}
        case StayDelivery():
            return _event_attributes(event.grant) | {"ikw.event_type": event.type}
        case StayEnd():
            return {"ikw.event_type": event.type, "ikw.reservation_key": event.reservation_key}
        case _:
            assert_never(event)


def _describe(outcome: Outcome) -> dict[str, Any]:
    fields = {
        "action": str(outcome.action),
        "channel": outcome.channel,
        "key_id": outcome.key_id,
        "user_identity_id": outcome.identity_id,
        "created": outcome.created or None,
        "deleted": outcome.deleted or None,
    }
    return {k: v for k, v in fields.items() if v is not None} | {"minted": outcome.minted}
