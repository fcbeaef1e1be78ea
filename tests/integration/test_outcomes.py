"""The booking system hears back: outcome events on <ns>.outcomes, routing key
<producer>.<type>, consumed from a queue bound as `ikw topology --producer` binds one, never with
the link or a full contact."""

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest

from tests.builders import grant, revoke
from tests.helpers import BROKER_USER, Publish, StartWorker, drain
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.events import KeyCleanup
from worker.sandbox import changed, wait_for
from worker.sandbox.all import Sandbox
from worker.service import Service

KINDS = (
    "access.delivered",
    "access.delivery_failed",
    "instant_key.deleted",
    "access.revoke_completed",
)


class Listener:
    def __init__(self) -> None:
        self.heard: list[tuple[str, dict[str, Any], bytes]] = []

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        # Taken with no_ack: an ack racing the channel's close at teardown broke the connection.
        self.heard.append((message.routing_key or "", json.loads(message.body), message.body))
        changed()

    def of(self, kind: str) -> list[dict[str, Any]]:
        assert kind in KINDS
        return [body for key, body, _ in self.heard if key == f"{BROKER_USER}.{kind}"]


@pytest.fixture
async def listener(amqp: Any, names: Names) -> AsyncIterator[Listener]:
    """The producer's own queue (the tests publish as the worker's user, trusted by default)."""
    channel = await amqp.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(names.outcomes, f"{BROKER_USER}.#")
    heard = Listener()
    await queue.consume(heard.on_message, no_ack=True)
    yield heard
    await channel.close()


def no_secrets(listener: Listener, sandbox: Sandbox) -> None:
    raw = b"".join(body for _, _, body in listener.heard).decode()
    for key in sandbox.seam.issued:
        assert key["instant_key_url"] not in raw
    assert "+1415555" not in raw and "@example.com" not in raw


async def test_a_delivery_is_announced_with_its_provider_id(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, listener: Listener
) -> None:
    await start_worker()
    event = grant("guest-48213", phone="+14155550100")
    await publish(event)
    await wait_for(lambda: listener.of("access.delivered"), 15, "access.delivered")

    [delivered] = listener.of("access.delivered")
    [key] = sandbox.seam.keys.values()
    [sms] = sandbox.twilio.outbox
    assert delivered["event_id"] == event["event_id"]
    assert delivered["grant_id"] == event["grant_id"]
    assert delivered["user_identity"] == {
        "user_identity_id": key["user_identity_id"],
        "user_identity_key": "guest-48213",
    }
    assert (delivered["instant_key_id"], delivered["channel"]) == (key["instant_key_id"], "sms")
    assert delivered["provider_message_id"] == sms["sid"]
    assert delivered["minted"] is True
    no_secrets(listener, sandbox)


async def test_a_dead_lettered_grant_is_announced_as_failed(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    listener: Listener,
    worker_env: dict[str, str],
) -> None:
    for name in ("SMTP_HOST", "EMAIL_FROM"):
        del worker_env[name]
    await start_worker()
    event = grant("guest-opted-out", phone="+15005550004", channels=("sms",))
    await publish(event)
    await wait_for(lambda: listener.of("access.delivery_failed"), 15, "access.delivery_failed")
    [failed] = listener.of("access.delivery_failed")
    assert (failed["event_id"], failed["grant_id"]) == (event["event_id"], event["grant_id"])
    assert failed["reason"] == "no_channel_accepted"
    assert "21610" in failed["error"]
    assert "+15005550004" not in json.dumps(failed)


async def test_every_deletion_is_announced_with_why(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, listener: Listener
) -> None:
    sandbox.seam.key_lifetime = 2
    await start_worker(IKW_MIN_KEY_LIFETIME="0")
    await publish(grant("guest-expiring", phone="+14155550101", email="e@example.com"))
    await wait_for(lambda: listener.of("instant_key.deleted"), 20, "the expired key's deletion")
    [expired] = listener.of("instant_key.deleted")
    assert expired["why"] == "expired"

    sandbox.seam.key_lifetime = 3600
    await publish(grant("guest-leaving", phone="+14155550102", email="l@example.com"))
    await wait_for(lambda: len(listener.of("access.delivered")) == 2, 15, "the second delivery")
    await publish(revoke("guest-leaving"))
    await wait_for(lambda: len(listener.of("instant_key.deleted")) == 2, 15, "the revoke")
    revoked = listener.of("instant_key.deleted")[1]
    assert revoked["why"] == "revoked"
    assert revoked["instant_key_id"] == listener.of("access.delivered")[1]["instant_key_id"]
    await wait_for(lambda: listener.of("access.revoke_completed"), 15, "the revoke's completion")
    [done] = listener.of("access.revoke_completed")
    assert (done["deleted"], done["kept"]) == (1, 0)
    no_secrets(listener, sandbox)


def unroutable_handled(service: Service, names: Names) -> float | None:
    labels = {"queue": names.unroutable, "outcome": "acked"}
    return service.metrics.registry.get_sample_value("ikw_messages_total", labels)


async def test_with_nobody_listening_the_broker_drops_outcomes_without_the_worker(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Any
) -> None:
    service = await start_worker()
    await publish(grant())
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS")
    await service.stop()  # whatever was in flight is done, or back in its queue

    # access.delivered went to <ns>.unheard, which keeps nothing: not to the alternate
    # exchange, where the worker would have taken it back.
    assert unroutable_handled(service, names) is None
    channel = await amqp.channel()
    for queue in (names.unroutable, names.unheard, names.dead):
        declared = await channel.declare_queue(queue, passive=True)
        assert declared.declaration_result.message_count == 0, queue


async def test_without_the_sink_an_unheard_outcome_is_logged_and_the_grant_still_done(
    start_worker: StartWorker, publish: Publish, names: Names, amqp: Any, log_lines: list[str]
) -> None:
    await (await amqp.channel()).queue_delete(names.unheard)
    await start_worker(IKW_DECLARE="false")
    await publish(grant())
    await wait_for(lambda: any("message acked" in line for line in log_lines), 15, "the ack")
    assert any("could not publish the access.delivered outcome" in line for line in log_lines)
    assert await drain(amqp, names.dead) == []


async def test_a_timer_of_a_producer_no_longer_trusted_deletes_its_key_and_tells_nobody(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Any
) -> None:
    """The worker trusts only itself here: an expiry timer set for a grant of `booking` (its
    x-ikw-publisher) still deletes the key, and no outcome goes anywhere."""
    every = Listener()
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(names.outcomes, "#")
    await queue.consume(every.on_message)
    service = await start_worker()
    await publish(grant("guest-of-booking"))
    await wait_for(lambda: every.heard, 15, "the grant's access.delivered")
    [key] = sandbox.seam.keys.values()

    timer = KeyCleanup(
        type="instant_key.cleanup",
        version=1,
        instant_key_id=key["instant_key_id"],
        user_identity_id=key["user_identity_id"],
        expires_at=datetime.now(UTC),
    )
    await Publisher(channel, names, BROKER_USER).to_queue(
        names.cleanup,
        timer.model_dump_json().encode(),
        headers={"x-ikw-publisher": "booking"},
        message_id="cleanup-of-booking",
    )
    done = {"queue": names.cleanup, "outcome": "acked"}
    await wait_for(
        lambda: service.metrics.registry.get_sample_value("ikw_messages_total", done),
        15,
        "the timer done",
    )
    assert not sandbox.seam.keys
    # Whatever the worker published before its ack is in our queue ahead of this marker.
    await Publisher(channel, names, BROKER_USER).publish(names.outcomes, "marker", b"{}")
    await wait_for(lambda: len(every.heard) > 1, 15, "the marker")
    assert [key for key, _, _ in every.heard] == [f"{BROKER_USER}.access.delivered", "marker"]
