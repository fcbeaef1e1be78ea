"""`ikw publish`'s flags and the shared event builders: what a stay, a revoke's reason, a time
zone and a property name put in the event, and the flags refused before anything is published."""

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from worker import events
from worker.cli import parser
from worker.commands import Failed
from worker.commands.publish import grant_or_revoke

PARIS = timezone(timedelta(hours=1))


def published(*argv: str) -> dict[str, Any]:
    """The event `ikw publish ARGV` would publish."""
    body, _, _ = grant_or_revoke(parser().parse_args(["publish", *argv]))
    event: dict[str, Any] = json.loads(body)
    return event


def refused(*argv: str) -> str:
    with pytest.raises(Failed) as raised:
        published(*argv)
    assert raised.value.exit_code == 2
    return str(raised.value)


def test_granted_with_a_stay_writes_its_moments_as_rfc3339() -> None:
    event = events.granted(
        user_identity_key="guest-1",
        stay={
            "reservation_key": "res-48213",
            "starts_at": datetime(2026, 12, 10, 15, tzinfo=PARIS),
            "ends_at": datetime(2026, 12, 12, 10, tzinfo=UTC),
            "deliver_at": "2026-12-09T15:00:00+01:00",
            "revision": 3,
        },
    )
    assert event["stay"] == {
        "reservation_key": "res-48213",
        "starts_at": "2026-12-10T15:00:00+01:00",
        "ends_at": "2026-12-12T10:00:00Z",
        "deliver_at": "2026-12-09T15:00:00+01:00",
        "revision": 3,
    }
    bare = events.granted(
        user_identity_key="guest-1",
        stay={"reservation_key": "r", "starts_at": "2026-12-10T15:00Z", "ends_at": "2026-12-11Z"},
    )
    assert bare["stay"] == {
        "reservation_key": "r",
        "starts_at": "2026-12-10T15:00Z",
        "ends_at": "2026-12-11Z",
        "revision": 0,
    }
    assert "stay" not in events.granted(user_identity_key="guest-1")
    with pytest.raises(ValueError, match="offset"):
        events.granted(
            user_identity_key="g",
            stay={"reservation_key": "r", "starts_at": datetime(2026, 12, 10), "ends_at": "x"},
        )


def test_revoked_names_the_reservation_and_the_reason_only_when_given() -> None:
    event = events.revoked(user_identity_key="guest-1", reservation_key="res-1", reason="no_show")
    assert (event["reservation_key"], event["reason"]) == ("res-1", "no_show")
    assert event["user_identity"]["user_identity_key"] == "guest-1"
    plain = events.revoked(user_identity_key="guest-1")
    assert "reservation_key" not in plain and "reason" not in plain


def test_publish_grant_with_a_stay() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    event = published(
        "grant", "--key", "guest-1", "--phone", "+14155550100",
        "--reservation", "res-48213", "--starts-at", "2026-12-10T15:00:00+01:00",
        "--ends-at", "2026-12-12T11:00Z", "--deliver-at", "+2m", "--revision", "3",
    )  # fmt: skip
    stay = event["stay"]
    assert stay["reservation_key"] == "res-48213"
    assert (stay["starts_at"], stay["ends_at"]) == (
        "2026-12-10T15:00:00+01:00",
        "2026-12-12T11:00:00Z",
    )
    deliver_at = datetime.fromisoformat(stay["deliver_at"])
    assert before + timedelta(minutes=2) <= deliver_at <= datetime.now(UTC) + timedelta(minutes=2)
    assert stay["revision"] == 3

    relative = published(
        "grant", "--key", "g", "--email", "g@example.com",
        "--reservation", "r", "--starts-at", "+90s", "--ends-at", "+3d",
    )["stay"]  # fmt: skip
    ends_at = datetime.fromisoformat(relative["ends_at"])
    assert (
        timedelta(days=3) - timedelta(seconds=5) < ends_at - before <= timedelta(days=3, seconds=5)
    )
    assert "deliver_at" not in relative and relative["revision"] == 0


def test_publish_revoke_of_one_stay_with_its_reason() -> None:
    event = published(
        "revoke", "--key", "guest-1", "--reservation", "res-1", "--reason", "cancelled"
    )
    assert (event["type"], event["reservation_key"], event["reason"]) == (
        "access.revoked",
        "res-1",
        "cancelled",
    )
    assert "reservation_key" not in published("revoke", "--key", "guest-1")


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["grant", "--reservation", "r", "--starts-at", "+1m"],
         "a stay needs --starts-at and --ends-at"),
        (["grant", "--ends-at", "+1d"], "a stay needs --reservation KEY"),
        (["grant", "--revision", "2"], "a stay needs --reservation KEY"),
        (["grant", "--reason", "other"], "--reason goes with `ikw publish revoke`"),
        (["revoke", "--reservation", "r", "--starts-at", "+1m"],
         "--starts-at goes with `ikw publish grant`"),
        (["revoke", "--revision", "1"], "--revision goes with `ikw publish grant`"),
    ],
)  # fmt: skip
def test_stay_flags_in_the_wrong_place_are_one_line(argv: list[str], line: str) -> None:
    assert refused(argv[0], "--key", "k", "--phone", "+14155550100", *argv[1:]) == line


@pytest.mark.parametrize("bad", ["tomorrow", "2026-12-10T15:00", "+2w", "+-1d"])
def test_a_moment_is_rfc3339_with_an_offset_or_from_now(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        published("grant", "--key", "k", "--reservation", "r", "--starts-at", bad)
    assert raised.value.code == 2
    said = capsys.readouterr().err.splitlines()[-1]
    assert said.startswith("ikw publish: error: argument --starts-at: ")


def test_publish_grant_without_a_contact_for_its_channels_is_refused() -> None:
    assert refused("grant", "--key", "k") == (
        "no contact for channels sms,email: give --phone or --email"
    )
    assert refused("grant", "--key", "k", "--channels", "email", "--phone", "+14155550100") == (
        "no contact for channels email: give --email"
    )
    assert published("grant", "--key", "k", "--channels", "sms,email", "--email", "k@example.com")


def test_publish_grant_carries_the_time_zone_and_the_property_name() -> None:
    event = published(
        "grant", "--key", "k", "--phone", "+14155550100",
        "--time-zone", "Europe/Paris", "--property-name", "Harbor Hotel",
    )  # fmt: skip
    assert event["delivery"] == {
        "channels": ["sms", "email"],
        "locale": "en",
        "time_zone": "Europe/Paris",
        "property_name": "Harbor Hotel",
    }
    assert (
        "time_zone" not in published("grant", "--key", "k", "--phone", "+14155550100")["delivery"]
    )
