"""The one codec for the worker's own ``x-ikw-*`` message headers, used by the consumer and by
``ikw dlq``. Reading never raises: a header that is missing, of the wrong type or out of range
reads as absent."""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

PREFIX = "x-ikw-"
ATTEMPT = "x-ikw-attempt"
FIRST_FAILED_AT = "x-ikw-first-failed-at"
ROUTING_KEY = "x-ikw-routing-key"
LAST_ERROR = "x-ikw-last-error"
PUBLISHER = "x-ikw-publisher"
REASON = "x-ikw-reason"
ERROR = "x-ikw-error"
ATTEMPTS = "x-ikw-attempts"
SOURCE_QUEUE = "x-ikw-source-queue"
DEAD_LETTERED_AT = "x-ikw-dead-lettered-at"
RECEIVED_AT = "x-ikw-received-at"
TRUNCATED = "x-ikw-truncated"
DELIVERIES = "x-ikw-deliveries"
SUSPECT = "x-ikw-suspect"
EXCUSED = "x-ikw-excused"
COPIED_AT = "x-ikw-copied-at"

MAX_ATTEMPT = 100_000
# Headers the broker adds when dead-lettering: a copy that keeps them would be seen as a
# dead-letter cycle by the delay queues and dropped.
BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")


@dataclass(frozen=True)
class Bookkeeping:
    """What the worker wrote on a message it republished (a retry, a requeue, a dead letter)."""

    attempt: int = 1
    first_failed_at: datetime | None = None
    routing_key: str | None = None
    last_error: str | None = None
    # The producer the broker named on the original message (its user_id), kept across retries,
    # dead-lettering and replay, which the worker publishes under its own user.
    publisher: str | None = None
    reason: str | None = None
    error: str | None = None
    attempts: int | None = None
    source_queue: str | None = None
    dead_lettered_at: datetime | None = None
    # When the worker first received the message: a retry or a replay keeps it, so a producer's
    # clock is judged against the first receipt, not the last.
    received_at: datetime | None = None
    # A dead letter cut to its first bytes (too_large): the original size. Never replayed.
    truncated: int | None = None
    # Deliveries of the copies before this one (x-delivery-count), kept across resets and retries.
    deliveries: int = 0
    excused: int = 0  # of those, how many recorded losses of channels explained
    copied_at: datetime | None = None
    # Sent through the delay queues to wait for late returns before a crash_loop verdict.
    suspect: bool = False


def read(headers: Mapping[str, Any] | None) -> Bookkeeping:
    """The worker's headers; call it only on a message published by the worker's own user."""
    h = headers or {}
    return Bookkeeping(
        attempt=_count(h.get(ATTEMPT)) or 1,
        first_failed_at=moment(h.get(FIRST_FAILED_AT)),
        routing_key=_text(h.get(ROUTING_KEY)),
        last_error=_text(h.get(LAST_ERROR)),
        publisher=_name(h.get(PUBLISHER)),
        reason=_text(h.get(REASON)),
        error=_text(h.get(ERROR)),
        attempts=_count(h.get(ATTEMPTS)),
        source_queue=_text(h.get(SOURCE_QUEUE)),
        dead_lettered_at=moment(h.get(DEAD_LETTERED_AT)),
        received_at=moment(h.get(RECEIVED_AT)),
        truncated=_size(h.get(TRUNCATED)),
        deliveries=_count(h.get(DELIVERIES)) or 0,
        suspect=_count(h.get(SUSPECT)) == 1,
        excused=_count(h.get(EXCUSED)) or 0,
        copied_at=moment(h.get(COPIED_AT)),
    )


def foreign(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The producer's own headers (e.g. ``traceparent``): no ``x-ikw-*``, no broker headers."""
    return {
        key: value
        for key, value in (headers or {}).items()
        if not key.startswith(PREFIX) and not key.startswith(BROKER_HEADERS)
    }


def write(book: Bookkeeping) -> dict[str, Any]:
    """The headers for ``book``; absent fields, and the first attempt, are left out."""
    fields: dict[str, Any] = {
        ATTEMPT: book.attempt if book.attempt > 1 else None,
        FIRST_FAILED_AT: book.first_failed_at.isoformat() if book.first_failed_at else None,
        ROUTING_KEY: book.routing_key,
        LAST_ERROR: book.last_error,
        PUBLISHER: book.publisher,
        REASON: book.reason,
        ERROR: book.error,
        ATTEMPTS: book.attempts,
        SOURCE_QUEUE: book.source_queue,
        DEAD_LETTERED_AT: book.dead_lettered_at.isoformat() if book.dead_lettered_at else None,
        RECEIVED_AT: book.received_at.isoformat() if book.received_at else None,
        TRUNCATED: book.truncated,
        DELIVERIES: book.deliveries or None,
        SUSPECT: 1 if book.suspect else None,
        EXCUSED: book.excused or None,
        COPIED_AT: book.copied_at.isoformat() if book.copied_at else None,
    }
    return {key: value for key, value in fields.items() if value is not None}


def for_replay(
    headers: Mapping[str, Any] | None, user_id: str | None, worker: str
) -> dict[str, Any]:
    """A dead letter's headers for its replay: the producer's own, where it was first published
    and by whom, when it was first received; the failure bookkeeping is dropped, so the replay
    starts at attempt 1. Our
    headers are read only on a dead letter the worker wrote: one the broker dead-lettered keeps
    the producer the broker named."""
    if user_id == worker:
        book = read(headers)
        routing_key, publisher, received_at = book.routing_key, book.publisher, book.received_at
    else:
        routing_key, publisher, received_at = None, user_id or "", None
    routing_key = routing_key or _first_death_routing_key(headers or {})
    kept = Bookkeeping(routing_key=routing_key, publisher=publisher, received_at=received_at)
    return foreign(headers) | write(kept)


def _first_death_routing_key(headers: Mapping[str, Any]) -> str | None:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[-1], dict):
        keys = deaths[-1].get("routing-keys")
        if isinstance(keys, list) and keys:
            return _text(keys[0])
    return None


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _name(value: object) -> str | None:
    """Like _text, but an empty name is kept: it says the producer was not named at all."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 1 <= value <= MAX_ATTEMPT else None


def _size(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if value > 0 else None


def moment(value: object) -> datetime | None:
    """An aware datetime from an ISO 8601 text or an AMQP timestamp; None otherwise."""
    if isinstance(value, datetime):
        # AMQP timestamps (x-death times) are UTC by definition.
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    text = _text(value)
    if text is None or len(text) > 64:
        return None
    try:
        found = datetime.fromisoformat(text)
    except ValueError:
        return None
    # A time without a zone cannot be compared with ours: it reads as absent, never raises.
    return found.astimezone(UTC) if found.tzinfo is not None else None
