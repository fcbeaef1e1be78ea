"""Grant, revoke and cleanup, over the ports in ports.py: no AMQP or HTTP in here."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from worker.errors import Abandoned, ChannelRefused, Permanent, SeamRejected
from worker.events import AccessGranted, AccessRevoked, IdentityRef, KeyCleanup
from worker.logs import mask_email, mask_phone
from worker.ports import Channel, InstantKey, KeyMessage, Seam, UserIdentity

log = logging.getLogger("worker.flows")


class Scheduler(Protocol):
    async def schedule_cleanup(self, key: InstantKey) -> None:
        """Durably schedule the key's deletion at its expires_at (confirmed by the broker)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


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


@dataclass
class Outcome:
    """What a handled event did, for logs and metrics."""

    action: str
    channel: str | None = None
    key_id: str | None = None
    minted: bool = False
    deleted: int = 0


class Flows:
    def __init__(
        self,
        seam: Seam,
        channels: Mapping[str, Channel],
        scheduler: Scheduler,
        *,
        min_key_lifetime: timedelta,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.seam = seam
        self.channels = channels
        self.scheduler = scheduler
        self.min_key_lifetime = min_key_lifetime
        self.clock = clock
        self.locks = KeyedLocks()

    async def grant(
        self, event: AccessGranted, still_held: Callable[[], bool] = lambda: True
    ) -> Outcome:
        """``still_held`` says whether the message is still ours to ack; when it is not, another
        delivery of it will do the work, so nothing is sent."""
        guest = event.user_identity
        async with self.locks.hold(guest.lock_key):
            identity = await self._resolve_or_create(event)
            key, minted = await self._fetch_or_create_key(identity.user_identity_id, event)
        # Scheduled before delivery, so a key whose delivery fails for good is still deleted.
        await self.scheduler.schedule_cleanup(key)
        message = KeyMessage(
            full_name=guest.full_name or identity.full_name,
            phone_number=guest.phone_number or identity.phone_number,
            email_address=guest.email_address or identity.email_address,
            locale=event.delivery.locale,
            expires_at=key.expires_at,
            url=key.instant_key_url,
        )
        channel = await self._deliver(message, event.delivery.channels, still_held)
        return Outcome("granted", channel=channel, key_id=key.instant_key_id, minted=minted)

    async def revoke(self, event: AccessRevoked) -> Outcome:
        identity = await self._resolve(event.user_identity)
        if identity is None:
            return Outcome("revoked")  # nothing of theirs exists in Seam
        keys = await self.seam.list_instant_keys(identity.user_identity_id)
        for key in keys:
            await self.seam.delete_instant_key(key.instant_key_id)
        return Outcome("revoked", deleted=len(keys))

    async def cleanup(self, event: KeyCleanup) -> Outcome:
        early = event.expires_at - self.clock()
        if early > timedelta(seconds=1):
            # Came due early (clock skew, a replay): wait out the rest in the delay queues.
            await self.scheduler.schedule_cleanup(
                InstantKey(
                    instant_key_id=event.instant_key_id,
                    user_identity_id=event.user_identity_id,
                    created_at=event.expires_at,
                    expires_at=event.expires_at,
                    instant_key_url="",
                )
            )
            return Outcome("cleanup_rescheduled", key_id=event.instant_key_id)
        await self.seam.delete_instant_key(event.instant_key_id)
        return Outcome("cleaned_up", key_id=event.instant_key_id, deleted=1)

    async def _resolve(self, ref: IdentityRef) -> UserIdentity | None:
        if ref.user_identity_id:
            return await self.seam.get_user_identity(user_identity_id=ref.user_identity_id)
        return await self.seam.get_user_identity(user_identity_key=ref.user_identity_key)

    async def _resolve_or_create(self, event: AccessGranted) -> UserIdentity:
        guest = event.user_identity
        identity = await self._resolve(guest)
        if identity is not None:
            return identity
        if guest.user_identity_id and not guest.user_identity_key:
            raise Permanent("user_identity_id is unknown to Seam", reason="identity_not_found")
        try:
            identity = await self.seam.create_user_identity(
                user_identity_key=guest.user_identity_key,
                full_name=guest.full_name,
                email_address=guest.email_address,
                phone_number=guest.phone_number,
            )
        except SeamRejected:
            # Another replica may have created it between our get and create.
            identity = await self.seam.get_user_identity(user_identity_key=guest.user_identity_key)
            if identity is None:
                raise
        log.info(
            "created user identity",
            extra={
                "ctx": {
                    "event_id": event.event_id,
                    "user_identity_id": identity.user_identity_id,
                    "phone": mask_phone(guest.phone_number),
                    "email": mask_email(guest.email_address),
                }
            },
        )
        return identity

    async def _fetch_or_create_key(
        self, user_identity_id: str, event: AccessGranted
    ) -> tuple[InstantKey, bool]:
        usable = self._usable(await self.seam.list_instant_keys(user_identity_id))
        if len(usable) == 1:
            return usable[0], False
        if usable:
            return await self._converge(usable), False
        await self.seam.generate_instant_key(
            user_identity_id,
            customization_profile_id=event.instant_key.customization_profile_id,
            max_use_count=event.instant_key.max_use_count,
        )
        # Another replica may have minted one at the same time: list again and converge.
        usable = self._usable(await self.seam.list_instant_keys(user_identity_id))
        if not usable:
            raise Permanent(
                "the key Seam generated is already too close to expiry",
                reason="key_lifetime_too_short",
            )
        return await self._converge(usable), True

    def _usable(self, keys: list[InstantKey]) -> list[InstantKey]:
        horizon = self.clock() + self.min_key_lifetime
        return [key for key in keys if key.expires_at >= horizon]

    async def _converge(self, keys: list[InstantKey]) -> InstantKey:
        """Keep the earliest created key (ties: smallest id) and delete the others."""
        keep, *extra = sorted(keys, key=lambda k: (k.created_at, k.instant_key_id))
        for key in extra:
            await self.seam.delete_instant_key(key.instant_key_id)
        if extra:
            log.info(
                "deleted duplicate instant keys",
                extra={"ctx": {"kept": keep.instant_key_id, "deleted": len(extra)}},
            )
        return keep

    async def _deliver(
        self, message: KeyMessage, order: Sequence[str], still_held: Callable[[], bool]
    ) -> str:
        refusals = []
        for name in order:
            if not still_held():
                raise Abandoned("the broker took the message back before delivery")
            channel = self.channels.get(name)
            if channel is None:
                refusals.append(f"{name}: not configured")
                continue
            if not channel.reaches(message):
                refusals.append(f"{name}: no contact")
                continue
            try:
                await channel.send(message)
            except ChannelRefused as exc:
                refusals.append(f"{name}: refused ({exc.code or exc})")
                continue
            return name
        raise Permanent("; ".join(refusals), reason="no_channel_accepted")
