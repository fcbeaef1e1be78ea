"""A producer that only reads schemas/ writes events the worker accepts, and vice versa."""

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.builders import body, grant, revoke
from worker.errors import InvalidEvent
from worker.events import parse

SCHEMAS = Path(__file__).parents[2] / "schemas"


def design_example() -> dict[str, Any]:
    return {
        "type": "access.granted",
        "version": 1,
        "event_id": "1f0c7a52-0000-4000-8000-000000000001",
        "occurred_at": "2026-11-26T10:00:00Z",
        "grant_id": "booking-48213",
        "user_identity": {
            "user_identity_id": None,
            "user_identity_key": "guest-991",
            "full_name": "Ada Lovelace",
            "email_address": "ada@example.com",
            "phone_number": "+14155550100",
        },
        "delivery": {"channels": ["sms", "email"], "locale": "en"},
        "instant_key": {"customization_profile_id": None, "max_use_count": 1},
    }


def minimal() -> dict[str, Any]:
    return {
        "type": "access.granted",
        "version": 1,
        "event_id": "e-1",
        "occurred_at": "2026-11-26T10:00:00+01:00",
        "grant_id": "g-1",
        "user_identity": {"user_identity_key": "guest-1", "phone_number": "+4915123456789"},
        "delivery": {"channels": ["sms"]},
    }


def changed(event: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(event))
    *parents, last = path.split(".")
    target = copy
    for part in parents:
        target = target[part]
    target[last] = value
    result: dict[str, Any] = copy
    return result


CASES = [
    ("design example", design_example(), True),
    ("required fields only", minimal(), True),
    ("revoke", revoke("guest-1"), True),
    ("builder grant", grant(), True),
    ("phone without +", changed(minimal(), "user_identity.phone_number", "4155550100"), False),
    ("no id nor key", changed(minimal(), "user_identity.user_identity_key", None), False),
    ("unknown channel", changed(minimal(), "delivery.channels", ["fax"]), False),
    ("no channels", changed(minimal(), "delivery.channels", []), False),
    ("version 2", changed(minimal(), "version", 2), False),
    ("max_use_count 0", changed(design_example(), "instant_key.max_use_count", 0), False),
    ("event_id a number", changed(minimal(), "event_id", 7), False),
]


@pytest.mark.parametrize("name,event,valid", CASES, ids=[c[0] for c in CASES])
def test_schema_and_worker_agree(name: str, event: dict[str, Any], valid: bool) -> None:
    schema_file = (
        f"{event['type']}.v1.json" if event.get("version") == 1 else "access.granted.v1.json"
    )
    schema = json.loads((SCHEMAS / schema_file).read_text())
    schema_says = jsonschema.Draft202012Validator(schema).is_valid(event)
    try:
        parse(body(event), "application/json")
        worker_says = True
    except InvalidEvent:
        worker_says = False
    assert (schema_says, worker_says) == (valid, valid)
