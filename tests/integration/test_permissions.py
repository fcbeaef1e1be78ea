"""The users of deploy/rabbitmq/definitions.json on a real broker: each may do its job, no more."""

import asyncio
import base64
import hashlib
import json
import os
import re
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

from tests import builders
from tests.builders import grant
from tests.helpers import AMQP_URL
from worker import config
from worker.broker import topology
from worker.broker.publisher import Publisher, delay_routing_key, entry_level
from worker.broker.topology import LEVELS, Names
from worker.sandbox import changed, wait_for
from worker.sandbox.all import Sandbox
from worker.service import Service

DEFINITIONS = Path(__file__).parents[2] / "deploy/rabbitmq/definitions.json"
VHOST, NAMESPACE = "ikw", "instant_keys"  # as written in the definitions
ADMIN, WORKER, PRODUCER = "ikw-admin", "ikw-worker", "booking"
RIVAL = "rival"  # a second producer, given booking's lines under its own name
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

    def pattern(text: str) -> str:
        """A producer's outcome queue is named after its user: <ns>.outcomes.<user>."""
        text = text.replace(NAMESPACE, run)
        return re.sub(r"(\\\.outcomes\\\.)([\w-]+)", lambda m: m[1] + user(m[2]), text)

    def patterns(entry: dict[str, Any], *keys: str) -> dict[str, Any]:
        return entry | {k: pattern(entry[k]) for k in keys} | {"vhost": run}

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


def with_rival(definitions: dict[str, Any]) -> dict[str, Any]:
    """The definitions with a second producer: booking's user and permissions under its name."""

    def of_booking(entries: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
        mine = [e for e in entries if e[field] == PRODUCER]
        theirs: list[dict[str, Any]] = json.loads(json.dumps(mine).replace(PRODUCER, RIVAL))
        return entries + theirs

    return definitions | {
        "users": of_booking(definitions["users"], "name"),
        "permissions": of_booking(definitions["permissions"], "user"),
        "topic_permissions": of_booking(definitions["topic_permissions"], "user"),
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

    @property
    def producers(self) -> list[str]:
        return [self.user(PRODUCER), self.user(RIVAL)]

    def outcomes_of(self, name: str) -> str:
        return self.names.outcome_queue(self.user(name))

    def url(self, name: str) -> str:
        netloc = f"{self.user(name)}:{self.password}@{BROKER.hostname}:{BROKER.port or 5672}"
        return f"{BROKER.scheme}://{netloc}/{quote(self.run, safe='')}"


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A vhost and users imported from the definitions; all removed afterwards, even on failure."""
    run = f"ikw_test_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    definitions = localised(with_rival(json.loads(DEFINITIONS.read_text())), run, password)
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
    await topology.declare(channel, names, producers=broker.producers)
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
    # Reading: no queue but its own outcome queue.
    for queue in [*every_queue(names), broker.outcomes_of(RIVAL)]:
        await refused(producer, partial(_consume_from, queue))
    await refused(producer, lambda ch: _basic_get(ch, names.grants))
    # Configuring: nothing at all, not even a queue of its own.
    await refused(producer, lambda ch: ch.declare_queue(exclusive=True))
    await refused(producer, lambda ch: ch.declare_queue(f"{user}.mine", durable=True))
    await refused(producer, lambda ch: ch.declare_exchange(f"{names.namespace}.mine"))
    await refused(producer, lambda ch: _bind(ch, names.grants, main, "access.#"))
    await refused(producer, lambda ch: ch.queue_delete(names.grants))
    await refused(producer, lambda ch: ch.queue_delete(broker.outcomes_of(PRODUCER)))
    # Someone else's name on its event.
    for other in [broker.user(WORKER), "guest"]:
        await refused(
            producer,
            partial(_publish_to, main, "access.granted", message(other)),
            aiormq.exceptions.ChannelPreconditionFailed,
        )

    await nothing_got_through(broker, admin)


async def nothing_got_through(broker: Broker, admin: AbstractConnection) -> None:
    counts = await admin.channel()
    for queue in [*every_queue(broker.names), *map(broker.names.outcome_queue, broker.producers)]:
        declared = await counts.get_queue(queue)
        assert declared.declaration_result.message_count == 0, queue


async def test_no_producer_forges_outcomes_or_reads_another_s(
    broker: Broker, admin: AbstractConnection, connect: Connect
) -> None:
    """Each way in that a producer with a configure right had, refused by the broker."""
    names, user = broker.names, broker.user(PRODUCER)
    own, rival = broker.outcomes_of(PRODUCER), broker.outcomes_of(RIVAL)
    forged = f"{broker.user(RIVAL)}.access.delivered"
    producer = await connect(PRODUCER)
    # An exchange of its own, to bind into the namespace and publish through.
    await refused(producer, lambda ch: ch.declare_exchange("mine", aio_pika.ExchangeType.TOPIC))
    # Binding an exchange that exists anyway (amq.topic) into the main or the outcomes exchange,
    # or the main exchange into the outcomes exchange.
    for source, destination in [
        ("amq.topic", names.exchange),
        ("amq.topic", names.outcomes),
        (names.exchange, names.outcomes),
    ]:
        await refused(producer, partial(_bind_exchange, destination, source, "#"))
    # A queue whose dead letters go into the namespace; or its own queue redeclared so.
    for exchange in (names.exchange, names.outcomes):
        dlx = {"x-dead-letter-exchange": exchange, "x-dead-letter-routing-key": forged}
        await refused(producer, partial(_declare, "mine", dlx))
        await refused(producer, partial(_declare, own, dlx))
    # Its own queue bound to another producer's outcomes, or to all of them.
    for key in (f"{broker.user(RIVAL)}.#", "#", "*.access.delivered"):
        await refused(producer, partial(_bind_to, own, names.outcomes, key))
    # Outcomes published directly, on the outcomes exchange or on the main one.
    for exchange, key in [
        (names.outcomes, forged),
        (names.outcomes, f"{user}.access.delivered"),
        (names.exchange, "access.delivered"),
        (names.exchange, "instant_key.deleted"),
    ]:
        await refused(producer, partial(_publish_to, exchange, key, message(user)))
    # Another producer's outcome queue.
    await refused(producer, partial(_consume_from, rival))
    await refused(producer, lambda ch: _basic_get(ch, rival))

    await nothing_got_through(broker, admin)


async def test_each_producer_reads_its_own_outcome_queue_only(
    broker: Broker, admin: AbstractConnection, connect: Connect
) -> None:
    worker = await connect(WORKER)
    sending = await worker.channel(publisher_confirms=True, on_return_raises=True)
    for name in (PRODUCER, RIVAL):
        key = f"{broker.user(name)}.access.delivered"
        await publish(sending, broker.names.outcomes, key, message(broker.user(WORKER), b"x"))
    for name in (PRODUCER, RIVAL):
        channel = await (await connect(name)).channel()
        [got] = await take(await channel.get_queue(broker.outcomes_of(name)))
        assert got.routing_key == f"{broker.user(name)}.access.delivered"
    await nothing_got_through(broker, admin)


async def _declare(queue: str, arguments: dict[str, Any], channel: AbstractChannel) -> None:
    await channel.declare_queue(queue, durable=True, arguments=arguments)


async def _bind_to(queue: str, exchange: str, key: str, channel: AbstractChannel) -> None:
    await _bind(channel, queue, exchange, key)


async def _bind_exchange(destination: str, source: str, key: str, channel: AbstractChannel) -> None:
    target = await channel.get_exchange(destination, ensure=False)
    await target.bind(await channel.get_exchange(source, ensure=False), key)


async def _publish_to(
    exchange: str, key: str, msg: aio_pika.Message, channel: AbstractChannel
) -> None:
    await publish(channel, exchange, key, msg)


async def _consume_from(queue: str, channel: AbstractChannel) -> None:
    await _consume(channel, queue)


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
    # The producer's queue of its outcome events, read here by the admin.
    subscriber = await (await admin.channel()).get_queue(broker.outcomes_of(PRODUCER))
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
    # Outcome events, routing key <producer>.<type>: no topic permission limits the worker.
    for key in outcomes:
        routing_key = f"{broker.user(PRODUCER)}.{key}"
        await publish(channel, names.outcomes, routing_key, message(user, key.encode()))

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


# --- two tenants, one worker: each hears only its own outcomes ------------------------------


class Heard:
    """What one producer reads from its own outcome queue: (routing key, body)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        self.events.append((message.routing_key or "", json.loads(message.body)))
        changed()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [body for key, body in self.events if key.split(".", 1)[1] == kind]


@dataclass
class Tenant:
    user: str
    publisher: Publisher
    heard: Heard

    async def publish(self, event: dict[str, Any]) -> None:
        raw = builders.body(event)
        await self.publisher.publish_event(event["type"], raw, event["event_id"])


@pytest.fixture
async def tenants(
    broker: Broker, admin: AbstractConnection, connect: Connect, sandbox: Sandbox
) -> AsyncIterator[dict[str, Tenant]]:
    """A worker with the definitions' rights trusting booking for `hotel-a-` and rival for
    `hotel-b-`; each producer publishes and listens with its own."""
    a, b = broker.user(PRODUCER), broker.user(RIVAL)
    env = sandbox.env() | {
        "AMQP_URL": broker.url(WORKER),
        "IKW_NAMESPACE": broker.run,
        "IKW_DECLARE": "false",
        "IKW_HTTP_PORT": "0",
        "IKW_MIN_KEY_LIFETIME": "0",
        "IKW_TRUSTED_PUBLISHERS": f"{a}:hotel-a-,{b}:hotel-b-",
    }
    service = Service(config.load(env))
    await service.start()
    found: dict[str, Tenant] = {}
    for name, user in ((PRODUCER, a), (RIVAL, b)):
        connection = await connect(name)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        heard = Heard()
        await (await channel.get_queue(broker.outcomes_of(name))).consume(heard.on_message)
        found[name] = Tenant(user, Publisher(channel, broker.names, user), heard)
    yield found
    await service.stop()


async def test_each_tenant_hears_its_own_outcomes_and_nothing_else(
    tenants: dict[str, Tenant], sandbox: Sandbox
) -> None:
    sandbox.seam.key_lifetime = 2  # expiry timers fire within the test
    grants = {
        PRODUCER: grant("hotel-a-1", phone="+14155550111"),
        RIVAL: grant("hotel-b-1", phone="+14155550122"),
    }
    for name, event in grants.items():
        await tenants[name].publish(event)
    everyone = [tenant.heard for tenant in tenants.values()]
    await wait_for(lambda: all(len(h.events) >= 2 for h in everyone), 30, "deliveries, expiries")

    for name, event in grants.items():
        tenant = tenants[name]
        [delivered] = tenant.heard.of("access.delivered")
        [deleted] = tenant.heard.of("instant_key.deleted")
        assert sorted(key for key, _ in tenant.heard.events) == [
            f"{tenant.user}.access.delivered",
            f"{tenant.user}.instant_key.deleted",
        ]
        assert delivered["event_id"] == event["event_id"]
        assert (
            delivered["user_identity"]["user_identity_key"]
            == event["user_identity"]["user_identity_key"]
        )
        # The expiry timer carried the producer of the grant that made the key.
        assert (deleted["instant_key_id"], deleted["why"]) == (
            delivered["instant_key_id"],
            "expired",
        )


async def test_a_grant_naming_another_tenant_s_ids_is_answered_to_its_producer_only(
    tenants: dict[str, Tenant], broker: Broker, admin: AbstractConnection
) -> None:
    """booking's grant for rival's guest, with rival's event and grant ids: the failure goes to
    booking; rival hears nothing of it."""
    theirs = grant("hotel-b-7", phone="+14155550133")
    forged = grant("hotel-b-7", event_id=theirs["event_id"], grant_id=theirs["grant_id"])
    await tenants[PRODUCER].publish(forged)
    heard = tenants[PRODUCER].heard
    await wait_for(lambda: heard.events, 20, "booking's access.delivery_failed")

    [(key, failed)] = heard.events
    assert key == f"{tenants[PRODUCER].user}.access.delivery_failed"
    assert (failed["event_id"], failed["reason"]) == (theirs["event_id"], "identity_out_of_scope")
    # One publish reaches every queue it routes to at once: rival's got nothing.
    assert tenants[RIVAL].heard.events == []
    queue = await (await admin.channel()).get_queue(broker.outcomes_of(RIVAL))
    assert queue.declaration_result.message_count == 0
