"""Rendering dead letters for the terminal: counts, the table, one letter in detail."""

import json
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime

from worker.broker.headers import foreign
from worker.dlq.read import DeadLetter
from worker.logs import mask_contacts

BODY_CHARS = 4000


def stamp(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if moment else "-"


def dead_letters(count: int) -> str:
    return f"{count} dead letter" + ("" if count == 1 else "s")


def by_reason(letters: Iterable[DeadLetter]) -> list[str]:
    counts = Counter(letter.reason for letter in letters).most_common()
    return [f"  {count:>6}  {reason}" for reason, count in counts]


HEADINGS = ("ID", "REASON", "SOURCE QUEUE", "ATTEMPTS", "DEAD-LETTERED AT", "ERROR")


def _row(letter: DeadLetter) -> tuple[str, ...]:
    attempts = "-" if letter.attempts is None else str(letter.attempts)
    source, error = letter.source or "-", letter.error or "-"
    return (letter.id, letter.reason, source, attempts, stamp(letter.dead_at), error)


def table(letters: list[DeadLetter]) -> str:
    rows = [HEADINGS, *map(_row, letters)]
    widths = [max(len(row[col]) for row in rows) for col in range(len(HEADINGS) - 1)]
    # The error, last, is not padded: it may be long.
    return "\n".join("  ".join([*map(str.ljust, row, widths), row[-1]]) for row in rows)


def details(letter: DeadLetter, *, full: bool = False, reveal: bool = False) -> str:
    """Phone numbers and email addresses in the body and the producer's own headers are masked
    unless ``reveal`` (the worker's headers hold none)."""
    message = letter.message
    lines = [
        f"reason:           {letter.reason}",
        f"error:            {letter.error or '-'}",
        f"source queue:     {letter.source or '-'}",
        f"attempts:         {'-' if letter.attempts is None else letter.attempts}",
        f"dead-lettered at: {stamp(letter.dead_at)}",
        f"message_id:       {_plain(message.message_id or '-')}",
        f"content_type:     {_plain(message.content_type or '-')}",
    ]
    if letter.truncated:
        lines.append(
            f"truncated:        only the first {len(message.body)} of {letter.truncated} bytes "
            "were kept; it cannot be replayed"
        )
    lines.append("headers:")
    headers = message.headers or {}
    producers = foreign(headers)
    masked = (lambda text: text) if reveal else mask_contacts
    # x-delivery-count only counts how often the dead queue was read (by this command too).
    for key in sorted(k for k in headers if k != "x-delivery-count"):
        shown = _header_lines(key, headers[key])
        lines.extend(map(masked, shown) if key in producers else shown)
    heading, *body = _body_lines(message.body, full=full)
    return "\n".join([*lines, heading, *map(masked, body)])


def _header_lines(key: str, value: object) -> list[str]:
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        entries = [" ".join(f"{k}={_plain(v)}" for k, v in item.items()) for item in value]
        return [f"  {_plain(key)}:", *(f"    - {entry}" for entry in entries)]
    return [f"  {_plain(key)}: {_plain(value)}"]


def _plain(value: object) -> str:
    if isinstance(value, datetime):
        return stamp(value)
    if isinstance(value, list):
        return "[" + ", ".join(_plain(item) for item in value) + "]"
    text = str(value)
    return text if text.isprintable() and not isinstance(value, bytes) else repr(value)


def _body_lines(body: bytes, *, full: bool = False) -> list[str]:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        text, kind = repr(body), "not JSON, shown as Python bytes"
    else:
        text, kind = json.dumps(parsed, indent=2, ensure_ascii=False), "JSON"
        if not text.replace("\n", "").isprintable():
            text = json.dumps(parsed, indent=2)
    lines = [f"body ({len(body)} bytes, {kind}):"]
    if len(text) > BODY_CHARS and not full:
        cut = len(text) - BODY_CHARS
        return [*lines, text[:BODY_CHARS], f"… {cut} more characters not shown (--full shows all)"]
    return [*lines, text]
