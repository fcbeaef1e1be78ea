"""The grant rules over in-memory ports: reuse, convergence across replicas, channel order."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.builders import body, grant
from worker.errors import ChannelRefused, Permanent
from worker.events import AccessGranted, parse
from worker.flows import Flows
from worker.ports import InstantKey, KeyMessage, UserIdentity

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


class MemorySeam:
    def __init__(self) -> None:
        self.identity = UserIdentity("ui-1", "guest-1")
        self.keys: dict[str, InstantKey] = {}
        self.rival: InstantKey | None = None  # minted by another replica during our generate

    def add_key(self, lifetime: timedelta, created: datetime = NOW) -> InstantKey:
        key_id = str(uuid.uuid4())
        key = InstantKey(key_id, "ui-1", created, created + lifetime, f"https://ik/{key_id}")
        self.keys[key_id] = key
        return key

    async def get_user_identity(self, **_: str | None) -> UserIdentity | None:
        return self.identity

    async def create_user_identity(self, **_: str | None) -> UserIdentity:
        raise AssertionError("not expected")

    async def list_instant_keys(self, user_identity_id: str) -> list[InstantKey]:
        return list(self.keys.values())

    async def generate_instant_key(self, user_identity_id: str, **_: object) -> InstantKey:
        if self.rival:
            self.keys[self.rival.instant_key_id] = self.rival
        return self.add_key(timedelta(hours=48), NOW + timedelta(milliseconds=5))

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

    async def schedule_cleanup(self, key: InstantKey) -> None:
        self.keys.append(key.instant_key_id)


def flows(seam: MemorySeam, *channels: Recorder) -> tuple[Flows, Scheduled]:
    scheduled = Scheduled()
    ports = {c.name: c for c in channels}
    flow = Flows(seam, ports, scheduled, min_key_lifetime=timedelta(hours=1), clock=lambda: NOW)
    return flow, scheduled


def event(**kwargs: object) -> AccessGranted:
    parsed = parse(body(grant("guest-1", **kwargs)), None)
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
    old = seam.add_key(timedelta(minutes=30))
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
    assert scheduled.keys == ["rival"]


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
