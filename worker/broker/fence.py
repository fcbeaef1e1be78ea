"""The revocation fence on a RabbitMQ stream: a revoke is appended (confirmed) before its keys are
deleted; every replica replays the stream from its start and follows it into memory, so a grant
that occurred before a revoke is refused wherever and whenever it is handled."""

import asyncio
import json
import logging
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from worker.broker.connect import BROKER_ERRORS
from worker.broker.headers import moment
from worker.broker.publisher import Publisher
from worker.broker.returns import RETURNED, Returns
from worker.errors import Transient
from worker.queues import Names

log = logging.getLogger("worker.fence")

STREAM_PREFETCH = 500  # streams need a prefetch; they are read in chunks
CATCH_UP_TIMEOUT = 10.0  # how long a marker may take to come back, and a grant to wait for it


class StreamFence:
    def __init__(
        self, names: Names, publisher: Publisher, worker_user: str, returns: Returns | None = None
    ) -> None:
        self.names = names
        self.publisher = publisher
        self.worker_user = worker_user
        self.returns = returns or Returns()
        self.caught_up = asyncio.Event()
        self._revoked: dict[str, datetime] = {}
        self._markers: dict[str, asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._revoked)

    def revoked_at(self, names: Iterable[str]) -> datetime | None:
        return max((self._revoked[n] for n in names if n in self._revoked), default=None)

    async def record(self, names: Iterable[str], occurred_at: datetime) -> None:
        listed = sorted(set(names))
        body = json.dumps({"names": listed, "occurred_at": occurred_at.isoformat()})
        await self.publisher.to_queue(self.names.fence, body.encode())
        self._remember(listed, occurred_at)

    async def append(self, entry: dict[str, Any]) -> None:
        """A record of another type (see ``returns``), confirmed."""
        await self.publisher.to_queue(self.names.fence, json.dumps(entry).encode())

    async def wait_caught_up(self) -> None:
        """Until this replica has read every revoke recorded before it (re)connected."""
        if self.caught_up.is_set():
            return
        try:
            await asyncio.wait_for(self.caught_up.wait(), CATCH_UP_TIMEOUT)
        except TimeoutError:
            raise Transient("the revocation fence is still catching up") from None

    async def start(self, channel: AbstractChannel) -> None:
        """Follow the stream from its first record; return once caught up."""
        await channel.set_qos(prefetch_count=STREAM_PREFETCH)
        queue = await channel.get_queue(self.names.fence)
        await queue.consume(self._on_message, arguments={"x-stream-offset": "first"})
        await self.catch_up()

    async def catch_up(self) -> None:
        """Append a marker and wait to read it back: everything before it has then been read.
        Markers are written only at start and after a reconnect, so the stream stays small."""
        self.caught_up.clear()
        marker = uuid.uuid4().hex
        seen = asyncio.get_running_loop().create_future()
        self._markers[marker] = seen
        try:
            await self.publisher.to_queue(self.names.fence, json.dumps({"marker": marker}).encode())
            await asyncio.wait_for(seen, CATCH_UP_TIMEOUT)
        finally:
            self._markers.pop(marker, None)
        self.caught_up.set()
        log.info("revocation fence caught up", extra={"ctx": {"identities": len(self)}})

    def _remember(self, names: Iterable[str], occurred_at: datetime) -> None:
        for name in names:
            if name not in self._revoked or self._revoked[name] < occurred_at:
                self._revoked[name] = occurred_at

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            # Only the worker's own user may write to the fence; anything else is ignored.
            if message.user_id == self.worker_user:
                self._read(message.body)
        finally:
            try:
                await message.ack()  # streams hand out more only as we ack
            except BROKER_ERRORS:
                pass

    def _read(self, body: bytes) -> None:
        try:
            entry = json.loads(body)
        except (ValueError, RecursionError):
            entry = None
        if not isinstance(entry, dict):
            log.warning("ignored a malformed fence record")
            return
        if entry.get("t") == RETURNED:
            self.returns.apply(entry)
            return
        marker = entry.get("marker")
        if isinstance(marker, str):
            seen = self._markers.get(marker)
            if seen is not None and not seen.done():
                seen.set_result(None)
            return
        names, occurred_at = entry.get("names"), moment(entry.get("occurred_at"))
        if not isinstance(names, list) or occurred_at is None:
            log.warning("ignored a malformed fence record")
            return
        self._remember((n for n in names if isinstance(n, str)), occurred_at)
