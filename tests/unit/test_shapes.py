"""Bodies shaped to cost: each is refused at once, for a permanent reason, in under 10 ms of CPU."""

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.builders import body, grant
from worker.errors import InvalidEvent
from worker.events import MAX_BODY_BYTES, parse

HEAD = b'{"type": "access.granted", "version": 1, "x": '
BUDGET = 0.010  # seconds of CPU per body


def filled(unit: bytes, start: bytes = b"[", end: bytes = b"]") -> bytes:
    """A grant's head, then ``unit`` repeated in a list (or object) up to the byte limit."""
    room = MAX_BODY_BYTES - len(HEAD) - len(start) - len(end) - 1
    return HEAD + start + (unit * (room // len(unit)))[:-1] + end + b"}"


def shaped(change: Callable[[dict[str, Any]], object]) -> bytes:
    event = grant()
    change(event)
    return body(event)


WORST = {
    # json.loads raises ValueError past 4300 digits: once retried as transient.
    "an integer of 5000 digits": (HEAD + b"9" * 5000 + b"}", "malformed_json"),
    "15 integers of 4000 digits": (filled(b"9" * 4000 + b","), "invalid_event"),
    "a float out of pydantic's range": (HEAD + b"1" + b"0" * 5000 + b".5}", "malformed_json"),
    "nesting 30,000 deep": (HEAD + b"[" * 30_000 + b"]" * 30_000 + b"}", "malformed_json"),
    "nesting 900 deep": (HEAD + b"[" * 900 + b"]" * 900 + b"}", "malformed_json"),
    "60 nested lists around 60 KiB": (
        HEAD + b"[" * 60 + b'"' + b"a" * 60_000 + b'"' + b"]" * 60 + b"}",
        "invalid_event",
    ),
    # pydantic copies the whole input into each "Field required" error: 20 ms before the limits.
    "21,000 empty lists": (filled(b"[],"), "malformed_json"),
    "21,000 empty objects": (filled(b"{},"), "malformed_json"),
    "32,000 zeros": (filled(b"0,"), "malformed_json"),
    "11,000 repeated keys": (filled(b'"k":0,', b"{", b"}"), "malformed_json"),
    "1000 values, every field missing": (HEAD + b"[" + b"0," * 999 + b"0]}", "invalid_event"),
    # locale's pattern took any length: 63 KiB of it cost 0.8 s of templates per grant.
    "a locale of 60 KiB": (
        shaped(lambda e: e["delivery"].update(locale="en" + "-abcdefgh" * 6_900)),
        "invalid_event",
    ),
    "a locale of 36 characters": (
        shaped(lambda e: e["delivery"].update(locale="en" + "-abcdefg" * 4 + "-a")),
        "invalid_event",
    ),
    "a name of 29,000 accented letters": (
        body(grant(name="NAME")).replace(b"NAME", "é".encode() * 29_000),
        "invalid_event",
    ),
    "an email of 60 KiB": (
        body(grant(email="a" * 60_000 + "@example.com")),
        "invalid_email_address",
    ),
    "a phone number of 60 KiB": (body(grant(phone="+1" + "5" * 60_000)), "invalid_phone_number"),
    "an identity key of 60 KiB": (body(grant("k" * 60_000)), "invalid_event"),
    "a time zone of 60 KiB": (
        shaped(lambda e: e["delivery"].update(time_zone="Europe/" + "a" * 60_000)),
        "invalid_event",
    ),
    "a property name of 60 KiB": (
        shaped(lambda e: e["delivery"].update(property_name="p" * 60_000)),
        "invalid_event",
    ),
    "occurred_at of 60 KiB": (
        shaped(lambda e: e.update(occurred_at="2" * 60_000)),
        "invalid_event",
    ),
    "8000 channels": (
        shaped(lambda e: e["delivery"].update(channels=["sms"] * 8_000)),
        "malformed_json",
    ),
    "max_use_count of 4000 digits": (
        shaped(lambda e: e["instant_key"].update(max_use_count=int("9" * 4000))),
        "invalid_event",
    ),
    "5000 surrogate pairs": (HEAD + b'"' + b"\\ud83d\\ude00" * 5000 + b'"}', "invalid_event"),
}


@pytest.mark.parametrize("name", WORST)
def test_a_worst_shape_is_refused_at_once_and_cheaply(name: str) -> None:
    raw, expected = WORST[name]
    assert len(raw) <= MAX_BODY_BYTES, "the shape must pass the byte limit to test anything"
    spent = []
    for _ in range(3):  # the best of three: a garbage collection is not the body's cost
        started = time.process_time()
        with pytest.raises(InvalidEvent) as refused:
            parse(raw, "application/json")
        spent.append(time.process_time() - started)
    assert refused.value.reason == expected  # permanent: dead-lettered at once, never retried
    assert min(spent) < BUDGET, f"{name}: {min(spent) * 1000:.1f} ms of CPU"
