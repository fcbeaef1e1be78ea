"""The message contract: one pydantic model per message type and version (the source of truth)."""

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, assert_never, get_args

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    ValidationError,
    model_validator,
)

from worker.dates import MAX_ZONE_LENGTH, time_zone
from worker.errors import InvalidEvent, Reason
from worker.guest_name import MAX_PROPERTY_NAME

MAX_BODY_BYTES = 64 * 1024
# An event holds about 5 objects and lists and 25 values. Far more, within the byte limit, only
# makes refusing it slow: pydantic copies the input into every error it reports.
MAX_CONTAINERS = 64
MAX_VALUES = 1024
MAX_LOCALE = 35  # BCP 47 tags in use fit (RFC 5646 asks implementations to take 35)
MAX_USE_COUNT = 10_000
E164_PATTERN = r"^\+[1-9][0-9]{6,14}$"


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


Text = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_not_blank)]
# What the guest reads of it is cleaned at delivery (worker/guest_name.py); unusable is no name.
Name = Annotated[str, Field(max_length=255)]
Phone = Annotated[str, Field(pattern=E164_PATTERN, description="E.164, e.g. +14155550100")]


class Model(BaseModel):
    # Unknown fields are ignored so producers can add fields within a version.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class IdentityRef(Model):
    """Names a Seam user identity by its id or by the producer's own key (at least one)."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {
                    "required": ["user_identity_id"],
                    "properties": {"user_identity_id": {"type": "string"}},
                },
                {
                    "required": ["user_identity_key"],
                    "properties": {"user_identity_key": {"type": "string"}},
                },
            ]
        }
    )
    user_identity_id: Text | None = None
    user_identity_key: Text | None = None

    @model_validator(mode="after")
    def _id_or_key(self) -> "IdentityRef":
        if not (self.user_identity_id or self.user_identity_key):
            raise ValueError("user_identity needs user_identity_id or user_identity_key")
        return self

    @property
    def lock_key(self) -> str:
        """One name per identity, whichever way the event names it."""
        if self.user_identity_key:
            return f"key:{self.user_identity_key}"
        return f"id:{self.user_identity_id}"


class GuestIdentity(IdentityRef):
    full_name: Name | None = None
    email_address: EmailStr | None = None
    phone_number: Phone | None = None


ChannelName = Literal["sms", "email"]
RevokeReason = Literal["cancelled", "checked_out", "no_show", "other"]
# Why a key was deleted: its expiry, a revoke, duplicates, its stay's end, or the revoke's reason.
DeletedWhy = Literal["expired", "revoked", "converged", "stay_ended"] | RevokeReason
DeliveryReason = Literal["initial", "renewal", "stay_changed"]


def _time_zone(value: str) -> str:
    time_zone(value)  # ValueError saying why
    return value


class Delivery(Model):
    channels: list[ChannelName] = Field(min_length=1, max_length=2)
    locale: Annotated[
        str, Field(max_length=MAX_LOCALE, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")
    ] = "en"
    time_zone: (
        Annotated[
            str,
            Field(
                max_length=MAX_ZONE_LENGTH,
                description="IANA time zone of the property, for the times the guest reads "
                "(default: the worker's IKW_TIME_ZONE, else UTC)",
                examples=["Europe/Paris"],
            ),
            AfterValidator(_time_zone),
        ]
        | None
    ) = None
    property_name: (
        Annotated[
            str,
            Field(
                max_length=MAX_PROPERTY_NAME,
                description="the property's name as guests know it (default: IKW_PROPERTY_NAME); "
                "control and format characters are dropped",
            ),
        ]
        | None
    ) = None


class KeyOptions(Model):
    customization_profile_id: Text | None = None
    max_use_count: Annotated[int, Field(ge=1, le=MAX_USE_COUNT)] = 1


class EventBase(Model):
    version: Literal[1]
    event_id: Text
    occurred_at: AwareDatetime
    grant_id: Text


class Stay(Model):
    """The booking a grant is for: the key is sent at ``deliver_at`` and deleted at checkout."""

    reservation_key: Text = Field(description="The booking system's own key for the reservation")
    starts_at: AwareDatetime = Field(description="Check-in")
    ends_at: AwareDatetime = Field(description="Checkout")
    deliver_at: AwareDatetime | None = Field(
        default=None,
        description="When to send the key (default: starts_at minus IKW_DELIVERY_LEAD); never "
        "after starts_at",
    )
    revision: Annotated[int, Field(ge=0, le=2**53)] = Field(
        default=0, description="Higher replaces the stay; lower or equal changes nothing"
    )

    @model_validator(mode="after")
    def _window(self) -> "Stay":
        if self.starts_at >= self.ends_at:
            raise ValueError("stay.starts_at must be before stay.ends_at")
        if self.deliver_at is not None and self.deliver_at > self.starts_at:
            raise ValueError("stay.deliver_at must not be after stay.starts_at")
        return self


class AccessGranted(EventBase):
    """A booking system grants a guest access: mint (or reuse) an Instant Key and deliver it, or,
    with a ``stay``, schedule it for the stay."""

    model_config = ConfigDict(title="access.granted v1")
    type: Literal["access.granted"]
    user_identity: GuestIdentity
    delivery: Delivery
    instant_key: KeyOptions = KeyOptions()
    stay: Stay | None = None


class AccessRevoked(EventBase):
    """A booking system revokes access: delete the identity's Instant Keys now, or, with a
    ``reservation_key``, end that stay only."""

    model_config = ConfigDict(title="access.revoked v1")
    type: Literal["access.revoked"]
    user_identity: IdentityRef
    reservation_key: Text | None = Field(
        default=None, description="End this stay only (default: every stay of the identity)"
    )
    reason: RevokeReason | None = Field(
        default=None,
        description="Why the stay ends, as instant_key.deleted's why (default "
        "cancelled for a reservation)",
    )


class StayDelivery(Model):
    """Internal: published by the worker, due at a stay's delivery or a key's renewal."""

    model_config = ConfigDict(title="stay.delivery v1")
    type: Literal["stay.delivery"]
    version: Literal[1]
    reason: Literal["initial", "renewal"]
    due_at: AwareDatetime
    grant: AccessGranted  # with its stay


class StayEnd(Model):
    """Internal: published by the worker, due at a stay's checkout plus IKW_CHECKOUT_GRACE."""

    model_config = ConfigDict(title="stay.end v1")
    type: Literal["stay.end"]
    version: Literal[1]
    reservation_key: Text
    revision: int
    due_at: AwareDatetime
    user_identity: IdentityRef


class KeyCleanup(Model):
    """Internal: published by the worker, due at the key's expires_at; deletes the key."""

    model_config = ConfigDict(title="instant_key.cleanup v1")
    type: Literal["instant_key.cleanup"]
    version: Literal[1]
    instant_key_id: Text
    user_identity_id: Text
    expires_at: AwareDatetime


class KnownIdentity(Model):
    """The identity an outcome is about: ids only, never a contact."""

    user_identity_id: str | None = None
    user_identity_key: str | None = None

    @classmethod
    def named(cls, ref: IdentityRef) -> "KnownIdentity":
        """As an event named it."""
        return cls(user_identity_id=ref.user_identity_id, user_identity_key=ref.user_identity_key)


class OutcomeBase(Model):
    version: Literal[1] = 1
    occurred_at: AwareDatetime


class AccessDelivered(OutcomeBase):
    """Published by the worker when a grant's link reached the guest (never the link itself)."""

    model_config = ConfigDict(title="access.delivered v1")
    type: Literal["access.delivered"] = "access.delivered"
    event_id: str
    grant_id: str
    user_identity: KnownIdentity
    instant_key_id: str
    expires_at: AwareDatetime
    channel: ChannelName
    provider_message_id: str = Field(description="The Twilio message SID or the email Message-ID")
    minted: bool = Field(description="False when an existing key was delivered again")
    reservation_key: str | None = Field(default=None, description="The stay's, if any")
    revision: int | None = None
    delivery_reason: DeliveryReason | None = Field(
        default=None, description="For a stay: its first key, a renewal, or a changed stay"
    )


class AccessScheduled(OutcomeBase):
    """Published by the worker when a grant with a stay is accepted: its key is sent at
    ``deliver_at``."""

    model_config = ConfigDict(title="access.scheduled v1")
    type: Literal["access.scheduled"] = "access.scheduled"
    event_id: str
    grant_id: str
    user_identity: KnownIdentity
    reservation_key: str
    revision: int
    deliver_at: AwareDatetime
    starts_at: AwareDatetime
    ends_at: AwareDatetime


class AccessDeliveryFailed(OutcomeBase):
    """Published by the worker when a grant is dead-lettered: no link was delivered for it."""

    model_config = ConfigDict(title="access.delivery_failed v1")
    type: Literal["access.delivery_failed"] = "access.delivery_failed"
    event_id: str
    grant_id: str
    user_identity: KnownIdentity
    reason: str = Field(
        description="stay_ended when the stay ended before its key could be sent (acked, "
        "nothing to replay); else the dead letter's x-ikw-reason, e.g. no_channel_accepted"
    )
    error: str = Field(description="One line; never a link or a contact")

    @classmethod
    def of(
        cls, grant: "AccessGranted", reason: str, error: str, at: datetime
    ) -> "AccessDeliveryFailed":
        return cls(
            occurred_at=at,
            event_id=grant.event_id,
            grant_id=grant.grant_id,
            user_identity=KnownIdentity.named(grant.user_identity),
            reason=reason,
            error=error,
        )


class KeyDeleted(OutcomeBase):
    """Published by the worker when it deleted an Instant Key from Seam."""

    model_config = ConfigDict(title="instant_key.deleted v1")
    type: Literal["instant_key.deleted"] = "instant_key.deleted"
    instant_key_id: str
    user_identity: KnownIdentity
    why: DeletedWhy


class RevokeCompleted(OutcomeBase):
    """Published by the worker when a revoke has done its work: every key delivered for a grant
    that occurred at or before it (or for a grant unknown to the worker) is deleted."""

    model_config = ConfigDict(title="access.revoke_completed v1")
    type: Literal["access.revoke_completed"] = "access.revoke_completed"
    event_id: str
    grant_id: str
    user_identity: KnownIdentity
    revoked_at: AwareDatetime = Field(description="The revoke's occurred_at")
    deleted: int = Field(description="Instant Keys deleted")
    kept: int = Field(description="Instant Keys left: delivered for grants that occurred later")


class AccessRejected(OutcomeBase):
    """Published by the worker when it refused one of your events for good (not JSON, failing its
    schema, a routing key no queue takes, a check such as the clock's) and did nothing for it;
    a grant that was read and then failed is access.delivery_failed instead."""

    model_config = ConfigDict(title="access.rejected v1")
    type: Literal["access.rejected"] = "access.rejected"
    event_id: str | None = Field(description="As read from the body; null when unreadable")
    grant_id: str | None = Field(description="As read from the body; null when unreadable")
    event_type: str | None = Field(description="The body's type, e.g. access.granted; or null")
    reason: str = Field(description="The dead letter's x-ikw-reason, e.g. invalid_event")
    error: str = Field(description="One line; never a link or a contact")


Announcement = (
    AccessDelivered
    | AccessDeliveryFailed
    | AccessRejected
    | KeyDeleted
    | RevokeCompleted
    | AccessScheduled
)

Event = AccessGranted | AccessRevoked | KeyCleanup | StayDelivery | StayEnd


def literal(model: type[Model], field: str) -> object:
    """The one value a ``Literal`` field admits: an event's type or version."""
    (value,) = get_args(model.model_fields[field].annotation)
    return value


# The routing keys of the outcome events the worker publishes.
ANNOUNCEMENTS = tuple(str(literal(model, "type")) for model in get_args(Announcement))
MODELS: dict[tuple[object, object], type[Event]] = {
    (literal(model, "type"), literal(model, "version")): model for model in get_args(Event)
}


def granted(
    *,
    user_identity_key: str | None = None,
    user_identity_id: str | None = None,
    full_name: str | None = None,
    email_address: str | None = None,
    phone_number: str | None = None,
    channels: Sequence[str] = ("sms", "email"),
    locale: str = "en",
    max_use_count: int = 1,
    time_zone: str | None = None,
    property_name: str | None = None,
    stay: dict[str, Any] | None = None,
    event_id: str | None = None,
    grant_id: str | None = None,
    occurred_at: datetime | None = None,
) -> dict[str, Any]:
    """An ``access.granted`` v1 event as a producer writes it, ready for ``json.dumps``: the one
    builder the CLI, the demo, the bench and the tests share. ``stay``: ``reservation_key``,
    ``starts_at`` and ``ends_at`` (RFC 3339 with an offset), optionally ``deliver_at`` and
    ``revision`` (default 0)."""
    event_id = event_id or str(uuid.uuid4())
    delivery: dict[str, Any] = {"channels": list(channels), "locale": locale}
    if time_zone is not None:
        delivery["time_zone"] = time_zone
    if property_name is not None:
        delivery["property_name"] = property_name
    event: dict[str, Any] = {
        "type": "access.granted",
        "version": 1,
        "event_id": event_id,
        "occurred_at": _stamp(occurred_at),
        "grant_id": grant_id or f"grant-{event_id[:8]}",
        "user_identity": {
            "user_identity_id": user_identity_id,
            "user_identity_key": user_identity_key,
            "full_name": full_name,
            "email_address": email_address,
            "phone_number": phone_number,
        },
        "delivery": delivery,
        "instant_key": {"customization_profile_id": None, "max_use_count": max_use_count},
    }
    if stay is not None:
        event["stay"] = _stay(**stay)
    return event


def _stay(
    *,
    reservation_key: str,
    starts_at: datetime | str,
    ends_at: datetime | str,
    deliver_at: datetime | str | None = None,
    revision: int = 0,
) -> dict[str, Any]:
    """A grant's ``stay``; a datetime is written as RFC 3339 (it needs an offset)."""
    moments = {"starts_at": starts_at, "ends_at": ends_at, "deliver_at": deliver_at}
    written = {name: _rfc3339(moment) for name, moment in moments.items() if moment is not None}
    return {"reservation_key": reservation_key, **written, "revision": revision}


def _rfc3339(moment: datetime | str) -> str:
    if isinstance(moment, str):
        return moment
    if moment.tzinfo is None:
        raise ValueError("a stay's moments need an offset")
    return _stamp(moment)


def revoked(
    *,
    user_identity_key: str | None = None,
    user_identity_id: str | None = None,
    reservation_key: str | None = None,
    reason: RevokeReason | None = None,
    event_id: str | None = None,
    grant_id: str | None = None,
    occurred_at: datetime | None = None,
) -> dict[str, Any]:
    """An ``access.revoked`` v1 event as a producer writes it; with ``reservation_key``, it ends
    that stay only (``reason``: why)."""
    event_id = event_id or str(uuid.uuid4())
    event: dict[str, Any] = {
        "type": "access.revoked",
        "version": 1,
        "event_id": event_id,
        "occurred_at": _stamp(occurred_at),
        "grant_id": grant_id or f"grant-{event_id[:8]}",
        "user_identity": {
            "user_identity_id": user_identity_id,
            "user_identity_key": user_identity_key,
        },
    }
    if reservation_key is not None:
        event["reservation_key"] = reservation_key
    if reason is not None:
        event["reason"] = reason
    return event


def _stamp(moment: datetime | None) -> str:
    return (moment or datetime.now(UTC)).isoformat().replace("+00:00", "Z")


def check_size(body: bytes) -> None:
    if len(body) > MAX_BODY_BYTES:
        raise InvalidEvent(
            f"body is {len(body)} bytes, over {MAX_BODY_BYTES}", reason=Reason.TOO_LARGE
        )


def parse(body: bytes, content_type: str | None, content_encoding: str | None = None) -> Event:
    """Validate a message body; raises InvalidEvent with a specific reason and no field values."""
    check_size(body)
    if (content_encoding or "identity").strip().lower() != "identity":
        raise InvalidEvent(
            f"content_encoding {str(content_encoding)[:40]!r} is not supported; publish plain JSON",
            reason=Reason.UNSUPPORTED_ENCODING,
        )
    if not _is_json(content_type):
        raise InvalidEvent(
            f"content_type {str(content_type)[:60]!r} is not application/json (UTF-8)",
            reason=Reason.WRONG_CONTENT_TYPE,
        )
    containers, values = body.count(b"{") + body.count(b"["), body.count(b",") + 1
    if containers > MAX_CONTAINERS or values > MAX_VALUES:
        raise InvalidEvent(
            f"body holds {containers} objects and lists and about {values} values; an event "
            f"holds at most {MAX_CONTAINERS} and {MAX_VALUES}",
            reason=Reason.MALFORMED_JSON,
        )
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        # ValueError: not JSON, not UTF-8, or an integer of more than 4300 digits.
        raise InvalidEvent(
            f"body is not JSON: {_where(exc)}", reason=Reason.MALFORMED_JSON
        ) from None
    if not isinstance(data, dict):
        raise InvalidEvent("body is not a JSON object", reason=Reason.MALFORMED_JSON)
    kind, version = data.get("type"), data.get("version")
    model = MODELS.get((kind, version)) if isinstance(kind, str) and type(version) is int else None
    if model is None:
        raise InvalidEvent(
            f"unknown type/version {str(kind)[:40]!r}/{str(version)[:10]!r}",
            reason=Reason.UNKNOWN_TYPE,
        )
    try:
        event = model.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidEvent(describe(exc), reason=_reason(exc)) from None
    return event


def glimpse(body: bytes) -> dict[str, str | None]:
    """What a refused body says of itself, best effort: its ``event_id``, ``grant_id`` and
    ``type`` where each is a short printable string, else None. Bodies over the limit are not
    read."""
    data: object = None
    if len(body) <= MAX_BODY_BYTES:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            pass
    found = data if isinstance(data, dict) else {}
    return {name: _short(found.get(name)) for name in ("event_id", "grant_id", "type")}


def _short(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= 255 and value.isprintable():
        return value
    return None


def _where(exc: Exception) -> str:
    """What and where, never the text: it may hold a phone number or an email address."""
    if isinstance(exc, json.JSONDecodeError):
        at = exc.msg if exc.msg.endswith(" at") else f"{exc.msg} at"  # "… starting at"
        return f"{at} line {exc.lineno}, column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 at byte {exc.start} (UnicodeDecodeError)"
    return type(exc).__name__


def _is_json(content_type: str | None) -> bool:
    """``application/json``, with parameters allowed (``; charset=utf-8``), or none given."""
    if not content_type:
        return True
    media, *parameters = (part.strip().lower() for part in content_type.split(";"))
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip() == "charset" and value.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return media == "application/json"


def describe(exc: ValidationError) -> str:
    """Where and what, without the offending values (they may be phone numbers or emails)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def _reason(exc: ValidationError) -> Reason:
    errors = exc.errors(include_url=False, include_input=False)
    if any(error["type"] == "json_invalid" for error in errors):
        return Reason.MALFORMED_JSON  # JSON that pydantic's parser refuses (a number out of range)
    fields = {str(error["loc"][-1]) for error in errors if error["loc"]}
    if "phone_number" in fields:
        return Reason.INVALID_PHONE_NUMBER
    if "email_address" in fields:
        return Reason.INVALID_EMAIL_ADDRESS
    return Reason.INVALID_EVENT


def event_key(event: Event) -> str:
    """Identifier for logs: the event id, the key id for cleanups, the reservation for stays."""
    match event:
        case AccessGranted() | AccessRevoked():
            return event.event_id
        case KeyCleanup():
            return event.instant_key_id
        case StayDelivery():
            return event.grant.event_id
        case StayEnd():
            return event.reservation_key
        case _:
            assert_never(event)


def reservation_of(event: Event) -> str | None:
    """The booking system's reservation the event belongs to, for the activity record."""
    match event:
        case AccessGranted():
            return event.stay.reservation_key if event.stay else None
        case AccessRevoked() | StayEnd():
            return event.reservation_key
        case StayDelivery():
            return reservation_of(event.grant)
        case KeyCleanup():
            return None
        case _:
            assert_never(event)


def occurred_at(event: Event) -> datetime | None:
    """When its producer says it occurred; None for the worker's own cleanups."""
    match event:
        case AccessGranted() | AccessRevoked():
            return event.occurred_at
        case KeyCleanup() | StayDelivery() | StayEnd():
            return None
        case _:
            assert_never(event)
