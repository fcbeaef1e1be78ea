"""Confirmed, mandatory publishes: events, delayed messages (via the delay levels), dead letters."""

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, HeadersType

from worker.broker.topology import LEVELS, Names
from worker.events import KeyCleanup
from worker.ports import InstantKey

MAX_DELAY = 2**LEVELS - 1  # seconds, about 8.5 years
# Headers the broker adds when dead-lettering: a copy that keeps them would be seen as a
# dead-letter cycle by the delay queues and dropped.
BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")


def delay_routing_key(seconds: float, queue: str) -> str:
    """28 binary digits of the delay, most significant first, then the target queue."""
    whole = min(max(math.ceil(seconds), 0), MAX_DELAY)
    return ".".join(format(whole, f"0{LEVELS}b")) + "." + queue


def clean_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (headers or {}).items() if not k.startswith(BROKER_HEADERS)}


class Publisher:
    def __init__(self, channel: AbstractChannel, names: Names) -> None:
        """``channel`` must be opened with publisher_confirms and on_return_raises."""
        self.channel = channel
        self.names = names
        self._exchanges: dict[str, AbstractExchange] = {}

    async def _exchange(self, name: str) -> AbstractExchange:
        if name not in self._exchanges:
            if name == "":
                self._exchanges[name] = self.channel.default_exchange
            else:
                self._exchanges[name] = await self.channel.get_exchange(name, ensure=False)
        return self._exchanges[name]

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: HeadersType | None = None,
        message_id: str | None = None,
        content_type: str | None = "application/json",
    ) -> None:
        """Raises when the broker nacks or returns (unroutable) the message."""
        message = aio_pika.Message(
            body,
            headers=headers or {},
            content_type=content_type,
            message_id=message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        target = await self._exchange(exchange)
        await target.publish(message, routing_key, mandatory=True)

    async def publish_event(self, routing_key: str, body: bytes, message_id: str) -> None:
        await self.publish(self.names.exchange, routing_key, body, message_id=message_id)

    async def to_queue(self, queue: str, body: bytes, **kwargs: Any) -> None:
        await self.publish("", queue, body, **kwargs)

    async def delayed(self, queue: str, body: bytes, seconds: float, **kwargs: Any) -> None:
        """Deliver to ``queue`` after ``seconds`` (one-second resolution); no timer in memory."""
        top = self.names.delay(LEVELS - 1)
        await self.publish(top, delay_routing_key(seconds, queue), body, **kwargs)

    async def schedule_cleanup(self, key: InstantKey) -> None:
        body = KeyCleanup(
            type="instant_key.cleanup",
            version=1,
            instant_key_id=key.instant_key_id,
            user_identity_id=key.user_identity_id,
            expires_at=key.expires_at,
        ).model_dump_json()
        seconds = (key.expires_at - datetime.now(UTC)).total_seconds()
        await self.delayed(
            self.names.cleanup, body.encode(), seconds, message_id=f"cleanup-{key.instant_key_id}"
        )
