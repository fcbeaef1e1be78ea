"""Every exchange, queue and binding of one namespace, declared idempotently at start."""

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, ExchangeType

LEVELS = 28  # delay levels: 2^0 s .. 2^27 s, so delays up to 2^28 - 1 s
DELIVERY_LIMIT = 5  # a message that kills the worker this often is dead-lettered


@dataclass(frozen=True)
class Names:
    namespace: str = "instant_keys"

    @property
    def exchange(self) -> str:
        return self.namespace

    @property
    def grants(self) -> str:
        return f"{self.namespace}.grants"

    @property
    def revocations(self) -> str:
        return f"{self.namespace}.revocations"

    @property
    def cleanup(self) -> str:
        return f"{self.namespace}.cleanup"

    @property
    def dead(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def deliver(self) -> str:
        return f"{self.namespace}.delay.deliver"

    def delay(self, level: int) -> str:
        return f"{self.namespace}.delay.{level:02d}"

    @property
    def work_queues(self) -> dict[str, str | None]:
        """Work queue -> the routing key producers use for it (None: internal only)."""
        return {
            self.grants: "access.granted",
            self.revocations: "access.revoked",
            self.cleanup: None,
        }

    def all_queues(self) -> list[str]:
        return [*self.work_queues, self.dead, *(self.delay(n) for n in range(LEVELS))]

    def all_exchanges(self) -> list[str]:
        return [self.exchange, self.deliver, *(self.delay(n) for n in range(LEVELS))]


def _level_pattern(level: int, bit: str) -> str:
    """Routing keys are 28 binary digits, most significant first, then the target queue."""
    return "*." * (LEVELS - 1 - level) + bit + ".#"


def plan(names: Names) -> list[tuple[str, str, dict[str, Any]]]:
    """The topology as (kind, name, details) rows, for declaring, printing and checking."""
    quorum = {"x-queue-type": "quorum"}
    rows: list[tuple[str, str, dict[str, Any]]] = [
        ("exchange", names.exchange, {"type": "topic"}),
        ("exchange", names.deliver, {"type": "topic"}),
        ("queue", names.dead, dict(quorum)),
    ]
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


async def declare(channel: AbstractChannel, names: Names) -> None:
    exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
    queues: dict[str, aio_pika.abc.AbstractQueue] = {}
    rows = plan(names)
    for kind, name, details in rows:
        if kind == "exchange":
            exchanges[name] = await channel.declare_exchange(name, ExchangeType.TOPIC, durable=True)
        elif kind == "queue":
            queues[name] = await channel.declare_queue(name, durable=True, arguments=details)
    for kind, name, details in rows:
        if kind == "binding":
            await queues[name].bind(exchanges[details["exchange"]], details["key"])
        elif kind == "exchange-binding":
            await exchanges[name].bind(exchanges[details["exchange"]], details["key"])


async def check(channel: AbstractChannel, names: Names) -> list[str]:
    """Names of the exchanges and queues that are missing (passive declares)."""
    missing = []
    for kind, name, _ in plan(names):
        try:
            if kind == "exchange":
                await channel.get_exchange(name, ensure=True)
            elif kind == "queue":
                await channel.get_queue(name, ensure=True)
        except aio_pika.exceptions.ChannelClosed:
            missing.append(f"{kind} {name}")
            await channel.reopen()
    return missing


async def delete(channel: AbstractChannel, names: Names) -> None:
    """Remove a namespace (tests, and `ikw topology --delete`)."""
    for name in names.all_queues():
        await channel.queue_delete(name)
    for name in names.all_exchanges():
        await channel.exchange_delete(name)


def describe(names: Names) -> str:
    lines = []
    for kind, name, details in plan(names):
        if kind in ("binding", "exchange-binding"):
            lines.append(f"{kind:16} {details['exchange']} --[{details['key']}]--> {name}")
        else:
            shown = ", ".join(f"{k}={v}" for k, v in details.items())
            lines.append(f"{kind:16} {name}  {shown}")
    return "\n".join(lines)
