"""Logging setup (one JSON object per line, or a readable line at a terminal) and masks for
contact details."""

import json
import logging
import math
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace


def mask_phone(phone: str | None) -> str:
    """+14155550100 -> +1*******00: enough to tell numbers apart in an incident, not to dial."""
    if not phone:
        return "-"
    return phone[:2] + "*" * max(len(phone) - 4, 0) + phone[-2:]


def mask_email(address: str | None) -> str:
    """ada@example.com -> a***@example.com."""
    if not address:
        return "-"
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}"


# In free text: an address, a number written with a + (E.164 and its spaced forms), a quoted
# string that is only a number of 7+ digits with separators, or a bare run of 7+ digits. Every
# repeat is bounded (an address's parts, a number's length): unbounded, a 64 KiB body of letters
# or digits cost seconds of backtracking.
_EMAIL = re.compile(r"[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}")
_PHONE = re.compile(
    r"\+\d[\d ().-]{5,30}\d"
    r"|(?<=\")\(?\d[\d ().-]{5,30}\d(?=\")"
    r"|(?<![\w.+-])\d{7,20}(?![\w.-])"
)


def mask_contacts(text: str) -> str:
    """``text`` with every email address and phone-like number in it masked, as in logs."""
    text = _EMAIL.sub(lambda found: mask_email(found.group()), text)
    return _PHONE.sub(lambda found: mask_phone(found.group()), text)


_encode = json.JSONEncoder(default=str).encode  # one encoder, not one per line


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._prefix = ""

    def _timestamp(self, created: float) -> str:
        """As ``datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")``, with
        the date and time formatted once a second rather than once a line."""
        fraction, whole = math.modf(created)
        seconds, micros = int(whole), round(fraction * 1e6)
        if micros >= 1_000_000:
            seconds, micros = seconds + 1, micros - 1_000_000
        if seconds != self._second:
            moment = datetime.fromtimestamp(seconds, UTC)
            self._second, self._prefix = seconds, moment.strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{micros // 1000:03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        return _encode(entry | details(record))


def details(record: logging.LogRecord) -> dict[str, Any]:
    """What a line says after its message, in either format: the caller's ``ctx`` (contacts in
    it already masked), the span it was written in (worker/tracing.py), the exception's name."""
    entry: dict[str, Any] = dict(getattr(record, "ctx", {}))
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        entry["trace_id"] = trace.format_trace_id(span.trace_id)
        entry["span_id"] = trace.format_span_id(span.span_id)
    if record.exc_info and record.exc_info[0] is not None:
        entry["exc"] = record.exc_info[0].__name__
    return entry


_compact = json.JSONEncoder(default=str, separators=(",", ":"), ensure_ascii=False).encode
_BARE = re.compile(r"[^\s\"'=]+")  # a value shown as it is; any other is quoted as JSON


class TextFormatter(logging.Formatter):
    """``HH:MM:SS level logger message key=value ...``, local time, one line: the fields of the
    JSON line, for a person reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        moment = time.strftime("%H:%M:%S", time.localtime(record.created))
        message = record.getMessage().replace("\n", "\\n")
        line = f"{moment} {record.levelname.lower():<7} {record.name} {message}"
        pairs = [f"{key}={_value(value)}" for key, value in details(record).items()]
        return " ".join([line, *pairs])


def _value(value: Any) -> str:
    if isinstance(value, str) and _BARE.fullmatch(value):
        return value
    return _compact(value)


def formatter(log_format: str, stream: TextIO) -> logging.Formatter:
    """IKW_LOG_FORMAT: ``auto`` is text when ``stream`` (where the lines go) is a terminal,
    JSON otherwise (a container's log collector, a file, a pipe)."""
    if log_format == "auto":
        log_format = "text" if stream.isatty() else "json"
    return TextFormatter() if log_format == "text" else JsonFormatter()


# Connection-loss exceptions, by name: what aio-pika and aiormq report while a robust connection
# is cut and restored. Not ours to act on; the reconnect that follows is logged at info.
_LOSS = frozenset(
    {
        "AMQPConnectionError",
        "ChannelInvalidStateError",
        "ConnectionClosed",
        "ConnectionError",
        "ConnectionRefusedError",
        "ConnectionResetError",
        "BrokenPipeError",
        "CancelledError",
        "TimeoutError",
        "IncompatibleProtocolError",
        "RuntimeError",  # "<Connection ...> closed", from a channel's close callback
    }
)
CONNECTION_FORCED = 320  # the broker closed the connection: restart, node down, operator


class ReconnectNoise(logging.Filter):
    """Lowers to warning the error records aio-pika and aiormq write on every connection cut,
    so an alert on error-level logs does not fire on a routine reconnect. Only these records:
    any other error from the libraries keeps its level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and _routine(record):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _routine(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    message = str(record.msg)
    if record.name == "aio_pika.tools" and message.startswith("Callback %r error"):
        # A robust channel's or connection's close callback failing because the link is gone.
        return len(args) >= 2 and "_on_close" in repr(args[0]) and args[1] in _LOSS
    if record.name == "aio_pika.robust_connection" and message.startswith("Reconnect attempt"):
        return len(args) >= 2 and args[1] in _LOSS
    if record.name == "aiormq.connection":
        if message.startswith("error when creating transport"):
            return True  # followed by aio-pika's "Connection attempt ... failed" warning
        if message.startswith("Unexpected connection close"):
            return len(args) >= 2 and args[1] == CONNECTION_FORCED
    return False


_NOISE_FILTER = ReconnectNoise()
NOISY_LOGGERS = ("aio_pika.tools", "aio_pika.robust_connection", "aiormq.connection")


def quiet_reconnects() -> None:
    """Install the filter on the loggers that write the noise (idempotent)."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _NOISE_FILTER not in logger.filters:
            logger.addFilter(_NOISE_FILTER)


def setup(level: str = "INFO", log_format: str = "auto") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, sys.stderr))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that would log request bodies (the SMS body holds the key's URL) stay quiet.
    for noisy in ("twilio", "aiormq", "aio_pika", "aiohttp.access", "mail.log"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_reconnects()
