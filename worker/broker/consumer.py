"""The thin executor: takes messages from the work queues, runs the trust checks and the flow, and
carries out what ``decision.decide`` chose: ack, retry through the delay queues, requeue or
dead-letter. Whatever goes wrong while settling, the message goes back to the broker."""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer

from worker import tracing
from worker.broker import headers
from worker.broker.connect import BROKER_ERRORS
from worker.broker.decision import (
    Ack,
    DeadLetter,
    Decision,
    Leave,
    Limits,
    Requeue,
    Reset,
    Retry,
    Settled,
    Trust,
    check_clock,
    check_event,
    check_publisher,
    decide,
    one_line,
    producer_of,
)
from worker.broker.headers import Bookkeeping
from worker.broker.publisher import Publisher, announce_to
from worker.broker.returns import (
    LOSS_WINDOW,
    SLACK,
    Returns,
    delivery_count,
    key,
    redelivered,
)
from worker.errors import CredentialsRefused, Permanent, Transient
from worker.events import (
    ANNOUNCEMENTS,
    MAX_BODY_BYTES,
    AccessDeliveryFailed,
    AccessGranted,
    AccessRevoked,
    Event,
    KeyCleanup,
    KnownIdentity,
    check_size,
    event_key,
    parse,
)
from worker.flows import Action, Flows, Outcome
from worker.metrics import Metrics
from worker.queues import Names

log = logging.getLogger("worker.consumer")

CANCEL_TIMEOUT = 2.0  # seconds to stop a consumer; past it the broker is gone and so is it


class Consumer:
    def __init__(
        self,
        channel: aio_pika.abc.AbstractChannel,
        publisher: Publisher,
        names: Names,
        flows: Flows,
        metrics: Metrics,
        *,
        limits: Limits,
        trust: Trust,
        deadline: timedelta,
        on_credentials_refused: Callable[[CredentialsRefused], None],
        returns: Returns | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.channel = channel
        self.publisher = publisher
        self.names = names
        self.flows = flows
        self.metrics = metrics
        self.limits = limits
        self.trust = trust
        self.deadline = deadline
        self.on_credentials_refused = on_credentials_refused
        self.returns = returns or Returns()
        self.tracer = tracer or tracing.tracer()
        # Queue -> the message type it takes; None for the main exchange's unroutable events.
        self._takes: dict[str, str | None] = {**names.takes, names.unroutable: None}
        # Revokes and cleanups wait for Seam, however long: a key must not outlive them.
        self._patient = {names.revocations, names.cleanup}
        for queue in self._patient:
            metrics.retry_age.labels(queue)  # exported from the start, at 0
        self._queues: dict[str, AbstractQueue] = {}
        self._tags: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._holding: dict[AbstractIncomingMessage, str] = {}  # unsettled message -> its queue

    @property
    def consuming(self) -> bool:
        return bool(self._tags)

    @property
    def holding(self) -> int:
        """Messages in hand, unsettled, on a channel still open."""
        return sum(1 for message in self._holding if _held(message))

    async def resume(self) -> None:
        for name in self._takes:
            if name not in self._tags:
                queue = self._queues.get(name) or await self.channel.get_queue(name)
                self._queues[name] = queue
                self._tags[name] = await queue.consume(partial(self._on_message, name))

    async def pause(self) -> None:
        """Stop taking new messages; those in flight go on. Bounded: with the broker gone, a
        robust queue's cancel would wait for the reconnect, for ever."""
        tags = list(self._tags.items())
        self._tags.clear()
        await asyncio.gather(*(self._cancel(name, tag) for name, tag in tags))

    async def _cancel(self, name: str, tag: str) -> None:
        try:
            # The robust queue forgets the consumer first, so a reconnect will not restore it.
            await asyncio.wait_for(self._queues[name].cancel(tag), CANCEL_TIMEOUT)
        except BROKER_ERRORS:
            log.warning("could not cancel consumer", extra={"ctx": {"queue": name}})

    async def stop(self, grace: float) -> int:
        """Pause, let in-flight messages finish within ``grace`` seconds, cancel the rest.

        A cancelled handler leaves its message unacked: the broker requeues it when the channel
        closes. Returns how many were cancelled.
        """
        await self.pause()
        if not self._tasks:
            return 0
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        self._note(list(self._holding), loss=True)  # what we leave goes back at the close
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

    def lost(self, *_: object) -> None:
        """The consuming channel closed (its close callback): the broker takes back what it
        held, and what was on its way to it."""
        self._note([m for m in self._holding if not _held(m)], loss=True)

    def _note(self, gone: list[AbstractIncomingMessage], loss: bool = False) -> None:
        self.returns.note((key(self._holding.pop(m), m.body) for m in gone), loss)

    async def _on_message(self, queue: str, message: AbstractIncomingMessage) -> None:
        # aio-pika runs each delivery's callback in a task of its own: the message is handled in
        # it (a second task per message cost CPU for nothing), known to ``stop`` meanwhile.
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._traced(queue, message)
        finally:
            self._tasks.discard(task)

    async def _traced(self, queue: str, message: AbstractIncomingMessage) -> None:
        """A CONSUMER span around the handling, in the trace the message's ``traceparent`` names
        (a producer's, or the retry's or cleanup's PRODUCER span), else in a new one."""
        attributes = (
            {
                "messaging.system": "rabbitmq",
                "messaging.destination.name": queue,
                "messaging.operation": "process",
                "messaging.operation.type": "process",
                "messaging.message.id": _printable(message.message_id),
                "messaging.rabbitmq.destination.routing_key": _printable(message.routing_key),
            }
            if tracing.records(self.tracer)
            else {}
        )
        parent = tracing.extract(message.headers)
        with tracing.span(self.tracer, f"process {queue}", SpanKind.CONSUMER, attributes, parent):
            await self._handle(queue, message)

    async def _handle(self, queue: str, message: AbstractIncomingMessage) -> None:
        started = time.monotonic()
        self.metrics.in_flight.inc()
        self._holding[message] = queue
        # x-ikw-* headers are ours: from anyone but the worker's own user they are not read.
        own = message.user_id == self.trust.worker
        book = headers.read(message.headers) if own else Bookkeeping()
        received_at = book.received_at or datetime.now(UTC)  # kept on every copy we publish
        book = replace(book, received_at=received_at)
        producer = producer_of(message.user_id, book.publisher, self.trust)
        trusted = producer == self.trust.worker or producer in self.trust.publishers
        announce_to.set(producer if trusted else None)  # this message's outcomes go to it alone
        ctx: dict[str, Any] = {
            "queue": queue,
            "message_id": _printable(message.message_id),
            "attempt": book.attempt,
        }
        outcome: Outcome | None = None
        error: Exception | None = None
        decided: Decision | None = None
        parsed: list[Event] = []
        early = self._redelivered(queue, message, book, ctx)
        try:
            try:
                if early is None:
                    outcome = await self._work(queue, message, producer, received_at, ctx, parsed)
            except Exception as exc:
                error = exc
            try:
                decided = early or decide(
                    error,
                    held=_held(message),
                    attempt=book.attempt,
                    first_failed_at=book.first_failed_at,
                    now=datetime.now(UTC),
                    limits=self.limits,
                    patient=queue in self._patient,
                )
                self.metrics.waited(queue, decided, book.first_failed_at)
                settled = await asyncio.shield(
                    self._carry_out(decided, queue, message, book, producer, error, ctx)
                )
                if settled is Settled.DEAD_LETTERED and isinstance(decided, DeadLetter):
                    await asyncio.shield(self._announce_failure(parsed, decided))
            except Exception as exc:
                settled = await asyncio.shield(self._give_back(message, exc))
            if outcome is not None:
                self._count(outcome, ctx)
                if outcome.action is Action.FENCED and settled is Settled.ACKED:
                    settled = Settled.REVOKED
            self.metrics.messages.labels(queue, settled).inc()
            ctx["outcome"] = str(settled)
            _annotate(book.attempt, settled, decided, outcome, error)
            ctx["ms"] = round((time.monotonic() - started) * 1000, 1)
            log.info("message %s", settled, extra={"ctx": ctx})
        finally:
            # Not settled, and its channel gone (aio-pika cancels the handler with it).
            if self._holding.get(message) and not _held(message):
                self._note([m for m in self._holding if not _held(m)])
            self._holding.pop(message, None)
            self.metrics.in_flight.dec()
            self.metrics.seconds.labels(queue).observe(time.monotonic() - started)
            # The error's traceback holds this frame, which holds the error: a cycle that would
            # keep the message (its body: up to the broker's max_message_size) until a full GC.
            error = None

    def _redelivered(
        self, queue: str, message: AbstractIncomingMessage, book: Bookkeeping, ctx: dict[str, Any]
    ) -> Reset | DeadLetter | None:
        """A crash loop, or a copy afresh before the broker's delivery limit (see returns)."""
        count = delivery_count(message.headers)
        if not count and not book.suspect:
            return None
        returned = self.returns.returns(key(queue, message.body))
        since = book.copied_at - SLACK if book.copied_at else datetime.now(UTC) - LOSS_WINDOW
        losses = self.returns.losses_since(since)
        ctx.update(
            delivery_count=count, returned=returned, deliveries=book.deliveries, losses=losses
        )
        return redelivered(count, book.deliveries, book.excused, returned, losses, book.suspect)

    async def _work(
        self,
        queue: str,
        message: AbstractIncomingMessage,
        producer: str | None,
        received_at: datetime,
        ctx: dict[str, Any],
        parsed: list[Event],
    ) -> Outcome:
        check_size(message.body)  # first: a body over the limit is not even checked for trust
        takes = self._takes[queue]
        if takes is None:
            if message.user_id == self.trust.worker and message.routing_key in ANNOUNCEMENTS:
                return Outcome(Action.UNHEARD)  # our own outcome event, with nobody listening
            raise Permanent(
                f"no queue takes routing key {_printable(message.routing_key)!r}",
                reason="unroutable",
            )
        check_publisher(takes, message.user_id, producer, self.trust)
        event = parse(message.body, message.content_type, message.content_encoding)
        ctx["event"] = event_key(event)
        parsed.append(event)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(_event_attributes(event))
        check_event(takes, event, producer, self.trust)
        check_clock(event, received_at, self.limits.max_clock_skew)
        # Measured from the parsed event, and only for a producer we trust: no second parse, and
        # nobody else can skew it.
        sent = event.occurred_at if isinstance(event, AccessGranted | AccessRevoked) else None
        self.metrics.observe_wait(queue, message, sent)
        seconds = self.deadline.total_seconds()
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                return await self._dispatch(event, partial(_held, message))
        except TimeoutError as exc:
            if not deadline.expired():
                raise  # a timeout of its own (a Seam call, a confirm), not the deadline
            raise Transient(f"not done within IKW_MESSAGE_DEADLINE ({seconds:g} s)") from exc

    async def _dispatch(self, event: Event, still_held: Callable[[], bool]) -> Outcome:
        if isinstance(event, AccessGranted):
            return await self.flows.grant(event, still_held)
        if isinstance(event, AccessRevoked):
            return await self.flows.revoke(event)
        assert isinstance(event, KeyCleanup)
        return await self.flows.cleanup(event)

    async def _carry_out(
        self,
        decided: Decision,
        queue: str,
        message: AbstractIncomingMessage,
        book: Bookkeeping,
        producer: str | None,
        error: Exception | None,
        ctx: dict[str, Any],
    ) -> Settled:
        if isinstance(decided, Ack):
            return await self._ack(message)
        if isinstance(decided, Leave):
            return Settled.ABANDONED
        # What a republished copy says: where it was first published, and by whom.
        book = replace(
            book,
            routing_key=book.routing_key or message.routing_key or "",
            publisher=producer or "",
        )
        if isinstance(decided, Reset):
            copy = replace(
                book,
                deliveries=decided.deliveries,
                excused=decided.excused,
                copied_at=datetime.now(UTC),
                suspect=decided.delay > 0,
            )
            delay = decided.delay or None
            return await self._republish(queue, message, copy, Settled.REQUEUED, delay)
        if isinstance(decided, Requeue):
            settled = await self._republish(queue, message, book, Settled.REQUEUED)
            assert isinstance(error, CredentialsRefused)
            self.on_credentials_refused(error)
            return settled
        if isinstance(decided, Retry):
            ctx.update(delay_s=round(decided.delay, 1), error=decided.error)
            log.info("retrying later", extra={"ctx": ctx})
            retry = replace(
                book,
                attempt=decided.attempt,
                first_failed_at=decided.first_failed_at,
                last_error=decided.error,
                suspect=False,
            )
            return await self._republish(queue, message, retry, Settled.RETRIED, decided.delay)
        assert isinstance(decided, DeadLetter)
        now = datetime.now(UTC)
        # A body over the limit is kept only in part: its headers and first bytes say what it was.
        body = message.body[:MAX_BODY_BYTES]
        dead = Bookkeeping(
            routing_key=book.routing_key,
            publisher=book.publisher,
            reason=decided.reason,
            error=decided.error,
            attempts=book.attempt,
            source_queue=queue,
            first_failed_at=book.first_failed_at or now,
            dead_lettered_at=now,
            received_at=book.received_at,
            truncated=len(message.body) if len(body) < len(message.body) else None,
        )
        settled = await self._republish(
            self.names.dead, message, dead, Settled.DEAD_LETTERED, body=body
        )
        if settled is Settled.DEAD_LETTERED:
            ctx.update(reason=decided.reason, error=decided.error)
            log.warning("dead-lettered", extra={"ctx": ctx})
            self.metrics.dead_letters.labels(decided.reason).inc()
        return settled

    async def _republish(
        self,
        target: str,
        message: AbstractIncomingMessage,
        book: Bookkeeping,
        done: Settled,
        delay: float | None = None,
        body: bytes | None = None,
    ) -> Settled:
        """A copy with ``book``'s headers (and ``body``, else the original's), confirmed, then the
        original acked."""
        properties: dict[str, Any] = {
            "headers": headers.foreign(message.headers) | headers.write(book),
            "message_id": message.message_id,
            "content_type": message.content_type,
            # Kept, so the copy (a retry, a dead letter, its replay) reads as the original did.
            "content_encoding": message.content_encoding,
            # Tried again only while the original is ours: after, the broker redelivers it.
            "still": partial(_held, message),
        }
        try:
            await self.publisher.ready()
            if not _held(message):
                return Settled.ABANDONED  # taken back while we waited: a copy would double it
            if delay is not None:
                await self.publisher.delayed(target, message.body, delay, **properties)
            else:
                await self.publisher.to_queue(
                    target, message.body if body is None else body, **properties
                )
        except BROKER_ERRORS as exc:
            log.warning(
                "could not publish the %s copy (%s); leaving the message to the broker",
                done,
                type(exc).__name__,
            )
            return await self._give_back(message, None)
        return done if await self._ack(message) is Settled.ACKED else Settled.REDELIVERED

    async def _ack(self, message: AbstractIncomingMessage) -> Settled:
        try:
            await message.ack()
        except BROKER_ERRORS:
            # The channel closed under us: the broker redelivers the message and it is redone.
            log.warning("ack lost with the channel; the message will be redone")
            return Settled.REDELIVERED
        self._holding.pop(message, None)
        return Settled.ACKED

    async def _give_back(self, message: AbstractIncomingMessage, exc: Exception | None) -> Settled:
        """The last resort: nack with requeue, so no message holds a prefetch slot for good."""
        if exc is not None and not _held(message):
            # The connection went while settling (aiormq may say so with a bare Exception): the
            # broker has the message back, as on any cut.
            log.warning("settling lost with the channel; the message will be redone")
            return Settled.REDELIVERED
        if exc is not None:
            log.error(
                "could not settle the message (%s: %s); returning it to the broker",
                type(exc).__name__,
                one_line(exc),
                extra={"ctx": {"message_id": _printable(message.message_id)}},
            )
        try:
            await message.nack(requeue=True)
        except BROKER_ERRORS:
            pass  # the channel is gone: the broker has it back already
        queue = self._holding.pop(message, None)
        if queue is not None and exc is None:  # the broker failed us: not the message's doing
            self.returns.note([key(queue, message.body)])
        return Settled.RETURNED if exc is not None else Settled.REDELIVERED

    async def _announce_failure(self, parsed: list[Event], dead: DeadLetter) -> None:
        """A grant that will deliver nothing: its booking system hears why."""
        if not parsed or not isinstance(parsed[0], AccessGranted):
            return
        event = parsed[0]
        await self.publisher.announce(
            AccessDeliveryFailed(
                occurred_at=datetime.now(UTC),
                event_id=event.event_id,
                grant_id=event.grant_id,
                user_identity=KnownIdentity(
                    user_identity_id=event.user_identity.user_identity_id,
                    user_identity_key=event.user_identity.user_identity_key,
                ),
                reason=dead.reason,
                error=dead.error,
            )
        )

    def _count(self, outcome: Outcome, ctx: dict[str, Any]) -> None:
        ctx.update(_describe(outcome))
        if outcome.action is Action.GRANTED:
            self.metrics.keys.labels("minted" if outcome.minted else "reused").inc()
            if outcome.channel:
                self.metrics.deliveries.labels(outcome.channel).inc()
        self.metrics.keys.labels("deleted").inc(outcome.deleted)


def _event_attributes(event: Event) -> dict[str, str]:
    """Ids only: never a link or a contact."""
    if isinstance(event, KeyCleanup):
        return {"ikw.event_type": event.type, "ikw.instant_key_id": event.instant_key_id}
    return {
        "ikw.event_type": event.type,
        "event_id": event.event_id,
        "grant_id": event.grant_id,
    }


def _annotate(
    attempt: int,
    settled: Settled,
    decided: Decision | None,
    outcome: Outcome | None,
    error: Exception | None,
) -> None:
    """The message span's result: the attempt, the settled outcome, why it failed."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attributes({"ikw.attempt": attempt, "ikw.outcome": str(settled)})
    if outcome is not None:
        span.set_attribute("ikw.action", str(outcome.action))
        if outcome.channel:
            span.set_attribute("ikw.channel", outcome.channel)
        if outcome.key_id:
            span.set_attribute("ikw.instant_key_id", outcome.key_id)
    if isinstance(decided, DeadLetter):
        span.set_attribute("ikw.reason", decided.reason)
    if isinstance(decided, Retry | DeadLetter):
        # The worker's one-line error: written to hold no link or contact (dead-letter headers
        # carry the same text).
        tracing.fail(span, type(error).__name__, decided.error)
    elif settled is Settled.RETURNED:
        tracing.fail(span, "settle_failed")


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


def _held(message: AbstractIncomingMessage) -> bool:
    """False once the channel the message came on has closed: the broker will redeliver it."""
    try:
        return not message.channel.is_closed
    except BROKER_ERRORS:
        return False


def _printable(text: str | None) -> str:
    """Producers choose ids and routing keys: keep them short and printable in logs."""
    text = (text or "-")[:128]
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)
