"""Every key minted is delivered or dead-lettered, and deleted at its expiry whatever happened;
odd input is dead-lettered at once; work per message is bounded; a stop without a broker ends.
Against the real broker and the stand-ins over real sockets."""

import asyncio
import json
import re
import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest

from tests.builders import body, grant, revoke
from tests.helpers import (
    AMQP_URL,
    BROKER_USER,
    Connection,
    Publish,
    StartWorker,
    dead_letters,
    drain,
    settled,
)
from worker.broker.topology import Names
from worker.cli import main
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox
from worker.sandbox.proxy import Proxy
from worker.sandbox.seam import WORKSPACE_ID, timestamp
from worker.service import Service

LINK = re.compile(r"https://\S+")


def link_in(text: str) -> str:
    """The one link a message holds, as the guest would tap it."""
    [url] = LINK.findall(text)
    return str(url)


def dead_count(service: Service, reason: str) -> float:
    value = service.metrics.registry.get_sample_value("ikw_dead_letters_total", {"reason": reason})
    return value or 0.0


def identity_of(sandbox: Sandbox, key: str) -> dict[str, Any]:
    [identity] = [i for i in sandbox.seam.identities.values() if i["user_identity_key"] == key]
    return identity


# --- 1. a short key under the default IKW_MIN_KEY_LIFETIME --------------------------------------


async def test_short_key_with_default_min_lifetime_is_delivered_once_and_deleted_at_expiry(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    names: Names,
    amqp: Connection,
    worker_env: dict[str, str],
) -> None:
    worker_env.pop("IKW_MIN_KEY_LIFETIME")  # the default, 1 h: far longer than the key lives
    sandbox.seam.key_lifetime = 3
    service = await start_worker()
    assert service.settings.min_key_lifetime == timedelta(hours=1)
    event = grant("guest-short")
    await publish(event)

    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS")
    [key] = sandbox.seam.issued
    assert link_in(sandbox.twilio.outbox[0]["body"]) == key["instant_key_url"]

    # Redelivered while the key is live: the same link again, no second key.
    await publish(event)
    await wait_for(lambda: len(sandbox.twilio.outbox) == 2, 15, "the SMS of the redelivery")
    assert len(sandbox.seam.issued) == 1
    assert link_in(sandbox.twilio.outbox[1]["body"]) == key["instant_key_url"]

    await wait_for(lambda: not sandbox.seam.keys, 20, "the key's deletion at expiry")
    assert await drain(amqp, names.dead) == []


# --- 2. failures after generation still leave a timer ------------------------------------------


async def test_seam_failing_after_generate_dead_letters_and_the_key_is_still_deleted(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Connection
) -> None:
    sandbox.seam.key_lifetime = 3
    await start_worker(IKW_MAX_ATTEMPTS="1")
    # A new identity: get (404), create, generate, then this list fails.
    sandbox.seam.fail_next(503, path="/instant_keys/list")
    await publish(grant("guest-503"))

    [dead] = await dead_letters(amqp, names, 1)
    assert dead.headers["x-ikw-reason"] == "retries_exhausted"
    assert dead.headers["x-ikw-attempts"] == 1
    paths = [r[1] for r in sandbox.seam.requests]
    assert paths.index("/user_identities/generate_instant_key") < paths.index("/instant_keys/list")
    [key] = sandbox.seam.issued
    assert sandbox.twilio.outbox == []  # nothing reached the guest
    await wait_for(lambda: key["instant_key_id"] not in sandbox.seam.keys, 20, "the deletion")


async def test_no_channel_accepted_then_replay_leaks_no_key(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    names: Names,
    amqp: Connection,
    worker_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sandbox.seam.key_lifetime = 3
    for name in ("SMTP_HOST", "EMAIL_FROM"):
        del worker_env[name]  # SMS only
    service = await start_worker()
    await publish(grant("guest-opted-out", phone="+15005550004", channels=("sms",)))

    await wait_for(lambda: dead_count(service, "no_channel_accepted") == 1, 15, "a dead letter")
    assert sandbox.twilio.received == 1 and sandbox.twilio.outbox == []
    assert len(sandbox.seam.issued) == 1

    # The operator replays it (the number is still opted out): it fails again, and whether the
    # replay reused the live key or minted another, every key issued is deleted at its expiry.
    monkeypatch.setenv("AMQP_URL", AMQP_URL)
    monkeypatch.setenv("IKW_NAMESPACE", names.namespace)
    assert await asyncio.to_thread(main, ["dlq", "replay", "--all", "--yes"]) == 0
    await wait_for(lambda: dead_count(service, "no_channel_accepted") == 2, 15, "the replay")
    [dead] = await dead_letters(amqp, names, 1)
    assert dead.headers["x-ikw-reason"] == "no_channel_accepted"
    assert sandbox.twilio.outbox == []

    issued = [key["instant_key_id"] for key in sandbox.seam.issued]
    await wait_for(
        lambda: not set(issued) & set(sandbox.seam.keys), 20, "every issued key's deletion"
    )
    assert not sandbox.seam.keys


# --- 3. a returning guest under a new key -------------------------------------------------------


async def test_returning_guest_under_a_new_key_gets_the_new_identitys_link(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Connection
) -> None:
    phone, email = "+14155550142", "returning@example.com"
    await start_worker()
    await publish(grant("booking-k1", phone=phone, email=email))
    await wait_for(lambda: len(sandbox.twilio.outbox) == 1, 15, "the first stay's SMS")
    first = identity_of(sandbox, "booking-k1")
    assert (first["phone_number"], first["email_address"]) == (phone, email)

    await publish(grant("booking-k2", phone=phone, email=email))
    await wait_for(lambda: len(sandbox.twilio.outbox) == 2, 15, "the second stay's SMS")

    assert len(sandbox.seam.identities) == 2
    second = identity_of(sandbox, "booking-k2")
    [k2_key] = sandbox.seam.live_keys(second["user_identity_id"])
    [k1_key] = sandbox.seam.live_keys(first["user_identity_id"])
    sms = sandbox.twilio.outbox[1]
    assert sms["to"] == phone
    assert link_in(sms["body"]) == k2_key["instant_key_url"] != k1_key["instant_key_url"]
    assert await drain(amqp, names.dead) == []


# --- 4. odd input -------------------------------------------------------------------------------


async def publish_raw(
    amqp: Connection, names: Names, raw: bytes, routing_key: str, **properties: Any
) -> None:
    """As a trusted producer would, with whatever message properties it likes."""
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await channel.get_exchange(names.exchange, ensure=False)
    message = aio_pika.Message(
        raw,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        user_id=BROKER_USER,
        **properties,
    )
    await exchange.publish(message, routing_key, mandatory=True)
    await channel.close()


DEEP = b'{"type": "access.granted", "version": 1, "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
HUGE_USE_COUNT = body(grant("guest-huge") | {"instant_key": {"max_use_count": 10**30}})


@pytest.mark.parametrize(
    "raw,routing_key,properties,reason",
    [
        (DEEP, "access.granted", {"content_type": "application/json"}, "malformed_json"),
        (
            body(grant("guest-gzip")),
            "access.granted",
            {"content_type": "application/json", "content_encoding": "gzip"},
            "unsupported_encoding",
        ),
        (HUGE_USE_COUNT, "access.granted", {"content_type": "application/json"}, "invalid_event"),
        (
            body(grant("guest-teleported")),
            "access.teleported",
            {"content_type": "application/json"},
            "unroutable",
        ),
    ],
    ids=["deep_json", "gzip", "huge_max_use_count", "unknown_routing_key"],
)
async def test_odd_input_is_dead_lettered_at_once_and_the_worker_keeps_serving(
    sandbox: Sandbox,
    start_worker: StartWorker,
    names: Names,
    amqp: Connection,
    raw: bytes,
    routing_key: str,
    properties: dict[str, Any],
    reason: str,
) -> None:
    service = await start_worker()
    await publish_raw(amqp, names, raw, routing_key, **properties)

    [dead] = await dead_letters(amqp, names, 1)
    assert dead.headers["x-ikw-reason"] == reason
    assert dead.headers["x-ikw-attempts"] == 1
    assert dead.headers["x-ikw-routing-key"] == routing_key
    assert dead.body == raw  # byte for byte
    assert dead.content_encoding == properties.get("content_encoding")  # and read as it was
    assert sum(settled(service, q, "retried") for q in (names.grants, names.unroutable)) == 0
    # Nothing of it reached Seam: no call names its identity, no key was asked for.
    assert not [r for r in sandbox.seam.requests if r[1] != "/user_identities/list"]

    await publish_raw(amqp, names, body(grant()), "access.granted", content_type="application/json")
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the valid grant after the odd one")
    assert await drain(amqp, names.dead) == []


async def test_a_gzip_dead_letter_replays_as_gzip(
    sandbox: Sandbox,
    start_worker: StartWorker,
    names: Names,
    amqp: Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dead letter and its replay keep content_encoding: the replay fails for the same
    reason, not as malformed JSON."""
    service = await start_worker()
    raw = body(grant("guest-gzip"))
    await publish_raw(
        amqp, names, raw, "access.granted", content_type="application/json", content_encoding="gzip"
    )
    await wait_for(lambda: dead_count(service, "unsupported_encoding") == 1, 15, "a dead letter")

    monkeypatch.setenv("AMQP_URL", AMQP_URL)
    monkeypatch.setenv("IKW_NAMESPACE", names.namespace)
    assert await asyncio.to_thread(main, ["dlq", "replay", "--all", "--yes"]) == 0
    await wait_for(lambda: dead_count(service, "unsupported_encoding") == 2, 15, "the replay")
    [dead] = await dead_letters(amqp, names, 1)
    assert (dead.body, dead.content_encoding) == (raw, "gzip")
    assert sandbox.seam.issued == []


async def test_json_with_a_charset_parameter_is_accepted_and_delivered(
    sandbox: Sandbox, start_worker: StartWorker, names: Names, amqp: Connection
) -> None:
    await start_worker()
    event = body(grant("guest-charset"))
    await publish_raw(
        amqp, names, event, "access.granted", content_type="application/json; charset=utf-8"
    )
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS")
    [key] = sandbox.seam.issued
    assert link_in(sandbox.twilio.outbox[0]["body"]) == key["instant_key_url"]
    assert await drain(amqp, names.dead) == []


# --- 5. bounded work ----------------------------------------------------------------------------

MANY = 2_000
BOUND = 20.0  # seconds for one message to handle MANY keys


async def identity_with_keys(sandbox: Sandbox, key: str, phone: str, count: int) -> str:
    """An identity holding ``count`` live keys, in the stand-in's own shapes; returns its id."""
    created = await sandbox.seam._create_identity(
        {"user_identity_key": key, "full_name": "Ada Lovelace", "phone_number": phone}
    )
    identity_id: str = created["user_identity"]["user_identity_id"]
    start = datetime.now(UTC) - timedelta(hours=1)
    for n in range(count):
        made = start + timedelta(milliseconds=n)
        instant_key = {
            "instant_key_id": str(uuid.uuid4()),
            "workspace_id": WORKSPACE_ID,
            "created_at": timestamp(made),
            "instant_key_url": sandbox.seam.url_base + secrets.token_urlsafe(16),
            "client_session_id": str(uuid.uuid4()),
            "user_identity_id": identity_id,
            "expires_at": timestamp(made + timedelta(hours=48)),
        }
        sandbox.seam.add_key(instant_key)
    return identity_id


def logged(log_lines: list[str], **fields: Any) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in log_lines]
    return [e for e in entries if all(e.get(k) == v for k, v in fields.items())]


async def test_revoke_of_an_identity_with_2000_keys_deletes_them_all_within_the_bound(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    names: Names,
    amqp: Connection,
    log_lines: list[str],
) -> None:
    identity_id = await identity_with_keys(sandbox, "guest-hoarder", "+14155550177", MANY)
    await start_worker()
    started = time.monotonic()
    await publish(revoke("guest-hoarder"))

    await wait_for(lambda: not sandbox.seam.live_keys(identity_id), BOUND, "every key deleted")
    took = time.monotonic() - started
    await wait_for(
        lambda: logged(log_lines, queue=names.revocations, outcome="acked"), 5, "the log line"
    )
    [line] = logged(log_lines, queue=names.revocations, outcome="acked")
    assert line["deleted"] == MANY
    assert took < BOUND
    assert await drain(amqp, names.dead) == []


async def test_grant_for_an_identity_with_2000_keys_converges_to_one_within_the_bound(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Connection
) -> None:
    phone = "+14155550178"
    identity_id = await identity_with_keys(sandbox, "guest-hoarder", phone, MANY)
    earliest = sandbox.seam.issued[0]
    await start_worker()
    started = time.monotonic()
    await publish(grant("guest-hoarder", phone=phone, email=None))

    await wait_for(lambda: sandbox.twilio.outbox, BOUND, "the SMS")
    assert time.monotonic() - started < BOUND
    assert sandbox.seam.live_keys(identity_id) == [earliest]
    assert link_in(sandbox.twilio.outbox[0]["body"]) == earliest["instant_key_url"]
    assert len(sandbox.seam.issued) == MANY  # nothing minted
    assert await drain(amqp, names.dead) == []


async def test_a_message_past_its_deadline_is_retried_not_left_hanging(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Connection
) -> None:
    service = await start_worker(IKW_MESSAGE_DEADLINE="2s")
    await wait_for(lambda: service.ready, 10, "the worker to consume")
    sandbox.seam.latency = 3  # every Seam call outlasts the whole message's deadline
    await publish(grant("guest-slow"))

    await wait_for(lambda: settled(service, names.grants, "retried") >= 1, 10, "a retry")
    assert sandbox.twilio.outbox == []
    sandbox.seam.latency = 0
    await wait_for(lambda: sandbox.twilio.outbox, 20, "the SMS once Seam is quick again")
    [identity] = sandbox.seam.identities.values()
    [key] = sandbox.seam.live_keys(identity["user_identity_id"])
    assert link_in(sandbox.twilio.outbox[0]["body"]) == key["instant_key_url"]
    assert await drain(amqp, names.dead) == []


# --- 6. stopping while the broker is gone -------------------------------------------------------


async def test_stop_with_the_broker_gone_returns_within_the_grace_and_loses_nothing(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    names: Names,
    amqp: Connection,
) -> None:
    proxy = Proxy("127.0.0.1", 5672)
    await proxy.start()
    through_proxy = AMQP_URL.replace(":5672", f":{proxy.port}")
    service = await start_worker(AMQP_URL=through_proxy)
    await wait_for(lambda: service.ready, 10, "the worker to consume")
    sandbox.seam.latency = 1.5
    await publish(grant("guest-in-flight"))
    await wait_for(lambda: sandbox.seam.requests[-1][1] != "/user_identities/list", 10, "Seam")

    await proxy.stop()  # the broker is gone: connections cut, new ones refused
    grace = service.settings.shutdown_grace.total_seconds()
    started = time.monotonic()
    await asyncio.wait_for(service.stop(), grace + 10)
    stopped_in = time.monotonic() - started
    assert stopped_in < grace + 10
    assert sandbox.twilio.outbox == []  # it stopped before sending, the message not ours

    # The broker took the message back: the next worker delivers it, with one live key.
    sandbox.seam.latency = 0
    await start_worker()
    await wait_for(lambda: sandbox.twilio.outbox, 20, "the SMS from the next worker")
    [identity] = sandbox.seam.identities.values()
    [key] = sandbox.seam.live_keys(identity["user_identity_id"])
    assert [link_in(sms["body"]) for sms in sandbox.twilio.outbox] == [key["instant_key_url"]]
    assert await drain(amqp, names.dead) == []
