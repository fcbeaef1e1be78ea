"""The seams between the flows and the outside world: Seam, delivery channels, the scheduler and
the revocation fence."""

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from worker.events import Announcement, StayDelivery, StayEnd

if TYPE_CHECKING:  # the record's module reads the broker's headers: not for the contract
    from worker.record import Record, StayRecord


@dataclass(frozen=True)
class UserIdentity:
    user_identity_id: str
    user_identity_key: str | None = None
    full_name: str | None = None
    email_address: str | None = None
    phone_number: str | None = None


@dataclass(frozen=True)
class InstantKey:
    instant_key_id: str
    user_identity_id: str
    created_at: datetime
    expires_at: datetime
    # A bearer credential for doors: kept out of repr so it cannot leak into logs or tracebacks.
    instant_key_url: str = field(repr=False)


@dataclass(frozen=True)
class KeyMessage:
    """What a channel sends to a guest (``reason``: why, for a stay's renewal or change)."""

    full_name: str | None
    phone_number: str | None
    email_address: str | None
    locale: str
    expires_at: datetime
    url: str = field(repr=False)
    time_zone: str | None = None  # IANA; None: IKW_TIME_ZONE
    property_name: str | None = None  # None: IKW_PROPERTY_NAME
    reason: str = "initial"  # "initial", "renewal" or "stay_changed"


class Seam(Protocol):
    async def get_user_identity(
        self, *, user_identity_id: str | None = None, user_identity_key: str | None = None
    ) -> UserIdentity | None:
        """The identity, or None when Seam answers 404."""

    async def create_user_identity(
        self,
        *,
        user_identity_key: str | None,
        full_name: str | None,
        email_address: str | None,
        phone_number: str | None,
    ) -> UserIdentity: ...

    async def list_instant_keys(self, user_identity_id: str) -> list[InstantKey]: ...

    async def get_instant_key(self, instant_key_id: str) -> InstantKey | None:
        """The key, or None when Seam answers 404."""

    async def generate_instant_key(
        self,
        user_identity_id: str,
        *,
        customization_profile_id: str | None = None,
        max_use_count: int | None = None,
    ) -> InstantKey: ...

    async def delete_instant_key(self, instant_key_id: str) -> None:
        """Delete; a key that is already gone (404) counts as done."""

    async def check(self) -> None:
        """Cheap authenticated call; raises CredentialsRefused when the API key is refused."""


class Channel(Protocol):
    name: str  # "sms" or "email", as in the event's delivery.channels

    def reaches(self, message: KeyMessage) -> bool:
        """True when the message has the contact this channel needs."""

    async def send(self, message: KeyMessage) -> str:
        """Send; returns the provider's message id.

        Raises ChannelRefused (try the next channel), Transient (retry the event later) or
        CredentialsRefused.
        """

    async def check(self) -> None:
        """Raises CredentialsRefused when the provider refuses our credentials."""

    async def close(self) -> None: ...


class Scheduler(Protocol):
    async def schedule_cleanup(
        self, instant_key_id: str, user_identity_id: str, expires_at: datetime
    ) -> None:
        """Durably schedule the key's deletion at ``expires_at`` (confirmed by the broker)."""

    async def schedule_stay(self, timer: StayDelivery | StayEnd) -> None:
        """Durably schedule a stay's timer for its ``due_at`` (confirmed by the broker)."""


class Fence(Protocol):
    """The worker's record, as every replica follows it: revokes win over every grant that
    occurred before them; deliveries say which grant each key was last delivered for.
    Identities are named ``key:<user_identity_key>`` or ``id:<user_identity_id>``, stays
    ``res:<reservation_key>``. ``record`` is the state this replica has read."""

    record: "Record"

    def revoked_at(self, names: Iterable[str]) -> datetime | None:
        """The latest revoke of any of ``names`` this replica has seen, if any."""

    def delivered_for(self, instant_key_id: str) -> datetime | None:
        """When the latest grant this key was delivered for occurred; None: unknown."""

    async def record_revoke(self, names: Iterable[str], occurred_at: datetime) -> None:
        """Durably record a revoke (confirmed), then read on until this replica has read it
        back: every delivery recorded before it is known here."""

    async def record_delivery(
        self,
        instant_key_id: str,
        grant_at: datetime,
        expires_at: datetime,
        stay: tuple[str, str] | None = None,
    ) -> None:
        """Durably record that the key is being delivered for a grant that occurred at
        ``grant_at`` (confirmed), before it is sent; ``stay``: (reservation key, contact digest)."""

    async def record_stay(self, stay: "StayRecord", reservation_key: str) -> None:
        """Durably record a stay's revision, then read on until this replica has read it back."""

    async def wait_caught_up(self) -> None:
        """Until this replica has read every record written before it (re)connected; raises
        Transient, naming the fence, when that takes too long."""


class Announcer(Protocol):
    async def announce(self, outcome: Announcement) -> None:
        """Tell the booking systems (confirmed); a failure is logged, never raised: the work it
        reports is done and must not be redone for it."""
