"""The activity entry of a settled message, and how `ikw activity` reads and matches entries."""

import json
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import cast

from aio_pika.abc import AbstractIncomingMessage

from tests.builders import body, grant
from worker.actions import Action, Outcome
from worker.broker.activity import entry
from worker.broker.decision import DeadLetter, Retry, Settled
from worker.broker.headers import Bookkeeping
from worker.broker.settle import Handling
from worker.commands.activity import SELECTORS, Matcher, line, what_happened
from worker.events import KeyCleanup, parse


def handling(raw: bytes, settled: Settled, attempt: int = 1) -> Handling:
    message = SimpleNamespace(message_id="m-1", routing_key="access.granted", headers={}, body=raw)
    h = Handling("ns.grants", cast(AbstractIncomingMessage, message), Bookkeeping(attempt), "bk")
    h.settled = settled
    return h


def test_a_delivered_grant_s_entry_holds_ids_and_no_contact() -> None:
    event = grant("guest-7", phone="+14155550123", email="ada@example.com", name="Ada Lovelace")
    h = handling(body(event), Settled.ACKED)
    h.event = parse(h.message.body, "application/json")
    h.outcome = Outcome(Action.GRANTED, channel="sms", key_id="k-1", identity_id="id-1")

    found = entry(h)

    assert {k: found[k] for k in ("type", "grant_id", "identity_key", "identity_id")} == {
        "type": "access.granted",
        "grant_id": event["grant_id"],
        "identity_key": "guest-7",
        "identity_id": "id-1",
    }
    assert (found["action"], found["channel"], found["key_id"]) == ("granted", "sms", "k-1")
    text = json.dumps(found)
    assert not [s for s in ("+14155550123", "ada@example.com", "Ada Lovelace") if s in text]
    assert what_happened(found) == "granted: delivered on sms, key k-1"


def test_a_retry_and_a_dead_letter_say_why() -> None:
    retried = handling(b"{}", Settled.RETRIED, attempt=2)
    retried.decided = Retry(8.2, 3, datetime.now(UTC), "seam answered 503")
    dead = handling(b"{}", Settled.DEAD_LETTERED)
    dead.decided = DeadLetter("unknown_type", "unknown type/version")

    assert what_happened(entry(retried)) == (
        "retried (attempt 2 failed; again in 8 s): seam answered 503"
    )
    assert entry(dead)["routing_key"] == "access.granted"  # no event: what it was sent as
    assert what_happened(entry(dead)) == "dead-lettered: unknown_type: unknown type/version"


def test_a_grant_s_lookup_also_finds_the_cleanup_of_its_key() -> None:
    matches = Matcher(*SELECTORS["grant"], "g-1")
    cleanup = KeyCleanup(
        type="instant_key.cleanup",
        version=1,
        instant_key_id="k-1",
        user_identity_id="id-1",
        expires_at=datetime.now(UTC),
    )
    h = handling(cleanup.model_dump_json().encode(), Settled.ACKED)
    h.event, h.outcome = cleanup, Outcome(Action.CLEANED_UP, key_id="k-1", deleted=1)

    assert not matches(entry(h))  # no grant named k-1 yet
    assert matches({"grant_id": "g-1", "key_id": "k-1", "action": "granted"})
    assert matches(entry(h))
    assert not matches({"grant_id": "g-2", "key_id": "k-2"})
    assert what_happened(entry(h)) == "cleaned up: key k-1 deleted at its expiry"


def test_a_producers_control_characters_never_reach_the_terminal() -> None:
    event = grant("guest-\x1b]2;owned\x07")
    h = handling(body(event), Settled.ACKED)
    h.event = parse(h.message.body, "application/json")
    h.outcome = Outcome(Action.GRANTED, channel="sms", key_id="k-1")

    shown = line(entry(h))

    assert "\x1b" not in shown and "\x07" not in shown
    assert "identity guest-?]2;owned?" in shown
