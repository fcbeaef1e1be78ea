"""The delay levels on a real broker: a delayed message arrives after its delay, never before,
whichever level its delay makes it enter at."""

import asyncio
import time

import aio_pika

from tests.helpers import BROKER_USER
from worker.broker.publisher import Publisher, entry_level
from worker.broker.topology import Names


async def test_each_delay_arrives_after_it_whatever_level_it_enters(
    amqp: aio_pika.abc.AbstractRobustConnection, names: Names
) -> None:
    delays = [0, 1, 2, 3, 5]
    assert sorted({entry_level(d) for d in delays}) == [0, 1, 2]
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    publisher = Publisher(channel, names, BROKER_USER)
    sent = time.monotonic()
    for delay in delays:
        await publisher.delayed(names.cleanup, str(delay).encode(), delay)

    arrived: dict[int, float] = {}
    got: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    queue = await channel.get_queue(names.cleanup)
    tag = await queue.consume(got.put)
    async with asyncio.timeout(15):
        while len(arrived) < len(delays):
            message = await got.get()
            arrived[int(message.body)] = time.monotonic() - sent
            await message.ack()
    await queue.cancel(tag)

    for delay in delays:
        # RabbitMQ expires by whole milliseconds from the enqueue, a little after our clock.
        assert delay - 0.1 <= arrived[delay] < delay + 2.5, (delay, arrived)
