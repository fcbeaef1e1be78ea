"""The flows over in-memory ports: reuse, convergence across replicas, channel order, timers for
every key, returning guests, the revocation fence and checked cleanups."""

import asyncio
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.builders import body, grant, revoke
from worker.actions import Action
from worker.broker.fence import stay_entry
from worker.errors import ChannelRefused, Permanent, SeamRejected, Transient
from worker.events import (
    AccessDelivered,
    AccessGranted,
    AccessRevoked,
    Announcement,
    KeyCleanup,
    KeyDeleted,
    RevokeCompleted,
    StayDelivery,
    StayEnd,
    parse,
)
from worker.flows import Flows
from worker.ports import InstantKey, KeyMessage, UserIdentity
from worker.record import Record, StayRecord, millis

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


class MemorySeam:
    def __init__(self) -> None:
        self.identity: UserIdentity | None = UserIdentity("ui-1", "guest-1")
        self.keys: dict[str, InstantKey] = {}
        self.rival: InstantKey | None = None  # minted by another replica during our generate
        self.key_lifetime = timedelta(hours=48)
        self.taken_contacts: set[str] = set()  # held by other identities: Seam refuses them
        self.created: list[dict[str, str | None]] = []
        self.on_generate: list[object] = []

    def add_key(self, lifetime: timedelta, created: datetime = NOW) -> InstantKey:
        key_id = str(uuid.uuid4())
        key = InstantKey(key_id, "ui-1", created, created + lifetime, f"https://ik/{key_id}")
        self.keys[key_id] = key
        return key

    async def get_user_identity(self, **_: str | None) -> UserIdentity | None:
        return self.identity

    async def create_user_identity(self, **fields: str | None) -> UserIdentity:
        if {fields["email_address"], fields["phone_number"]} & self.taken_contacts:
            raise SeamRejected("seam answered 400", error_type="user_identity_email_taken")
        self.created.append(fields)
        self.identity = UserIdentity("ui-1", fields["user_identity_key"])
        return self.identity

    async def list_instant_keys(self, user_identity_id: str) -> list[InstantKey]:
        return list(self.keys.values())

    async def get_instant_key(self, instant_key_id: str) -> InstantKey | None:
        return self.keys.get(instant_key_id)

    async def generate_instant_key(self, user_identity_id: str, **_: object) -> InstantKey:
        if self.rival:
            self.keys[self.rival.instant_key_id] = self.rival
        for action in self.on_generate:
            action()  # type: ignore[operator]
        return self.add_key(self.key_lifetime, NOW + timedelta(milliseconds=5))

    async def delete_instant_key(self, instant_key_id: str) -> None:
        self.keys.pop(instant_key_id, None)

    async def check(self) -> None:
        pass


class Recorder:
    def __init__(self, name: str, refuse: bool = False) -> None:
        self.name = name
        self.refuse = refuse
        self.sent: list[str] = []

    def reaches(self, message: KeyMessage) -> bool:
        return bool(message.phone_number if self.name == "sms" else message.email_address)

    async def send(self, message: KeyMessage) -> str:
        if self.refuse:
            raise ChannelRefused("refused", code="21610")
        self.sent.append(message.url)
        return "id"

    async def check(self) -> None:
        pass

    async def close(self) -> None:
        pass


class Scheduled:
    def __init__(self) -> None:
        self.keys: list[str] = []
        self.timers: list[StayDelivery | StayEnd] = []
        self.fail = False
        self.one = asyncio.Event()

    async def schedule_cleanup(self, instant_key_id: str, user_identity_id: str, _: object) -> None:
        if self.fail:
            raise ConnectionError("the broker is gone")
        self.keys.append(instant_key_id)
        self.one.set()

    async def schedule_stay(self, timer: StayDelivery | StayEnd) -> None:
        self.timers.append(timer)


class MemoryFence:
    """The record without its stream: entries applied at once."""

    def __init__(self) -> None:
        self.record = Record(timedelta(days=30), lambda: datetime.now(UTC))

    def revoked_at(self, names: Iterable[str]) -> datetime | None:
        return self.record.revoked_at(names)

    def delivered_for(self, instant_key_id: str) -> datetime | None:
        return self.record.delivered_for(instant_key_id)

    async def record_revoke(self, names: Iterable[str], occurred_at: datetime) -> None:
        self.record.apply({"t": "revoke", "names": list(names), "at": millis(occurred_at, up=True)})

    async def record_delivery(
        self, instant_key_id: str, grant_at: datetime, expires_at: datetime, stay: Any = None
    ) -> None:
        reservation, contact = stay or (None, None)
        entry = {"t": "delivered", "key": instant_key_id, "grant_at": millis(grant_at)}
        self.record.apply(
            entry | {"expires_at": millis(expires_at), "r": reservation, "c": contact}
        )

    async def record_stay(self, stay: StayRecord, reservation_key: str) -> None:
        assert self.record.apply(stay_entry(stay, reservation_key))

    async def wait_caught_up(self) -> None:
        pass


class Heard:
    """The outcome events the flows announced."""

    def __init__(self) -> None:
        self.outcomes: list[Announcement] = []

    async def announce(self, outcome: Announcement) -> None:
        self.outcomes.append(outcome)


def flows(
    seam: MemorySeam,
    *channels: Recorder,
    fence: MemoryFence | None = None,
    heard: Heard | None = None,
) -> tuple[Flows, Scheduled]:
    scheduled = Scheduled()
    ports = {c.name: c for c in channels}
    flow = Flows(
        seam,
        ports,
        scheduled,
        fence or MemoryFence(),
        heard or Heard(),
        min_key_lifetime=timedelta(hours=1),
        clock=lambda: NOW,
    )
    return flow, scheduled


def at(moment: datetime) -> str:
    return moment.isoformat()


def event(occurred_at: datetime = NOW - timedelta(minutes=1), **kwargs: Any) -> AccessGranted:
    parsed = parse(body(grant("guest-1", occurred_at=at(occurred_at), **kwargs)), None)
    assert isinstance(parsed, AccessGranted)
    return parsed


async def test_a_key_with_enough_life_left_is_reused() -> None:
    seam = MemorySeam()
    existing = seam.add_key(timedelta(hours=3))
    sms = Recorder("sms")
    flow, scheduled = flows(seam, sms)
    outcome = await flow.grant(event())
    assert (outcome.minted, sms.sent) == (False, [existing.instant_key_url])
    assert scheduled.keys == [existing.instant_key_id]


async def test_a_key_about_to_expire_is_replaced() -> None:
    seam = MemorySeam()
    old = seam.add_key(timedelta(hours=48), created=NOW - timedelta(hours=47, minutes=30))
    sms = Recorder("sms")
    flow, _ = flows(seam, sms)
    outcome = await flow.grant(event())
    assert outcome.minted
    assert sms.sent and sms.sent[0] != old.instant_key_url


async def test_a_rival_replicas_earlier_key_wins_and_ours_is_deleted() -> None:
    seam = MemorySeam()
    seam.rival = InstantKey("rival", "ui-1", NOW, NOW + timedelta(hours=48), "https://ik/rival")
    sms = Recorder("sms")
    flow, scheduled = flows(seam, sms)
    await flow.grant(event())
    assert sms.sent == ["https://ik/rival"]
    assert list(seam.keys) == ["rival"]
    # Ours was given its timer the moment it was minted; the rival's is scheduled again in case
    # its minter died before it could.
    assert scheduled.keys[1:] == ["rival"] and len(scheduled.keys) == 2


async def test_channels_are_tried_in_order_and_a_refusal_falls_through() -> None:
    seam = MemorySeam()
    sms, email = Recorder("sms", refuse=True), Recorder("email")
    flow, _ = flows(seam, sms, email)
    outcome = await flow.grant(event(channels=("sms", "email")))
    assert outcome.channel == "email" and len(email.sent) == 1


async def test_no_channel_accepting_names_each_refusal_without_contacts() -> None:
    seam = MemorySeam()
    flow, scheduled = flows(seam, Recorder("sms", refuse=True))
    with pytest.raises(Permanent) as caught:
        await flow.grant(event(channels=("sms", "email")))
    assert caught.value.reason == "no_channel_accepted"
    assert str(caught.value) == "sms: refused (21610); email: not configured"
    assert len(scheduled.keys) == 1  # cleanup was scheduled before delivery was tried


async def test_a_minted_key_shorter_than_the_minimum_is_delivered_and_scheduled() -> None:
    seam = MemorySeam()
    seam.key_lifetime = timedelta(minutes=10)
    sms = Recorder("sms")
    flow, scheduled = flows(seam, sms)
    outcome = await flow.grant(event())
    [key] = seam.keys.values()
    assert outcome.minted and sms.sent == [key.instant_key_url]
    assert scheduled.keys == [key.instant_key_id]


async def test_a_retry_after_a_failure_past_generation_reuses_the_short_key() -> None:
    seam = MemorySeam()
    seam.key_lifetime = timedelta(minutes=10)
    sms = Recorder("sms")
    flow, scheduled = flows(seam, sms)
    scheduled.fail = True
    with pytest.raises(ConnectionError):
        await flow.grant(event())
    scheduled.fail = False
    outcome = await flow.grant(event())
    [key] = seam.keys.values()  # not a second key
    assert not outcome.minted and sms.sent == [key.instant_key_url]
    assert scheduled.keys == [key.instant_key_id]


async def test_old_keys_left_in_seam_get_a_timer_too() -> None:
    seam = MemorySeam()
    old = seam.add_key(timedelta(hours=47, minutes=20), created=NOW - timedelta(hours=47))
    flow, scheduled = flows(seam, Recorder("sms"))
    await flow.grant(event())
    assert old.instant_key_id in scheduled.keys
    assert set(scheduled.keys) == set(seam.keys)


async def test_a_returning_guest_whose_contact_seam_holds_elsewhere_still_gets_the_key() -> None:
    seam = MemorySeam()
    seam.identity = None
    seam.taken_contacts = {"+14155550100"}
    sms = Recorder("sms")
    flow, _ = flows(seam, sms)
    outcome = await flow.grant(event())
    assert seam.created == [
        {
            "user_identity_key": "guest-1",
            "full_name": "Ada Lovelace",
            "email_address": None,
            "phone_number": None,
        }
    ]
    assert outcome.action is Action.GRANTED and len(sms.sent) == 1


async def test_a_grant_older_than_a_recorded_revoke_is_fenced_before_anything_happens() -> None:
    seam, fence = MemorySeam(), MemoryFence()
    sms = Recorder("sms")
    flow, _ = flows(seam, sms, fence=fence)
    await fence.record_revoke(["key:guest-1"], NOW)
    outcome = await flow.grant(event(NOW - timedelta(minutes=5)))
    assert outcome.action is Action.FENCED
    assert (sms.sent, seam.keys) == ([], {})


async def test_a_revoke_recorded_while_minting_deletes_the_minted_key() -> None:
    seam, fence = MemorySeam(), MemoryFence()
    sms = Recorder("sms")
    flow, _ = flows(seam, sms, fence=fence)
    # Another replica records a revoke, by id, while we generate.
    seam.on_generate.append(lambda: fence.record.revoked.update({"id:ui-1": millis(NOW)}))
    outcome = await flow.grant(event(NOW - timedelta(minutes=5)))
    assert (outcome.action, outcome.minted, outcome.deleted) == (Action.FENCED, True, 1)
    assert (sms.sent, seam.keys) == ([], {})


async def test_a_new_booking_after_a_revoke_is_delivered() -> None:
    seam, fence = MemorySeam(), MemoryFence()
    sms = Recorder("sms")
    flow, _ = flows(seam, sms, fence=fence)
    await fence.record_revoke(["key:guest-1"], NOW - timedelta(minutes=5))
    outcome = await flow.grant(event(NOW - timedelta(minutes=1)))
    assert outcome.action is Action.GRANTED and len(sms.sent) == 1


async def test_a_grant_older_than_the_revoke_retention_is_refused() -> None:
    flow, _ = flows(MemorySeam(), Recorder("sms"))
    with pytest.raises(Permanent) as caught:
        await flow.grant(event(NOW - timedelta(days=31)))
    assert caught.value.reason == "stale_grant"


def revoked_at(moment: datetime) -> AccessRevoked:
    parsed = parse(body(revoke("guest-1") | {"occurred_at": at(moment)}), None)
    assert isinstance(parsed, AccessRevoked)
    return parsed


async def test_a_revoke_is_recorded_by_key_and_id_then_deletes_every_key() -> None:
    seam, fence = MemorySeam(), MemoryFence()
    for _ in range(3):
        seam.add_key(timedelta(hours=3))
    flow, _ = flows(seam, fence=fence)
    outcome = await flow.revoke(revoked_at(NOW))
    assert (outcome.action, outcome.deleted, seam.keys) == (Action.REVOKED, 3, {})
    assert fence.record.revoked == {"key:guest-1": millis(NOW), "id:ui-1": millis(NOW)}


async def test_a_revoke_is_recorded_before_seam_answers() -> None:
    seam, fence = MemorySeam(), MemoryFence()

    async def down(**_: str | None) -> UserIdentity | None:
        raise Transient("seam answered 503")

    seam.get_user_identity = down  # type: ignore[method-assign]
    flow, _ = flows(seam, fence=fence)
    with pytest.raises(Transient):
        await flow.revoke(revoked_at(NOW))
    assert fence.record.revoked == {"key:guest-1": millis(NOW)}


async def test_a_revoke_deletes_keys_of_earlier_or_unknown_grants_and_says_so() -> None:
    seam, fence, heard = MemorySeam(), MemoryFence(), Heard()
    earlier, later, unknown = (seam.add_key(timedelta(hours=3)) for _ in range(3))
    await fence.record_delivery(
        earlier.instant_key_id, NOW - timedelta(hours=2), earlier.expires_at
    )
    await fence.record_delivery(later.instant_key_id, NOW, later.expires_at)
    flow, _ = flows(seam, fence=fence, heard=heard)
    revoke_event = revoked_at(NOW - timedelta(hours=1))
    outcome = await flow.revoke(revoke_event)
    assert outcome.deleted == 2 and list(seam.keys) == [later.instant_key_id]
    completed = heard.outcomes[-1]
    assert isinstance(completed, RevokeCompleted)
    assert completed.event_id == revoke_event.event_id
    assert completed.grant_id == revoke_event.grant_id
    assert (completed.deleted, completed.kept) == (2, 1)
    assert completed.revoked_at == revoke_event.occurred_at
    assert completed.user_identity.user_identity_id == "ui-1"
    assert {o.instant_key_id for o in heard.outcomes if isinstance(o, KeyDeleted)} == {
        earlier.instant_key_id,
        unknown.instant_key_id,
    }


async def test_a_key_is_recorded_as_delivered_for_its_grant_before_it_is_sent() -> None:
    seam, fence = MemorySeam(), MemoryFence()
    recorded: list[bool] = []

    class Checking(Recorder):
        async def send(self, message: KeyMessage) -> str:
            recorded.append(bool(fence.record.delivered))
            return await super().send(message)

    flow, _ = flows(seam, Checking("sms"), fence=fence)
    grant_event = event(NOW - timedelta(minutes=3))
    outcome = await flow.grant(grant_event)
    assert recorded == [True]
    assert outcome.key_id is not None
    assert list(fence.record.delivered) == [outcome.key_id]
    assert fence.delivered_for(outcome.key_id) == grant_event.occurred_at


def cleanup(key_id: str, identity: str = "ui-1") -> KeyCleanup:
    return KeyCleanup(
        type="instant_key.cleanup",
        version=1,
        instant_key_id=key_id,
        user_identity_id=identity,
        expires_at=NOW - timedelta(seconds=5),
    )


async def test_a_cleanup_deletes_only_a_key_of_the_identity_it_names() -> None:
    seam = MemorySeam()
    key = seam.add_key(timedelta(hours=3))
    flow, _ = flows(seam)
    with pytest.raises(Permanent) as caught:
        await flow.cleanup(cleanup(key.instant_key_id, identity="ui-other"))
    assert caught.value.reason == "key_identity_mismatch"
    assert key.instant_key_id in seam.keys
    assert (await flow.cleanup(cleanup(key.instant_key_id))).deleted == 1
    assert (await flow.cleanup(cleanup(key.instant_key_id))).deleted == 0  # gone: done


async def test_the_booking_system_hears_of_the_delivery_and_of_every_deletion() -> None:
    seam, heard = MemorySeam(), Heard()
    seam.rival = InstantKey("rival", "ui-1", NOW, NOW + timedelta(hours=48), "https://ik/rival")
    flow, _ = flows(seam, Recorder("sms"), heard=heard)
    grant_event = event()
    await flow.grant(grant_event)
    converged, delivered = heard.outcomes
    assert isinstance(converged, KeyDeleted) and converged.why == "converged"
    assert isinstance(delivered, AccessDelivered)
    assert (delivered.event_id, delivered.grant_id) == (grant_event.event_id, grant_event.grant_id)
    assert (delivered.instant_key_id, delivered.channel, delivered.minted) == (
        "rival",
        "sms",
        False,
    )
    assert delivered.provider_message_id == "id"
    assert "https://ik/" not in delivered.model_dump_json()
    assert "+1415" not in delivered.model_dump_json()

    await flow.cleanup(cleanup("rival"))
    assert heard.outcomes[-1] == KeyDeleted(
        occurred_at=NOW,
        instant_key_id="rival",
        user_identity=converged.user_identity,
        why="expired",
    )


async def test_a_deadline_during_generation_still_leaves_the_minted_key_a_timer() -> None:
    seam = MemorySeam()
    slow = asyncio.Event()
    real_generate = seam.generate_instant_key

    async def generate(user_identity_id: str, **options: object) -> InstantKey:
        await slow.wait()  # Seam answers after the message's deadline has passed
        return await real_generate(user_identity_id, **options)

    seam.generate_instant_key = generate  # type: ignore[method-assign]
    flow, scheduled = flows(seam, Recorder("sms"))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await flow.grant(event())
    slow.set()
    await asyncio.wait_for(scheduled.one.wait(), 5)
    assert scheduled.keys == list(seam.keys)


def stay_event(revision: int, deliver_in: timedelta) -> AccessGranted:
    start = NOW + deliver_in + timedelta(days=1)
    stay = {
        "reservation_key": "res-1",
        "starts_at": at(start),
        "ends_at": at(start + timedelta(days=2)),
        "deliver_at": at(NOW + deliver_in),
        "revision": revision,
    }
    return event(stay=stay)


async def test_a_stay_is_scheduled_not_sent_and_its_end_is_set() -> None:
    seam, heard = MemorySeam(), Heard()
    sms = Recorder("sms")
    flow, scheduled = flows(seam, sms, heard=heard)
    outcome = await flow.grant(stay_event(1, timedelta(days=3)))
    assert (outcome.action, sms.sent, seam.keys) == (Action.SCHEDULED, [], {})
    delivery, end = sorted(scheduled.timers, key=lambda t: t.type)
    assert isinstance(delivery, StayDelivery) and delivery.due_at == NOW + timedelta(days=3)
    assert isinstance(end, StayEnd) and end.revision == 1
    assert end.due_at == NOW + timedelta(days=6, hours=1)  # checkout plus the grace
    assert [o.type for o in heard.outcomes] == ["access.scheduled"]


async def test_a_higher_revision_recorded_elsewhere_first_makes_ours_stale() -> None:
    class Racing(MemoryFence):
        async def record_stay(self, stay: StayRecord, reservation_key: str) -> None:
            # Another replica's revision, recorded before ours: read back with it.
            higher = stay._replace(revision=stay.revision + 1, event_id="other")
            await super().record_stay(higher, reservation_key)
            await super().record_stay(stay, reservation_key)

    seam, sms = MemorySeam(), Recorder("sms")
    flow, scheduled = flows(seam, sms, fence=Racing())
    outcome = await flow.grant(stay_event(1, timedelta(0)))  # due now: it would send at once
    assert (outcome.action, sms.sent, scheduled.timers) == (Action.STALE_REVISION, [], [])
