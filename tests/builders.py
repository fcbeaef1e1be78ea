"""Events as producers write them: plain JSON, the shape of schemas/."""

import json
import uuid
from datetime import UTC, datetime
from typing import Any


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
    return {
        "type": "access.granted",
        "version": 1,
        "event_id": event_id or str(uuid.uuid4()),
        "occurred_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "grant_id": f"booking-{uuid.uuid4().hex[:6]}",
        "user_identity": {
            "user_identity_id": user_identity_id,
            "user_identity_key": key
            if key or user_identity_id
            else f"guest-{uuid.uuid4().hex[:8]}",
            "full_name": name,
            "email_address": email,
            "phone_number": phone,
        },
        "delivery": {"channels": list(channels), "locale": locale},
        "instant_key": {"customization_profile_id": None, "max_use_count": 1},
        **extra,
    }


def revoke(key: str | None = None, *, user_identity_id: str | None = None) -> dict[str, Any]:
    return {
        "type": "access.revoked",
        "version": 1,
        "event_id": str(uuid.uuid4()),
        "occurred_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "grant_id": "booking-1",
        "user_identity": {"user_identity_id": user_identity_id, "user_identity_key": key},
    }


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()
