"""Carrying out a decision on one message: ack; a confirmed copy (retry, requeue, fresh copy, dead
letter), then the ack; or, when settling itself fails, a nack back to the broker."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol, assert_never

from aio_pika.abc import AbstractIncomingMessage

from worker.actions import Outcome
from worker.broker import headers
from worker.broker.connect import BROKER_ERRORS
from worker.broker.decision import (
    Ack,
    DeadLetter,
    Decision,
    Requeue,
    Reset,
    Retry,
    Settled,
    TakenBack,
    Trust,
    one_line,
    producer_of,
)
from worker.broker.headers import Bookkeeping
from worker.broker.publisher import announce_to
from worker.broker.returns import (
    LOSS_WINDOW,
    SLACK,
    Returns,
    delivery_count,
    key,
    redelivered,
)
from worker.errors import CredentialsRefused
from worker.events import (
    MAX_BODY_BYTES,
    AccessDeliveryFailed,
    AccessGranted,
    AccessRejected,
    Event,
    StayDelivery,
    event_key,
    glimpse,
)
from worker.routes import Route

log = logging.getLogger("worker.consumer")


class Port(Protocol):
    """What settling asks of the publisher: the real one, or a stub in tests."""

    async def ready(self) -> None: ...

    async def to_queue(self, queue: str, body: bytes, **kwargs: Any) -> None: ...

    async def delayed(self, queue: str, body: bytes, seconds: float, **kwargs: Any) -> None: ...


@dataclass
class Handling:
    """One message in hand: what it said, what became of it."""

    queue: str
    message: AbstractIncomingMessage
    book: Bookkeeping
    producer: str | None
    started: float = field(default_factory=time.monotonic)
    redelivery: dict[str, int | bool] = field(default_factory=dict)  # counts, when redelivered
    event: Event | None = None
    outcome: Outcome | None = None
    error: Exception | None = None
    decided: Decision | None = None
    settled: Settled | None = None

    @classmethod
    def begin(cls, queue: str, message: AbstractIncomingMessage, trust: Trust) -> "Handling":
        # x-ikw-* headers are ours: from anyone but the worker's own user they are not read.
        own = message.user_id == trust.worker
        book = headers.read(message.headers) if own else Bookkeeping()
        # Kept on every copy we publish.
        book = replace(book, received_at=book.received_at or datetime.now(UTC))
        producer = producer_of(message.user_id, book.publisher, trust)
        trusted = producer == trust.worker or producer in trust.publishers
        announce_to.set(producer if trusted else None)  # this message's outcomes go to it alone
        return cls(queue, message, book, producer)

    def fields(self) -> dict[str, Any]:
        """Its log fields so far."""
        seen = {
            "queue": self.queue,
            "message_id": printable(self.message.message_id),
            "attempt": self.book.attempt,
        }
        event = {} if self.event is None else {"event": event_key(self.event)}
        return seen | self.redelivery | event | self._why()

    def _why(self) -> dict[str, Any]:
        match self.decided:
            case Retry():
                return {"delay_s": round(self.decided.delay, 1), "error": self.decided.error}
            case DeadLetter() if self.settled is Settled.DEAD_LETTERED:
                return {"reason": self.decided.reason, "error": self.decided.error}
        return {}


def redelivery(h: Handling, returns: Returns) -> Reset | DeadLetter | None:
    """A crash loop, or a copy afresh before the broker's delivery limit (see returns)."""
    count, book = delivery_count(h.message.headers), h.book
    if not count and not book.suspect:
        return None
    returned = returns.returns(key(h.queue, h.message.body))
    since = book.copied_at - SLACK if book.copied_at else datetime.now(UTC) - LOSS_WINDOW
    losses = returns.losses_since(since)
    h.redelivery = dict(
        delivery_count=count, returned=returned, deliveries=book.deliveries, losses=losses
    )
    return redelivered(count, book.deliveries, book.excused, returned, losses, book.suspect)


def refusal(h: Handling, route: Route | None) -> AccessDeliveryFailed | AccessRejected | None:
    """What the producer hears of its dead-lettered event, exactly one: a grant that was read
    will deliver nothing (access.delivery_failed); any other was refused (access.rejected). None
    for the worker's own messages (a timer's producer did not publish it); ``announce`` sends
    it only to a trusted producer."""
    event, dead = h.event, h.decided
    if not isinstance(dead, DeadLetter):
        return None
    now = datetime.now(UTC)
    if isinstance(event, StayDelivery):
        event = event.grant  # a stay's key due: the grant's producer hears it failed
    if isinstance(event, AccessGranted) and route is not None and route.announces_failure:
        return AccessDeliveryFailed.of(event, dead.reason, dead.error, now)
    if route is not None and not route.public:
        return None  # the worker's own timers: their producer did not publish them
    read = glimpse(h.message.body)
    return AccessRejected(
        occurred_at=now,
        event_id=read["event_id"],
        grant_id=read["grant_id"],
        event_type=read["type"],
        reason=dead.reason,
        error=dead.error,
    )


class Settler:
    def __init__(
        self,
        port: Port,
        dead: str,
        returns: Returns,
        on_credentials_refused: Callable[[CredentialsRefused], None],
    ) -> None:
        self.port = port
        self.dead = dead
        self.returns = returns
        self.on_credentials_refused = on_credentials_refused
        self.holding: dict[AbstractIncomingMessage, str] = {}  # unsettled message -> its queue

    async def carry_out(self, h: Handling, decided: Decision) -> Settled:
        match decided:
            case Ack():
                return await self.ack(h.message)
            case TakenBack():
                return Settled.TAKEN_BACK
            case Reset():
                copy = replace(
                    self._origin(h),
                    deliveries=decided.deliveries,
                    excused=decided.excused,
                    copied_at=datetime.now(UTC),
                    suspect=decided.delay > 0,
                )
                return await self._republish(h, copy, Settled.REQUEUED, decided.delay or None)
            case Requeue():
                settled = await self._republish(h, self._origin(h), Settled.REQUEUED)
                assert isinstance(h.error, CredentialsRefused)
                self.on_credentials_refused(h.error)
                return settled
            case Retry():
                log.info("retrying later", extra={"ctx": h.fields()})
                retry = replace(
                    self._origin(h),
                    attempt=decided.attempt,
                    first_failed_at=decided.first_failed_at,
                    last_error=decided.error,
                    suspect=False,
                )
                return await self._republish(h, retry, Settled.RETRIED, decided.delay)
            case DeadLetter():
                return await self._dead_letter(h, decided)
            case _:
                assert_never(decided)

    def _origin(self, h: Handling) -> Bookkeeping:
        """What a republished copy says: where it was first published, and by whom."""
        return replace(
            h.book,
            routing_key=h.book.routing_key or h.message.routing_key or "",
            publisher=h.producer or "",
        )

    async def _dead_letter(self, h: Handling, decided: DeadLetter) -> Settled:
        now = datetime.now(UTC)
        book, message = self._origin(h), h.message
        # A body over the limit is kept only in part: its headers and first bytes say what it was.
        body = message.body[:MAX_BODY_BYTES]
        dead = Bookkeeping(
            routing_key=book.routing_key,
            publisher=book.publisher,
            reason=decided.reason,
            error=decided.error,
            attempts_made=book.attempt,
            source_queue=h.queue,
            first_failed_at=book.first_failed_at or now,
            dead_lettered_at=now,
            received_at=book.received_at,
            truncated=len(message.body) if len(body) < len(message.body) else None,
        )
        settled = await self._republish(h, dead, Settled.DEAD_LETTERED, body=body, to=self.dead)
        if settled is Settled.DEAD_LETTERED:
            fields = {"reason": decided.reason, "error": decided.error}
            log.warning("dead-lettered", extra={"ctx": h.fields() | fields})
        return settled

    async def _republish(
        self,
        h: Handling,
        book: Bookkeeping,
        done: Settled,
        delay: float | None = None,
        body: bytes | None = None,
        to: str | None = None,
    ) -> Settled:
        """A copy with ``book``'s headers (and ``body``, else the original's) to ``to`` (else the
        message's queue), confirmed, then the original acked."""
        message = h.message
        properties: dict[str, Any] = {
            "headers": headers.foreign(message.headers) | headers.write(book),
            "message_id": message.message_id,
            "content_type": message.content_type,
            # Kept, so the copy (a retry, a dead letter, its replay) reads as the original did.
            "content_encoding": message.content_encoding,
            # Tried again only while the original is ours: after, the broker redelivers it.
            "still": partial(held, message),
        }
        target = to or h.queue
        try:
            await self.port.ready()
            if not held(message):
                return Settled.TAKEN_BACK  # taken back while we waited: a copy would double it
            if delay is not None:
                await self.port.delayed(target, message.body, delay, **properties)
            else:
                await self.port.to_queue(
                    target, message.body if body is None else body, **properties
                )
        except BROKER_ERRORS as exc:
            log.warning(
                "could not publish the %s copy (%s); leaving the message to the broker",
                done,
                type(exc).__name__,
            )
            return await self.give_back(message, None)
        return done if await self.ack(message) is Settled.ACKED else Settled.REDELIVERED

    async def ack(self, message: AbstractIncomingMessage) -> Settled:
        try:
            await message.ack()
        except BROKER_ERRORS:
            # The channel closed under us: the broker redelivers the message and it is redone.
            log.warning("ack lost with the channel; the message will be redone")
            return Settled.REDELIVERED
        self.holding.pop(message, None)
        return Settled.ACKED

    async def give_back(self, message: AbstractIncomingMessage, exc: Exception | None) -> Settled:
        """The last resort: nack with requeue, so no message holds a prefetch slot for good."""
        if exc is not None and not held(message):
            # The connection went while settling (aiormq may say so with a bare Exception): the
            # broker has the message back, as on any cut.
            log.warning("settling lost with the channel; the message will be redone")
            return Settled.REDELIVERED
        if exc is not None:
            log.error(
                "could not settle the message (%s: %s); returning it to the broker",
                type(exc).__name__,
                one_line(exc),
                extra={"ctx": {"message_id": printable(message.message_id)}},
            )
        try:
            await message.nack(requeue=True)
        except BROKER_ERRORS:
            pass  # the channel is gone: the broker has it back already
        queue = self.holding.pop(message, None)
        if queue is not None and exc is None:  # the broker failed us: not the message's doing
            self.returns.note([key(queue, message.body)])
        return Settled.NACKED if exc is not None else Settled.REDELIVERED


def held(message: AbstractIncomingMessage) -> bool:
    """False once the channel the message came on has closed: the broker will redeliver it."""
    try:
        return not message.channel.is_closed
    except BROKER_ERRORS:
        return False


def printable(text: str | None) -> str:
    """Producers choose ids and routing keys: keep them short and printable in logs."""
    text = (text or "-")[:128]
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)
