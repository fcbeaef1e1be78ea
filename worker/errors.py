"""The one small tree of failures; the consumer decides ack, retry or dead-letter from the type.

Messages of these exceptions are logged and copied into dead-letter headers: they must never hold
an instant_key_url, an API key, a phone number or an email address.
"""

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# Every x-ikw-reason a dead letter can carry, and the reasons RabbitMQ gives (x-death):
# `ikw dlq --reason` checks against this. Add a code here when you add one.
REASONS = frozenset(
    {
        "malformed_json",
        "wrong_content_type",
        "too_large",
        "unknown_type",
        "unsupported_encoding",
        "invalid_phone_number",
        "invalid_email_address",
        "invalid_event",
        "seam_rejected",
        "not_found",
        "identity_not_found",
        "no_channel_accepted",
        "retries_exhausted",
        "untrusted_publisher",
        "identity_out_of_scope",
        "wrong_queue",
        "key_identity_mismatch",
        "stale_grant",
        "occurred_in_future",
        "unroutable",
        "crash_loop",
        # RabbitMQ's own
        "delivery_limit",
        "rejected",
        "expired",
        "maxlen",
    }
)


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

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class InvalidEvent(Permanent):
    """The message itself is malformed (bad JSON, wrong type, failed validation...)."""

    reason = "invalid_event"


class SeamRejected(Permanent):
    """Seam answered 400: the request can never succeed as it is."""

    reason = "seam_rejected"

    def __init__(self, message: str, *, error_type: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type


class NotFound(Permanent):
    """Seam answered 404 (``<resource>_not_found``)."""

    reason = "not_found"


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


class Abandoned(WorkerError):
    """The broker took the message back (its channel closed) and will redeliver it: stop before
    sending, so a connection cut does not text the guest twice."""

    reason = "abandoned"
