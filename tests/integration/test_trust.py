"""The trust boundary, attacked as a producer with publish rights would: every attack is refused
with its reason before anything reaches Seam or a guest, and the victim's key stays intact."""

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest

import worker.broker.consumer
import worker.broker.decision
from tests.builders import body, grant, revoke
from tests.helpers import (
    AMQP_URL,
    Publish,
    StartWorker,
    broker_users,
    dead_letters,
    drain,
    user_url,
)
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox

VICTIM_PHONE, ATTACKER_PHONE = "+14155550100", "+14155550666"


@dataclass(frozen=True)
class Users:
    booking: str  # trusted for any identity
    hotel: str  # trusted for user_identity_keys starting with hotel-a- only
    mallory: str  # a broker user with publish rights that nobody listed


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    """Broker users made for this module and removed after it, even when a test fails."""
    with broker_users("booking", "hotel", "mallory") as made:
        yield Users(**made)


@pytest.fixture
def trusting(worker_env: dict[str, str], users: Users) -> dict[str, str]:
    worker_env["IKW_TRUSTED_PUBLISHERS"] = f"{users.booking},{users.hotel}:hotel-a-"
    return worker_env


class As:
    """Publishes as one broker user, with its own user_id unless told otherwise."""

    def __init__(
        self, connection: aio_pika.abc.AbstractRobustConnection, user: str | None, names: Names
    ) -> None:
        self.connection = connection
        self.user = user
        self.names = names

    async def send(
        self,
        event: dict[str, Any],
        routing_key: str | None = None,
        *,
        queue: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        publisher = Publisher(channel, self.names, self.user)
        if queue is not None:
            await publisher.publish("", queue, body(event), headers=headers)
        else:
            key = routing_key or str(event["type"])
            await publisher.publish(self.names.exchange, key, body(event), headers=headers)
        await channel.close()


@pytest.fixture
async def as_user(
    names: Names, users: Users
) -> AsyncIterator[Callable[[str | None], Awaitable[As]]]:
    opened: list[aio_pika.abc.AbstractRobustConnection] = []

    async def connect(user: str | None) -> As:
        url = user_url(user) if user else AMQP_URL
        connection = await aio_pika.connect_robust(url)
        opened.append(connection)
        return As(connection, user, names)

    yield connect
    for connection in opened:
        await connection.close()


@pytest.fixture
async def victim(
    trusting: dict[str, str], sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> dict[str, Any]:
    """A guest who holds a live key, delivered to their own phone."""
    await start_worker()
    await publish(grant("guest-victim", phone=VICTIM_PHONE, email="ada@example.com"))
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the victim's SMS")
    [key] = sandbox.seam.keys.values()
    return key


def untouched(sandbox: Sandbox, victim: dict[str, Any], seam_calls: int) -> None:
    """Nothing reached Seam or a guest since the attack, and the victim's key still works."""
    assert len(sandbox.seam.requests) == seam_calls
    assert [sms["to"] for sms in sandbox.twilio.outbox] == [VICTIM_PHONE]
    assert sandbox.smtp.messages == []
    assert victim["instant_key_id"] in sandbox.seam.keys
    assert len(sandbox.seam.identities) == 1


async def test_an_unlisted_producer_cannot_have_a_guests_key_sent_to_its_phone(
    victim: dict[str, Any], sandbox: Sandbox, as_user: Any, users: Users, amqp: Any, names: Names
) -> None:
    calls = len(sandbox.seam.requests)
    mallory = await as_user(users.mallory)
    await mallory.send(grant("guest-victim", phone=ATTACKER_PHONE, email="evil@example.com"))

    [dead] = await dead_letters(amqp, names, 1)
    assert dead.headers["x-ikw-reason"] == "untrusted_publisher"
    assert users.mallory in dead.headers["x-ikw-error"]
    assert dead.headers["x-ikw-publisher"] == users.mallory
    untouched(sandbox, victim, calls)


async def test_an_event_without_user_id_is_refused(
    victim: dict[str, Any], sandbox: Sandbox, as_user: Any, amqp: Any, names: Names
) -> None:
    calls = len(sandbox.seam.requests)
    anonymous = await as_user(None)
    anonymous.user = None  # the worker's own connection, but no user_id on the message
    await anonymous.send(grant("guest-victim", phone=ATTACKER_PHONE))

    [dead] = await dead_letters(amqp, names, 1)
    assert dead.headers["x-ikw-reason"] == "untrusted_publisher"
    assert "no user_id" in dead.headers["x-ikw-error"]
    untouched(sandbox, victim, calls)


async def test_a_prefixed_producer_reaches_only_identities_under_its_prefix(
    victim: dict[str, Any], sandbox: Sandbox, as_user: Any, users: Users, amqp: Any, names: Names
) -> None:
    calls = len(sandbox.seam.requests)
    hotel = await as_user(users.hotel)
    await hotel.send(grant(user_identity_id=victim["user_identity_id"], phone=ATTACKER_PHONE))
    await hotel.send(grant("guest-victim", phone=ATTACKER_PHONE))
    dead = await dead_letters(amqp, names, 2)
    assert {d.headers["x-ikw-reason"] for d in dead} == {"identity_out_of_scope"}
    untouched(sandbox, victim, calls)

    await hotel.send(grant("hotel-a-48213", phone="+14155550177", email="bo@example.com"))
    await wait_for(lambda: len(sandbox.twilio.outbox) == 2, 15, "the in-scope grant's SMS")
    assert sandbox.twilio.outbox[1]["to"] == "+14155550177"


async def test_a_forged_revoke_deletes_nothing(
    victim: dict[str, Any], sandbox: Sandbox, as_user: Any, users: Users, amqp: Any, names: Names
) -> None:
    calls = len(sandbox.seam.requests)
    mallory = await as_user(users.mallory)
    await mallory.send(revoke("guest-victim"))
    [dead] = await dead_letters(amqp, names, 1)
    assert dead.headers["x-ikw-reason"] == "untrusted_publisher"
    assert dead.headers["x-ikw-source-queue"] == names.revocations
    untouched(sandbox, victim, calls)


def cleanup_of(key: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "instant_key.cleanup",
        "version": 1,
        "instant_key_id": key["instant_key_id"],
        "user_identity_id": key["user_identity_id"],
        "expires_at": datetime.now(UTC).isoformat(),
    }


async def test_only_the_worker_may_order_a_deletion(
    victim: dict[str, Any], sandbox: Sandbox, as_user: Any, users: Users, amqp: Any, names: Names
) -> None:
    calls = len(sandbox.seam.requests)
    booking, mallory = await as_user(users.booking), await as_user(users.mallory)
    # A cleanup body through the grants' routing key, from a trusted producer...
    await booking.send(cleanup_of(victim), "access.granted")
    # ...and straight into the cleanup queue, from a trusted and an untrusted producer.
    await booking.send(cleanup_of(victim), queue=names.cleanup)
    await mallory.send(cleanup_of(victim), queue=names.cleanup)

    dead = await dead_letters(amqp, names, 3)
    reasons = sorted((d.headers["x-ikw-source-queue"], d.headers["x-ikw-reason"]) for d in dead)
    assert reasons == [
        (names.cleanup, "untrusted_publisher"),
        (names.cleanup, "untrusted_publisher"),
        (names.grants, "wrong_queue"),
    ]
    untouched(sandbox, victim, calls)


async def test_a_grant_sent_as_a_revoke_is_refused(
    victim: dict[str, Any], sandbox: Sandbox, as_user: Any, users: Users, amqp: Any, names: Names
) -> None:
    calls = len(sandbox.seam.requests)
    booking = await as_user(users.booking)
    await booking.send(grant("guest-victim", phone=ATTACKER_PHONE), "access.revoked")
    [dead] = await dead_letters(amqp, names, 1)
    assert (dead.headers["x-ikw-reason"], dead.headers["x-ikw-source-queue"]) == (
        "wrong_queue",
        names.revocations,
    )
    untouched(sandbox, victim, calls)


async def test_producer_set_worker_headers_are_ignored_and_a_retry_still_completes(
    trusting: dict[str, str],
    sandbox: Sandbox,
    start_worker: StartWorker,
    as_user: Any,
    users: Users,
    amqp: Any,
    names: Names,
) -> None:
    service = await start_worker(IKW_PREFETCH="2")
    sandbox.seam.fail_next(503, path="/user_identities/get", count=2)
    booking = await as_user(users.booking)
    forged = {
        "x-ikw-attempt": 999,  # would skip every retry
        "x-ikw-first-failed-at": "2026-01-01T00:00:00",  # no time zone: used to crash settling
        "x-ikw-publisher": users.mallory,
    }
    for n in range(2):
        await booking.send(grant(f"guest-{n}", phone=f"+1415555017{n}"), headers=forged)

    await wait_for(lambda: len(sandbox.twilio.outbox) == 2, 20, "both SMS after a retry")
    retried = service.metrics.registry.get_sample_value(
        "ikw_messages_total", {"queue": names.grants, "outcome": "retried"}
    )
    assert retried == 2
    assert await drain(amqp, names.dead) == []


async def test_a_message_whose_settling_fails_goes_back_to_the_broker(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    monkeypatch: pytest.MonkeyPatch,
    log_lines: list[str],
) -> None:
    real = worker.broker.decision.decide
    failures = [RuntimeError("a bug in the decision")]

    def decide_once_wrong(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(worker.broker.consumer, "decide", decide_once_wrong)
    # One prefetch slot: a message that never settled would stop the worker for good.
    await start_worker(IKW_PREFETCH="1")
    await publish(grant("guest-1", phone="+14155550181"))
    await publish(grant("guest-2", phone="+14155550182"))

    await wait_for(
        lambda: {"+14155550181", "+14155550182"} <= {s["to"] for s in sandbox.twilio.outbox},
        20,
        "both grants delivered",
    )
    assert any("could not settle the message (RuntimeError" in line for line in log_lines)
