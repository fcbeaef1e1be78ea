"""The contract: what is accepted, and the reason a rejected message is dead-lettered with."""

import json

import pytest

from tests.builders import body, grant, revoke
from worker.errors import InvalidEvent
from worker.events import AccessGranted, AccessRevoked, glimpse, parse


def test_the_design_example_is_accepted_and_unknown_fields_ignored() -> None:
    event = parse(body(grant("guest-991", added_in_v1_1="ignored")), "application/json")
    assert isinstance(event, AccessGranted)
    assert event.user_identity.user_identity_key == "guest-991"
    assert event.delivery.channels == ["sms", "email"]
    assert isinstance(parse(body(revoke("guest-991")), None), AccessRevoked)


def reason(raw: bytes, content_type: str | None = "application/json") -> str:
    with pytest.raises(InvalidEvent) as caught:
        parse(raw, content_type)
    return caught.value.reason


def with_identity(**fields: object) -> bytes:
    event = grant()
    event["user_identity"].update(fields)
    return body(event)


@pytest.mark.parametrize(
    "raw,content_type,expected",
    [
        (b'{"type": "access.granted", "vers', "application/json", "malformed_json"),
        (b"[1, 2]", "application/json", "malformed_json"),
        (b"\xff\xfe", "application/json", "malformed_json"),
        (body(grant()), "text/plain", "wrong_content_type"),
        (b'{"pad": "' + b"x" * 70_000 + b'"}', "application/json", "too_large"),
        (body(grant() | {"type": "access.extended"}), "application/json", "unknown_type"),
        (body(grant() | {"version": 2}), "application/json", "unknown_type"),
        (body(grant() | {"version": "1"}), "application/json", "unknown_type"),
        (with_identity(phone_number="4155550100"), "application/json", "invalid_phone_number"),
        (with_identity(email_address="ada@"), "application/json", "invalid_email_address"),
        (with_identity(user_identity_key=None), "application/json", "invalid_event"),
        (body(grant() | {"delivery": {"channels": ["fax"]}}), "application/json", "invalid_event"),
    ],
)
def test_each_malformed_input_has_its_own_reason(
    raw: bytes, content_type: str, expected: str
) -> None:
    assert reason(raw, content_type) == expected


def test_a_rejection_names_the_field_but_not_the_value() -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse(with_identity(phone_number="4155550199"), "application/json")
    assert "user_identity.phone_number" in str(caught.value)
    assert "4155550199" not in str(caught.value)


def test_strict_types_refuse_a_number_as_text() -> None:
    event = grant()
    event["event_id"] = 123
    assert reason(json.dumps(event).encode()) == "invalid_event"


def test_deeply_nested_json_is_malformed_not_a_crash() -> None:
    assert reason(b"[" * 30_000 + b"]" * 30_000) == "malformed_json"
    assert reason(b'{"a":' * 10_000 + b"1" + b"}" * 10_000) == "malformed_json"


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
    ],
)
def test_json_with_or_without_media_type_parameters_is_accepted(content_type: str | None) -> None:
    assert isinstance(parse(body(grant()), content_type), AccessGranted)


def test_a_charset_other_than_utf8_is_refused() -> None:
    assert reason(body(grant()), "application/json; charset=latin-1") == "wrong_content_type"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_compressed_body_is_refused_with_its_own_reason(encoding: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse(body(grant()), "application/json", encoding)
    assert caught.value.reason == "unsupported_encoding"
    assert isinstance(parse(body(grant()), "application/json", "identity"), AccessGranted)


@pytest.mark.parametrize("count", [10**30, 0, 10_001])
def test_max_use_count_is_bounded(count: int) -> None:
    assert reason(body(grant(instant_key={"max_use_count": count}))) == "invalid_event"


def test_a_name_that_cleans_to_nothing_is_no_reason_to_refuse_a_grant() -> None:
    event = parse(body(grant(name="\u200b\u200b")), "application/json")
    assert isinstance(event, AccessGranted)


def test_a_glimpse_of_a_refused_body_reads_only_short_printable_strings() -> None:
    raw = json.dumps({"type": "access.granted", "event_id": "e\n1", "grant_id": "g" * 256})
    assert glimpse(raw.encode()) == {"event_id": None, "grant_id": None, "type": "access.granted"}
    nothing = {"event_id": None, "grant_id": None, "type": None}
    assert glimpse(b"[" * 60_000) == nothing  # too deep for json
    assert glimpse(b'{"event_id": "e-1", "pad": "' + b"x" * 70_000 + b'"}') == nothing  # too large


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (b'{"type": "access.granted", "vers', "Unterminated string starting at line 1, column 28"),
        (b'{\n "phone": +14155550100}', "Expecting value at line 2, column 11"),
        (b'{"email": "ada@example.com" "x": 1}', "Expecting ',' delimiter at line 1, column 29"),
    ],
)
def test_a_body_that_is_not_json_says_where_never_what(raw: bytes, said: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse(raw, "application/json")
    assert str(caught.value) == f"body is not JSON: {said}"
    assert "14155550100" not in str(caught.value) and "ada@" not in str(caught.value)
