"""What becomes of a message, decided without I/O: who may send what (the trust boundary), and
ack, retry, requeue or dead-letter from the failure. The consumer only carries decisions out."""

import random
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import assert_never

from worker.errors import CredentialsRefused, Permanent, Reason, TakenBackError, Transient
from worker.events import (
    AccessGranted,
    AccessRevoked,
    Event,
    IdentityRef,
    KeyCleanup,
    StayDelivery,
    StayEnd,
    occurred_at,
)
from worker.routes import Route

MAX_BACKOFF = 3600.0
# Revokes and cleanups wait for Seam however long it is away: retried at least this often.
PATIENT_BACKOFF = 300.0


class Settled(StrEnum):
    """How a message ended, as logs and the ``ikw_messages_total`` metric say it."""

    ACKED = "acked"
    FENCED = "revoked"  # a grant fenced by a later revoke: acked, nothing delivered
    RETRIED = "retried"
    REQUEUED = "requeued"
    DEAD_LETTERED = "dead_lettered"
    REDELIVERED = "redelivered"  # the ack or republish was lost with the channel
    TAKEN_BACK = "abandoned"  # the broker took it back before we sent anything
    NACKED = "returned"  # settling failed: nacked back to the broker as a last resort


@dataclass(frozen=True)
class Ack:
    pass


@dataclass(frozen=True)
class TakenBack:
    """The broker took the message back and redelivers it: publishing a copy would double it."""


@dataclass(frozen=True)
class Requeue:
    """Back to its queue, attempt unchanged: the failure was not the message's."""


@dataclass(frozen=True)
class Reset:
    """A fresh copy to its queue, so returns by lost channels never walk the message to the
    broker's delivery limit; what the copy carries (see ``returns.redelivered``)."""

    deliveries: int
    excused: int = 0  # deliveries explained by recorded losses so far
    delay: float = 0.0  # through the delay queues, to wait for late returns: a suspect


@dataclass(frozen=True)
class Retry:
    delay: float
    attempt: int  # the attempt number the retried message will carry
    first_failed_at: datetime
    error: str


@dataclass(frozen=True)
class DeadLetter:
    reason: str  # a Reason; a bare Permanent's "permanent" too
    error: str


Decision = Ack | TakenBack | Requeue | Reset | Retry | DeadLetter


@dataclass(frozen=True)
class Limits:
    max_attempts: int
    max_retry_age: timedelta
    max_clock_skew: timedelta = timedelta(minutes=5)


def backoff(attempt: int, retry_after: float | None = None, jitter: float = 1.0) -> float:
    """Exponential, about 1 s, 2 s, 4 s ... capped at an hour, times ``jitter`` (0.5 to 1);
    never less than Retry-After."""
    delay = min(MAX_BACKOFF, 2.0 ** (attempt - 1)) * jitter
    return max(1.0, delay, retry_after or 0.0)


def decide(
    error: BaseException | None,
    *,
    held: bool,
    attempt: int,
    first_failed_at: datetime | None,
    now: datetime,
    limits: Limits,
    patient: bool = False,
    jitter: float | None = None,
) -> Decision:
    """The one decision for a handled message, from the exception's type alone. ``patient``
    (revokes and cleanups): a transient failure is retried for as long as it lasts, never
    dead-lettered, at most PATIENT_BACKOFF apart; a key would otherwise outlive its revoke."""
    if error is None:
        return Ack()
    if isinstance(error, TakenBackError) or not held:
        return TakenBack()
    if isinstance(error, CredentialsRefused):
        return Requeue()
    if isinstance(error, Permanent):
        return DeadLetter(error.reason, one_line(error))
    first = first_failed_at or now
    exhausted = attempt >= limits.max_attempts or now - first >= limits.max_retry_age
    if exhausted and not patient:
        return DeadLetter(
            Reason.RETRIES_EXHAUSTED, f"gave up after {attempt} attempts: {one_line(error)}"
        )
    retry_after = error.retry_after if isinstance(error, Transient) else None
    spread = random.uniform(0.5, 1.0) if jitter is None else jitter
    delay = backoff(attempt, retry_after, spread)
    if patient:
        delay = min(delay, max(PATIENT_BACKOFF, retry_after or 0.0))
    return Retry(delay, attempt + 1, first, one_line(error))


def one_line(exc: BaseException) -> str:
    """The error for logs and headers. Only the worker's own errors are quoted (they are written
    to hold no secret); a library's message may quote what we sent, so it is named by type and
    where it was raised."""
    if not isinstance(exc, Transient | Permanent | CredentialsRefused):
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        return f"unexpected {type(exc).__name__}{where}"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]


# --- the trust boundary ---------------------------------------------------------------------


@dataclass(frozen=True)
class Trust:
    """``worker``: the broker user the worker runs as, trusted for everything. ``publishers``:
    broker user -> the ``user_identity_key`` prefixes it may name (None: any identity)."""

    worker: str
    publishers: Mapping[str, tuple[str, ...] | None]


def producer_of(user_id: str | None, republished_for: str | None, trust: Trust) -> str | None:
    """The producer the broker vouches for. A message the worker republished (a retry, a replay)
    carries the original producer in its own header, which only the worker's user can write."""
    if user_id == trust.worker and republished_for is not None:
        return republished_for or None
    return user_id


def check_publisher(route: Route, user_id: str | None, producer: str | None, trust: Trust) -> None:
    """Refuse before parsing anything: a message whose producer is not trusted for this queue."""
    if not route.public:
        # Its x-ikw-publisher names the grant's producer, to hear of the deletion.
        if user_id != trust.worker:
            raise Permanent(
                f"{route.type} is accepted only from the worker's own user, not {_who(user_id)}",
                reason=Reason.UNTRUSTED_PUBLISHER,
            )
        return
    if producer is None:
        raise Permanent(
            "the message has no user_id: the broker did not name its producer",
            reason=Reason.UNTRUSTED_PUBLISHER,
        )
    if producer != trust.worker and producer not in trust.publishers:
        raise Permanent(
            f"{_who(producer)} is not in IKW_TRUSTED_PUBLISHERS", reason=Reason.UNTRUSTED_PUBLISHER
        )


def check_event(route: Route, event: Event, producer: str | None, trust: Trust) -> None:
    """Refuse a message on the wrong queue, or naming an identity outside its producer's scope."""
    if event.type != route.type:
        raise Permanent(
            f"{event.type} arrived on the queue for {route.type}", reason=Reason.WRONG_QUEUE
        )
    if producer == trust.worker:
        return
    match event:
        case AccessGranted() | AccessRevoked():
            _check_scope(event.user_identity, producer, trust)
        case KeyCleanup() | StayDelivery() | StayEnd():
            pass  # the worker's own
        case _:
            assert_never(event)


def _check_scope(identity: IdentityRef, producer: str | None, trust: Trust) -> None:
    prefixes = trust.publishers.get(producer or "")
    if prefixes is None:
        return
    key = identity.user_identity_key
    if identity.user_identity_id is not None or key is None:
        raise Permanent(
            f"{_who(producer)} may name identities by user_identity_key only",
            reason=Reason.IDENTITY_OUT_OF_SCOPE,
        )
    if not key.startswith(prefixes):
        raise Permanent(
            f"{_who(producer)} may name only user_identity_keys starting with "
            + " or ".join(repr(p) for p in prefixes),
            reason=Reason.IDENTITY_OUT_OF_SCOPE,
        )


def check_clock(event: Event, received_at: datetime, skew: timedelta) -> None:
    """Refuse an event that says it occurred later than the worker first received it (plus the
    skew allowed): the fence compares producers' times, and a time from the future would outlive
    every revoke."""
    occurred = occurred_at(event)
    if occurred is None:
        return
    ahead = occurred - received_at
    if ahead > skew:
        raise Permanent(
            f"occurred_at is {_span(ahead)} after the worker first received the event "
            f"(IKW_MAX_CLOCK_SKEW allows {_span(skew)})",
            reason=Reason.OCCURRED_IN_FUTURE,
        )


def _span(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _who(producer: str | None) -> str:
    if producer is None:
        return "an unnamed producer"
    shown = "".join(c if c.isprintable() else "?" for c in producer[:64])
    return f"publisher {shown!r}"
