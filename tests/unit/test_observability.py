"""The queue-wait histogram, the credentials gauge and IKW_LOG_LEVEL, without a broker."""

import logging
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage

from worker import config, logs
from worker.metrics import Metrics

BASE = {"SEAM_API_KEY": "k", "SMTP_HOST": "localhost", "EMAIL_FROM": "keys@example.com"}


def message(body: bytes, **properties: Any) -> AbstractIncomingMessage:
    fields = {"timestamp": None, "headers": {}} | properties
    return cast(AbstractIncomingMessage, SimpleNamespace(body=body, **fields))


def waits(metrics: Metrics) -> tuple[float, float]:
    get = metrics.registry.get_sample_value
    return (
        get("ikw_queue_wait_seconds_count", {"queue": "q"}) or 0.0,
        get("ikw_queue_wait_seconds_sum", {"queue": "q"}) or 0.0,
    )


def test_wait_is_from_the_timestamp_else_occurred_at() -> None:
    metrics = Metrics()
    ago = datetime.now(UTC) - timedelta(seconds=90)
    metrics.observe_wait("q", message(b"{}"), ago)
    # The AMQP timestamp wins over occurred_at; aio-pika may give it without a zone (UTC).
    stamp = (datetime.now(UTC) - timedelta(seconds=30)).replace(tzinfo=None)
    old = datetime(2000, 1, 1, tzinfo=UTC)
    metrics.observe_wait("q", message(b"{}", timestamp=stamp), old)
    count, total = waits(metrics)
    assert count == 2
    assert 119 <= total < 125


@pytest.mark.parametrize(
    "occurred_at,properties",
    [
        # Nothing to measure from (a cleanup, an event that did not parse).
        (None, {}),
        # Back from the delay queues: a retry or a cleanup, waiting on purpose.
        (datetime(2024, 1, 1, tzinfo=UTC), {"headers": {"x-death": [{}]}}),
    ],
)
def test_no_wait_is_counted_without_a_start_or_after_a_delay(
    occurred_at: datetime | None, properties: dict[str, Any]
) -> None:
    metrics = Metrics()
    metrics.observe_wait("q", message(b"{}", **properties), occurred_at)
    assert waits(metrics) == (0.0, 0.0)


def test_a_clock_ahead_of_ours_counts_as_no_wait() -> None:
    metrics = Metrics()
    metrics.observe_wait("q", message(b"{}", timestamp=datetime.now(UTC) + timedelta(minutes=5)))
    assert waits(metrics) == (1.0, 0.0)


def test_credentials_refused_names_one_service_at_a_time() -> None:
    metrics = Metrics()

    def gauge() -> dict[str, float]:
        [family] = [f for f in metrics.registry.collect() if f.name == "ikw_credentials_refused"]
        return {s.labels["service"]: s.value for s in family.samples}

    assert gauge() == {"seam": 0.0}
    metrics.refused("twilio")
    assert gauge() == {"seam": 0.0, "twilio": 1.0}
    metrics.refused("seam")
    assert gauge() == {"seam": 1.0, "twilio": 0.0}
    metrics.refused("")
    assert gauge() == {"seam": 0.0, "twilio": 0.0}


def test_build_info_names_the_version() -> None:
    value = Metrics().registry.get_sample_value(
        "ikw_build_info", {"version": "0.1.0", "python": __import__("platform").python_version()}
    )
    assert value == 1.0


@pytest.mark.parametrize("raw,level", [("", "info"), ("DEBUG", "debug"), (" warning ", "warning")])
def test_log_level_is_read(raw: str, level: str) -> None:
    assert config.load(BASE | {"IKW_LOG_LEVEL": raw}).log_level == level


def test_a_bad_log_level_is_one_line_naming_the_variable() -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(BASE | {"IKW_LOG_LEVEL": "verbose"})
    assert str(caught.value) == (
        "IKW_LOG_LEVEL: must be debug, info, warning or error, got 'verbose'"
    )
    assert "IKW_LOG_LEVEL" in dict(config.VARIABLES)


def test_setup_applies_the_level() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.setup("debug")
        assert root.level == logging.DEBUG
        assert logging.getLogger("twilio").level == logging.WARNING  # bodies hold key links
        logs.setup("error")
        assert root.level == logging.ERROR
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.parametrize(
    "created", [0.0, 1.9995, 1.9999996, 1764297600.0004999, 1764297600.9999999, 2e9 + 0.123456]
)
def test_log_timestamps_read_as_isoformat_did(created: float) -> None:
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    assert logs.JsonFormatter()._timestamp(created) == expected


def test_contacts_in_free_text_are_masked() -> None:
    text = '"phone": "+14155550100", "email": "ada.lovelace@example.com", "note": "call 0207946095"'
    assert logs.mask_contacts(text) == (
        '"phone": "+1********00", "email": "a***@example.com", "note": "call 02******95"'
    )


@pytest.mark.parametrize(
    "body",
    ["a" * 65_536, "1" * 65_536, "+1" + " 1" * 32_767, "a" * 65_535 + "@", "x@" + "a." * 32_767],
)
def test_masking_a_hostile_body_costs_milliseconds_not_seconds(body: str) -> None:
    # Unbounded repeats made `ikw dlq show` backtrack for seconds over 64 KiB of letters.
    started = time.process_time()
    logs.mask_contacts(body)
    assert time.process_time() - started < 0.5
