"""The one small tree of failures; the consumer decides ack, retry or dead-letter from the type.

Messages of these exceptions are logged and copied into dead-letter headers: they must never hold
an instant_key_url, an API key, a phone number or an email address.
"""

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum


class Reason(StrEnum):
    """Every x-ikw-reason a dead letter can carry, then the reasons RabbitMQ gives (x-death), each
    with the line `ikw dlq --help`, the README's failure table and the schemas draw on."""

    description: str

    def __new__(cls, value: str, description: str) -> "Reason":
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        return member

    MALFORMED_JSON = "malformed_json", "not JSON, not an object, or nested too deep"
    WRONG_CONTENT_TYPE = "wrong_content_type", "content_type is not application/json (UTF-8)"
    TOO_LARGE = "too_large", "the body is over 64 KiB; kept only in part"
    UNKNOWN_TYPE = "unknown_type", "no event of this type and version"
    UNSUPPORTED_ENCODING = "unsupported_encoding", "a content_encoding other than identity"
    INVALID_PHONE_NUMBER = "invalid_phone_number", "the guest's phone number is not E.164"
    INVALID_EMAIL_ADDRESS = "invalid_email_address", "the guest's email address is not valid"
    INVALID_EVENT = "invalid_event", "the event fails its schema"
    SEAM_REJECTED = "seam_rejected", "Seam answered 400"
    NOT_FOUND = "not_found", "Seam answered 404 for what must exist"
    IDENTITY_NOT_FOUND = "identity_not_found", "a user_identity_id unknown to Seam"
    NO_CHANNEL_ACCEPTED = "no_channel_accepted", "every channel refused the delivery for good"
    RETRIES_EXHAUSTED = "retries_exhausted", "IKW_MAX_ATTEMPTS or IKW_MAX_RETRY_AGE reached"
    UNTRUSTED_PUBLISHER = "untrusted_publisher", "a producer not trusted for this queue"
    IDENTITY_OUT_OF_SCOPE = "identity_out_of_scope", "an identity outside its producer's prefixes"
    WRONG_QUEUE = "wrong_queue", "an event on the queue of another type"
    KEY_IDENTITY_MISMATCH = "key_identity_mismatch", "a cleanup for a key of another identity"
    RESERVATION_IDENTITY_MISMATCH = (
        "reservation_identity_mismatch",
        "a reservation_key already recorded for another identity",
    )
    STALE_GRANT = "stale_grant", "a grant older than IKW_REVOKE_RETENTION"
    OCCURRED_IN_FUTURE = "occurred_in_future", "occurred_at past receipt plus IKW_MAX_CLOCK_SKEW"
    UNROUTABLE = "unroutable", "an event no queue takes"
    CRASH_LOOP = "crash_loop", "it killed a worker 3 times"
    # RabbitMQ's own
    DELIVERY_LIMIT = (
        "delivery_limit",
        "redelivered past the queue's x-delivery-limit, never acked (crash loop?)",
    )
    REJECTED = "rejected", "rejected without requeue"
    EXPIRED = "expired", "expired (message TTL)"
    MAXLEN = "maxlen", "dropped by the queue's length limit"


BROKER_REASONS = (Reason.DELIVERY_LIMIT, Reason.REJECTED, Reason.EXPIRED, Reason.MAXLEN)
# `ikw dlq --reason` checks against this.
REASONS: frozenset[str] = frozenset(Reason)


def retry_after_seconds(header: str | None) -> float | None:
    """A Retry-After header as seconds from now: delay-seconds or an HTTP date."""
    if not header:
        return None
    try:
        seconds = float(header)
    except ValueError:
        try:
            moment = parsedate_to_datetime(header)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


class WorkerError(Exception):
    """Base class; ``reason`` is the short code a dead letter carries."""

    reason = "error"


class Transient(WorkerError):
    """Worth trying again later: timeouts, connection errors, 429, 5xx, SMTP 4xx."""

    reason = "transient"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Permanent(WorkerError):
    """Trying again cannot help: the message is dead-lettered with ``reason``."""

    reason = "permanent"

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class InvalidEvent(Permanent):
    """The message itself is malformed (bad JSON, wrong type, failed validation...)."""

    reason: str = Reason.INVALID_EVENT


class SeamRejected(Permanent):
    """Seam answered 400: the request can never succeed as it is."""

    reason: str = Reason.SEAM_REJECTED

    def __init__(self, message: str, *, error_type: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type


class NotFound(Permanent):
    """Seam answered 404 (``<resource>_not_found``)."""

    reason: str = Reason.NOT_FOUND


class ChannelRefused(WorkerError):
    """Permanent for one channel only (invalid or opted-out number, SMTP 5xx): try the next one."""

    reason = "channel_refused"

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class CredentialsRefused(WorkerError):
    """A provider refused our credentials (Seam 401, Twilio 20003, SMTP auth).

    Not the message's fault: the worker stops consuming until the credentials work again.
    """

    reason = "credentials_refused"

    def __init__(self, message: str, *, service: str) -> None:
        super().__init__(message)
        self.service = service


class TakenBackError(WorkerError):
    """The broker took the message back (its channel closed) and will redeliver it: stop before
    sending, so a connection cut does not text the guest twice."""

    reason = "abandoned"
