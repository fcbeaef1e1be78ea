"""Reading the dead queue: each dead letter described, held unacked while we look."""

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from worker import errors
from worker.broker import headers
from worker.broker.topology import Names

ERROR_WIDTH = 160
# A get that finds nothing while the queue counts messages ready is asked again, this often.
EMPTY_GETS = 20
EMPTY_PAUSE = 0.05
BROKER_REASONS: dict[str, str] = {reason: reason.description for reason in errors.BROKER_REASONS}
_EPOCH = datetime.min.replace(tzinfo=UTC)


class DlqError(Exception):
    """Printed as one line; the command exits ``exit_code`` (1: failed, 2: usage)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class DeadLetter:
    message: AbstractIncomingMessage
    id: str
    reason: str
    source: str
    attempts: int | None
    dead_at: datetime | None
    error: str
    truncated: int | None = None  # the original size of a body cut when dead-lettered

    @property
    def fingerprint(self) -> str:
        """Tells two reads of the same dead letter apart from other dead letters."""
        headers = {k: v for k, v in (self.message.headers or {}).items() if k != "x-delivery-count"}
        seen = json.dumps(sorted(headers.items()), default=str).encode()
        return hashlib.sha256(self.message.body + b"\0" + seen).hexdigest()


# --- reading a dead letter -----------------------------------------------------------------


def letter_id(message: AbstractIncomingMessage) -> str:
    return message.message_id or hashlib.sha256(message.body).hexdigest()[:12]


def describe(message: AbstractIncomingMessage, worker: str) -> DeadLetter:
    """What the dead letter says; our headers count only on one the worker wrote."""
    raw = message.headers or {}
    book = headers.read(raw) if message.user_id == worker else headers.Bookkeeping()
    if book.reason:
        reason, source = book.reason, book.source_queue or ""
        dead_at, error, attempts = book.dead_lettered_at, book.error or "", book.attempts_made
    else:
        death = _broker_death(raw)
        reason = _text(death.get("reason")) or "unknown"
        source = _text(death.get("queue"))
        dead_at = headers.moment(death.get("time"))
        error = _broker_error(reason, book)
        attempts = book.attempt
    return DeadLetter(
        message=message,
        id=printable(letter_id(message)),
        reason=printable(reason),
        source=printable(source),
        attempts=attempts if isinstance(attempts, int) else None,
        dead_at=dead_at,
        error=one_line(error),
        truncated=book.truncated,
    )


def _broker_death(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The latest x-death entry (the broker puts it first), else the x-*-death-* summary."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    for prefix in ("x-last-death-", "x-first-death-"):
        if f"{prefix}reason" in headers:
            return {"reason": headers[f"{prefix}reason"], "queue": headers.get(f"{prefix}queue")}
    return {}


def _broker_error(reason: str, book: headers.Bookkeeping) -> str:
    text = "dead-lettered by RabbitMQ: " + BROKER_REASONS.get(reason, reason)
    return f"{text}; last error: {book.last_error}" if book.last_error else text


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def printable(text: str) -> str:
    """Producers choose ids and headers: keep their control characters off the terminal."""
    return "".join(char if char.isprintable() else "?" for char in text)


def one_line(text: str, width: int = ERROR_WIDTH) -> str:
    flat = printable(" ".join(text.split()))
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# --- the dead queue ------------------------------------------------------------------------


@asynccontextmanager
async def holding(
    connection: AbstractRobustConnection, names: Names, worker: str
) -> AsyncIterator[list[DeadLetter]]:
    """Every dead letter, held unacked on one channel; closing it returns those not acked.

    AMQP cannot browse a queue, so this is how to look without taking. The broker returns the
    messages in no particular order and adds 1 to each one's x-delivery-count: harmless, as the
    dead queue has no delivery limit.
    """
    channel = await connection.channel()
    try:
        yield await _read_all(channel, names, worker)
    finally:
        if not channel.is_closed:
            await channel.close()


async def snapshot(
    connection: AbstractRobustConnection, names: Names, worker: str
) -> list[DeadLetter]:
    async with holding(connection, names, worker) as letters:
        return letters


async def _read_all(
    channel: aio_pika.abc.AbstractChannel, names: Names, worker: str
) -> list[DeadLetter]:
    try:
        queue = await channel.get_queue(names.dead, ensure=True)
    except aio_pika.exceptions.ChannelClosed:
        raise DlqError(
            f"queue {names.dead} does not exist; check IKW_NAMESPACE or run `ikw topology`"
        ) from None
    # Only what is there now: a worker may dead-letter more while we read.
    expected = queue.declaration_result.message_count or 0
    letters: list[DeadLetter] = []
    empty = 0
    while len(letters) < expected and empty < EMPTY_GETS:
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            # Counted as ready but not handed out yet: a message another reader (a second
            # `ikw dlq`) is giving back. Ask again shortly, a bounded number of times.
            empty += 1
            await asyncio.sleep(EMPTY_PAUSE)
            continue
        letters.append(describe(message, worker))
    return letters


def newest_first(letters: Iterable[DeadLetter]) -> list[DeadLetter]:
    return sorted(letters, key=lambda letter: letter.dead_at or _EPOCH, reverse=True)


def select(
    letters: Iterable[DeadLetter],
    *,
    ids: Iterable[str] = (),
    reason: str | None = None,
    older_than: timedelta | None = None,
    newer_than: timedelta | None = None,
) -> list[DeadLetter]:
    wanted = set(ids)
    now = datetime.now(UTC)

    def keep(letter: DeadLetter) -> bool:
        if wanted and letter.id not in wanted:
            return False
        if reason is not None and letter.reason != reason:
            return False
        if older_than is not None and not (letter.dead_at and letter.dead_at <= now - older_than):
            return False
        return newer_than is None or bool(letter.dead_at and letter.dead_at >= now - newer_than)

    return [letter for letter in letters if keep(letter)]
