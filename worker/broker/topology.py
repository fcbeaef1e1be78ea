"""Every exchange, queue and binding of one namespace, declared idempotently at start.

Replication: with ``quorum_size`` None (IKW_QUORUM_SIZE unset) the broker picks how many nodes
hold each new quorum queue and stream (RabbitMQ 3.10 places them on every node of a three-node
cluster, measured); a number sets ``x-quorum-initial-group-size`` and the stream's
``x-initial-cluster-size``. RabbitMQ compares it on every declare: a namespace declared with one
value refuses another (PRECONDITION_FAILED), so choose it before the first start; changing the
members of existing queues is `rabbitmq-queues grow` / `shrink`, not this setting."""

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, ExchangeType

from worker.queues import DELIVERY_LIMIT, LEVELS, Names

REVOKE_RETENTION = timedelta(days=30)
ACTIVITY_RETENTION = timedelta(days=7)
# Stream retention drops whole segments only: small segments let x-max-age take effect.
FENCE_SEGMENT_BYTES = 1_000_000
# The activity stream takes an entry per message: larger segments, fewer files (a day of 10
# messages/s is about 3 MB of entries).
ACTIVITY_SEGMENT_BYTES = 10_000_000

__all__ = [
    "LEVELS",
    "Names",
    "check",
    "counts",
    "declare",
    "delete",
    "describe",
    "first_missing",
    "plan",
]


def _level_pattern(level: int, bit: str) -> str:
    """Routing keys are 28 binary digits, most significant first, then the target queue."""
    return "*." * (LEVELS - 1 - level) + bit + ".#"


Row = tuple[str, str, dict[str, Any]]


def plan(
    names: Names,
    revoke_retention: timedelta = REVOKE_RETENTION,
    quorum_size: int | None = None,
    producers: Sequence[str] = (),
    activity_retention: timedelta = ACTIVITY_RETENTION,
) -> list[Row]:
    """The topology as (kind, name, details) rows, for declaring, printing and checking.
    An exchange's details are its type and its arguments. ``producers``: a queue of its own
    outcome events for each (`ikw topology --producer`)."""
    quorum: dict[str, Any] = {"x-queue-type": "quorum"}
    replicas: dict[str, Any] = {}
    if quorum_size is not None:
        quorum["x-quorum-initial-group-size"] = quorum_size
        replicas["x-initial-cluster-size"] = quorum_size
    rows = _exchanges(names, quorum)
    for stream in (names.fence, names.fence_index):
        rows.append(("queue", stream, _stream(revoke_retention, FENCE_SEGMENT_BYTES, replicas)))
    activity = _stream(activity_retention, ACTIVITY_SEGMENT_BYTES, replicas)
    rows.append(("queue", names.activity, activity))
    rows += _work_queues(names, quorum)
    rows += _delay_levels(names, quorum)
    for producer in producers:
        queue = names.outcome_queue(producer)
        rows.append(("queue", queue, dict(quorum)))
        rows.append(("binding", queue, {"exchange": names.outcomes, "key": f"{producer}.#"}))
    return rows


def _exchanges(names: Names, quorum: dict[str, Any]) -> list[Row]:
    return [
        # An event no queue takes goes to the alternate exchange and is kept as a dead letter.
        ("exchange", names.exchange, {"type": "topic", "alternate-exchange": names.unroutable}),
        ("exchange", names.unroutable, {"type": "fanout"}),
        ("queue", names.unroutable, dict(quorum)),
        ("binding", names.unroutable, {"exchange": names.unroutable, "key": "#"}),
        # Outcome events, routing key <producer>.<type>: each producer reads only its own queue.
        ("exchange", names.outcomes, {"type": "topic"}),
        # The outcome events nobody listens to: kept by none, dropped by the broker.
        ("queue", names.unheard, {"x-max-length": 0, "x-overflow": "drop-head"}),
        ("binding", names.unheard, {"exchange": names.outcomes, "key": "#"}),
        ("exchange", names.deliver, {"type": "topic"}),
        ("queue", names.dead, dict(quorum)),
    ]


def _stream(retention: timedelta, segment: int, replicas: dict[str, Any]) -> dict[str, Any]:
    return {
        "x-queue-type": "stream",
        "x-max-age": f"{max(1, int(retention.total_seconds()))}s",
        "x-stream-max-segment-size-bytes": segment,
        **replicas,
    }


def _work_queues(names: Names, quorum: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for queue, routing_key in names.work_queues.items():
        arguments = {
            **quorum,
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": names.dead,
        }
        rows.append(("queue", queue, arguments))
        if routing_key:
            rows.append(("binding", queue, {"exchange": names.exchange, "key": routing_key}))
        rows.append(("binding", queue, {"exchange": names.deliver, "key": f"#.{queue}"}))
    return rows


def _delay_levels(names: Names, quorum: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for level in range(LEVELS):
        name = names.delay(level)
        lower = names.delay(level - 1) if level else names.deliver
        rows.append(("exchange", name, {"type": "topic"}))
        arguments = {
            **quorum,
            "x-message-ttl": 2**level * 1000,
            "x-dead-letter-exchange": lower,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        rows.append(("queue", name, arguments))
        rows.append(("binding", name, {"exchange": name, "key": _level_pattern(level, "1")}))
        rows.append(
            ("exchange-binding", lower, {"exchange": name, "key": _level_pattern(level, "0")})
        )
    return rows


async def declare(
    channel: AbstractChannel,
    names: Names,
    revoke_retention: timedelta = REVOKE_RETENTION,
    quorum_size: int | None = None,
    producers: Sequence[str] = (),
    activity_retention: timedelta = ACTIVITY_RETENTION,
) -> None:
    exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
    queues: dict[str, aio_pika.abc.AbstractQueue] = {}
    rows = plan(names, revoke_retention, quorum_size, producers, activity_retention)
    for kind, name, details in rows:
        if kind == "exchange":
            kind_of, arguments = details["type"], {k: v for k, v in details.items() if k != "type"}
            exchanges[name] = await channel.declare_exchange(
                name, ExchangeType(kind_of), durable=True, arguments=arguments
            )
        elif kind == "queue":
            queues[name] = await channel.declare_queue(name, durable=True, arguments=details)
    for kind, name, details in rows:
        if kind == "binding":
            await queues[name].bind(exchanges[details["exchange"]], details["key"])
        elif kind == "exchange-binding":
            await exchanges[name].bind(exchanges[details["exchange"]], details["key"])


async def _exists(channel: AbstractChannel, kind: str, name: str) -> bool:
    """A passive declare; a missing one closes ``channel``."""
    try:
        if kind == "exchange":
            await channel.get_exchange(name, ensure=True)
        elif kind == "queue":
            await channel.get_queue(name, ensure=True)
    except aio_pika.exceptions.ChannelClosed:
        return False
    return True


async def check(channel: AbstractChannel, names: Names, producers: Sequence[str] = ()) -> list[str]:
    """Names of the exchanges and queues that are missing (passive declares)."""
    missing = []
    for kind, name, _ in plan(names, producers=producers):
        if not await _exists(channel, kind, name):
            missing.append(f"{kind} {name}")
            await channel.reopen()
    return missing


async def first_missing(channel: AbstractChannel, names: Names) -> str | None:
    """The first exchange or queue a worker uses that is not there ("queue ns.fence"), or None;
    ``channel`` is closed by then. The sink of unheard outcomes is not needed: without it, an
    outcome nobody listens to is logged and dropped."""
    for kind, name, _ in plan(names):
        if kind in ("exchange", "queue") and name != names.unheard:
            if not await _exists(channel, kind, name):
                return f"{kind} {name}"
    return None


async def counts(
    connection: aio_pika.abc.AbstractRobustConnection, queues: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """Ready messages and consumers of each of ``queues`` that exists (passive declares, on the
    raw channel: a robust one answers a passive declare from its cache)."""
    channel = await connection.channel()
    found: dict[str, tuple[int, int]] = {}
    try:
        for name in queues:
            raw = await channel.get_underlay_channel()
            try:
                ok = await raw.queue_declare(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                await channel.reopen()
                continue
            found[name] = (ok.message_count or 0, ok.consumer_count or 0)
    finally:
        await channel.close()
    return found


async def delete(channel: AbstractChannel, names: Names, producers: Sequence[str] = ()) -> None:
    """Remove a namespace (tests, and `ikw topology --delete`)."""
    for name in [*names.all_queues(), *map(names.outcome_queue, producers)]:
        await channel.queue_delete(name)
    for name in names.all_exchanges():
        await channel.exchange_delete(name)


def describe(names: Names, producers: Sequence[str] = ()) -> str:
    lines = []
    for kind, name, details in plan(names, producers=producers):
        if kind in ("binding", "exchange-binding"):
            lines.append(f"{kind:16} {details['exchange']} --[{details['key']}]--> {name}")
        else:
            shown = ", ".join(f"{k}={v}" for k, v in details.items())
            lines.append(f"{kind:16} {name}  {shown}")
    return "\n".join(lines)
