"""`ikw dlq`: the list, show, replay and purge commands, and their arguments."""

import argparse
import asyncio
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta

from aio_pika.abc import AbstractRobustConnection

from worker import config
from worker.broker import headers
from worker.broker.connect import BROKER_ERRORS, connect
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.config import DURATION_HINT, parse_duration
from worker.dlq.read import (
    DeadLetter,
    DlqError,
    holding,
    newest_first,
    printable,
    select,
    snapshot,
)
from worker.dlq.render import BODY_CHARS, by_reason, dead_letters, details, table
from worker.errors import REASONS

BATCH = 100  # replays in flight at once, and how often a progress line is printed
DEFAULT_LIMIT = 100
SHOWN_FAILURES = 20


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
    print(table(shown))
    if len(shown) < len(chosen):
        print(f"… {len(chosen) - len(shown)} older not shown (--limit 0 shows all)")
    return 0


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
        print(details(letter, full=args.full, reveal=args.reveal))
    return 0


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
    reply = (await answer()).strip().lower()
    if reply not in (str(len(chosen)), "y", "yes"):
        print("not confirmed; nothing was changed")
        return None
    return Confirmed(chosen)


async def answer() -> str:
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
    if letter.truncated:
        return (
            f"{letter.id}: its body was cut to {len(letter.message.body)} of {letter.truncated} "
            "bytes when dead-lettered (too_large); it cannot be replayed"
        )
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
    show.add_argument(
        "--reveal", action="store_true", help="phone numbers and emails in full (default: masked)"
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
        f"unknown reason {printable(reason)!r}; in {names.dead} now: "
        f"{', '.join(present) or 'none'}; known reasons: {', '.join(sorted(REASONS))}",
        exit_code=2,
    )
