"""`ikw status`: the namespace at a glance, over AMQP only (passive declares, a peek at the dead
queue, the first and last entries of the streams) and each named replica's /readyz."""

import argparse
import asyncio
import json
from collections import Counter
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from worker.broker.fence import consume_stream
from worker.commands import FAILED, OK, Failed, Subcommands, command
from worker.queues import LEVELS, Names

EMPTY_STREAM_WAIT = 1.0  # seconds a stream with no entry takes to say so
READYZ_TIMEOUT = 3.0


def add_parser(commands: Subcommands) -> None:
    status = command(
        commands,
        "status",
        "the namespace at a glance: each work queue's ready messages and consumers, the delayed "
        "messages, the dead letters by reason, the size of the worker's streams, and each "
        "replica's readiness (reads AMQP_URL and IKW_NAMESPACE)",
    )
    status.add_argument("--json", action="store_true", help="one JSON object instead of text")
    status.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="URL",
        help="a replica's health address, http://host:port (its IKW_HTTP_PORT): its /readyz "
        "is shown; repeat for each replica",
    )


async def run(args: argparse.Namespace) -> int:
    from worker import config
    from worker.broker.connect import connect

    settings = config.broker_settings()
    names = Names(settings.namespace)
    connection = await connect(settings.amqp_url, "ikw status")
    async with connection:
        report = await gather(connection, names, settings.broker_user)
    report["replicas"] = await asyncio.gather(*map(readiness, args.replica))
    print(json.dumps(report, indent=2) if args.json else "\n".join(text(report)))
    return OK


async def gather(connection: AbstractRobustConnection, names: Names, worker: str) -> dict[str, Any]:
    from worker.broker import topology
    from worker.dlq.read import snapshot

    found = await topology.counts(connection, names.all_queues())
    missing = [name for name in names.all_queues() if name not in found]
    if missing:
        raise Failed(
            f"namespace {names.namespace} has no complete topology ({len(missing)} queues "
            f"missing, e.g. {missing[0]}): run `ikw topology`",
            FAILED,
        )
    queues = [*names.work_queues, names.unroutable, names.dead]
    levels = {level: found[names.delay(level)][0] for level in range(LEVELS)}
    waiting = [level for level, count in levels.items() if count]
    streams = (names.fence, names.activity)
    spans = await asyncio.gather(*(span(connection, stream) for stream in streams))
    letters = await snapshot(connection, names, worker) if found[names.dead][0] else []
    return {
        "namespace": names.namespace,
        "queues": [
            {"queue": name, "ready": found[name][0], "consumers": found[name][1]} for name in queues
        ],
        "delayed": {
            "messages": sum(levels.values()),
            "nearest_level": min(waiting, default=None),
            "farthest_level": max(waiting, default=None),
        },
        "dead_letters": dict(Counter(letter.reason for letter in letters).most_common()),
        "streams": dict(zip(streams, spans, strict=True)),
    }


async def span(connection: AbstractRobustConnection, stream: str) -> dict[str, int] | None:
    """The offsets of a stream's first entry and of the first entry of its last chunk (AMQP
    tells no more: the entries between are about their difference); None when it is empty."""
    first, last = await asyncio.gather(
        _offset(connection, stream, "first"), _offset(connection, stream, "last")
    )
    if first is None or last is None:
        return None
    return {"first_offset": first, "last_chunk_offset": last, "entries_about": last - first + 1}


async def _offset(connection: AbstractRobustConnection, stream: str, where: str) -> int | None:
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def take(message: AbstractIncomingMessage) -> None:
        offset = (message.headers or {}).get("x-stream-offset")
        if isinstance(offset, int) and not seen.done():
            seen.set_result(offset)

    channel = await connection.channel()
    await channel.set_qos(prefetch_count=1)
    try:
        await consume_stream(channel, stream, take, where)
        return await asyncio.wait_for(seen, EMPTY_STREAM_WAIT)
    except TimeoutError:
        return None
    finally:
        await channel.close()


async def readiness(url: str) -> dict[str, Any]:
    """GET <url>/readyz: ready, or why not, or why it could not be asked."""
    import aiohttp

    address = url.rstrip("/") + "/readyz"
    try:
        timeout = aiohttp.ClientTimeout(total=READYZ_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(address) as response,
        ):
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return {"replica": url, "ready": None, "why": f"unreachable ({type(exc).__name__})"}
    ready = isinstance(body, dict) and body.get("ready") is True
    why = body.get("why") if isinstance(body, dict) else None
    return {"replica": url, "ready": ready, "why": why or (None if ready else "not ready")}


def text(report: dict[str, Any]) -> list[str]:
    rows = [("QUEUE", "READY", "CONSUMERS")] + [
        (q["queue"], str(q["ready"]), str(q["consumers"])) for q in report["queues"]
    ]
    width = max(len(row[0]) for row in rows)
    lines = [f"namespace {report['namespace']}"]
    lines += [f"  {name:<{width}}  {ready:>6}  {consumers:>9}" for name, ready, consumers in rows]
    lines.append(_delayed(report["delayed"]))
    dead = report["dead_letters"]
    lines.append(f"dead letters: {sum(dead.values())}")
    lines += [f"  {count:>6}  {reason}" for reason, count in dead.items()]
    for stream, found in report["streams"].items():
        lines.append(
            f"stream {stream}: "
            + (
                f"about {found['entries_about']} entries (offsets {found['first_offset']} to "
                f"{found['last_chunk_offset']}+)"
                if found
                else "empty"
            )
        )
    for replica in report["replicas"]:
        state = "ready" if replica["ready"] else replica["why"]
        lines.append(f"replica {replica['replica']}: {state}")
    return lines


def _delayed(delayed: dict[str, Any]) -> str:
    line = f"delayed (retries, expiry timers): {delayed['messages']} messages waiting"
    near, far = delayed["nearest_level"], delayed["farthest_level"]
    if near is not None and near == far:
        line += f", due in {_due(near)}"
    elif near is not None:
        line += f", the nearest due in {_due(near)}, the farthest in {_due(far)}"
    return line


def _due(level: int) -> str:
    """A message at delay level L is due in 2^L to 2^(L+1) seconds."""
    low, high = 2**level, 2 ** (level + 1)
    for unit, seconds in (("d", 86400), ("h", 3600), ("min", 60)):
        if low >= seconds * 2:
            return f"{low // seconds}-{high // seconds} {unit}"
    return f"{low}-{high} s"
