"""A lost channel is not a crash: a grant given back by more lost channels than the queue's
x-delivery-limit is still delivered; one that really kills the worker is dead-lettered
``crash_loop``; a channel error on a publish is retried without a reconnect."""

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika

from tests.builders import grant
from tests.helpers import Publish, StartWorker, WorkerProcess, dead_letters, drain
from worker.broker.returns import CRASH_LIMIT, VERDICT_DELAY
from worker.broker.topology import Names
from worker.queues import DELIVERY_LIMIT
from worker.sandbox import changed, wait_for
from worker.sandbox.all import Sandbox
from worker.service import Service

PHONE = "+14155550142"


async def seam_called(sandbox: Sandbox) -> None:
    """Until the next Seam call: a worker has the grant in hand."""
    seen = len(sandbox.seam.requests)
    await wait_for(lambda: len(sandbox.seam.requests) > seen, 30, "the grant in hand")


def reconnects(service: Service) -> float | None:
    return service.metrics.registry.get_sample_value("ikw_broker_reconnects_total")


async def test_a_grant_given_back_by_more_lost_channels_than_the_limit_is_delivered(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Any
) -> None:
    sandbox.seam.latency = 0.5  # each delivery stays in hand while Seam answers
    service = await start_worker()
    consumer = service.consumer
    assert consumer is not None
    await publish(grant("guest-lost", phone=PHONE))
    for cut in range(DELIVERY_LIMIT + 2):
        await wait_for(lambda: consumer.holding > 0, 20, f"the grant in hand ({cut})")
        assert isinstance(consumer.channel, aio_pika.abc.AbstractRobustChannel)
        await asyncio.wait_for(consumer.channel.ready(), 10)  # its consumers all restored
        # What a node going away does to the consumer's channel: the grant goes back unacked.
        await (await consumer.channel.get_underlay_channel()).close()
    sandbox.seam.latency = 0.0
    await wait_for(lambda: sandbox.twilio.outbox, 30, "the SMS")
    assert [sms["to"] for sms in sandbox.twilio.outbox][:1] == [PHONE]
    assert await drain(amqp, names.dead) == []
    assert reconnects(service) == 0


async def test_a_grant_that_kills_the_worker_is_dead_lettered_as_a_crash_loop(
    sandbox: Sandbox,
    processes: Callable[..., Awaitable[WorkerProcess]],
    publish: Publish,
    names: Names,
    amqp: Any,
) -> None:
    """Whenever a worker holds it, the worker dies (SIGKILL: nothing is noted). At the crash
    limit it waits VERDICT_DELAY for returns recorded late, then is dead-lettered unhandled."""
    sandbox.seam.latency = 1.0
    await publish(grant("guest-poison", phone=PHONE))
    kills = 0
    while True:
        worker = await processes()
        dead = asyncio.ensure_future(dead_letters(amqp, names, 1, within=VERDICT_DELAY + 20))
        held = asyncio.ensure_future(seam_called(sandbox))
        await asyncio.wait([dead, held], return_when=asyncio.FIRST_COMPLETED)
        if dead.done():
            held.cancel()
            break
        dead.cancel()
        await asyncio.gather(held, dead, return_exceptions=True)
        worker.signal(signal.SIGKILL)
        await worker.exit_code()
        kills += 1
        assert kills <= CRASH_LIMIT, "not dead-lettered after the crash limit"
    [letter] = dead.result()
    assert letter.headers["x-ikw-reason"] == "crash_loop"
    assert kills == CRASH_LIMIT
    assert sandbox.twilio.outbox == []


async def test_a_publish_refused_with_its_channel_is_retried_without_a_reconnect(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    names: Names,
    amqp: Any,
    log_lines: list[str],
) -> None:
    """NOT_FOUND closes the publishing channel (as while a queue's leader moves); the exchange
    appears meanwhile: the publish goes through on a fresh channel, the consumers stay."""
    service = await start_worker()
    assert service.consumer is not None
    publisher = service.consumer.publisher
    late = f"{names.namespace}.late"
    channel = await amqp.channel()
    created: list[bool] = []

    async def create(*_: object) -> None:
        if not created:
            created.append(True)
            exchange = await channel.declare_exchange(late, "fanout", auto_delete=True)
            queue = await channel.declare_queue(late, exclusive=True)
            await queue.bind(exchange)
            changed()

    publisher.channel.close_callbacks.add(create)
    try:
        await publisher.publish(late, "", b"{}")
        queue = await channel.get_queue(late)
        assert await queue.get(fail=False) is not None
    finally:
        publisher.channel.close_callbacks.discard(create)
        await channel.close()  # the exclusive queue goes, then the exchange (auto-delete)
    assert any("trying again on a fresh one" in line for line in log_lines)
    assert reconnects(service) == 0
    await publish(grant("guest-after", phone=PHONE))
    await wait_for(lambda: sandbox.twilio.outbox, 20, "a grant consumed afterwards")
