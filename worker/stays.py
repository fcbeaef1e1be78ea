"""Stays: access that follows the booking. A grant with a ``stay`` is recorded and scheduled;
its key is sent at ``deliver_at``, renewed before it expires while the stay lasts, and deleted at
checkout (plus a grace) unless another stay of the identity still needs it. The stay's current
revision and window live in the record stream (worker/record.py), the timers in the delay queues:
a timer that no longer matches its stay's record is dropped."""

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal

from worker.actions import Action, Outcome
from worker.errors import Permanent, Reason
from worker.events import (
    AccessDeliveryFailed,
    AccessGranted,
    AccessRevoked,
    AccessScheduled,
    DeletedWhy,
    IdentityRef,
    KnownIdentity,
    Stay,
    StayDelivery,
    StayEnd,
)
from worker.ports import InstantKey
from worker.record import (
    Record,
    StayRecord,
    from_millis,
    identity_names,
    millis,
    reservation_name,
)

if TYPE_CHECKING:
    from worker.flows import Flows

log = logging.getLogger("worker.stays")


@dataclass(frozen=True)
class StayTimes:
    delivery_lead: timedelta = timedelta(hours=24)  # IKW_DELIVERY_LEAD
    checkout_grace: timedelta = timedelta(hours=1)  # IKW_CHECKOUT_GRACE
    renew_before: timedelta = timedelta(hours=2)  # IKW_RENEW_BEFORE


@dataclass(frozen=True)
class ForStay:
    """What a delivery for a stay adds to a grant's: which stay, why, and which keys will do."""

    reservation_key: str
    revision: int
    reason: Literal["initial", "renewal", "stay_changed"]
    contact: str
    usable: Callable[[InstantKey], bool]


DEFAULT_STAY_TIMES = StayTimes()


def contact_digest(event: AccessGranted) -> str:
    """Whom the key goes to, as a digest the record may keep (never the contact itself)."""
    guest, delivery = event.user_identity, event.delivery
    text = "\x1f".join([guest.phone_number or "", guest.email_address or "", *delivery.channels])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def deliver_at(stay: Stay, lead: timedelta) -> datetime:
    return min(stay.deliver_at or stay.starts_at - lead, stay.starts_at)


def _stay_of(event: AccessGranted) -> Stay:
    if event.stay is None:  # only a grant with a stay is scheduled: a forged timer
        raise Permanent(
            "the stay's timer carries a grant without a stay", reason=Reason.INVALID_EVENT
        )
    return event.stay


class Stays:
    def __init__(self, flows: "Flows", times: StayTimes) -> None:
        self.flows = flows
        self.times = times

    @property
    def record(self) -> Record:
        return self.flows.fence.record

    def renew_at(self, key: InstantKey) -> datetime:
        """``IKW_RENEW_BEFORE`` before it expires; for a key shorter than twice that, half-way."""
        life = key.expires_at - key.created_at
        if life < 2 * self.times.renew_before:
            return key.created_at + life / 2
        return key.expires_at - self.times.renew_before

    def _usable(self, key: InstantKey) -> bool:
        return self.renew_at(key) > self.flows.clock()

    # -- a grant with a stay --------------------------------------------------------------------

    async def accept(self, event: AccessGranted, still_held: Callable[[], bool]) -> Outcome:
        """Record the stay's revision, schedule its end, then schedule or send its key."""
        stay = _stay_of(event)
        guest = event.user_identity
        names = identity_names(guest.user_identity_id, guest.user_identity_key)
        new = StayRecord(
            stay.revision,
            millis(event.occurred_at),
            event.event_id,
            (*names, reservation_name(stay.reservation_key)),
            millis(deliver_at(stay, self.times.delivery_lead)),
            millis(stay.starts_at),
            millis(stay.ends_at),
        )
        current = self.record.stays.get(stay.reservation_key)
        if current is not None:
            await self._check_identity(current, guest)
            if current[:3] != new[:3] and current.revision >= new.revision:
                log.info(
                    "stale revision: changed nothing",
                    extra={"ctx": _ids(event) | {"applied_revision": current.revision}},
                )
                return Outcome(Action.STALE_REVISION)
        await self.flows.fence.record_stay(new, stay.reservation_key)
        # Read back: what other replicas recorded before ours is known now.
        if self.record.stays.get(stay.reservation_key, new)[:3] != new[:3]:
            return Outcome(Action.STALE_REVISION)  # a higher revision, handled elsewhere
        if self.flows.fenced(event, new.names):
            return Outcome(Action.FENCED)
        await self._schedule_end(stay, guest)
        now = self.flows.clock()
        if now >= stay.ends_at:
            await self.flows.announcer.announce(_ended(event, now))
            return Outcome(Action.STAY_ENDED)
        due = from_millis(new.deliver_at)
        if due > now:
            await self.flows.scheduler.schedule_stay(
                StayDelivery(
                    type="stay.delivery", version=1, reason="initial", due_at=due, grant=event
                )
            )
            await self.flows.announcer.announce(_scheduled(event, stay, due, now))
            return Outcome(Action.SCHEDULED)
        return await self._deliver(event, "initial", still_held)

    async def _schedule_end(self, stay: Stay, who: IdentityRef) -> None:
        """At checkout plus the grace (at once for a stay already past it)."""
        end = max(stay.ends_at + self.times.checkout_grace, self.flows.clock())
        await self.flows.scheduler.schedule_stay(
            StayEnd(
                type="stay.end",
                version=1,
                reservation_key=stay.reservation_key,
                revision=stay.revision,
                due_at=end,
                user_identity=IdentityRef(
                    user_identity_id=who.user_identity_id, user_identity_key=who.user_identity_key
                ),
            )
        )

    async def _check_identity(self, current: StayRecord, ref: IdentityRef) -> None:
        """The reservation is recorded for the identity the event names (by its key or id;
        Seam says which id a key has when the record named it the other way)."""
        names = set(self.flows.names_of(ref))
        if names & set(current.names):
            return
        identity = await self.flows.resolve(ref)
        if identity is None or not set(self.flows.names_of(identity)) & set(current.names):
            raise Permanent(
                "the reservation_key is recorded for another identity",
                reason=Reason.RESERVATION_IDENTITY_MISMATCH,
            )

    # -- the timers -----------------------------------------------------------------------------

    def _current(self, reservation_key: str, revision: int, event_id: str | None) -> bool:
        stay = self.record.stays.get(reservation_key)
        if stay is None or stay.revision != revision:
            return False
        return event_id is None or stay.event_id == event_id

    async def delivery_due(self, timer: StayDelivery, still_held: Callable[[], bool]) -> Outcome:
        event = timer.grant
        stay = _stay_of(event)
        if await self._early(timer):
            return Outcome(Action.TIMER_RESCHEDULED)
        await self.flows.fence.wait_caught_up()
        if not self._current(stay.reservation_key, stay.revision, event.event_id):
            return Outcome(Action.STALE_TIMER)
        now = self.flows.clock()
        if now >= stay.ends_at:
            if timer.reason == "initial":
                await self.flows.announcer.announce(_ended(event, now))
            return Outcome(Action.STAY_ENDED)
        return await self._deliver(event, timer.reason, still_held)

    async def end_due(self, timer: StayEnd) -> Outcome:
        if await self._early(timer):
            return Outcome(Action.TIMER_RESCHEDULED)
        await self.flows.fence.wait_caught_up()
        if not self._current(timer.reservation_key, timer.revision, None):
            return Outcome(Action.STALE_TIMER)
        deleted, _, identity_id = await self._end(
            timer.user_identity, timer.reservation_key, "stay_ended", None
        )
        return Outcome(Action.STAY_ENDED, deleted=deleted, identity_id=identity_id)

    async def _early(self, timer: StayDelivery | StayEnd) -> bool:
        """Came due early (clock skew, a replay): wait out the rest in the delay queues."""
        if timer.due_at - self.flows.clock() <= timedelta(seconds=1):
            return False
        await self.flows.scheduler.schedule_stay(timer)
        return True

    # -- delivering -----------------------------------------------------------------------------

    async def _deliver(
        self,
        event: AccessGranted,
        reason: Literal["initial", "renewal"],
        still_held: Callable[[], bool],
    ) -> Outcome:
        """Send the stay's key, unless the guest already holds a working one for it at the same
        contact; then make sure the key is renewed before it expires within the stay."""
        stay = _stay_of(event)
        contact = contact_digest(event)
        held, before = await self._held(event, stay.reservation_key, contact)
        if held is not None:
            # Kept for this grant now: a revoke between the two revisions leaves it.
            await self.flows.fence.record_delivery(
                held.instant_key_id,
                event.occurred_at,
                held.expires_at,
                (stay.reservation_key, contact),
            )
            await self._schedule_renewal(event, held)
            return Outcome(Action.ALREADY_HELD, key_id=held.instant_key_id)
        why = reason if reason == "renewal" or not before else "stay_changed"
        outcome = await self.flows.deliver(
            event,
            still_held,
            ForStay(stay.reservation_key, stay.revision, why, contact, self._usable),
        )
        if outcome.key is not None:
            await self._schedule_renewal(event, outcome.key)
        return outcome

    async def _held(
        self, event: AccessGranted, reservation_key: str, contact: str
    ) -> tuple[InstantKey | None, bool]:
        """A working key already delivered for this stay at this contact, if any; and whether
        any key of the identity was delivered for this stay before."""
        identity = await self.flows.resolve(event.user_identity)
        if identity is None:
            return None, False
        keys = await self.flows.seam.list_instant_keys(identity.user_identity_id)
        mine = [
            key
            for key in keys
            if (d := self.record.delivered.get(key.instant_key_id)) is not None
            and d.reservation == reservation_key
        ]
        for key in mine:
            delivery = self.record.delivered[key.instant_key_id]
            if delivery.contact == contact and self._usable(key):
                return key, True
        return None, bool(mine)

    async def _schedule_renewal(self, event: AccessGranted, key: InstantKey) -> None:
        stay = _stay_of(event)
        if key.expires_at >= stay.ends_at:
            return
        await self.flows.scheduler.schedule_stay(
            StayDelivery(
                type="stay.delivery",
                version=1,
                reason="renewal",
                due_at=max(self.renew_at(key), self.flows.clock()),
                grant=event,
            )
        )

    # -- ending ---------------------------------------------------------------------------------

    async def cancel(self, event: AccessRevoked) -> Outcome:
        """A revoke naming a reservation: the stay ends now, and every grant of it that occurred
        before the revoke is fenced."""
        assert event.reservation_key is not None
        ref = event.user_identity
        current = self.record.stays.get(event.reservation_key)
        if current is not None:
            await self._check_identity(current, ref)
        await self.flows.fence.record_revoke(
            [reservation_name(event.reservation_key)], event.occurred_at
        )
        why: DeletedWhy = event.reason or "cancelled"
        deleted, kept, identity_id = await self._end(
            ref, event.reservation_key, why, event.occurred_at
        )
        return await self.flows.revoked(event, identity_id, deleted, kept)

    async def _end(
        self, ref: IdentityRef, reservation_key: str, why: DeletedWhy, before: datetime | None
    ) -> tuple[int, int, str | None]:
        """Delete the identity's keys delivered for stays (for a revoke: for grants at or before
        it), unless another live stay of the identity covers now. (deleted, kept, identity id)"""
        async with self.flows.locks.hold(ref.lock_key):
            identity = await self.flows.resolve(ref)
            if identity is None:
                return 0, 0, None
            names = self.flows.names_of(ref) + self.flows.names_of(identity)
            keys = await self.flows.seam.list_instant_keys(identity.user_identity_id)
            if self._covered(names, reservation_key):
                log.info(
                    "kept the keys: another stay of the identity covers now",
                    extra={"ctx": {"reservation_key": reservation_key}},
                )
                return 0, len(keys), identity.user_identity_id
            doomed = [key for key in keys if self._for_a_stay(key, before)]
            await self.flows.each(doomed, lambda key: self.flows.delete(key, why, ref))
        return len(doomed), len(keys) - len(doomed), identity.user_identity_id

    def _covered(self, names: list[str], ending: str) -> bool:
        now = millis(self.flows.clock())
        grace = int(self.times.checkout_grace.total_seconds() * 1000)
        return any(
            stay.deliver_at <= now < stay.ends_at + grace and self.record.live(stay)
            for key, stay in self.record.stays_of(names).items()
            if key != ending
        )

    def _for_a_stay(self, key: InstantKey, before: datetime | None) -> bool:
        delivery = self.record.delivered.get(key.instant_key_id)
        if delivery is None or delivery.reservation is None:
            return False  # delivered for a grant without a stay, or unknown: its expiry's
        return before is None or delivery.grant_at <= millis(before, up=True)


def _ids(event: AccessGranted) -> dict[str, object]:
    stay = _stay_of(event)
    return {
        "event_id": event.event_id,
        "grant_id": event.grant_id,
        "reservation_key": stay.reservation_key,
        "revision": stay.revision,
    }


def _ended(event: AccessGranted, now: datetime) -> AccessDeliveryFailed:
    error = "the stay ended before its key could be sent"
    return AccessDeliveryFailed.of(event, "stay_ended", error, now)


def _scheduled(event: AccessGranted, stay: Stay, due: datetime, now: datetime) -> AccessScheduled:
    return AccessScheduled(
        occurred_at=now,
        event_id=event.event_id,
        grant_id=event.grant_id,
        user_identity=KnownIdentity.named(event.user_identity),
        reservation_key=stay.reservation_key,
        revision=stay.revision,
        deliver_at=due,
        starts_at=stay.starts_at,
        ends_at=stay.ends_at,
    )
