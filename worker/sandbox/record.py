"""A revocation fence filled fast, for tests and the bench: revokes written as the worker writes
them, published as the worker's user with confirms awaited a batch at a time."""

import asyncio
import json
from datetime import datetime

import aio_pika
from aio_pika.abc import AbstractChannel

from worker.queues import Names

BATCH = 1000


def revoke_entry(key: str, occurred_at: datetime) -> bytes:
    """One revoke of ``user_identity_key`` ``key``, as worker/broker/fence.py writes it."""
    entry = {"t": "revoke", "names": [f"key:{key}"], "occurred_at": occurred_at.isoformat()}
    return json.dumps(entry).encode()


async def fill_fence(
    channel: AbstractChannel,
    names: Names,
    user_id: str,
    count: int,
    occurred_at: datetime,
    prefix: str = "guest-",
) -> None:
    """Append ``count`` revokes (``prefix`` + 0 .. count-1) to the fence. ``channel`` must be
    opened with publisher confirms."""
    exchange = channel.default_exchange
    for start in range(0, count, BATCH):
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(revoke_entry(f"{prefix}{n}", occurred_at), user_id=user_id),
                    names.fence,
                )
                for n in range(start, min(start + BATCH, count))
            )
        )
