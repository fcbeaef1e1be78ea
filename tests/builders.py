"""Events as producers write them: plain JSON, the shape of schemas/, from the package's builder."""

import json
import uuid
from datetime import datetime
from typing import Any

from worker import events


def grant(
    key: str | None = None,
    *,
    name: str | None = "Ada Lovelace",
    phone: str | None = "+14155550100",
    email: str | None = "ada@example.com",
    channels: tuple[str, ...] = ("sms", "email"),
    locale: str = "en",
    user_identity_id: str | None = None,
    event_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A grant for a new guest by default; ``extra`` replaces top-level fields as given."""
    event = events.granted(
        user_identity_id=user_identity_id,
        user_identity_key=key if key or user_identity_id else f"guest-{uuid.uuid4().hex[:8]}",
        full_name=name,
        email_address=email,
        phone_number=phone,
        channels=channels,
        locale=locale,
        event_id=event_id,
    )
    return event | extra


def revoke(
    key: str | None = None,
    *,
    user_identity_id: str | None = None,
    occurred_at: datetime | None = None,
) -> dict[str, Any]:
    return events.revoked(
        user_identity_key=key, user_identity_id=user_identity_id, occurred_at=occurred_at
    )


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()
