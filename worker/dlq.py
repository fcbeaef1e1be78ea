"""`ikw dlq`: list, show, replay and purge dead letters."""

import argparse
import asyncio
import hashlib
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from worker import config
from worker.broker import headers
from worker.broker.connect import BROKER_ERRORS, connect
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.config import DURATION_HINT, parse_duration
from worker.errors import REASONS

BATCH = 100  # replays in flight at once, and how often a progress line is printed
DEFAULT_LIMIT = 100
ERROR_WIDTH = 160
BODY_CHARS = 4000
SHOWN_FAILURES = 20
BROKER_REASONS = {
    "delivery_limit": "redelivered past the queue's x-delivery-limit, never acked (crash loop?)",
    "rejected": "rejected without requeue",
    "expired": "expired (message TTL)",
    "maxlen": "dropped by the queue's length limit",
}
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
        dead_at, error, attempts = book.dead_lettered_at, book.error or "", book.attempts
    else:
        death = _broker_death(raw)
        reason = _text(death.get("reason")) or "unknown"
        source = _text(death.get("queue"))
        dead_at = headers.moment(death.get("time"))
        error = _broker_error(reason, book)
        attempts = book.attempt
    return DeadLetter(
        message=message,
        id=_printable(letter_id(message)),
        reason=_printable(reason),
        source=_printable(source),
        attempts=attempts if isinstance(attempts, int) else None,
        dead_at=dead_at,
        error=_one_line(error),
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


def _printable(text: str) -> str:
    """Producers choose ids and headers: keep their control characters off the terminal."""
    return "".join(char if char.isprintable() else "?" for char in text)


def _one_line(text: str, width: int = ERROR_WIDTH) -> str:
    flat = _printable(" ".join(text.split()))
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _stamp(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if moment else "-"


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
    while len(letters) < expected:
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            break
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


def dead_letters(count: int) -> str:
    return f"{count} dead letter" + ("" if count == 1 else "s")


def by_reason(letters: Iterable[DeadLetter]) -> list[str]:
    counts = Counter(letter.reason for letter in letters).most_common()
    return [f"  {count:>6}  {reason}" for reason, count in counts]


# --- list and show -------------------------------------------------------------------------


async def _list(
    args: argparse.Namespace, connection: AbstractRobustConnection, names: Names
) -> int:
    letters = await snapshot(connection, names, args.broker_user)
    chosen = newest_first(
        select(letters, reason=args.reason, older_than=args.older_than, newer_than=args.newer_than)
    )
    if not chosen:
        print(
            f"none of the {dead_letters(len(letters))} in {names.dead} match"
            if letters
            else f"no dead letters in {names.dead}"
        )
        return 0
    of = f" (of {len(letters)})" if len(chosen) < len(letters) else ""
    print(f"{dead_letters(len(chosen))} in {names.dead}{of}")
    print("\n".join(by_reason(chosen)))
    print()
    shown = chosen[: args.limit] if args.limit else chosen
    print(_table(shown))
    if len(shown) < len(chosen):
        print(f"… {len(chosen) - len(shown)} older not shown (--limit 0 shows all)")
    return 0


HEADINGS = ("ID", "REASON", "SOURCE QUEUE", "ATTEMPTS", "DEAD-LETTERED AT", "ERROR")


def _row(letter: DeadLetter) -> tuple[str, ...]:
    attempts = "-" if letter.attempts is None else str(letter.attempts)
    source, error = letter.source or "-", letter.error or "-"
    return (letter.id, letter.reason, source, attempts, _stamp(letter.dead_at), error)


def _table(letters: list[DeadLetter]) -> str:
    rows = [HEADINGS, *map(_row, letters)]
    widths = [max(len(row[col]) for row in rows) for col in range(len(HEADINGS) - 1)]
    # The error, last, is not padded: it may be long.
    return "\n".join("  ".join([*map(str.ljust, row, widths), row[-1]]) for row in rows)


async def _show(
    args: argparse.Namespace, connection: AbstractRobustConnection, names: Names
) -> int:
    matches = newest_first(
        select(await snapshot(connection, names, args.broker_user), ids=[args.id])
    )
    if not matches:
        raise DlqError(f"no dead letter with id {args.id} in {names.dead}")
    for number, letter in enumerate(matches, 1):
        if number > 1:
            print()
        suffix = f" ({number} of {len(matches)} with this id)" if len(matches) > 1 else ""
        print(f"dead letter {letter.id}{suffix}")
        print(_details(letter, full=args.full))
    return 0


def _details(letter: DeadLetter, *, full: bool = False) -> str:
    message = letter.message
    lines = [
        f"reason:           {letter.reason}",
        f"error:            {letter.error or '-'}",
        f"source queue:     {letter.source or '-'}",
        f"attempts:         {'-' if letter.attempts is None else letter.attempts}",
        f"dead-lettered at: {_stamp(letter.dead_at)}",
        f"message_id:       {_plain(message.message_id or '-')}",
        f"content_type:     {_plain(message.content_type or '-')}",
        "headers:",
    ]
    headers = message.headers or {}
    # x-delivery-count only counts how often the dead queue was read (by this command too).
    for key in sorted(k for k in headers if k != "x-delivery-count"):
        lines.extend(_header_lines(key, headers[key]))
    return "\n".join([*lines, *_body_lines(message.body, full=full)])


def _header_lines(key: str, value: object) -> list[str]:
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        entries = [" ".join(f"{k}={_plain(v)}" for k, v in item.items()) for item in value]
        return [f"  {_plain(key)}:", *(f"    - {entry}" for entry in entries)]
    return [f"  {_plain(key)}: {_plain(value)}"]


def _plain(value: object) -> str:
    if isinstance(value, datetime):
        return _stamp(value)
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


# --- replay and purge ----------------------------------------------------------------------


class Confirmed:
    """What the operator agreed to: all that is selected (--yes), or exactly what was shown."""

    def __init__(self, shown: list[DeadLetter] | None) -> None:
        self._left = None if shown is None else Counter(letter.fingerprint for letter in shown)

    def take(self, letters: list[DeadLetter]) -> list[DeadLetter]:
        if self._left is None:
            return letters
        taken = []
        for letter in letters:
            if self._left[letter.fingerprint] > 0:
                self._left[letter.fingerprint] -= 1
                taken.append(letter)
        return taken


def _selection(args: argparse.Namespace, letters: list[DeadLetter]) -> list[DeadLetter]:
    return select(letters, ids=getattr(args, "ids", ()), reason=args.reason)


async def confirm(
    args: argparse.Namespace, connection: AbstractRobustConnection, names: Names, verb: str
) -> Confirmed | None:
    """Ask first, holding nothing while the operator reads; None when not confirmed."""
    if args.yes:
        return Confirmed(None)
    chosen = _selection(args, await snapshot(connection, names, args.broker_user))
    if not chosen:
        return Confirmed([])
    print(f"{verb} {dead_letters(len(chosen))} from {names.dead}:")
    print("\n".join(by_reason(chosen)))
    if not sys.stdin or not sys.stdin.isatty():
        print(
            f"ikw dlq: refusing to {verb} without confirmation: stdin is not a terminal; "
            "pass --yes to confirm. Nothing was changed.",
            file=sys.stderr,
        )
        return None
    print(f"type {len(chosen)} or y to {verb} them: ", end="", flush=True)
    answer = (await _answer()).strip().lower()
    if answer not in (str(len(chosen)), "y", "yes"):
        print("not confirmed; nothing was changed")
        return None
    return Confirmed(chosen)


async def _answer() -> str:
    """A line from the terminal, read on the loop: a thread blocked in readline would keep
    asyncio.run from exiting on Ctrl-C."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    return sys.stdin.readline()


async def _replay(
    args: argparse.Namespace, connection: AbstractRobustConnection, names: Names
) -> int:
    confirmed = await confirm(args, connection, names, "replay")
    if confirmed is None:
        return 1
    async with holding(connection, names, args.broker_user) as letters:
        missing = sorted(set(args.ids) - {letter.id for letter in letters})
        chosen = confirmed.take(_selection(args, letters))
        # Oldest first, so the work queue sees them roughly in their first order.
        chosen = newest_first(chosen)[::-1]
        failures = await republish(connection, names, chosen, args.broker_user)
    for line in [f"no dead letter with id {i}" for i in missing] + failures[:SHOWN_FAILURES]:
        print(f"failed: {line}")
    if len(failures) > SHOWN_FAILURES:
        print(f"failed: … and {len(failures) - SHOWN_FAILURES} more")
    print(f"replayed {len(chosen) - len(failures)}, failed {len(failures) + len(missing)}")
    return 1 if failures or missing else 0


async def republish(
    connection: AbstractRobustConnection, names: Names, letters: list[DeadLetter], user: str
) -> list[str]:
    """Each back on its work queue, acked in the dead queue once the broker confirmed it.
    Published as ``user``, the worker's own: only then does the worker keep the original
    producer the dead letter names, so a replay is trusted exactly as the original was."""
    if not letters:
        return []
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    publisher = Publisher(channel, names, user)
    failures: list[str] = []
    done = 0
    try:
        for batch in _batches(letters):
            results = await asyncio.gather(*(_replay_one(publisher, letter) for letter in batch))
            failures.extend(result for result in results if result)
            before, done = done, done + len(batch)
            if len(letters) > BATCH and (done // BATCH > before // BATCH or done == len(letters)):
                print(f"… {done} of {len(letters)} done, {len(failures)} failed", flush=True)
    finally:
        await channel.close()
    return failures


def _batches(letters: list[DeadLetter]) -> Iterator[list[DeadLetter]]:
    """Up to BATCH at a time, never two with one message_id in flight: aiormq matches a returned
    (unroutable) publish to its confirm by message_id, so twins could take each other's confirm
    and a lost message would look delivered."""
    batch: list[DeadLetter] = []
    ids: set[str] = set()
    for letter in letters:
        message_id = letter.message.message_id
        if len(batch) == BATCH or message_id in ids:
            yield batch
            batch, ids = [], set()
        batch.append(letter)
        if message_id:
            ids.add(message_id)
    if batch:
        yield batch


async def _replay_one(publisher: Publisher, letter: DeadLetter) -> str | None:
    """None when replayed, else why not."""
    if letter.source not in publisher.names.work_queues:
        source = letter.source or "unknown"
        return f"{letter.id}: its source queue ({source}) is not a work queue of this namespace"
    message = letter.message
    try:
        await publisher.to_queue(
            letter.source,
            message.body,
            headers=headers.for_replay(message.headers, message.user_id, publisher.user_id or ""),
            message_id=message.message_id,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
        )
    except BROKER_ERRORS as exc:
        return f"{letter.id}: not republished ({type(exc).__name__}); it stays a dead letter"
    try:
        await message.ack()
    except BROKER_ERRORS as exc:
        return f"{letter.id}: republished but not removed ({type(exc).__name__}); it shows again"
    return None


async def _purge(
    args: argparse.Namespace, connection: AbstractRobustConnection, names: Names
) -> int:
    confirmed = await confirm(args, connection, names, "purge")
    if confirmed is None:
        return 1
    async with holding(connection, names, args.broker_user) as letters:
        missing = sorted(set(args.ids) - {letter.id for letter in letters})
        chosen = confirmed.take(_selection(args, letters))
        purged = 0
        try:
            for letter in chosen:
                await letter.message.ack()
                purged += 1
        except BROKER_ERRORS as exc:
            raise DlqError(
                f"lost the channel ({type(exc).__name__}) after purging {purged}; the rest stay"
            ) from None
    for letter_id in missing:
        print(f"failed: no dead letter with id {letter_id}")
    print(f"purged {dead_letters(purged)} from {names.dead}")
    return 1 if missing else 0


# --- the command ---------------------------------------------------------------------------


def duration(raw: str) -> timedelta:
    value = parse_duration(raw)
    if value is None:
        raise argparse.ArgumentTypeError(f"use {DURATION_HINT}: {raw!r}")
    return value


def add_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    dlq = commands.add_parser(
        "dlq",
        help="inspect, replay and purge dead letters",
        description=f"Inspect, replay and purge the dead letters of the namespace's .dead queue "
        "(reads AMQP_URL and IKW_NAMESPACE). A --reason is one of: "
        f"{', '.join(sorted(REASONS))}.",
    )
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")

    def action(name: str, what: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = actions.add_parser(
            name, help=what, description=what[0].upper() + what[1:] + "."
        )
        return sub

    listing = action("list", "count by reason, then one line each, newest first; takes nothing")
    listing.add_argument("--reason", help="only this reason, e.g. invalid_event")
    listing.add_argument("--older-than", type=duration, metavar="DURATION", help="e.g. 2h")
    listing.add_argument("--newer-than", type=duration, metavar="DURATION", help="e.g. 15m")
    listing.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT, help=f"lines (default {DEFAULT_LIMIT}, 0: all)"
    )

    show = action("show", "headers and body of the dead letters with this id; takes nothing")
    show.add_argument("id", metavar="ID")
    show.add_argument(
        "--full", action="store_true", help=f"the whole body (default: its first {BODY_CHARS})"
    )

    replay = action(
        "replay", "put dead letters back on their source queue, at attempt 1; asks first"
    )
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", nargs="*", default=[], metavar="ID")
    which.add_argument("--reason", help="every dead letter with this reason")
    which.add_argument("--all", action="store_true", help="every dead letter")
    replay.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    purge = action(
        "purge", "delete dead letters for good: these ids, this reason, or all; asks first"
    )
    purge.add_argument("ids", nargs="*", default=[], metavar="ID", help="only these ids")
    purge.add_argument("--reason", help="only this reason (default: all)")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")


Command = Callable[[argparse.Namespace, AbstractRobustConnection, Names], Awaitable[int]]
COMMANDS: dict[str, Command] = {"list": _list, "show": _show, "replay": _replay, "purge": _purge}


async def run(args: argparse.Namespace) -> int:
    settings = config.broker_settings()
    names = Names(settings.namespace)
    args.broker_user = settings.broker_user
    connection = await connect(settings.amqp_url, "ikw-dlq")
    try:
        async with connection:
            await check_reason(
                getattr(args, "reason", None), connection, names, settings.broker_user
            )
            return await COMMANDS[args.dlq_command](args, connection, names)
    except DlqError as exc:
        print(f"ikw dlq: {exc}", file=sys.stderr)
        return exc.exit_code


async def check_reason(
    reason: str | None, connection: AbstractRobustConnection, names: Names, worker: str
) -> None:
    """A reason no one gives and no dead letter has is a typo, not an empty selection."""
    if reason is None or reason in REASONS:
        return
    present = sorted({letter.reason for letter in await snapshot(connection, names, worker)})
    if reason in present:  # e.g. from a newer worker
        return
    raise DlqError(
        f"unknown reason {_printable(reason)!r}; in {names.dead} now: "
        f"{', '.join(present) or 'none'}; known reasons: {', '.join(sorted(REASONS))}",
        exit_code=2,
    )
