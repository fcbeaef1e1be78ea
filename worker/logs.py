"""Logging setup (one JSON object per line) and masks for contact details."""

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any


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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "ctx", {}))
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that would log request bodies (the SMS body holds the key's URL) stay quiet.
    for noisy in ("twilio", "aiormq", "aio_pika", "aiohttp.access", "mail.log"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
