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
from tests.helpers import (
    BROKER_USER,
    Publish,
    StartWorker,
    broker_users,
    dead_letters,
    drain,
    user_url,
)
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
    "access.scheduled",
    "access.rejected",
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


async def test_a_stay_is_heard_scheduled_delivered_and_deleted_at_checkout(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, listener: Listener
) -> None:
    await start_worker(IKW_CHECKOUT_GRACE="1s")
    now = datetime.now(UTC).timestamp()

    def at(seconds: float) -> str:
        return datetime.fromtimestamp(now + seconds, UTC).isoformat()

    stay = {"reservation_key": "res-48213", "starts_at": at(4), "ends_at": at(6)}
    event = grant("guest-stay") | {"stay": stay | {"deliver_at": at(2), "revision": 3}}
    await publish(event)
    await wait_for(lambda: listener.of("instant_key.deleted"), 25, "the checkout")

    [scheduled] = listener.of("access.scheduled")
    assert (scheduled["event_id"], scheduled["reservation_key"]) == (event["event_id"], "res-48213")
    assert scheduled["revision"] == 3
    assert datetime.fromisoformat(scheduled["deliver_at"]).timestamp() == pytest.approx(now + 2)
    [delivered] = listener.of("access.delivered")
    assert (delivered["reservation_key"], delivered["revision"]) == ("res-48213", 3)
    assert delivered["delivery_reason"] == "initial"
    [deleted] = listener.of("instant_key.deleted")
    assert deleted["why"] == "stay_ended"
    assert deleted["instant_key_id"] == delivered["instant_key_id"]
    no_secrets(listener, sandbox)


async def test_a_cancelled_stay_says_why_its_key_was_deleted(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, listener: Listener
) -> None:
    await start_worker()
    now = datetime.now(UTC).timestamp()
    stay = {
        "reservation_key": "res-9",
        "starts_at": datetime.fromtimestamp(now, UTC).isoformat(),
        "ends_at": datetime.fromtimestamp(now + 600, UTC).isoformat(),
    }
    await publish(grant("guest-no-show") | {"stay": stay})
    await wait_for(lambda: listener.of("access.delivered"), 15, "access.delivered")
    await publish(revoke("guest-no-show") | {"reservation_key": "res-9", "reason": "no_show"})
    await wait_for(lambda: listener.of("access.revoke_completed"), 15, "the revoke's end")
    [deleted] = listener.of("instant_key.deleted")
    assert deleted["why"] == "no_show"
    assert deleted["user_identity"]["user_identity_key"] == "guest-no-show"
    [completed] = listener.of("access.revoke_completed")
    assert (completed["deleted"], completed["kept"]) == (1, 0)


def refused_grants() -> dict[str, tuple[bytes, str]]:
    """A booking system's likeliest mistakes: what it sends, and the reason it is told."""
    unnamed = grant()
    unnamed["user_identity"] |= {"user_identity_key": None, "user_identity_id": None}
    zoned = grant()
    zoned["delivery"]["time_zone"] = "Europe/Pariss"
    return {
        "no identity": (json.dumps(unnamed).encode(), "invalid_event"),
        "bad time zone": (json.dumps(zoned).encode(), "invalid_event"),
        "not json": (b"{'event_id': 'e-1'}", "malformed_json"),
    }


async def test_an_event_refused_for_its_content_is_rejected_to_its_producer(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, listener: Listener
) -> None:
    await start_worker()
    refused = refused_grants()
    for raw, _ in refused.values():
        await publish(raw, "access.granted")
    await wait_for(lambda: len(listener.of("access.rejected")) == 3, 15, "three rejections")

    told = {(r["event_id"], r["reason"]): r for r in listener.of("access.rejected")}
    for raw, reason in refused.values():
        sent = json.loads(raw) if raw.startswith(b'{"') else {}
        rejected = told[(sent.get("event_id"), reason)]
        assert rejected["grant_id"] == sent.get("grant_id")
        assert rejected["event_type"] == sent.get("type")
    assert (
        "time_zone"
        in told[(json.loads(refused["bad time zone"][0])["event_id"], "invalid_event")]["error"]
    )
    # Exactly one outcome each, and nothing reached a guest.
    assert [key for key, _, _ in listener.heard] == [f"{BROKER_USER}.access.rejected"] * 3
    assert sandbox.twilio.outbox == [] and not sandbox.seam.identities and not sandbox.seam.keys
    no_secrets(listener, sandbox)


async def test_an_untrusted_producer_hears_nothing_of_its_refused_events(
    start_worker: StartWorker, names: Names, amqp: Any
) -> None:
    every = Listener()
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(names.outcomes, "#")
    await queue.consume(every.on_message, no_ack=True)
    await start_worker()
    with broker_users("stranger") as users:
        connection = await aio_pika.connect_robust(user_url(users["stranger"]))
        async with connection:
            stranger = Publisher(
                await connection.channel(publisher_confirms=True), names, users["stranger"]
            )
            for raw, _ in refused_grants().values():
                await stranger.publish(names.exchange, "access.granted", raw)
        dead = await dead_letters(amqp, names, 3)
    assert {m.headers["x-ikw-reason"] for m in dead} == {"untrusted_publisher"}
    # Whatever the worker published before its dead letters is in our queue ahead of this marker.
    await Publisher(channel, names, BROKER_USER).publish(names.outcomes, "marker", b"{}")
    await wait_for(lambda: every.heard, 15, "the marker")
    assert [key for key, _, _ in every.heard] == ["marker"]
