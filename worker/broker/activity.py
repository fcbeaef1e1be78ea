"""The activity stream ``<ns>.activity``: one small JSON entry per settled message (ids, what
happened, why; never a link, a contact or a guest's name), written best effort, and read back
by ``ikw activity`` up to a marker of its own."""

import asyncio
import json
import logging
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, assert_never

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from worker.broker.connect import BROKER_ERRORS
from worker.broker.decision import DeadLetter, Retry
from worker.broker.fence import ACK_EVERY, STREAM_PREFETCH, consume_stream, decode
from worker.broker.settle import Handling, printable
from worker.events import (
    AccessGranted,
    AccessRevoked,
    Event,
    KeyCleanup,
    StayDelivery,
    StayEnd,
    reservation_of,
)

log = logging.getLogger("worker.activity")

BUFFER = 10_000  # entries waiting to be written; past it new ones are dropped (and counted)
Entry = dict[str, Any]


def entry(h: Handling) -> Entry:
    """What became of one message. Ids chosen by producers are cut short and made printable."""
    message, outcome = h.message, h.outcome
    found: Entry = {
        "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "queue": h.queue,
        "message_id": printable(message.message_id),
        "producer": h.producer,
        "attempt": h.book.attempt,
        "settled": str(h.settled),
    }
    if h.event is None:
        found["routing_key"] = printable(h.book.routing_key or message.routing_key)
    found |= _about(h.event)
    if outcome is not None:
        found |= {
            "action": str(outcome.action),
            "channel": outcome.channel,
            "key_id": outcome.key_id,
            "identity_id": outcome.identity_id or found.get("identity_id"),
            "deleted": outcome.deleted or None,
        }
    match h.decided:
        case Retry():
            found |= {"retry_in_s": round(h.decided.delay), "error": h.decided.error}
        case DeadLetter():
            found |= {"reason": h.decided.reason, "error": h.decided.error}
    return {k: v for k, v in found.items() if v is not None}


def _about(event: Event | None) -> Entry:
    match event:
        case None:
            return {}
        case AccessGranted() | AccessRevoked():
            return {
                "type": event.type,
                "event_id": printable(event.event_id),
                "grant_id": printable(event.grant_id),
                "identity_key": event.user_identity.user_identity_key,
                "identity_id": event.user_identity.user_identity_id,
                "reservation_key": reservation_of(event),
            }
        case KeyCleanup():
            return {
                "type": event.type,
                "key_id": event.instant_key_id,
                "identity_id": event.user_identity_id,
            }
        case StayDelivery():
            return _about(event.grant) | {"type": event.type, "why": event.reason}
        case StayEnd():
            return {
                "type": event.type,
                "identity_key": event.user_identity.user_identity_key,
                "identity_id": event.user_identity.user_identity_id,
                "reservation_key": event.reservation_key,
                "revision": event.revision,
            }
        case _:
            assert_never(event)


class ActivityLog:
    """Entries wait in a bounded buffer; one task publishes them on a channel of their own,
    unconfirmed: recording never holds a message's settling back, and an entry that cannot be
    written is dropped (logged once per run of failures)."""

    def __init__(self, channel: AbstractChannel, stream: str, user_id: str) -> None:
        self.channel = channel
        self.stream = stream
        self.user_id = user_id
        self.dropped = 0
        self._buffer: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # the buffer is empty
        self._idle.set()
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    def record(self, entry: Entry) -> None:
        if len(self._buffer) >= BUFFER:
            self._drop(1, "the buffer is full")
            return
        self._buffer.append(json.dumps(entry, separators=(",", ":")).encode())
        self._idle.clear()
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._write())

    async def flushed(self) -> None:
        """Until every entry recorded so far is written (or dropped)."""
        await self._idle.wait()

    async def stop(self, timeout: float) -> None:
        """Write what is buffered, within ``timeout`` seconds, then stop."""
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self.flushed(), timeout)
        except TimeoutError:
            self._drop(len(self._buffer), "the worker stopped first")
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._buffer:
                body = self._buffer.popleft()
                message = aio_pika.Message(
                    body, content_type="application/json", user_id=self.user_id
                )
                try:
                    await self.channel.default_exchange.publish(message, self.stream)
                except BROKER_ERRORS as exc:
                    self._drop(1 + len(self._buffer), type(exc).__name__)
                    self._buffer.clear()
                else:
                    self._failing = False
            self._idle.set()

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        if not self._failing:
            self._failing = True
            log.warning(
                "could not record %d activity entries (%s); dropping them",
                count,
                why,
                extra={"ctx": {"stream": self.stream}},
            )


async def read(
    connection: AbstractRobustConnection,
    stream: str,
    since: datetime,
    worker: str,
    take: Callable[[Entry], None],
) -> int:
    """Each entry the worker's user wrote from ``since`` to now, in order, to ``take``; the end
    is a marker appended first. Returns how many entries were read."""
    marker = uuid.uuid4().hex
    writing = await connection.channel(publisher_confirms=True, on_return_raises=True)
    body = json.dumps({"t": "marker", "marker": marker}).encode()
    try:
        await writing.default_exchange.publish(aio_pika.Message(body), stream, mandatory=True)
    finally:
        if not writing.is_closed:
            await writing.close()
    reading = await connection.channel()
    await reading.set_qos(prefetch_count=STREAM_PREFETCH)
    end: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    count = 0

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal count
        count += 1
        found = decode(message.body)
        if found is not None and found.get("marker") == marker and not end.done():
            end.set_result(None)
        elif found is not None and message.user_id == worker and "marker" not in found:
            take(found)
        if count % ACK_EVERY == 0:
            await message.ack(multiple=True)  # streams hand out more only as we ack

    try:
        await consume_stream(reading, stream, on_message, since)
        await end
    finally:
        await reading.close()
    return count
