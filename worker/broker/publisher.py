"""Confirmed, mandatory publishes: events, delayed messages (via the delay levels), dead letters."""

import asyncio
import logging
import math
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustChannel, HeadersType
from aio_pika.exceptions import ChannelClosed, ChannelInvalidStateError, DeliveryError, PublishError
from opentelemetry.trace import SpanKind, Tracer

from worker import tracing
from worker.broker import headers as bookkeeping
from worker.broker.connect import BROKER_ERRORS
from worker.events import Announcement, KeyCleanup, StayDelivery, StayEnd
from worker.queues import LEVELS, PRODUCER, Names

log = logging.getLogger("worker.publisher")

MAX_DELAY: int = 2**LEVELS - 1  # seconds, about 8.5 years
CONFIRM_TIMEOUT = 15.0  # seconds to wait for the broker's confirm before calling it failed
# After a reconnect the channels come back one by one: a publish waits this long for its own.
RESTORE_TIMEOUT = 10.0
# A publish that failed with its channel (closed by the broker, e.g. NOT_FOUND while a queue's
# leader moves; closed under us; a nack; no confirm in time) is tried again on a fresh channel,
# this often in all. The connection and the consumers stay: a channel error is not a lost node.
PUBLISH_ATTEMPTS = 3
CHANNEL_FAILURES = (ChannelClosed, ChannelInvalidStateError, DeliveryError, TimeoutError)

# The trusted producer of the message being handled (None: none), set once per message by the
# consumer: its outcome events go to it alone, and the expiry timers set meanwhile carry it.
announce_to: ContextVar[str | None] = ContextVar("announce_to", default=None)


def _whole(seconds: float) -> int:
    return min(max(math.ceil(seconds), 0), MAX_DELAY)  # rounded up: never early


def delay_routing_key(seconds: float, queue: str) -> str:
    """28 binary digits of the delay, most significant first, then the target queue."""
    return ".".join(format(_whole(seconds), f"0{LEVELS}b")) + "." + queue


def entry_level(seconds: float) -> int:
    """The delay level a message enters at: its delay's highest binary digit. The levels above
    would only pass it down, each a topic exchange matching all 28 digits: entering at the top,
    a 48-hour timer cost RabbitMQ 6 times the CPU (0.84 ms against 0.13 ms, measured)."""
    return max(_whole(seconds).bit_length() - 1, 0)


class Publisher:
    def __init__(
        self,
        channel: AbstractChannel,
        names: Names,
        user_id: str | None = None,
        *,
        tracer: Tracer | None = None,
    ) -> None:
        """``channel`` must be opened with publisher_confirms and on_return_raises. ``user_id``
        is the connection's user: the broker checks it, so consumers can trust it."""
        self.channel = channel
        self.names = names
        self.user_id = user_id
        self.tracer = tracer or tracing.tracer()
        self._exchanges: dict[str, AbstractExchange] = {}
        self._renewing = asyncio.Lock()

    async def ready(self) -> None:
        """Until the publishing channel is open: right after a reconnect the consuming channel
        may be back first. Raises TimeoutError when the broker stays away."""
        if self.channel.is_closed and isinstance(self.channel, AbstractRobustChannel):
            await asyncio.wait_for(self.channel.ready(), RESTORE_TIMEOUT)

    async def _exchange(self, name: str) -> AbstractExchange:
        if name not in self._exchanges:
            if name == "":
                self._exchanges[name] = self.channel.default_exchange
            else:
                self._exchanges[name] = await self.channel.get_exchange(name, ensure=False)
        return self._exchanges[name]

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: HeadersType | None = None,
        message_id: str | None = None,
        content_type: str | None = "application/json",
        content_encoding: str | None = None,
        still: Callable[[], bool] | None = None,
    ) -> None:
        """Raises when the broker nacks or returns (unroutable) the message. ``still``: whether
        the publish is still wanted (a copy of a message the broker has not taken back), asked
        before each try. A PRODUCER span whose context goes in the ``traceparent`` header: a
        child of the current span, else of the trace the headers already carry (a replay), else
        a new trace."""
        headers = dict(headers or {})
        parent = None if tracing.has_trace() else tracing.extract(headers)
        attributes = (
            {
                "messaging.system": "rabbitmq",
                "messaging.operation": "publish",
                "messaging.operation.type": "send",
                "messaging.destination.name": exchange or "amq.default",
                "messaging.rabbitmq.destination.routing_key": routing_key,
            }
            | ({"messaging.message.id": message_id} if message_id else {})
            if tracing.records(self.tracer)
            else {}
        )
        name = f"publish {exchange or routing_key}"
        with tracing.span(self.tracer, name, SpanKind.PRODUCER, attributes, parent):
            tracing.inject(headers)
            message = aio_pika.Message(
                body,
                headers=headers,
                content_type=content_type,
                content_encoding=content_encoding,
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                user_id=self.user_id,
            )
            await self._send(exchange, routing_key, message, still or (lambda: True))

    async def _send(
        self, exchange: str, routing_key: str, message: aio_pika.Message, still: Callable[[], bool]
    ) -> None:
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            await self.ready()  # raises when the connection stays away: no retry then
            if not still():
                raise ChannelInvalidStateError("no longer wanted: the original went back")
            target = await self._exchange(exchange)
            underlay = await self.channel.get_underlay_channel()
            try:
                await target.publish(message, routing_key, mandatory=True, timeout=CONFIRM_TIMEOUT)
                return
            except PublishError:
                raise  # returned: unroutable, which another try will not change
            except CHANNEL_FAILURES as exc:
                if attempt == PUBLISH_ATTEMPTS:
                    raise
                log.info(
                    "a publish failed with its channel (%s); trying again on a fresh one",
                    type(exc).__name__,
                )
                if isinstance(exc, TimeoutError):
                    await self._renew(underlay)
                await asyncio.sleep(0.25 * attempt)

    async def _renew(self, stuck: object) -> None:
        """Close and reopen a channel that gave no confirm in time (one the broker closed
        reopens by itself: a robust channel), unless another publish renewed it meanwhile."""
        async with self._renewing:
            if not self.channel.is_closed and await self.channel.get_underlay_channel() is stuck:
                await self.channel.close()
                await self.channel.reopen()

    async def publish_event(self, routing_key: str, body: bytes, message_id: str) -> None:
        await self.publish(self.names.exchange, routing_key, body, message_id=message_id)

    async def to_queue(self, queue: str, body: bytes, **kwargs: Any) -> None:
        await self.publish("", queue, body, **kwargs)

    async def delayed(self, queue: str, body: bytes, seconds: float, **kwargs: Any) -> None:
        """Deliver to ``queue`` after ``seconds`` (one-second resolution); no timer in memory."""
        level = self.names.delay(entry_level(seconds))
        await self.publish(level, delay_routing_key(seconds, queue), body, **kwargs)

    async def schedule_cleanup(
        self, instant_key_id: str, user_identity_id: str, expires_at: datetime
    ) -> None:
        body = KeyCleanup(
            type="instant_key.cleanup",
            version=1,
            instant_key_id=instant_key_id,
            user_identity_id=user_identity_id,
            expires_at=expires_at,
        ).model_dump_json()
        await self._timer(self.names.cleanup, body, expires_at, f"cleanup-{instant_key_id}")

    async def schedule_stay(self, timer: StayDelivery | StayEnd) -> None:
        queue = self.names.deliveries if isinstance(timer, StayDelivery) else self.names.checkouts
        await self._timer(queue, timer.model_dump_json(), timer.due_at, str(uuid.uuid4()))

    async def _timer(self, queue: str, body: str, due_at: datetime, message_id: str) -> None:
        """``body`` to ``queue`` at ``due_at``, carrying the producer of the message being
        handled, who hears what it does ("": nobody)."""
        seconds = (due_at - datetime.now(UTC)).total_seconds()
        producer = bookkeeping.write(bookkeeping.Bookkeeping(publisher=announce_to.get() or ""))
        await self.delayed(queue, body.encode(), seconds, message_id=message_id, headers=producer)

    async def announce(self, outcome: Announcement) -> None:
        """An outcome event on ``<ns>.outcomes``, routing key ``<producer>.<type>``, for the
        producer of the message being handled alone; none for a message without a trusted
        producer. With no queue of that producer's, ``<ns>.unheard`` takes it and keeps
        nothing."""
        producer = announce_to.get()
        if producer is None or not PRODUCER.fullmatch(producer):
            log.debug("no trusted producer to hear the %s outcome", outcome.type)
            return
        try:
            await self.publish(
                self.names.outcomes,
                f"{producer}.{outcome.type}",
                outcome.model_dump_json().encode(),
                message_id=str(uuid.uuid4()),
            )
        except BROKER_ERRORS as exc:
            log.warning("could not publish the %s outcome (%s)", outcome.type, type(exc).__name__)
