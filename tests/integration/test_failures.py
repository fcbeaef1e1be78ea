"""Every failure ends acked after a retry, delivered by another channel, or dead-lettered with a
reason; each is made to happen for real against the broker and the stand-ins."""

import json
import time
from typing import Any

import aiohttp
import pytest

from tests.builders import body, grant, revoke
from tests.helpers import Publish, StartWorker, dead_letters, drain, settled
from worker.broker.topology import Names
from worker.events import MAX_BODY_BYTES
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox


async def test_seam_503_then_200_is_delivered_after_a_retry(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Any
) -> None:
    service = await start_worker()
    sandbox.seam.fail_next(503, path="/instant_keys/list")
    await publish(grant())

    await wait_for(lambda: sandbox.twilio.outbox, 20, "the SMS after a retry")
    assert settled(service, names.grants, "retried") == 1
    # The SMS went out; the ack follows it.
    await wait_for(lambda: settled(service, names.grants, "acked") == 1, 5, "the ack")
    assert await drain(amqp, names.dead) == []
    assert len(sandbox.seam.issued) == 1


async def test_seam_429_retry_waits_for_retry_after(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    await start_worker()
    sandbox.seam.fail_next(429, path="/instant_keys/list", retry_after=3)
    await publish(grant())

    await wait_for(lambda: sandbox.seam.requests, 10, "the first Seam call")
    first_try = time.monotonic()
    await wait_for(lambda: sandbox.twilio.outbox, 20, "the SMS after Retry-After")
    assert time.monotonic() - first_try >= 3 - 0.2
    # 429 after generating, then 200 on the retry, which delivers the key already minted.
    assert [r[1] for r in sandbox.seam.requests].count("/instant_keys/list") == 2
    assert len(sandbox.seam.issued) == 1


async def test_seam_400_is_dead_lettered_with_its_reason_and_the_body_intact(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    names: Names,
    amqp: Any,
    log_lines: list[str],
) -> None:
    await start_worker()
    sandbox.seam.fail_next(400, "invalid_input", path="/user_identities/get")
    event = body(grant("guest-400"))
    await publish(event, message_id="evt-400")

    [dead] = await dead_letters(amqp, names, 1)
    assert dead.body == event
    assert dead.headers["x-ikw-reason"] == "seam_rejected"
    assert "400" in dead.headers["x-ikw-error"]
    assert dead.headers["x-ikw-source-queue"] == names.grants
    assert dead.headers["x-ikw-routing-key"] == "access.granted"
    assert dead.headers["x-ikw-attempts"] == 1
    assert dead.headers["x-ikw-first-failed-at"]
    assert sandbox.twilio.outbox == []
    [logged] = [json.loads(line) for line in log_lines if '"msg": "dead-lettered"' in line]
    assert (logged["message_id"], logged["reason"]) == ("evt-400", "seam_rejected")


async def test_a_refused_number_falls_through_to_email(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Any
) -> None:
    await start_worker()
    sandbox.twilio.fail_next(21211)
    await publish(grant(channels=("sms", "email")))

    await wait_for(lambda: sandbox.smtp.messages, 20, "the fallback email")
    [url] = [k["instant_key_url"] for k in sandbox.seam.keys.values()]
    assert url in sandbox.smtp.messages[0].get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert sandbox.twilio.outbox == []
    assert await drain(amqp, names.dead) == []


async def test_no_channel_accepting_is_dead_lettered_and_the_key_still_cleaned_up(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    names: Names,
    amqp: Any,
    worker_env: dict[str, str],
) -> None:
    sandbox.seam.key_lifetime = 3
    for name in ("SMTP_HOST", "EMAIL_FROM"):
        del worker_env[name]  # SMS only
    await start_worker(IKW_MIN_KEY_LIFETIME="0")
    await publish(grant(phone="+15005550004", channels=("sms", "email")))  # opted out

    [dead] = await dead_letters(amqp, names, 1)
    assert dead.headers["x-ikw-reason"] == "no_channel_accepted"
    assert "21610" in dead.headers["x-ikw-error"]
    assert "email: not configured" in dead.headers["x-ikw-error"]
    [key] = sandbox.seam.issued
    assert all(key["instant_key_url"] not in str(v) for v in dead.headers.values())
    assert all("+15005550004" not in str(v) for v in dead.headers.values())
    # The cleanup was scheduled before delivery: the undelivered key is deleted at expiry.
    await wait_for(lambda: not sandbox.seam.keys, 20, "the undelivered key's deletion")


async def test_smtp_451_then_250_is_delivered_after_a_retry(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Any
) -> None:
    service = await start_worker()
    sandbox.smtp.refuse_next(451, "4.7.1 try again later")
    await publish(grant(phone=None, channels=("email",)))

    await wait_for(lambda: sandbox.smtp.messages, 20, "the email after a retry")
    assert settled(service, names.grants, "retried") == 1
    assert await drain(amqp, names.dead) == []


async def test_retries_end_in_a_dead_letter_after_max_attempts(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Any
) -> None:
    await start_worker(IKW_MAX_ATTEMPTS="3")
    sandbox.seam.fail_next(503, path="/instant_keys/list", count=100)
    await publish(grant())

    [dead] = await dead_letters(amqp, names, 1)
    assert dead.headers["x-ikw-reason"] == "retries_exhausted"
    assert dead.headers["x-ikw-attempts"] == 3
    assert "503" in dead.headers["x-ikw-error"]
    assert [r[1] for r in sandbox.seam.requests].count("/instant_keys/list") == 3


async def test_cleanup_and_revoke_retry_too(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Any
) -> None:
    sandbox.seam.key_lifetime = 2
    service = await start_worker(IKW_MIN_KEY_LIFETIME="0")
    await publish(grant("guest-a"))
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS")
    sandbox.seam.fail_next(503, path="/instant_keys/delete")
    await wait_for(lambda: not sandbox.seam.keys, 20, "deletion after a failed first try")
    await wait_for(lambda: settled(service, names.cleanup, "acked") == 1, 5, "the cleanup's ack")
    assert settled(service, names.cleanup, "retried") == 1

    sandbox.seam.key_lifetime = 3600
    await publish(grant("guest-b", phone="+14155550122", email="b@example.com"))
    await wait_for(lambda: len(sandbox.twilio.outbox) == 2, 15, "guest-b's SMS")
    sandbox.seam.fail_next(502, path="/instant_keys/list")
    await publish(revoke("guest-b"))
    await wait_for(lambda: not sandbox.seam.keys, 20, "revoke after a failed first try")
    await wait_for(lambda: settled(service, names.revocations, "acked") == 1, 5, "the revoke's ack")
    assert settled(service, names.revocations, "retried") == 1
    assert await drain(amqp, names.dead) == []


@pytest.mark.parametrize(
    "raw,content_type,reason",
    [
        (b"{not json", "application/json", "malformed_json"),
        (body(grant()), "text/xml", "wrong_content_type"),
        (b'{"pad": "' + b"x" * 70_000 + b'"}', "application/json", "too_large"),
        (body(grant() | {"type": "access.teleported"}), "application/json", "unknown_type"),
        (body(grant() | {"version": 9}), "application/json", "unknown_type"),
        (body(grant(phone="555-0100")), "application/json", "invalid_phone_number"),
        (body(grant(email="ada@@example.com")), "application/json", "invalid_email_address"),
    ],
)
async def test_malformed_input_is_dead_lettered_and_the_worker_keeps_going(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    names: Names,
    amqp: Any,
    raw: bytes,
    content_type: str,
    reason: str,
) -> None:
    await start_worker()
    await publish(raw, "access.granted", content_type=content_type)
    await publish(grant())

    [dead] = await dead_letters(amqp, names, 1)
    assert dead.headers["x-ikw-reason"] == reason
    assert dead.body == raw[:MAX_BODY_BYTES]  # byte for byte; a body over the limit cut to it
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the valid grant after the bad one")


@pytest.mark.parametrize("service_name,secret", [("seam", "api_key"), ("twilio", "auth_token")])
async def test_refused_credentials_pause_without_dead_letters_and_resume_when_fixed(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    names: Names,
    amqp: Any,
    log_lines: list[str],
    service_name: str,
    secret: str,
) -> None:
    service = await start_worker()
    await wait_for(lambda: service.ready, 10, "the worker to consume")
    stand_in = getattr(sandbox, service_name)
    real = getattr(stand_in, secret)
    setattr(stand_in, secret, "rotated-by-someone")
    await publish(grant(channels=("sms", "email")))

    async def ready() -> tuple[int, Any]:
        assert service.http is not None
        async with aiohttp.ClientSession() as http:
            async with http.get(service.http.url + "/readyz") as response:
                return response.status, await response.json()

    await wait_for(lambda: not service.ready, 15, "the worker to report not ready")
    assert await ready() == (
        503,
        {"ready": False, "why": f"paused: {service_name} refuses our credentials"},
    )
    said = f"{service_name} refused our credentials"
    await wait_for(lambda: any(said in line for line in log_lines), 5, "one clear log line")
    assert (sandbox.twilio.outbox, sandbox.smtp.messages) == ([], [])  # no fallback to email
    assert await drain(amqp, names.dead) == []

    setattr(stand_in, secret, real)
    await wait_for(lambda: sandbox.twilio.outbox, 30, "delivery once the credentials work")
    assert await ready() == (200, {"ready": True})
    assert await drain(amqp, names.dead) == []


async def test_a_message_that_keeps_coming_back_hits_the_delivery_limit(
    names: Names, amqp: Any, publish: Publish
) -> None:
    """What protects against a message that kills the process: the queue's x-delivery-limit."""
    event = body(grant())
    await publish(event)
    channel = await amqp.channel()
    queue = await channel.get_queue(names.grants)
    returned = 0
    dead: list[Any] = []
    deadline = time.monotonic() + 20
    while not dead and time.monotonic() < deadline:
        message = await queue.get(fail=False)
        if message is not None:
            await message.nack(requeue=True)  # as if the process died holding it
            returned += 1
        dead = await drain(amqp, names.dead)
    await channel.close()
    assert [d.body for d in dead] == [event]
    assert 1 < returned <= 10
