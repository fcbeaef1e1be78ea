"""`ikw topology`: declare, check, print or delete the namespace's exchanges and queues."""

import argparse
import sys

import aio_pika

from worker import config
from worker.broker import topology
from worker.broker.connect import connect
from worker.broker.topology import Names
from worker.commands import FAILED, OK, USAGE, Failed, Subcommands, command
from worker.queues import PRODUCER


def add_parser(commands: Subcommands) -> None:
    topo = command(
        commands,
        "topology",
        "declare (idempotent) and print the namespace's exchanges and queues; or check, print "
        "or delete them (reads AMQP_URL and IKW_NAMESPACE)",
    )
    mode = topo.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only report what is missing")
    mode.add_argument("--print", action="store_true", help="only print it, touch nothing")
    mode.add_argument(
        "--delete",
        action="store_true",
        help="delete every queue and exchange of the namespace, with the dead letters and "
        "expiry timers they hold; says what it would destroy and asks first",
    )
    topo.add_argument("--yes", action="store_true", help="--delete without asking")
    topo.add_argument(
        "--producer",
        action="append",
        default=[],
        type=_producer,
        metavar="NAME",
        help="also the queue of producer NAME's outcome events, <namespace>.outcomes.NAME, "
        "bound with NAME.#; repeat for each producer",
    )


def _producer(text: str) -> str:
    if not PRODUCER.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"a producer is its broker user: 1 to 64 letters, digits, '_' or '-', got {text[:80]!r}"
        )
    return text


async def run(args: argparse.Namespace) -> int:
    if args.yes and not args.delete:
        raise Failed("--yes goes with --delete only", USAGE)
    settings = config.broker_settings()
    names = Names(settings.namespace)
    if args.print:
        print(topology.describe(names, args.producer))
        return OK
    connection = await connect(settings.amqp_url, "ikw topology")
    async with connection:
        if args.delete:
            return await _delete(args, connection, names)
        channel = await connection.channel()
        if args.check:
            return await _check(args, channel, names)
        await topology.declare(
            channel,
            names,
            quorum_size=settings.quorum_size,
            producers=args.producer,
            activity_retention=settings.activity_retention,
        )
        print(topology.describe(names, args.producer))
        return OK


async def _check(
    args: argparse.Namespace, channel: aio_pika.abc.AbstractChannel, names: Names
) -> int:
    missing = await topology.check(channel, names, args.producer)
    checked = [kind for kind, _, _ in topology.plan(names, producers=args.producer)]
    if len(missing) == checked.count("exchange") + checked.count("queue"):
        print(f"namespace {names.namespace} is not declared: run `ikw topology`")
        return FAILED
    for line in missing:
        print(f"missing: {line}")
    print("topology complete" if not missing else f"{len(missing)} missing")
    return FAILED if missing else OK


async def depths(connection: aio_pika.abc.AbstractRobustConnection, names: Names) -> dict[str, int]:
    """Ready messages of each queue of the namespace that exists (passive declares)."""
    found = await topology.counts(connection, names.all_queues())
    return {name: ready for name, (ready, _) in found.items()}


def _at_stake(names: Names, found: dict[str, int]) -> list[str]:
    delays = [name for name in found if name.startswith(f"{names.namespace}.delay.")]
    rows = [
        (found.get(names.dead), f"dead letters in {names.dead}"),
        (
            sum(found[name] for name in delays) if delays else None,
            f"pending expiry timers and retries in {names.delay(0)} … .{topology.LEVELS - 1:02d}",
        ),
        (found.get(names.cleanup), f"due expiry timers in {names.cleanup}"),
        (found.get(names.grants), f"grants waiting in {names.grants}"),
        (found.get(names.revocations), f"revocations waiting in {names.revocations}"),
    ]
    return [f"  {count:>7}  {what}" for count, what in rows if count is not None]


async def _confirmed(names: Names, found: dict[str, int]) -> bool:
    """Says what deleting would destroy and asks for the namespace's name on a terminal."""
    from worker.dlq import answer

    print(
        f"delete namespace {names.namespace}: {len(found)} queues and their exchanges, "
        f"holding {sum(found.values())} ready messages:"
    )
    print("\n".join(_at_stake(names, found)))
    timers = sum(n for q, n in found.items() if q.startswith(f"{names.namespace}.delay."))
    if timers or found.get(names.cleanup):
        print("Keys whose expiry timers are deleted are never deleted from Seam.")
    if names.fence in found:
        print(
            f"The revokes remembered in {names.fence} are forgotten: a grant retried or "
            "replayed later would no longer be refused."
        )
    if not sys.stdin or not sys.stdin.isatty():
        print(
            f"ikw topology: refusing to delete namespace {names.namespace} without "
            "confirmation: stdin is not a terminal; pass --yes to confirm. "
            "Nothing was changed.",
            file=sys.stderr,
        )
        return False
    print(f"type the namespace ({names.namespace}) to delete it: ", end="", flush=True)
    if (await answer()).strip() != names.namespace:
        print("not confirmed; nothing was changed")
        return False
    return True


async def _delete(
    args: argparse.Namespace, connection: aio_pika.abc.AbstractRobustConnection, names: Names
) -> int:
    found = await depths(connection, names)
    if found and not args.yes and not await _confirmed(names, found):
        return FAILED
    channel = await connection.channel()
    await topology.delete(channel, names, args.producer)
    await channel.close()
    if not found:
        print(f"namespace {names.namespace} had no queues; deleted its exchanges, if any")
        return OK
    held = sum(found.values())
    lost = f", with {held} messages" if held else ""
    print(f"deleted the topology of namespace {names.namespace} ({len(found)} queues{lost})")
    return OK
