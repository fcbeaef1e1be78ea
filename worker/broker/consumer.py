"""The one place that decides, from the exception's type, whether a message is acked, retried
later through the delay queues, requeued, or dead-lettered with a reason."""

import asyncio
import logging
import random
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from worker.broker.connect import BROKER_ERRORS
from worker.broker.publisher import Publisher, clean_headers
from worker.broker.topology import Names
from worker.errors import Abandoned, CredentialsRefused, Permanent, Transient
from worker.events import AccessGranted, AccessRevoked, Event, KeyCleanup, event_key, parse
from worker.flows import Flows, Outcome
from worker.metrics import Metrics

log = logging.getLogger("worker.consumer")

MAX_BACKOFF = 3600.0


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Exponential with jitter: about 1 s, 2 s, 4 s ... capped at an hour; honours Retry-After."""
    delay = min(MAX_BACKOFF, 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)
    return max(1.0, delay, retry_after or 0.0)


def one_line(exc: BaseException) -> str:
    if not isinstance(exc, Transient | Permanent | CredentialsRefused):
        # A library's message may quote what we sent: name the type and where it was raised.
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        return f"unexpected {type(exc).__name__}{where}"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]


class Consumer:
    def __init__(
        self,
        channel: aio_pika.abc.AbstractChannel,
        publisher: Publisher,
        names: Names,
        flows: Flows,
        metrics: Metrics,
        *,
        max_attempts: int,
        max_retry_age: float,
        on_credentials_refused: Callable[[CredentialsRefused], None],
    ) -> None:
        self.channel = channel
        self.publisher = publisher
        self.names = names
        self.flows = flows
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.max_retry_age = timedelta(seconds=max_retry_age)
        self.on_credentials_refused = on_credentials_refused
        self._queues: dict[str, AbstractQueue] = {}
        self._tags: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def consuming(self) -> bool:
        return bool(self._tags)

    async def resume(self) -> None:
        for name in self.names.work_queues:
            if name not in self._tags:
                queue = self._queues.get(name) or await self.channel.get_queue(name)
                self._queues[name] = queue
                self._tags[name] = await queue.consume(partial(self._on_message, name))

    async def pause(self) -> None:
        """Stop taking new messages; those in flight go on."""
        for name, tag in list(self._tags.items()):
            del self._tags[name]
            try:
                await self._queues[name].cancel(tag)
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
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

    async def _on_message(self, queue: str, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._handle(queue, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, queue: str, message: AbstractIncomingMessage) -> None:
        started = time.monotonic()
        self.metrics.in_flight.inc()
        ctx: dict[str, Any] = {"queue": queue, "attempt": _attempt(message)}
        try:
            try:
                event = parse(message.body, message.content_type)
                ctx["event"] = event_key(event)
                outcome = await self._dispatch(event, partial(_held, message))
            except Exception as exc:
                settled = await asyncio.shield(self._settle_failure(queue, message, exc))
            else:
                settled = await asyncio.shield(self._ack(message))
                ctx.update(_describe(outcome))
                if outcome.action == "granted":
                    self.metrics.keys.labels("minted" if outcome.minted else "reused").inc()
                self.metrics.keys.labels("deleted").inc(outcome.deleted)
                if outcome.channel:
                    self.metrics.deliveries.labels(outcome.channel).inc()
            self.metrics.messages.labels(queue, settled).inc()
            ctx["outcome"] = settled
            ctx["ms"] = round((time.monotonic() - started) * 1000, 1)
            log.info("message %s", settled, extra={"ctx": ctx})
        finally:
            self.metrics.in_flight.dec()
            self.metrics.seconds.labels(queue).observe(time.monotonic() - started)

    async def _settle_failure(
        self, queue: str, message: AbstractIncomingMessage, exc: Exception
    ) -> str:
        """The one decision for a failed message: requeue, dead-letter or retry, by type."""
        if isinstance(exc, Abandoned) or not _held(message):
            return "abandoned"  # the broker redelivers it: publishing a copy would double it
        if isinstance(exc, CredentialsRefused):
            settled = await self._requeue(queue, message)
            self.on_credentials_refused(exc)
            return settled
        if isinstance(exc, Permanent):
            return await self._dead_letter(queue, message, exc.reason, exc)
        return await self._retry(queue, message, exc)

    async def _dispatch(self, event: Event, still_held: Callable[[], bool]) -> Outcome:
        if isinstance(event, AccessGranted):
            return await self.flows.grant(event, still_held)
        if isinstance(event, AccessRevoked):
            return await self.flows.revoke(event)
        assert isinstance(event, KeyCleanup)
        return await self.flows.cleanup(event)

    async def _ack(self, message: AbstractIncomingMessage) -> str:
        try:
            await message.ack()
        except BROKER_ERRORS:
            # The channel closed under us: the broker redelivers the message and it is redone.
            log.warning("ack lost with the channel; the message will be redone")
            return "redelivered"
        return "acked"

    async def _after_failed_publish(self, message: AbstractIncomingMessage, what: str) -> str:
        log.warning("could not publish the %s; leaving the message to the broker", what)
        try:
            await message.nack(requeue=True)
        except BROKER_ERRORS:
            pass
        return "redelivered"

    async def _requeue(self, queue: str, message: AbstractIncomingMessage) -> str:
        """Back to the queue, attempt count unchanged: the failure was not the message's."""
        try:
            await self.publisher.to_queue(queue, message.body, **_properties(message))
        except BROKER_ERRORS:
            return await self._after_failed_publish(message, "requeue")
        return "requeued" if await self._ack(message) == "acked" else "redelivered"

    async def _retry(self, queue: str, message: AbstractIncomingMessage, exc: Exception) -> str:
        attempt = _attempt(message)
        now = datetime.now(UTC)
        first = _first_failed_at(message) or now
        if attempt >= self.max_attempts or now - first >= self.max_retry_age:
            error = f"gave up after {attempt} attempts: {one_line(exc)}"
            return await self._dead_letter(queue, message, "retries_exhausted", error)
        delay = backoff(attempt, getattr(exc, "retry_after", None))
        props = _properties(message)
        props["headers"].update(
            {
                "x-ikw-attempt": attempt + 1,
                "x-ikw-first-failed-at": first.isoformat(),
                "x-ikw-routing-key": _original_routing_key(message),
                "x-ikw-last-error": one_line(exc),
            }
        )
        log.info(
            "retrying later",
            extra={
                "ctx": {
                    "queue": queue,
                    "attempt": attempt,
                    "delay_s": round(delay, 1),
                    "error": one_line(exc),
                }
            },
        )
        try:
            await self.publisher.delayed(queue, message.body, delay, **props)
        except BROKER_ERRORS:
            return await self._after_failed_publish(message, "retry")
        return "retried" if await self._ack(message) == "acked" else "redelivered"

    async def _dead_letter(
        self, queue: str, message: AbstractIncomingMessage, reason: str, error: object
    ) -> str:
        now = datetime.now(UTC)
        text = one_line(error) if isinstance(error, BaseException) else str(error)
        props = _properties(message)
        props["headers"].update(
            {
                "x-ikw-reason": reason,
                "x-ikw-error": text,
                "x-ikw-attempts": _attempt(message),
                "x-ikw-source-queue": queue,
                "x-ikw-routing-key": _original_routing_key(message),
                "x-ikw-first-failed-at": (_first_failed_at(message) or now).isoformat(),
                "x-ikw-dead-lettered-at": now.isoformat(),
            }
        )
        props["headers"].pop("x-ikw-last-error", None)
        try:
            await self.publisher.to_queue(self.names.dead, message.body, **props)
        except BROKER_ERRORS:
            return await self._after_failed_publish(message, "dead letter")
        log.warning(
            "dead-lettered", extra={"ctx": {"queue": queue, "reason": reason, "error": text}}
        )
        self.metrics.dead_letters.labels(reason).inc()
        return "dead_lettered" if await self._ack(message) == "acked" else "redelivered"


def _describe(outcome: Outcome) -> dict[str, Any]:
    fields = {"action": outcome.action, "channel": outcome.channel, "key_id": outcome.key_id}
    return {k: v for k, v in fields.items() if v is not None} | {"minted": outcome.minted}


def _held(message: AbstractIncomingMessage) -> bool:
    """False once the channel the message came on has closed: the broker will redeliver it."""
    try:
        return not message.channel.is_closed
    except BROKER_ERRORS:
        return False


def _attempt(message: AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get("x-ikw-attempt", 1)
    return value if isinstance(value, int) and value >= 1 else 1


def _first_failed_at(message: AbstractIncomingMessage) -> datetime | None:
    value = (message.headers or {}).get("x-ikw-first-failed-at")
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _original_routing_key(message: AbstractIncomingMessage) -> str:
    value = (message.headers or {}).get("x-ikw-routing-key")
    return value if isinstance(value, str) else (message.routing_key or "")


def _properties(message: AbstractIncomingMessage) -> dict[str, Any]:
    return {
        "headers": clean_headers(message.headers),
        "message_id": message.message_id,
        "content_type": message.content_type,
    }
