"""The users of deploy/rabbitmq/definitions.json on a real broker: each may do its job, no more."""

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from tests.integration.conftest import AMQP_URL
from worker.broker import topology
from worker.broker.publisher import delay_routing_key, entry_level
from worker.broker.topology import LEVELS, Names

DEFINITIONS = Path(__file__).parents[2] / "deploy/rabbitmq/definitions.json"
VHOST, NAMESPACE = "ikw", "instant_keys"  # as written in the definitions
ADMIN, WORKER, PRODUCER = "ikw-admin", "ikw-worker", "booking"
BROKER = urlsplit(AMQP_URL)

pytestmark = pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl for the broker under test"
)


def rabbitmqctl(*args: str, stdin: str | None = None) -> None:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], input=stdin, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"rabbitmqctl {args[0]}: {done.stderr or done.stdout}"


def password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: salt + sha256(salt + password)."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def localised(definitions: dict[str, Any], run: str, password: str) -> dict[str, Any]:
    """The definitions with this run's vhost, namespace and user names, and one password."""
    assert [v["name"] for v in definitions["vhosts"]] == [VHOST]

    def user(name: str) -> str:
        return f"{run}_{name}"

    def patterns(entry: dict[str, Any], *keys: str) -> dict[str, Any]:
        return entry | {k: entry[k].replace(NAMESPACE, run) for k in keys} | {"vhost": run}

    return {
        "vhosts": [{"name": run}],
        "users": [
            u | {"name": user(u["name"]), "password_hash": password_hash(password)}
            for u in definitions["users"]
        ],
        "permissions": [
            patterns(p, "configure", "write", "read") | {"user": user(p["user"])}
            for p in definitions["permissions"]
        ],
        "topic_permissions": [
            patterns(t, "exchange", "write", "read") | {"user": user(t["user"])}
            for t in definitions["topic_permissions"]
        ],
    }


@dataclass(frozen=True)
class Broker:
    run: str  # the vhost and the namespace
    password: str

    @property
    def names(self) -> Names:
        return Names(self.run)

    def user(self, name: str) -> str:
        return f"{self.run}_{name}"

    def url(self, name: str) -> str:
        netloc = f"{self.user(name)}:{self.password}@{BROKER.hostname}:{BROKER.port or 5672}"
        return f"{BROKER.scheme}://{netloc}/{quote(self.run, safe='')}"


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A vhost and users imported from the definitions; all removed afterwards, even on failure."""
    run = f"ikw_test_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    definitions = localised(json.loads(DEFINITIONS.read_text()), run, password)
    try:
        # From stdin: rabbitmqctl may run as the broker's user, who cannot read our temp files.
        rabbitmqctl("import_definitions", "--format", "json", stdin=json.dumps(definitions))
        yield Broker(run, password)
    finally:
        # Deleting the vhost also deletes its queues, exchanges and permissions.
        for command in [["delete_vhost", run]] + [
            ["delete_user", u["name"]] for u in definitions["users"]
        ]:
            subprocess.run(["rabbitmqctl", "-q", *command], capture_output=True, timeout=60)


Connect = Callable[[str], Awaitable[AbstractConnection]]


@pytest.fixture
async def connect(broker: Broker) -> AsyncIterator[Connect]:
    """Connect as one of the definitions' users; every connection is closed at the end."""
    opened: list[AbstractConnection] = []

    async def open_as(name: str) -> AbstractConnection:
        opened.append(await aio_pika.connect(broker.url(name)))
        return opened[-1]

    yield open_as
    for connection in opened:
        await connection.close()


@pytest.fixture
async def admin(broker: Broker, connect: Connect) -> AbstractConnection:
    """The topology, declared as `ikw topology` does, by the admin user."""
    connection = await connect(ADMIN)
    channel = await connection.channel()
    names = broker.names
    await topology.declare(channel, names)
    # The fence stream and the alternate exchange's queue, unless topology.py declares them.
    planned = {name for kind, name, _ in topology.plan(names) if kind == "queue"}
    if f"{names.namespace}.fence" not in planned:
        await channel.declare_queue(
            f"{names.namespace}.fence", durable=True, arguments={"x-queue-type": "stream"}
        )
    unroutable = f"{names.namespace}.unroutable"
    if unroutable not in planned:
        exchange = await channel.declare_exchange(
            unroutable, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(
            unroutable, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange)
    return connection


def worker_queues(names: Names) -> list[str]:
    ns = names.namespace
    return [*names.work_queues, names.dead, f"{ns}.unroutable", f"{ns}.fence", f"{ns}.fence.index"]


def every_queue(names: Names) -> list[str]:
    return [*names.all_queues(), f"{names.namespace}.unroutable", f"{names.namespace}.fence"]


def message(user_id: str, body: bytes = b"{}") -> aio_pika.Message:
    return aio_pika.Message(body, user_id=user_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


async def refused(
    connection: AbstractConnection,
    action: Callable[[AbstractChannel], Awaitable[object]],
    error: type[Exception] = aiormq.exceptions.ChannelAccessRefused,
) -> None:
    """``action`` on a fresh confirming channel makes the broker close that channel."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    with pytest.raises(error):
        await action(channel)


async def publish(
    channel: AbstractChannel, exchange: str, routing_key: str, msg: aio_pika.Message
) -> None:
    target = (
        channel.default_exchange
        if exchange == ""
        else await channel.get_exchange(exchange, ensure=False)
    )
    await target.publish(msg, routing_key, mandatory=True)


async def take(
    queue: aio_pika.abc.AbstractQueue, count: int = 1, **arguments: Any
) -> list[AbstractIncomingMessage]:
    """The first ``count`` messages ``queue`` delivers, within 10 s, acked."""
    delivered: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    tag = await queue.consume(delivered.put, arguments=arguments)
    try:
        async with asyncio.timeout(10):
            got = [await delivered.get() for _ in range(count)]
    finally:
        await queue.cancel(tag)
    for message in got:
        await message.ack()
    return got


async def test_producer_publishes_grants_and_revocations(
    broker: Broker, admin: AbstractConnection, connect: Connect
) -> None:
    names, user = broker.names, broker.user(PRODUCER)
    producer = await connect(PRODUCER)
    channel = await producer.channel(publisher_confirms=True, on_return_raises=True)
    # Persistent, mandatory, confirmed: as the README asks of producers.
    await publish(channel, names.exchange, "access.granted", message(user, b"grant"))
    await publish(channel, names.exchange, "access.revoked", message(user, b"revoke"))

    reader = await admin.channel()
    [grant] = await take(await reader.get_queue(names.grants))
    [revoke] = await take(await reader.get_queue(names.revocations))
    assert (grant.body, grant.user_id) == (b"grant", user)
    assert (revoke.body, revoke.user_id) == (b"revoke", user)


async def test_producer_may_do_nothing_else(
    broker: Broker, admin: AbstractConnection, connect: Connect
) -> None:
    names, user = broker.names, broker.user(PRODUCER)
    producer = await connect(PRODUCER)
    main = names.exchange

    # Topic permissions: other routing keys on the main exchange, the worker's own included.
    for key in [
        "access.delivered",
        "access.granted.extra",
        "xaccess.granted",
        "instant_key.deleted",
        f"0.0.1.{names.cleanup}",
    ]:
        await refused(producer, partial(_publish_to, main, key, message(user)))
    # The delay levels, and the default exchange (which could reach any queue by name).
    for exchange in [names.delay(n) for n in range(LEVELS)] + [names.deliver]:
        key = delay_routing_key(1, names.cleanup)
        await refused(producer, partial(_publish_to, exchange, key, message(user)))
    for queue in [names.grants, names.cleanup, f"{names.namespace}.fence"]:
        await refused(producer, partial(_publish_to, "", queue, message(user)))
    # Reading: no queue at all.
    for queue in every_queue(names):
        await refused(producer, partial(_consume_from, queue))
    await refused(producer, lambda ch: _basic_get(ch, names.grants))
    # Configuring: declare, bind, delete.
    await refused(producer, lambda ch: ch.declare_queue(exclusive=True))
    await refused(producer, lambda ch: ch.declare_queue(f"{names.namespace}.mine", durable=True))
    await refused(producer, lambda ch: ch.declare_exchange(f"{names.namespace}.mine"))
    await refused(producer, lambda ch: _bind(ch, names.grants, main, "access.#"))
    await refused(producer, lambda ch: ch.queue_delete(names.grants))
    # Its own queue may hear the outcome events, never the other producers' events.
    for key in ["access.granted", "access.revoked", "#", "access.*", "instant_key.cleanup"]:
        await refused(producer, partial(_listen_to, main, key))
    # Someone else's name on its event.
    for other in [broker.user(WORKER), "guest"]:
        await refused(
            producer,
            partial(_publish_to, main, "access.granted", message(other)),
            aiormq.exceptions.ChannelPreconditionFailed,
        )

    # Nothing of the above got through.
    counts = await admin.channel()
    for queue in every_queue(names):
        declared = await counts.get_queue(queue)
        assert declared.declaration_result.message_count == 0, queue


async def test_producer_listens_to_the_outcome_events_on_its_own_queue(
    broker: Broker, admin: AbstractConnection, connect: Connect
) -> None:
    producer = await connect(PRODUCER)
    channel = await producer.channel()
    heard = await _listen(channel, broker.names.exchange, "access.delivered")
    for key in ("access.delivery_failed", "instant_key.deleted"):
        await heard.bind(broker.names.exchange, key)
    worker = await connect(WORKER)
    sending = await worker.channel(publisher_confirms=True)
    await publish(sending, broker.names.exchange, "access.delivered", message(broker.user(WORKER)))
    got = await heard.get(timeout=5, fail=False)
    assert got is not None and got.routing_key == "access.delivered"


async def _listen(channel: AbstractChannel, exchange: str, key: str) -> aio_pika.abc.AbstractQueue:
    queue = await channel.declare_queue("booking.outcomes", durable=True)
    await queue.bind(exchange, key)
    return queue


async def _publish_to(
    exchange: str, key: str, msg: aio_pika.Message, channel: AbstractChannel
) -> None:
    await publish(channel, exchange, key, msg)


async def _consume_from(queue: str, channel: AbstractChannel) -> None:
    await _consume(channel, queue)


async def _listen_to(exchange: str, key: str, channel: AbstractChannel) -> None:
    await _listen(channel, exchange, key)


async def _consume(channel: AbstractChannel, queue: str) -> None:
    await channel.set_qos(prefetch_count=1)
    await (await channel.get_queue(queue, ensure=False)).consume(_ack)


async def _ack(message: AbstractIncomingMessage) -> None:
    await message.ack()


async def _basic_get(channel: AbstractChannel, queue: str) -> None:
    await (await channel.get_queue(queue, ensure=False)).get(fail=False)


async def _bind(channel: AbstractChannel, queue: str, exchange: str, key: str) -> None:
    await (await channel.get_queue(queue, ensure=False)).bind(exchange, key)


async def test_worker_does_its_job_without_configure(
    broker: Broker, admin: AbstractConnection, connect: Connect
) -> None:
    names, user = broker.names, broker.user(WORKER)
    fence = f"{names.namespace}.fence"
    outcomes = ["access.delivered", "access.delivery_failed", "instant_key.deleted"]
    # A subscriber's queue for the outcome events, so that they are routable.
    subscriber = await (await admin.channel()).declare_queue(f"{names.namespace}.subscriber")
    for key in outcomes:
        await subscriber.bind(names.exchange, key)
    worker = await connect(WORKER)
    channel = await worker.channel(publisher_confirms=True, on_return_raises=True)
    await channel.set_qos(prefetch_count=10)
    # Passive declares, as with IKW_DECLARE=false.
    queues = {name: await channel.get_queue(name) for name in worker_queues(names)}

    # Retries and cleanups enter the delay levels at their delay's level; the broker does the
    # rest.
    await publish(
        channel,
        names.delay(entry_level(2)),
        delay_routing_key(2, names.cleanup),
        message(user, b"cleanup"),
    )
    await publish(
        channel,
        names.delay(entry_level(0)),
        delay_routing_key(0, names.grants),
        message(user, b"retry"),
    )
    # Dead letters, requeues and fence records go through the default exchange.
    await publish(channel, "", names.dead, message(user, b"dead"))
    await publish(channel, "", names.revocations, message(user, b"requeue"))
    await publish(channel, "", fence, message(user, b"fenced"))
    # Outcome events on the main exchange: no topic permission limits the worker.
    for key in outcomes:
        await publish(channel, names.exchange, key, message(user, key.encode()))

    for name, body in [
        (names.grants, b"retry"),
        (names.cleanup, b"cleanup"),
        (names.dead, b"dead"),
        (names.revocations, b"requeue"),
    ]:
        [got] = await take(queues[name])
        assert (got.body, got.user_id) == (body, user), name
    stream: dict[str, Any] = {"x-stream-offset": "first"}
    [got] = await take(queues[fence], **stream)
    assert (got.body, got.user_id) == (b"fenced", user)
    events = await take(subscriber, len(outcomes))
    assert sorted((m.body.decode(), m.user_id) for m in events) == sorted(
        (key, user) for key in outcomes
    )
    await _consume(channel, f"{names.namespace}.unroutable")


async def test_worker_may_not_configure_or_impersonate(
    broker: Broker, admin: AbstractConnection, connect: Connect
) -> None:
    names, user = broker.names, broker.user(WORKER)
    worker = await connect(WORKER)
    await refused(worker, lambda ch: ch.declare_queue(names.grants, durable=True))
    await refused(worker, lambda ch: ch.declare_queue(exclusive=True))
    await refused(
        worker,
        lambda ch: ch.declare_exchange(names.exchange, aio_pika.ExchangeType.TOPIC, durable=True),
    )
    await refused(worker, lambda ch: _bind(ch, names.grants, names.exchange, "access.#"))
    await refused(worker, lambda ch: ch.queue_delete(names.grants))
    # The delay levels, not the exchange behind them, which would skip the wait.
    key = delay_routing_key(1, names.cleanup)
    await refused(worker, lambda ch: publish(ch, names.deliver, key, message(user)))
    await refused(worker, lambda ch: _basic_get(ch, names.delay(0)))
    await refused(
        worker,
        lambda ch: publish(ch, names.exchange, "access.granted", message(broker.user(PRODUCER))),
        aiormq.exceptions.ChannelPreconditionFailed,
    )
