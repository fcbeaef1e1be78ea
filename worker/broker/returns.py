"""Deliveries a lost channel gave back, told apart from crashes. RabbitMQ 3.10 counts both in a
quorum queue's ``x-delivery-count``; only a worker that survives knows which messages it held. It
notes them (a short key per message) in the worker's record stream, which every replica replays;
a redelivered message's crashes are then its deliveries minus the returns recorded for it."""

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from worker.broker.decision import DeadLetter, Reset

log = logging.getLogger("worker.returns")

RETURNED = "returned"  # the record's type: {"t": "returned", "id": ..., "keys": [...]}
CRASH_LIMIT = 3  # unexplained deliveries (crashes) before a message is dead-lettered
RESET_AT = 2  # a delivery count from which the message is copied afresh (the broker's limit: 5)
BACKOFF_CAP = 10.0  # seconds between attempts to record, while the broker is away
# A message at the crash limit waits this long (delay queues) for returns recorded late (their
# worker was reconnecting) before it is dead-lettered: lost channels cost it time, not the key.
VERDICT_DELAY = 10.0


def key(queue: str, body: bytes) -> str:
    """The same for every copy of one message on one queue (a retry, a reset)."""
    return hashlib.sha256(queue.encode() + b"\0" + body).hexdigest()[:24]


def redelivered(
    count: int, carried: int, returned: int, suspect: bool = False
) -> Reset | DeadLetter | None:
    """What a delivery with ``x-delivery-count`` ``count`` becomes. ``carried``: the deliveries of
    the copies before it (``x-ikw-deliveries``); ``returned``: the returns recorded for its key;
    ``suspect``: it waited VERDICT_DELAY at the limit already. Returns recorded late only lower
    the count later: the copy carries deliveries, not crashes."""
    crashes = carried + count - returned
    if crashes >= CRASH_LIMIT and suspect:
        return DeadLetter(
            "crash_loop", f"the worker stopped {crashes} times while holding this message"
        )
    if crashes >= CRASH_LIMIT:
        return Reset(carried + count, VERDICT_DELAY)
    if count >= RESET_AT:
        return Reset(carried + count)
    return None


class Returns:
    """Return counts per message key, from this worker's notes and the stream's records. Each
    record has an id, so reading one twice (a replay, our own read back) counts it once."""

    def __init__(self) -> None:
        self._seen: dict[str, set[str]] = {}
        self._pending: list[dict[str, Any]] = []
        self._waiting = asyncio.Event()

    def returns(self, message_key: str) -> int:
        return len(self._seen.get(message_key, ()))

    def note(self, keys: Iterable[str]) -> None:
        """Messages this worker held are going back to the broker: count them now, and record
        them for the other replicas."""
        entry = {"t": RETURNED, "id": uuid.uuid4().hex, "keys": sorted(set(keys))}
        if entry["keys"]:
            self.apply(entry)
            self._pending.append(entry)
            self._waiting.set()

    def apply(self, entry: dict[str, Any]) -> None:
        """A ``returned`` record read from the stream."""
        record, keys = entry.get("id"), entry.get("keys")
        if not isinstance(record, str) or not isinstance(keys, list):
            log.warning("ignored a malformed returns record")
            return
        for one in keys:
            if isinstance(one, str):
                self._seen.setdefault(one, set()).add(record)

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
