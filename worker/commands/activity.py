"""`ikw activity`: what became of a grant, an event, an identity or a reservation, from the
activity stream the worker writes (one entry per settled message)."""

import argparse
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from worker.commands import FAILED, OK, Failed, Subcommands, command
from worker.dlq.command import duration
from worker.dlq.read import printable
from worker.dlq.render import stamp
from worker.queues import Names

DEFAULT_SINCE = timedelta(days=1)
# What each selector compares, and the id that ties later entries to a match: a grant's key is
# deleted by a cleanup that names only the key; an identity's cleanups name only its Seam id.
SELECTORS = {
    "grant": (("grant_id",), "key_id"),
    "event": (("event_id", "message_id"), "key_id"),
    "identity": (("identity_key", "identity_id"), "identity_id"),
    "reservation": (("reservation_key",), "key_id"),
}

Entry = dict[str, Any]


def add_parser(commands: Subcommands) -> None:
    activity = command(
        commands,
        "activity",
        "what became of a grant, an event, an identity or a reservation: one line per message "
        "the worker settled (granted, delivered on which channel, retried, fenced, revoked, "
        "cleaned up, dead-lettered and why), from the activity stream (reads AMQP_URL and "
        "IKW_NAMESPACE)",
    )
    which = activity.add_mutually_exclusive_group(required=True)
    which.add_argument("--grant", metavar="GRANT_ID")
    which.add_argument("--event", metavar="EVENT_ID", help="an event id (or a message id)")
    which.add_argument("--identity", metavar="KEY_OR_ID", help="a user_identity_key or id")
    which.add_argument("--reservation", metavar="RESERVATION_KEY")
    activity.add_argument(
        "--since",
        type=duration,
        default=DEFAULT_SINCE,
        metavar="DURATION",
        help="how far back to look, e.g. 2h (default 1d; the stream keeps IKW_ACTIVITY_RETENTION)",
    )
    activity.add_argument("--json", action="store_true", help="the entries as JSON lines")


class Matcher:
    """An entry matches when one of its fields is the value, or it names an id that an earlier
    match named (the key a grant delivered, deleted later by its cleanup)."""

    def __init__(self, fields: tuple[str, ...], related: str, value: str) -> None:
        self.fields = fields
        self.related = related
        self.value = value
        self.seen: set[str] = set()

    def __call__(self, entry: Entry) -> bool:
        tied = entry.get(self.related)
        if any(entry.get(field) == self.value for field in self.fields):
            if isinstance(tied, str):
                self.seen.add(tied)
            return True
        return tied in self.seen


async def run(args: argparse.Namespace) -> int:
    from aio_pika.exceptions import PublishError

    from worker import config
    from worker.broker import activity
    from worker.broker.connect import connect

    settings = config.broker_settings()
    names = Names(settings.namespace)
    selector = next(name for name in SELECTORS if getattr(args, name) is not None)
    fields, related = SELECTORS[selector]
    matches = Matcher(fields, related, getattr(args, selector))
    since = datetime.now(UTC) - args.since
    found = 0

    def take(entry: Entry) -> None:
        nonlocal found
        if str(entry.get("at", "")) >= since.isoformat() and matches(entry):
            found += 1
            print(json.dumps(entry) if args.json else line(entry), flush=True)

    connection = await connect(settings.amqp_url, "ikw activity")
    async with connection:
        try:
            read = await activity.read(
                connection, names.activity, since, settings.broker_user, take
            )
        except PublishError:
            raise Failed(
                f"stream {names.activity} does not exist; run `ikw topology` (workers record "
                "activity once it is there)",
                FAILED,
            ) from None
    if not args.json:
        what = f"{selector} {getattr(args, selector)}"
        entries = "1 entry" if found == 1 else f"{found} entries"
        print(f"{entries} for {what} of {read} read in {names.activity} since {stamp(since)}")
    return OK


def line(entry: Entry) -> str:
    at = str(entry.get("at", "-"))[:23].replace("T", " ") + "Z"
    kind = entry.get("type") or entry.get("routing_key") or "-"
    ids = [
        f"{label} {entry[field]}"
        for label, field in (
            ("event", "event_id"),
            ("grant", "grant_id"),
            ("reservation", "reservation_key"),
            ("identity", "identity_key"),
            ("identity_id", "identity_id"),
            ("producer", "producer"),
        )
        if entry.get(field)
    ]
    # Producers chose the ids and keys: no control character of theirs reaches the terminal.
    return printable(f"{at}  {kind}  {what_happened(entry)}  [{', '.join(ids)}]")


def what_happened(entry: Entry) -> str:
    settled, action = entry.get("settled"), entry.get("action")
    key = f"key {entry['key_id']}" if entry.get("key_id") else "no key"
    if settled == "dead_lettered":
        return f"dead-lettered: {entry.get('reason')}: {entry.get('error', '')}"
    if settled == "retried":
        return (
            f"retried (attempt {entry.get('attempt')} failed; again in "
            f"{entry.get('retry_in_s')} s): {entry.get('error', '')}"
        )
    if action == "granted":
        channel = entry.get("channel")
        return f"granted: delivered on {channel}, {key}" if channel else f"granted: {key}"
    if action == "fenced":
        return "fenced: a later revoke of this identity; nothing delivered"
    if action == "revoked":
        return f"revoked: {entry.get('deleted', 0)} keys deleted"
    if action == "cleaned_up":
        return f"cleaned up: {key} deleted at its expiry"
    if action == "stay_ended":
        return f"stay ended: {entry.get('deleted', 0)} keys deleted"
    return PHRASES.get(str(action), str(action or settled))


# What the stays' other actions mean, in a line.
PHRASES = {
    "scheduled": "scheduled: the key is sent at the stay's deliver_at",
    "stale_revision": "stale revision: no higher than the one applied; changed nothing",
    "stale_timer": "a timer of a revision since replaced: dropped",
    "already_held": "the guest holds a working key for the stay: not sent again",
    "timer_rescheduled": "came due early: set again for its time",
}
