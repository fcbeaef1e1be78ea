"""Access follows the stay: the key is sent at deliver_at, renewed while the stay lasts, deleted
at checkout (plus the grace), moved with the booking and never sent for a cancelled one. Windows
of seconds, on the real broker and the stand-ins."""

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.builders import grant, revoke
from tests.helpers import Publish, StartWorker, dead_lettered, dead_letters, drain, settled
from worker.broker.topology import Names
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox
from worker.service import Service


def at(seconds: float) -> str:
    """A time ``seconds`` from now, as producers write it."""
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def stay_grant(
    guest: str,
    reservation: str,
    starts: float,
    ends: float,
    deliver: float | None = None,
    revision: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """A grant for ``reservation``, times in seconds from now."""
    stay: dict[str, Any] = {
        "reservation_key": reservation,
        "starts_at": at(starts),
        "ends_at": at(ends),
        "revision": revision,
    }
    if deliver is not None:
        stay["deliver_at"] = at(deliver)
    return grant(guest, **extra) | {"stay": stay}


def cancel(guest: str, reservation: str, reason: str = "cancelled") -> dict[str, Any]:
    return revoke(guest) | {"reservation_key": reservation, "reason": reason}


def live(sandbox: Sandbox, guest: str) -> list[dict[str, Any]]:
    """The guest's keys Seam would still open doors with."""
    ids = [i for i, found in sandbox.seam.identities.items() if found["user_identity_key"] == guest]
    return [key for i in ids for key in sandbox.seam.live_keys(i)]


def stays(service: Service, what: str) -> float:
    value = service.metrics.registry.get_sample_value("ikw_stays_total", {"what": what})
    return value or 0.0


def arrivals(sandbox: Sandbox) -> list[float]:
    """Wall-clock times at which the Twilio stand-in accepted each SMS."""
    seen: list[float] = []
    sandbox.twilio.listeners.append(lambda _: seen.append(time.time()))
    return seen


async def gone(sandbox: Sandbox, guest: str, within: float) -> float:
    """When the guest's last key stopped working (deleted), as wall-clock time."""
    await wait_for(lambda: not live(sandbox, guest), within, "the keys to be deleted")
    return time.time()


def reservation() -> str:
    return f"res-{uuid.uuid4().hex[:8]}"


async def test_the_key_is_sent_at_deliver_at_not_before(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names
) -> None:
    service = await start_worker()
    sent = arrivals(sandbox)
    due = time.time() + 4
    await publish(stay_grant("g-deliver", reservation(), starts=6, ends=30, deliver=4))
    await wait_for(lambda: stays(service, "scheduled") == 1, 15, "the stay to be scheduled")
    assert sandbox.twilio.outbox == [] and sandbox.seam.issued == []  # nothing minted yet
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS at deliver_at")
    assert due - 0.05 <= sent[0] <= due + 3  # one-second timers, and the work itself
    assert sandbox.seam.issued[0]["instant_key_url"] in sandbox.twilio.outbox[0]["body"]


async def test_the_keys_are_deleted_at_checkout_plus_grace_and_not_before(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    await start_worker(IKW_CHECKOUT_GRACE="2s")
    checkout = time.time() + 4
    await publish(stay_grant("g-end", reservation(), starts=0, ends=4))
    await wait_for(lambda: live(sandbox, "g-end"), 15, "the key to be sent")
    deleted = await gone(sandbox, "g-end", 20)
    assert checkout + 2 - 0.05 <= deleted <= checkout + 2 + 4


async def test_an_extension_keeps_the_key_past_the_old_checkout(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names
) -> None:
    service = await start_worker(IKW_CHECKOUT_GRACE="1s")
    booking = reservation()
    await publish(stay_grant("g-ext", booking, starts=0, ends=3))
    await wait_for(lambda: live(sandbox, "g-ext"), 15, "the key to be sent")
    await publish(stay_grant("g-ext", booking, starts=0, ends=12, revision=1))
    await wait_for(lambda: stays(service, "stale_timer") == 1, 20, "the old checkout dropped")
    assert live(sandbox, "g-ext") and len(sandbox.twilio.outbox) == 1  # not messaged again
    extended = time.time()
    deleted = await gone(sandbox, "g-ext", 25)
    assert deleted >= extended + 4  # at the new checkout (+12 s), not the old one (+3 s)


async def test_a_shortened_stay_ends_at_its_new_checkout(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    await start_worker(IKW_CHECKOUT_GRACE="1s")
    booking = reservation()
    await publish(stay_grant("g-short", booking, starts=0, ends=120))
    await wait_for(lambda: live(sandbox, "g-short"), 15, "the key to be sent")
    shortened = time.time()
    await publish(stay_grant("g-short", booking, starts=0, ends=3, revision=1))
    deleted = await gone(sandbox, "g-short", 20)
    assert shortened + 3 + 1 - 0.5 <= deleted <= shortened + 12


async def test_a_stale_revision_changes_nothing(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names
) -> None:
    service = await start_worker()
    booking = reservation()
    await publish(stay_grant("g-stale", booking, starts=0, ends=60, revision=2))
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS")
    await publish(stay_grant("g-stale", booking, starts=0, ends=3, revision=1))
    await wait_for(lambda: stays(service, "stale_revision") == 1, 15, "the stale revision")
    assert len(sandbox.twilio.outbox) == 1 and live(sandbox, "g-stale")
    assert dead_lettered(service) == 0


async def test_a_short_key_is_renewed_and_the_guest_is_never_without_one(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    sandbox.seam.key_lifetime = 6  # seconds: renewed 2 s before it expires
    await start_worker(IKW_RENEW_BEFORE="2s", IKW_CHECKOUT_GRACE="1s")
    checkout = time.time() + 13
    await publish(stay_grant("g-renew", reservation(), starts=0, ends=13))
    await wait_for(lambda: live(sandbox, "g-renew"), 15, "the first key")
    without: list[float] = []
    while time.time() < checkout:  # sampled until checkout, on the stand-in's own clock
        if not live(sandbox, "g-renew"):
            without.append(time.time())
        await asyncio.sleep(0.1)
    assert without == []
    bodies = [sms["body"] for sms in sandbox.twilio.outbox]
    urls = [key["instant_key_url"] for key in sandbox.seam.issued]
    assert len(bodies) >= 2 and all(any(u in b for u in urls) for b in bodies)
    assert len({u for u in urls if any(u in b for b in bodies)}) == len(bodies)  # a new key each
    assert "here is your key" in bodies[0] and all("your new key" in b for b in bodies[1:])
    await gone(sandbox, "g-renew", 15)


async def test_a_cancellation_before_delivery_sends_and_mints_nothing(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names
) -> None:
    service = await start_worker()
    booking = reservation()
    await publish(stay_grant("g-cancel", booking, starts=5, ends=30, deliver=3))
    await wait_for(lambda: stays(service, "scheduled") == 1, 15, "the stay to be scheduled")
    await publish(cancel("g-cancel", booking))
    await wait_for(lambda: settled(service, names.revocations, "acked") == 1, 15, "the cancel")
    await wait_for(lambda: settled(service, names.deliveries, "revoked") == 1, 20, "the timer")
    assert sandbox.twilio.outbox == [] and sandbox.smtp.messages == []
    assert sandbox.seam.issued == []
    assert dead_lettered(service) == 0


async def test_an_early_checkout_deletes_now(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    await start_worker()
    booking = reservation()
    await publish(stay_grant("g-early", booking, starts=0, ends=600))
    await wait_for(lambda: live(sandbox, "g-early"), 15, "the key to be sent")
    await publish(cancel("g-early", booking, reason="checked_out"))
    await gone(sandbox, "g-early", 10)


async def test_overlapping_stays_keep_the_key_the_second_still_needs(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names
) -> None:
    service = await start_worker(IKW_CHECKOUT_GRACE="1s")
    await publish(stay_grant("g-both", reservation(), starts=0, ends=3))
    await wait_for(lambda: live(sandbox, "g-both"), 15, "the first stay's key")
    second_checkout = time.time() + 12
    await publish(stay_grant("g-both", reservation(), starts=1, ends=12))
    await wait_for(lambda: stays(service, "stay_ended") == 1, 20, "the first checkout")
    assert live(sandbox, "g-both")  # the second stay covers this moment
    deleted = await gone(sandbox, "g-both", 25)
    assert deleted >= second_checkout


async def test_a_worker_restarted_between_scheduling_and_delivery_still_delivers_and_deletes(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    first = await start_worker(IKW_CHECKOUT_GRACE="1s")
    await publish(stay_grant("g-restart", reservation(), starts=6, ends=10, deliver=4))
    await wait_for(lambda: stays(first, "scheduled") == 1, 15, "the stay to be scheduled")
    await first.stop()
    await start_worker(IKW_CHECKOUT_GRACE="1s")  # a fresh replica: it reads the record
    await wait_for(lambda: sandbox.twilio.outbox, 20, "the SMS from the new replica")
    await wait_for(lambda: live(sandbox, "g-restart"), 5, "the key")
    await gone(sandbox, "g-restart", 20)


async def test_a_stay_that_has_ended_gets_stay_ended_and_no_dead_letter(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Any
) -> None:
    service = await start_worker()
    await publish(stay_grant("g-late", reservation(), starts=-7200, ends=-60))
    await wait_for(lambda: stays(service, "stay_ended") == 1, 15, "stay_ended")
    assert sandbox.twilio.outbox == [] and sandbox.seam.issued == []
    assert await drain(amqp, names.dead) == []


async def test_a_reservation_of_another_identity_is_refused(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Any
) -> None:
    service = await start_worker()
    booking = reservation()
    await publish(stay_grant("g-owner", booking, starts=60, ends=600, deliver=50))
    await wait_for(lambda: stays(service, "scheduled") == 1, 15, "the stay to be scheduled")
    await publish(stay_grant("g-intruder", booking, starts=0, ends=600, revision=5))
    [dead] = await dead_letters(amqp, names, 1)
    assert dead.headers["x-ikw-reason"] == "reservation_identity_mismatch"
    await publish(cancel("g-intruder", booking))
    [dead] = await dead_letters(amqp, names, 1)
    assert dead.headers["x-ikw-reason"] == "reservation_identity_mismatch"
    assert sandbox.twilio.outbox == []
