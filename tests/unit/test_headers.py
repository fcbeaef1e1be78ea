"""The x-ikw-* codec: what it writes reads back, and hostile values never raise."""

from datetime import UTC, datetime

import pytest

from worker.broker import headers
from worker.broker.headers import Bookkeeping

WHEN = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def test_what_is_written_reads_back() -> None:
    book = Bookkeeping(
        attempt=3,
        first_failed_at=WHEN,
        routing_key="access.granted",
        last_error="seam answered 503",
        publisher="booking",
        reason="retries_exhausted",
        error="gave up",
        attempts_made=3,
        source_queue="instant_keys.grants",
        dead_lettered_at=WHEN,
        received_at=WHEN,
        truncated=10_485_760,
    )
    assert headers.read(headers.write(book)) == book


@pytest.mark.parametrize(
    "value",
    ["2026-11-28T12:00:00", "yesterday", "9" * 500, 12, None, b"\xff\xfe", [1], {"a": 1}],
)
def test_a_hostile_first_failure_time_reads_as_absent(value: object) -> None:
    assert headers.read({headers.FIRST_FAILED_AT: value}).first_failed_at is None


@pytest.mark.parametrize("value", [999_999_999, 0, -4, True, "3", 2.5, None])
def test_an_attempt_out_of_range_or_of_the_wrong_type_reads_as_the_first(value: object) -> None:
    assert headers.read({headers.ATTEMPT: value}).attempt == 1


def test_an_amqp_timestamp_is_utc() -> None:
    assert headers.moment(datetime(2026, 11, 28, 12, 0)) == WHEN


def test_foreign_keeps_the_producers_headers_only() -> None:
    raw = {
        "traceparent": "00-abc-def-01",
        "x-ikw-attempt": 999,
        "x-death": [],
        "x-first-death-queue": "q",
        "x-delivery-count": 3,
    }
    assert headers.foreign(raw) == {"traceparent": "00-abc-def-01"}


def test_a_replay_restarts_at_attempt_one_and_keeps_who_and_where() -> None:
    dead = headers.write(
        Bookkeeping(
            attempt=4,
            routing_key="access.granted",
            publisher="booking",
            reason="retries_exhausted",
            source_queue="q",
            received_at=WHEN,
        )
    ) | {"traceparent": "t"}
    replayed = headers.for_replay(dead, "ikw", "ikw")
    assert replayed == {
        "traceparent": "t",
        headers.ROUTING_KEY: "access.granted",
        headers.PUBLISHER: "booking",
        headers.RECEIVED_AT: WHEN.isoformat(),  # its clock is judged by its first receipt
    }


def test_a_dead_letter_the_broker_wrote_keeps_the_producer_it_named() -> None:
    # A producer's own x-ikw-publisher claim is never carried into a replay.
    forged = {headers.PUBLISHER: "booking", headers.ROUTING_KEY: "access.granted"}
    replayed = headers.for_replay(forged, "mallory", "ikw")
    assert replayed[headers.PUBLISHER] == "mallory"
    assert headers.for_replay(forged, None, "ikw")[headers.PUBLISHER] == ""


def test_a_producer_cannot_date_its_own_receipt() -> None:
    forged = {headers.RECEIVED_AT: "2036-01-01T00:00:00+00:00"}
    assert headers.RECEIVED_AT not in headers.for_replay(forged, "mallory", "ikw")
    assert headers.RECEIVED_AT not in headers.foreign(forged)


@pytest.mark.parametrize("value", [0, -1, True, "65536", 2.5])
def test_a_hostile_truncated_size_reads_as_absent(value: object) -> None:
    assert headers.read({headers.TRUNCATED: value}).truncated is None
