"""Grant, revoke and cleanup, over the ports in ports.py: no AMQP or HTTP in here."""

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from worker.actions import Action, Outcome
from worker.errors import ChannelRefused, Permanent, Reason, SeamRejected, TakenBackError, Transient
from worker.events import (
    AccessDelivered,
    AccessGranted,
    AccessRevoked,
    ChannelName,
    DeletedWhy,
    IdentityRef,
    KeyCleanup,
    KeyDeleted,
    KnownIdentity,
    RevokeCompleted,
    StayDelivery,
    StayEnd,
)
from worker.guest_name import clean_name
from worker.logs import mask_email, mask_phone
from worker.ports import (
    Announcer,
    Channel,
    Fence,
    InstantKey,
    KeyMessage,
    Scheduler,
    Seam,
    UserIdentity,
)
from worker.record import identity_names
from worker.stays import DEFAULT_STAY_TIMES, ForStay, Stays, StayTimes

log = logging.getLogger("worker.flows")

# Seam calls in flight at once when one message deletes or schedules many keys.
PARALLEL_CALLS = 8


def utcnow() -> datetime:
    return datetime.now(UTC)


def _retrieved(task: "asyncio.Future[InstantKey]") -> None:
    """A mint whose message gave up first fails silently: the retry finds the key, or not."""
    if not task.cancelled():
        task.exception()


class KeyedLocks:
    """One asyncio.Lock per name, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)


class Flows:
    def __init__(
        self,
        seam: Seam,
        channels: Mapping[str, Channel],
        scheduler: Scheduler,
        fence: Fence,
        announcer: Announcer,
        *,
        min_key_lifetime: timedelta,
        revoke_retention: timedelta = timedelta(days=30),
        stay_times: StayTimes = DEFAULT_STAY_TIMES,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.seam = seam
        self.channels = channels
        self.scheduler = scheduler
        self.fence = fence
        self.announcer = announcer
        self.min_key_lifetime = min_key_lifetime
        self.revoke_retention = revoke_retention
        self.clock = clock
        self.locks = KeyedLocks()
        self.stays = Stays(self, stay_times)

    async def grant(
        self, event: AccessGranted, still_held: Callable[[], bool] = lambda: True
    ) -> Outcome:
        """``still_held`` says whether the message is still ours to ack; when it is not, another
        delivery of it will do the work, so nothing is sent. A grant with a stay is scheduled."""
        self._check_fresh(event)
        await self.fence.wait_caught_up()
        if event.stay is not None:
            return await self.stays.accept(event, still_held)
        return await self.deliver(event, still_held)

    async def stay_delivery(
        self, timer: StayDelivery, still_held: Callable[[], bool] = lambda: True
    ) -> Outcome:
        return await self.stays.delivery_due(timer, still_held)

    async def stay_end(self, timer: StayEnd) -> Outcome:
        return await self.stays.end_due(timer)

    async def deliver(
        self, event: AccessGranted, still_held: Callable[[], bool], stay: ForStay | None = None
    ) -> Outcome:
        """Find or mint the identity's key and send it: a grant now, or a stay's at its time."""
        guest = event.user_identity
        names = self.names_of(guest) + ([f"res:{stay.reservation_key}"] if stay else [])
        if self.fenced(event, names):
            return Outcome(Action.FENCED)
        # The whole grant holds the identity's lock: a revoke handled by this process waits for
        # it, and is never overtaken by it.
        async with self.locks.hold(guest.lock_key):
            identity, created = await self._resolve_or_create(event)
            names += self.names_of(identity)
            if self.fenced(event, names):
                return Outcome(Action.FENCED)
            key, minted = await self._fetch_or_create_key(
                identity.user_identity_id, event, created, stay.usable if stay else None
            )
            # A revoke another replica recorded while we minted is seen now, before delivery.
            if self.fenced(event, names):
                if minted:
                    await self.delete(key, "revoked")
                return Outcome(
                    Action.FENCED, key_id=key.instant_key_id, minted=minted, deleted=int(minted)
                )
            # Recorded before it is sent: a key delivered for this grant outlives only revokes
            # that occurred before it (an unrecorded key is treated as revoked).
            await self.fence.record_delivery(
                key.instant_key_id,
                event.occurred_at,
                key.expires_at,
                (stay.reservation_key, stay.contact) if stay else None,
            )
            message = _key_message(event, identity, key, stay.reason if stay else "initial")
            channel, sent_id = await self._send(message, event.delivery.channels, still_held)
        await self.announcer.announce(
            _delivered(event, identity, key, (channel, sent_id), minted, stay, self.clock())
        )
        return Outcome(
            Action.GRANTED,
            channel=channel,
            key_id=key.instant_key_id,
            minted=minted,
            provider_message_id=sent_id,
            identity_id=identity.user_identity_id,
            created=created,
            key=key,
        )

    @staticmethod
    def names_of(who: IdentityRef | UserIdentity) -> list[str]:
        return identity_names(who.user_identity_id, who.user_identity_key)

    def _check_fresh(self, event: AccessGranted) -> None:
        if self.clock() - event.occurred_at > self.revoke_retention:
            raise Permanent(
                "the grant occurred longer ago than IKW_REVOKE_RETENTION: a revoke of it could "
                "no longer be seen",
                reason=Reason.STALE_GRANT,
            )

    async def revoke(self, event: AccessRevoked) -> Outcome:
        if event.reservation_key is not None:
            return await self.stays.cancel(event)
        ref = event.user_identity
        names = identity_names(ref.user_identity_id, ref.user_identity_key)
        # Recorded before any Seam call: it fences at once, whatever Seam does.
        await self.fence.record_revoke(names, event.occurred_at)
        deleted: list[InstantKey] = []
        kept = 0
        async with self.locks.hold(ref.lock_key):
            identity = await self.resolve(ref)
            if identity is not None:
                known = identity_names(identity.user_identity_id, identity.user_identity_key)
                if set(known) - set(names):
                    await self.fence.record_revoke(names + known, event.occurred_at)
                # Recording read on to our own entry: deliveries recorded before it by any
                # replica are known here. Keys delivered for later grants stay.
                keys = await self.seam.list_instant_keys(identity.user_identity_id)
                deleted = [key for key in keys if self._revoked_by(key, event)]
                kept = len(keys) - len(deleted)
                await self.each(deleted, lambda key: self.delete(key, "revoked", ref))
        identity_id = identity.user_identity_id if identity else None
        return await self.revoked(event, identity_id, len(deleted), kept)

    async def revoked(
        self, event: AccessRevoked, identity_id: str | None, deleted: int, kept: int
    ) -> Outcome:
        """A revoke has done its work: its producer hears how much."""
        await self.announcer.announce(
            RevokeCompleted(
                occurred_at=self.clock(),
                event_id=event.event_id,
                grant_id=event.grant_id,
                user_identity=KnownIdentity(
                    user_identity_id=identity_id,
                    user_identity_key=event.user_identity.user_identity_key,
                ),
                revoked_at=event.occurred_at,
                deleted=deleted,
                kept=kept,
            )
        )
        return Outcome(Action.REVOKED, deleted=deleted, identity_id=identity_id)

    def _revoked_by(self, key: InstantKey, event: AccessRevoked) -> bool:
        """A key delivered for a grant that occurred at or before the revoke, or for a grant
        the record does not know (treated as revoked)."""
        grant_at = self.fence.delivered_for(key.instant_key_id)
        return grant_at is None or grant_at <= event.occurred_at

    async def cleanup(self, event: KeyCleanup) -> Outcome:
        early = event.expires_at - self.clock()
        if early > timedelta(seconds=1):
            # Came due early (clock skew, a replay): wait out the rest in the delay queues.
            await self.scheduler.schedule_cleanup(
                event.instant_key_id, event.user_identity_id, event.expires_at
            )
            return Outcome(Action.CLEANUP_RESCHEDULED, key_id=event.instant_key_id)
        key = await self.seam.get_instant_key(event.instant_key_id)
        if key is None:
            return Outcome(Action.CLEANED_UP, key_id=event.instant_key_id)  # already gone
        if key.user_identity_id != event.user_identity_id:
            raise Permanent(
                "the key belongs to another identity than the cleanup names",
                reason=Reason.KEY_IDENTITY_MISMATCH,
            )
        await self.delete(key, "expired")
        return Outcome(Action.CLEANED_UP, key_id=event.instant_key_id, deleted=1)

    def fenced(self, event: AccessGranted, names: Iterable[str]) -> bool:
        revoked = self.fence.revoked_at(names)
        return revoked is not None and event.occurred_at <= revoked

    async def resolve(self, ref: IdentityRef) -> UserIdentity | None:
        if ref.user_identity_id:
            return await self.seam.get_user_identity(user_identity_id=ref.user_identity_id)
        return await self.seam.get_user_identity(user_identity_key=ref.user_identity_key)

    async def _resolve_or_create(self, event: AccessGranted) -> tuple[UserIdentity, bool]:
        """The identity, and whether we just created it (then it has no keys yet)."""
        guest = event.user_identity
        identity = await self.resolve(guest)
        if identity is not None:
            return identity, False
        if guest.user_identity_id and not guest.user_identity_key:
            raise Permanent("user_identity_id is unknown to Seam", reason=Reason.IDENTITY_NOT_FOUND)
        contacts = {"email_address": guest.email_address, "phone_number": guest.phone_number}
        try:
            identity = await self._create(event, **contacts)
        except SeamRejected as exc:
            # Another replica may have created it between our get and create.
            identity = await self.seam.get_user_identity(user_identity_key=guest.user_identity_key)
            if identity is not None:
                return identity, False
            if not any(contacts.values()):
                raise
            # Seam keeps email addresses and phone numbers unique across identities: a returning
            # guest booked under a new key is created without them. The key still goes to the
            # event's contacts.
            log.info(
                "creating the identity without its contacts, which Seam refused",
                extra={"ctx": {"event_id": event.event_id, "seam_error": exc.error_type}},
            )
            identity = await self._create(event, email_address=None, phone_number=None)
        return identity, True

    async def _create(
        self, event: AccessGranted, *, email_address: str | None, phone_number: str | None
    ) -> UserIdentity:
        guest = event.user_identity
        identity = await self.seam.create_user_identity(
            user_identity_key=guest.user_identity_key,
            full_name=clean_name(guest.full_name),  # a stranger wrote it: Seam shows it too
            email_address=email_address,
            phone_number=phone_number,
        )
        # The message's own line says so too (``created``); this one adds the masked contacts.
        log.debug(
            "created user identity",
            extra={
                "ctx": {
                    "event_id": event.event_id,
                    "user_identity_id": identity.user_identity_id,
                    "phone": mask_phone(phone_number),
                    "email": mask_email(email_address),
                }
            },
        )
        return identity

    async def _fetch_or_create_key(
        self,
        user_identity_id: str,
        event: AccessGranted,
        created: bool,
        worth: Callable[[InstantKey], bool] | None = None,
    ) -> tuple[InstantKey, bool]:
        """The key to deliver, and whether we minted it (``worth``: which keys will do, for a
        stay). Every key this returns or leaves in Seam has a confirmed cleanup timer."""
        # An identity we have just created has no keys: no need to ask.
        before = [] if created else await self.seam.list_instant_keys(user_identity_id)
        usable = [key for key in before if worth(key)] if worth else self._usable(before)
        if usable:
            kept = await self._converge(usable)
            # By id: comparing the keys themselves made this quadratic (1.3 s at 2,000 keys).
            ids = {key.instant_key_id for key in usable}
            await self._schedule([k for k in before if k.instant_key_id not in ids] + [kept])
            return kept, False
        # Generated and scheduled in one step that a deadline or a shutdown cannot cut in two:
        # no minted key is ever left without its timer, whatever its lifetime.
        minting = asyncio.ensure_future(self._mint(user_identity_id, event, before))
        minting.add_done_callback(_retrieved)
        minted = await asyncio.shield(minting)
        # Another replica may have minted one at the same time: list again and converge on the
        # earliest of the keys that are new since our first look.
        old = {key.instant_key_id for key in before}
        after = await self.seam.list_instant_keys(user_identity_id)
        fresh = [key for key in after if key.instant_key_id not in old]
        if not fresh:
            raise Transient("the key Seam generated was deleted before it could be delivered")
        kept = await self._converge(fresh)
        if kept.instant_key_id != minted.instant_key_id:
            await self._schedule([kept])  # its minter may have died before scheduling it
        return kept, kept.instant_key_id == minted.instant_key_id

    async def _mint(
        self, user_identity_id: str, event: AccessGranted, before: list[InstantKey]
    ) -> InstantKey:
        minted = await self.seam.generate_instant_key(
            user_identity_id,
            customization_profile_id=event.instant_key.customization_profile_id,
            max_use_count=event.instant_key.max_use_count,
        )
        await self._schedule([minted, *before])
        return minted

    def _usable(self, keys: list[InstantKey]) -> list[InstantKey]:
        """Keys worth delivering again: at least IKW_MIN_KEY_LIFETIME left, or, for keys Seam
        issues for less than that, at least half their life (so a retried or redelivered grant
        reuses the short key it minted instead of minting another)."""
        now = self.clock()
        return [
            key
            for key in keys
            if key.expires_at - now
            >= min(self.min_key_lifetime, (key.expires_at - key.created_at) / 2)
            and key.expires_at > now
        ]

    async def _converge(self, keys: list[InstantKey]) -> InstantKey:
        """Keep the earliest created key (ties: smallest id) and delete the others."""
        keep, *extra = sorted(keys, key=lambda k: (k.created_at, k.instant_key_id))
        await self.each(extra, lambda key: self.delete(key, "converged"))
        if extra:
            log.info(
                "deleted duplicate instant keys",
                extra={"ctx": {"kept": keep.instant_key_id, "deleted": len(extra)}},
            )
        return keep

    async def delete(
        self, key: InstantKey, why: DeletedWhy, named: IdentityRef | None = None
    ) -> None:
        """Delete and announce it (``named``: how the event named the identity)."""
        await self.seam.delete_instant_key(key.instant_key_id)
        await self.announcer.announce(
            KeyDeleted(
                occurred_at=self.clock(),
                instant_key_id=key.instant_key_id,
                user_identity=KnownIdentity(
                    user_identity_id=key.user_identity_id,
                    user_identity_key=named.user_identity_key if named else None,
                ),
                why=why,
            )
        )

    async def _schedule(self, keys: list[InstantKey]) -> None:
        now = self.clock()
        live = {key.instant_key_id: key for key in keys if key.expires_at > now}
        await self.each(
            list(live.values()),
            lambda key: self.scheduler.schedule_cleanup(
                key.instant_key_id, key.user_identity_id, key.expires_at
            ),
        )

    @staticmethod
    async def each(
        keys: Sequence[InstantKey], call: Callable[[InstantKey], Awaitable[None]]
    ) -> None:
        """``call`` for every key, PARALLEL_CALLS at a time; raises the first failure."""
        if len(keys) <= 1:  # the usual case (a grant's one key): no tasks, no gate
            for key in keys:
                await call(key)
            return
        gate = asyncio.Semaphore(PARALLEL_CALLS)

        async def one(key: InstantKey) -> None:
            async with gate:
                await call(key)

        results = await asyncio.gather(*(one(key) for key in keys), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _send(
        self, message: KeyMessage, order: Sequence[ChannelName], still_held: Callable[[], bool]
    ) -> tuple[ChannelName, str]:
        """The channel that took the message, and the provider's id for it."""
        refusals = []
        for name in order:
            if not still_held():
                raise TakenBackError("the broker took the message back before delivery")
            channel = self.channels.get(name)
            if channel is None:
                refusals.append(f"{name}: not configured")
                continue
            if not channel.reaches(message):
                refusals.append(f"{name}: no contact")
                continue
            try:
                sent_id = await channel.send(message)
            except ChannelRefused as exc:
                refusals.append(f"{name}: refused ({exc.code or exc})")
                continue
            return name, sent_id
        raise Permanent("; ".join(refusals), reason=Reason.NO_CHANNEL_ACCEPTED)


def _delivered(
    event: AccessGranted,
    identity: UserIdentity,
    key: InstantKey,
    sent: tuple[ChannelName, str],
    minted: bool,
    stay: ForStay | None,
    now: datetime,
) -> AccessDelivered:
    return AccessDelivered(
        occurred_at=now,
        event_id=event.event_id,
        grant_id=event.grant_id,
        user_identity=KnownIdentity(
            user_identity_id=identity.user_identity_id,
            user_identity_key=identity.user_identity_key or event.user_identity.user_identity_key,
        ),
        instant_key_id=key.instant_key_id,
        expires_at=key.expires_at,
        channel=sent[0],
        provider_message_id=sent[1],
        minted=minted,
        reservation_key=stay.reservation_key if stay else None,
        revision=stay.revision if stay else None,
        delivery_reason=stay.reason if stay else None,
    )


def _key_message(
    event: AccessGranted, identity: UserIdentity, key: InstantKey, reason: str
) -> KeyMessage:
    """What the guest is sent: the event's contact details first, then Seam's."""
    guest = event.user_identity
    return KeyMessage(
        full_name=guest.full_name or identity.full_name,
        phone_number=guest.phone_number or identity.phone_number,
        email_address=guest.email_address or identity.email_address,
        locale=event.delivery.locale,
        expires_at=key.expires_at,
        url=key.instant_key_url,
        time_zone=event.delivery.time_zone,
        property_name=event.delivery.property_name,
        reason=reason,
    )
