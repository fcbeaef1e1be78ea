"""The worker's record on RabbitMQ streams. ``<ns>.fence`` holds typed JSON entries (revokes,
deliveries, the parts of snapshots, markers) that only the worker's user writes;
``<ns>.fence.index`` points at the latest snapshot. A replica reads from the latest snapshot on,
follows the stream into memory (worker/record.py) and, after a reconnect, resumes after the last
entry it read."""

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustQueue,
    ConsumerTag,
)

from worker.broker.connect import BROKER_ERRORS
from worker.broker.publisher import Publisher
from worker.errors import Transient
from worker.queues import Names
from worker.record import Apply, Dump, Entry, Record, StayRecord, millis

log = logging.getLogger("worker.fence")

STREAM_PREFETCH = 2000  # streams are read in chunks; acked every ACK_EVERY entries while behind
ACK_EVERY = 500  # measured: 13,000 entries/s against 6,000 with an ack per entry
SNAPSHOT_EVERY = 50_000  # entries after the latest snapshot before a replica writes another
GRANT_WAIT = 60.0  # how long a grant waits for a replica catching up before it is retried later
READ_BACK_WAIT = 60.0  # how long a revoke waits to read its own entry back
RETRY_CAP = 30.0


def utcnow() -> datetime:
    return datetime.now(UTC)


def decode(body: bytes) -> Entry | None:
    try:
        entry = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return entry if isinstance(entry, dict) else None


async def consume_stream(
    channel: AbstractChannel,
    stream: str,
    callback: Callable[[AbstractIncomingMessage], Awaitable[None]],
    offset: int | str | datetime,
) -> tuple[AbstractQueue, ConsumerTag]:
    """Read ``stream`` from ``offset``. Not aio-pika's robust consumer: after every reconnect
    it would start again from ``offset`` (the whole stream, for "first"); the fence resumes
    after the last entry it read instead."""
    queue = await channel.get_queue(stream, ensure=False)
    arguments: dict[str, Any] = {"x-stream-offset": offset}
    if isinstance(queue, AbstractRobustQueue):
        return queue, await queue.consume(callback, arguments=arguments, robust=False)
    return queue, await queue.consume(callback, arguments=arguments)


def stay_entry(stay: StayRecord, reservation_key: str) -> Entry:
    """A stay's revision as the record stream holds it (the bench writes the same)."""
    entry: Entry = {"t": "stay", "r": reservation_key, "rev": stay.revision}
    entry |= {"grant_at": stay.grant_at, "event": stay.event_id, "names": list(stay.names)}
    return entry | {"deliver": stay.deliver_at, "start": stay.starts_at, "end": stay.ends_at}


class StreamFence:
    def __init__(
        self,
        names: Names,
        publisher: Publisher,
        worker_user: str,
        retention: timedelta = timedelta(days=30),
    ) -> None:
        self.names = names
        self.publisher = publisher
        self.worker_user = worker_user
        self.record = Record(retention, utcnow)
        self.caught_up = asyncio.Event()
        self.read = 0  # entries read since start
        self.memory = 0  # bytes the record holds, as of the last catch-up or snapshot
        self.snapshot_every = SNAPSHOT_EVERY
        self._first: int | None = None  # offset of the first entry this replica read
        self._offset: int | None = None  # offset of the last entry read
        self._start: int | str = "first"
        self._snapshot_from = 0  # offset the latest snapshot seen covers up to (exclusive)
        self._threshold = self.snapshot_every * random.uniform(1.0, 1.2)  # rarely two at once
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._channel: AbstractChannel | None = None
        self._tag: str | None = None  # our consumer of the fence
        self._acking = asyncio.Lock()
        self._acked: tuple[object, int] = (None, 0)  # the channel, the highest tag acked on it
        self._catching_up: asyncio.Task[None] | None = None
        self._snapshotting: asyncio.Task[None] | None = None

    # -- the Fence port -------------------------------------------------------------------------

    def revoked_at(self, names: Iterable[str]) -> datetime | None:
        return self.record.revoked_at(names)

    def delivered_for(self, instant_key_id: str) -> datetime | None:
        return self.record.delivered_for(instant_key_id)

    async def record_revoke(self, names: Iterable[str], occurred_at: datetime) -> None:
        # "occurred_at" as the first records wrote it: replicas of the previous version read it.
        entry = {"t": "revoke", "names": sorted(set(names)), "occurred_at": occurred_at.isoformat()}
        await self.append(entry, read_back=True)

    async def record_delivery(
        self,
        instant_key_id: str,
        grant_at: datetime,
        expires_at: datetime,
        stay: tuple[str, str] | None = None,
    ) -> None:
        known = self.record.delivered.get(instant_key_id)
        grant_ms, expires_ms = millis(grant_at), millis(expires_at)
        reservation, contact = stay or (None, None)
        if known == (grant_ms, expires_ms, reservation, contact):
            return  # already recorded (a redelivered grant)
        entry = {"t": "delivered", "key": instant_key_id, "grant_at": grant_ms}
        extra = {"r": reservation, "c": contact} if stay else {}
        await self.append(entry | {"expires_at": expires_ms} | extra)

    async def record_stay(self, stay: StayRecord, reservation_key: str) -> None:
        await self.append(stay_entry(stay, reservation_key), read_back=True)

    async def wait_caught_up(self) -> None:
        if self.caught_up.is_set():
            return
        try:
            await asyncio.wait_for(self.caught_up.wait(), GRANT_WAIT)
        except TimeoutError:
            raise Transient(
                f"the revocation fence is still catching up ({self.read} records read)"
            ) from None

    # -- the generic record API -----------------------------------------------------------------

    def register(self, kind: str, apply: Apply, dump: Dump = tuple) -> None:
        """Entries ``{"t": kind, ...}`` read from the stream (or appended here) go to ``apply``;
        ``dump`` yields entries of ``kind`` that rebuild its state, for snapshots."""
        self.record.register(kind, apply, dump)

    async def append(self, entry: Entry, *, read_back: bool = False) -> None:
        """Append ``entry`` (confirmed) and apply it here at once. ``read_back``: then wait until
        this replica reads it back from the stream, so everything appended before it by any
        replica has been read too."""
        mark = uuid.uuid4().hex if read_back else None
        seen = self._expect(mark) if mark else None
        try:
            body = entry | ({"m": mark} if mark else {})
            await self.publisher.to_queue(self.names.fence, json.dumps(body).encode())
            self.record.apply(entry)
            if seen is not None:
                try:
                    await asyncio.wait_for(seen, READ_BACK_WAIT)
                except TimeoutError:
                    raise Transient(
                        "the revocation fence is behind: its own record was not read back "
                        f"within {READ_BACK_WAIT:.0f} s"
                    ) from None
        finally:
            if mark:
                self._waiting.pop(mark, None)

    # -- following the stream -------------------------------------------------------------------

    @property
    def progress(self) -> str:
        return f"{self.read} records read"

    async def start(self, channel: AbstractChannel) -> None:
        """Read from the latest snapshot on and follow; return once caught up (no time limit:
        ``progress`` says how far it is)."""
        self._channel = channel
        started = time.monotonic()
        await channel.set_qos(prefetch_count=STREAM_PREFETCH)
        pointer = await self._latest_snapshot(channel)
        if pointer is not None:
            self._start = self._snapshot_from = pointer
        await self._follow(channel, self._start)
        if hasattr(channel, "reopen_callbacks"):
            channel.reopen_callbacks.add(self._reopened)
        await self.catch_up()
        log.info(
            "revocation fence caught up",
            extra={
                "ctx": {
                    "records": self.read,
                    "from_snapshot": pointer is not None,
                    "seconds": round(time.monotonic() - started, 2),
                    "entries": len(self.record),
                    "revokes": len(self.record.revoked),
                    "deliveries": len(self.record.delivered),
                    "memory_mib": round(self.memory / 2**20, 1),
                }
            },
        )

    async def catch_up(self) -> None:
        """Append a marker and read up to it: everything recorded before it has then been read.
        The marker is written again while the broker refuses it; reading it back has no limit."""
        self.caught_up.clear()
        delay = 0.5
        while True:
            marker = uuid.uuid4().hex
            seen = self._expect(marker)
            try:
                body = json.dumps({"t": "marker", "marker": marker}).encode()
                await self.publisher.to_queue(self.names.fence, body)
                await seen
                break
            except BROKER_ERRORS as exc:
                log.warning(
                    "could not write a marker to the revocation fence (%s); trying again in %.0f s",
                    type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)  # backoff between failed publishes, not a poll
                delay = min(delay * 2, RETRY_CAP)
            finally:
                self._waiting.pop(marker, None)
        self.record.prune()
        self.memory = self.record.memory()
        self.caught_up.set()
        self._maybe_snapshot()

    def stop(self) -> None:
        for task in (self._catching_up, self._snapshotting):
            if task is not None:
                task.cancel()

    def _expect(self, mark: str) -> "asyncio.Future[None]":
        seen: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[mark] = seen
        return seen

    def _seen(self, mark: object) -> None:
        seen = self._waiting.get(mark) if isinstance(mark, str) else None
        if seen is not None and not seen.done():
            seen.set_result(None)

    async def _latest_snapshot(self, channel: AbstractChannel) -> int | None:
        """Where the latest snapshot's reading starts, from the index (a few entries per
        snapshot and per start: read whole, up to a marker of ours)."""
        pointers: list[int] = []
        marker = uuid.uuid4().hex
        seen = self._expect(marker)

        async def take(message: AbstractIncomingMessage) -> None:
            entry = decode(message.body) if message.user_id == self.worker_user else None
            if entry is not None:
                self._seen(entry.get("marker"))
                if isinstance(entry.get("from"), int):
                    pointers.append(entry["from"])
            await self._ack(message)

        queue, tag = await consume_stream(channel, self.names.fence_index, take, "first")
        try:
            body = json.dumps({"t": "marker", "marker": marker}).encode()
            await self.publisher.to_queue(self.names.fence_index, body)
            await seen
        finally:
            self._waiting.pop(marker, None)
            await queue.cancel(tag)
        return max(pointers, default=None)

    async def _follow(self, channel: AbstractChannel, offset: int | str) -> None:
        _, self._tag = await consume_stream(channel, self.names.fence, self._on_message, offset)
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._cancelled)

    def _cancelled(self, frame: Any) -> None:
        """The broker cancelled a consumer (``frame`` is a Basic.Cancel). Ours, when the stream's
        leader moved, say: read on from the last entry read, as after a reconnect."""
        if frame.consumer_tag == self._tag:
            log.warning("the broker stopped our reading of the revocation fence; reading on")
            self._reopened()

    def _reopened(self, *_: object) -> None:
        log.info("following the revocation fence again", extra={"ctx": {"offset": self._offset}})
        if self._catching_up is not None:
            self._catching_up.cancel()
        self._catching_up = asyncio.create_task(self._resume())

    async def _resume(self) -> None:
        """After a reconnect: read on from the entry after the last one read, then catch up."""
        assert self._channel is not None
        self.caught_up.clear()
        offset = self._start if self._offset is None else self._offset + 1
        delay = 0.5
        while True:
            try:
                await self._follow(self._channel, offset)
                break
            except BROKER_ERRORS as exc:
                log.warning(
                    "could not follow the revocation fence (%s); trying again in %.0f s",
                    type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CAP)
        await self.catch_up()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        offset = (message.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            self._first = offset if self._first is None else self._first
            self._offset = offset
        self.read += 1
        # Only the worker's own user may write to the fence; anything else is ignored.
        if message.user_id == self.worker_user:
            self._read(message.body)
        if self.caught_up.is_set() or self.read % ACK_EVERY == 0:
            await self._ack(message)
        if self.read % self.snapshot_every == 0 and not self.caught_up.is_set():
            self.record.prune()  # a long catch-up keeps only what can still fence
        self._maybe_snapshot()

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        """Ack everything up to ``message`` (streams hand out more only as we ack). One ack at
        a time and never a lower tag after a higher one: each message's callback is a task of
        its own, and the connection's write queue does not keep waiting tasks in order; a
        "multiple" ack that reaches the broker after a higher one names a tag it no longer
        knows, and the broker closes the channel for it."""
        async with self._acking:
            try:
                channel = message.channel
                if channel is self._acked[0] and (message.delivery_tag or 0) <= self._acked[1]:
                    return
                await message.ack(multiple=True)
                self._acked = (channel, message.delivery_tag or 0)
            except BROKER_ERRORS:
                pass

    def _read(self, body: bytes) -> None:
        entry = decode(body)
        if entry is None:
            log.warning("ignored a malformed fence record")
            return
        if entry.get("t") == "marker" or "marker" in entry:
            self._seen(entry.get("marker"))
            return
        covers = entry.get("from")
        if isinstance(covers, int):  # a snapshot's part
            self._snapshot_from = max(self._snapshot_from, covers)
            if self._first is not None and covers > self._first:
                return  # covers only entries this replica has read itself
        if not self.record.apply(entry):
            log.warning("ignored a malformed fence record")
        self._seen(entry.get("m"))

    def _maybe_snapshot(self) -> None:
        if (
            self.caught_up.is_set()
            and self._offset is not None
            and self._offset - self._snapshot_from >= self._threshold
            and (self._snapshotting is None or self._snapshotting.done())
        ):
            self._snapshotting = asyncio.create_task(self._snapshot(self._offset + 1))

    async def _snapshot(self, start: int) -> None:
        """Everything up to ``start`` is in this replica's record: write it as parts, each
        marked with ``start``, then point the index at ``start``."""
        began = time.monotonic()
        parts = 0
        try:
            for entry in self.record.dump():
                await self.publisher.to_queue(
                    self.names.fence, json.dumps(entry | {"from": start}).encode()
                )
                parts += 1
            body = json.dumps({"from": start}).encode()
            await self.publisher.to_queue(self.names.fence_index, body)
        except BROKER_ERRORS as exc:
            log.warning("could not write a fence snapshot (%s)", type(exc).__name__)
            return
        self._snapshot_from = max(self._snapshot_from, start)
        self._threshold = self.snapshot_every * random.uniform(1.0, 1.2)
        self.memory = self.record.memory()
        log.info(
            "wrote a snapshot of the revocation fence",
            extra={
                "ctx": {
                    "entries": len(self.record),
                    "parts": parts,
                    "seconds": round(time.monotonic() - began, 2),
                    "memory_mib": round(self.memory / 2**20, 1),
                }
            },
        )
