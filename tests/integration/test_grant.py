"""The whole job against a real broker and the stand-ins: grant, deliver, expire, revoke."""

import json
from typing import Any

import pytest

from tests.builders import grant, revoke
from tests.helpers import Publish, StartWorker, drain
from worker.broker.topology import Names
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox


def links(sandbox: Sandbox) -> list[str]:
    return [key["instant_key_url"] for key in sandbox.seam.keys.values()]


async def test_grant_by_sms_carries_the_exact_link_seam_issued(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    await start_worker()
    await publish(grant("guest-991", name="Ada Lovelace", channels=("sms", "email")))

    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS")
    [key] = sandbox.seam.keys.values()
    [sms] = sandbox.twilio.outbox
    assert sms["to"] == "+14155550100"
    assert key["instant_key_url"] in sms["body"]
    assert "Ada Lovelace" in sms["body"]
    assert sandbox.smtp.messages == []  # the first channel that works, only


async def test_grant_by_email_has_the_link_in_both_parts(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    await start_worker()
    await publish(grant(phone=None, email="grace@example.com", channels=("sms", "email")))

    await wait_for(lambda: sandbox.smtp.messages, 15, "the email")
    [url] = links(sandbox)
    [mail] = sandbox.smtp.messages
    assert mail["To"].addresses[0].addr_spec == "grace@example.com"
    assert url in mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert f'href="{url}"' in mail.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert sandbox.twilio.outbox == []


async def test_unknown_identity_is_created_and_a_known_one_reused(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, log_lines: list[str]
) -> None:
    await start_worker()
    await publish(grant("guest-7", name="Ada Lovelace", phone="+14155550107"))
    await wait_for(lambda: len(sandbox.twilio.outbox) == 1, 15, "the first SMS")
    [identity] = sandbox.seam.identities.values()
    assert identity["user_identity_key"] == "guest-7"
    assert identity["full_name"] == "Ada Lovelace"
    assert identity["phone_number"] == "+14155550107"

    # Found by key the second time, and by id the third: no new identity.
    await publish(grant("guest-7", phone="+14155550107"))
    await publish(grant(user_identity_id=identity["user_identity_id"], phone="+14155550107"))
    await wait_for(lambda: len(sandbox.twilio.outbox) == 3, 15, "three SMS")
    assert len(sandbox.seam.identities) == 1
    assert [r[1] for r in sandbox.seam.requests].count("/user_identities/create") == 1

    # One line per message says what it did, the creation included.
    def handled() -> list[dict[str, Any]]:
        return [e for e in map(json.loads, log_lines) if e.get("action") == "granted"]

    await wait_for(lambda: len(handled()) == 3, 5, "a line per message")
    assert [(e["user_identity_id"], e.get("created")) for e in handled()] == [
        (identity["user_identity_id"], True),
        (identity["user_identity_id"], None),
        (identity["user_identity_id"], None),
    ]


async def test_the_same_event_published_twice_mints_one_key(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    await start_worker()
    event = grant("guest-twice")
    await publish(event)
    await wait_for(lambda: len(sandbox.twilio.outbox) == 1, 15, "the first SMS")
    await publish(event)
    await wait_for(lambda: len(sandbox.twilio.outbox) == 2, 15, "the second SMS")

    assert len(sandbox.seam.issued) == 1
    [url] = links(sandbox)
    assert all(url in sms["body"] for sms in sandbox.twilio.outbox)


async def test_three_grants_at_once_for_one_identity_mint_one_key(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    await start_worker(IKW_PREFETCH="10")
    for _ in range(3):
        await publish(grant("guest-triple"))

    await wait_for(lambda: len(sandbox.twilio.outbox) == 3, 15, "three SMS")
    assert len(sandbox.seam.identities) == 1
    assert len(sandbox.seam.issued) == 1
    [url] = links(sandbox)
    assert all(url in sms["body"] for sms in sandbox.twilio.outbox)


async def test_two_workers_racing_converge_on_one_link(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    sandbox.seam.latency = 0.05  # widen the window in which both mint
    await start_worker()
    await start_worker()
    for _ in range(6):
        await publish(grant("guest-race"))

    await wait_for(lambda: len(sandbox.twilio.outbox) == 6, 20, "six SMS")
    [identity] = sandbox.seam.identities.values()
    live = sandbox.seam.live_keys(identity["user_identity_id"])
    assert len(live) == 1
    assert {sms["body"] for sms in sandbox.twilio.outbox} == {sandbox.twilio.outbox[0]["body"]}
    assert live[0]["instant_key_url"] in sandbox.twilio.outbox[0]["body"]


async def test_key_is_deleted_from_seam_when_it_expires(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    sandbox.seam.key_lifetime = 3
    await start_worker(IKW_MIN_KEY_LIFETIME="0")
    await publish(grant())
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS")
    assert len(sandbox.seam.keys) == 1

    await wait_for(lambda: not sandbox.seam.keys, 20, "the key's deletion")
    deletes = [r for r in sandbox.seam.requests if r[1] == "/instant_keys/delete"]
    assert len(deletes) == 1


async def test_expiry_deletion_survives_a_worker_restart(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names
) -> None:
    sandbox.seam.key_lifetime = 4
    first = await start_worker(IKW_MIN_KEY_LIFETIME="0")
    await publish(grant())
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS")
    await first.stop()  # the timer is a message in the delay queues, not in this process

    assert len(sandbox.seam.keys) == 1
    await start_worker(IKW_MIN_KEY_LIFETIME="0")
    await wait_for(lambda: not sandbox.seam.keys, 20, "the key's deletion")


async def test_revoke_deletes_every_key_now(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    await start_worker()
    await publish(grant("guest-leaving"))
    await publish(grant("guest-staying", phone="+14155550111", email="bo@example.com"))
    await wait_for(lambda: len(sandbox.twilio.outbox) == 2, 15, "two SMS")

    await publish(revoke("guest-leaving"))

    def keys_of(key: str) -> list[Any]:
        [identity] = [i for i in sandbox.seam.identities.values() if i["user_identity_key"] == key]
        return sandbox.seam.live_keys(identity["user_identity_id"])

    await wait_for(lambda: not keys_of("guest-leaving"), 15, "the revoked key's deletion")
    assert len(keys_of("guest-staying")) == 1


async def test_revoke_of_an_unknown_identity_is_done(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, amqp: Any, names: Names
) -> None:
    service = await start_worker()
    await publish(revoke("nobody"))
    await wait_for(
        lambda: service.metrics.messages.labels(names.revocations, "acked")._value.get() == 1,
        15,
        "the revoke to be acked",
    )
    assert await drain(amqp, names.dead) == []


@pytest.mark.parametrize("locale,greeting", [("fr", "Bonjour"), ("en", "Hi")])
async def test_sms_text_follows_the_locale(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, locale: str, greeting: str
) -> None:
    await start_worker()
    await publish(grant(locale=locale))
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS")
    assert sandbox.twilio.outbox[0]["body"].startswith(greeting)
