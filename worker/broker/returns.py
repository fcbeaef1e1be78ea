"""Deliveries a lost channel gave back, told apart from crashes. RabbitMQ 3.10 counts both in a
quorum queue's ``x-delivery-count``; only a worker that survives knows which messages it held. It
notes each loss, with the messages it held (a short key per message), in the worker's record
stream, which every replica replays. A delivery it never saw (in flight when the connection went,
or sent to a consumer on a node already down) is returned too: each recorded loss may explain
one delivery of any message. A redelivered message's crashes are its deliveries minus what the
records explain."""

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from worker.broker.decision import DeadLetter, Reset
from worker.broker.headers import moment
from worker.errors import Reason

log = logging.getLogger("worker.returns")


class Registry(Protocol):
    def register(self, kind: str, apply: Callable[[dict[str, Any]], None]) -> None: ...


# The record's type: {"t": "returned", "id", "keys": [...], "at", "loss": true for a lost channel}
RETURNED = "returned"
CRASH_LIMIT = 3  # unexplained deliveries (crashes) before a message is dead-lettered
RESET_AT = 2  # a delivery count from which the message is copied afresh (the broker's limit: 5)
BACKOFF_CAP = 10.0  # seconds between attempts to record, while the broker is away
# A message at the crash limit waits this long (delay queues) for returns recorded late (their
# worker was reconnecting) before it is dead-lettered: lost channels cost it time, not the key.
VERDICT_DELAY = 10.0
# Losses recorded this long before a message's delivery may explain it (a copy counts those
# since it was made, less SLACK for records of losses just before it).
LOSS_WINDOW = timedelta(minutes=15)
SLACK = timedelta(seconds=30)
# Records older than this are forgotten (a message's own copies carry what explained it before):
# without it a long-running replica would hold every return of the stream's retention.
KEPT = timedelta(days=1)
FORGET_EVERY = 1024  # records applied between two sweeps


def key(queue: str, body: bytes) -> str:
    """The same for every copy of one message on one queue (a retry, a reset)."""
    return hashlib.sha256(queue.encode() + b"\0" + body).hexdigest()[:24]


def redelivered(
    count: int,
    carried: int,
    excused: int,
    returned: int,
    losses: int,
    suspect: bool = False,
) -> Reset | DeadLetter | None:
    """What a delivery with ``x-delivery-count`` ``count`` becomes. ``carried``, ``excused``: the
    deliveries of the copies before it and the losses that explained them (``x-ikw-deliveries``,
    ``x-ikw-excused``); ``returned``: the returns recorded for its key; ``losses``: the losses
    recorded since the last copy; ``suspect``: it waited VERDICT_DELAY at the limit already.
    A record that comes late still counts: the copy carries deliveries, not crashes."""
    crashes = carried + count - max(returned, excused + losses)
    if crashes >= CRASH_LIMIT and suspect:
        return DeadLetter(
            Reason.CRASH_LOOP, f"the worker stopped {crashes} times while holding this message"
        )
    if crashes >= CRASH_LIMIT:
        return Reset(carried + count, excused + losses, VERDICT_DELAY)
    if count >= RESET_AT:
        return Reset(carried + count, excused + losses)
    return None


class Returns:
    """Return counts per message key, from this worker's notes and the stream's records. Each
    record has an id, so reading one twice (a replay, our own read back) counts it once."""

    def __init__(self) -> None:
        self._seen: dict[str, set[str]] = {}
        self._losses: dict[str, datetime] = {}  # record id -> when a channel was lost
        self._records: dict[str, tuple[datetime, list[str]]] = {}  # record id -> when, keys
        self._pending: list[dict[str, Any]] = []
        self._waiting = asyncio.Event()

    def follow(self, record: "Registry") -> None:
        """Read the ``returned`` entries of the worker's record (not kept in its snapshots: a
        return matters for minutes)."""
        record.register(RETURNED, self.apply)

    def returns(self, message_key: str) -> int:
        return len(self._seen.get(message_key, ()))

    def losses_since(self, moment_: datetime) -> int:
        return sum(1 for at in self._losses.values() if at > moment_)

    def note(self, keys: Iterable[str], loss: bool = False) -> None:
        """Messages this worker held go back to the broker (``loss``: with a lost channel, which
        takes back deliveries not yet seen too): count them now, and record them for the other
        replicas."""
        listed = sorted(set(keys))
        if not listed and not loss:
            return
        entry: dict[str, Any] = {"t": RETURNED, "id": uuid.uuid4().hex, "keys": listed}
        entry["at"] = datetime.now(UTC).isoformat()
        if loss:
            entry["loss"] = True
        self.apply(entry)
        self._pending.append(entry)
        self._waiting.set()

    def apply(self, entry: dict[str, Any]) -> None:
        """A ``returned`` record read from the stream."""
        record, keys = entry.get("id"), entry.get("keys")
        if not isinstance(record, str) or not isinstance(keys, list):
            log.warning("ignored a malformed returns record")
            return
        now = datetime.now(UTC)
        at = moment(entry.get("at")) or now
        if record in self._records or at < now - KEPT:
            return
        listed = [one for one in keys if isinstance(one, str)]
        self._records[record] = (at, listed)
        for one in listed:
            self._seen.setdefault(one, set()).add(record)
        if entry.get("loss") is True:
            self._losses[record] = at
        if len(self._records) % FORGET_EVERY == 0:
            self.forget(now - KEPT)

    def forget(self, before: datetime) -> None:
        """Drop the records written before ``before``."""
        for record, (at, listed) in list(self._records.items()):
            if at >= before:
                continue
            del self._records[record]
            self._losses.pop(record, None)
            for one in listed:
                ids = self._seen.get(one)
                if ids is not None:
                    ids.discard(record)
                    if not ids:
                        del self._seen[one]

    async def flush(self, append: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Record every pending note; raises (keeping the rest) when the broker refuses."""
        while self._pending:
            await append(self._pending[0])
            self._pending.pop(0)
        self._waiting.clear()

    async def record(self, append: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Forever: record notes as they come, trying again while the broker is away."""
        delay = 0.5
        while True:
            await self._waiting.wait()
            try:
                await self.flush(append)
                delay = 0.5
            except Exception as exc:
                log.warning("could not record returned messages (%s)", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_CAP)


def delivery_count(headers: Mapping[str, Any] | None) -> int:
    """The quorum queue's ``x-delivery-count``: how often the message went back to the queue."""
    value = (headers or {}).get("x-delivery-count")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
