"""Crashes told from returns, without I/O: what a redelivery becomes, and the records' counts."""

from typing import Any

from worker.broker.decision import DeadLetter, Reset
from worker.broker.returns import (
    CRASH_LIMIT,
    RESET_AT,
    VERDICT_DELAY,
    Returns,
    delivery_count,
    key,
    redelivered,
)


def test_a_first_redelivery_is_handled_as_it_is() -> None:
    assert redelivered(1, 0, 0) is None
    assert redelivered(1, 0, 1) is None


def test_returns_recorded_keep_a_message_from_the_crash_limit_and_a_copy_resets_the_count() -> None:
    assert redelivered(RESET_AT, 0, RESET_AT) == Reset(RESET_AT)
    # The copy carries the deliveries so far: its own count starts again at 0.
    assert redelivered(RESET_AT, RESET_AT, 2 * RESET_AT) == Reset(2 * RESET_AT)


def test_unexplained_deliveries_are_crashes_dead_lettered_after_a_wait_for_late_returns() -> None:
    assert redelivered(CRASH_LIMIT - 1, 0, 0) == Reset(CRASH_LIMIT - 1)
    # At the limit it waits in the delay queues first, then is judged again, not handled.
    assert redelivered(CRASH_LIMIT, 0, 0) == Reset(CRASH_LIMIT, VERDICT_DELAY)
    dead = redelivered(0, CRASH_LIMIT, 0, suspect=True)
    assert isinstance(dead, DeadLetter) and dead.reason == "crash_loop"
    # Returns recorded meanwhile clear it: handled as usual.
    assert redelivered(0, CRASH_LIMIT, 1, suspect=True) is None
    # Crashes before a copy count after it.
    assert redelivered(1, CRASH_LIMIT - 1, 0) == Reset(CRASH_LIMIT, VERDICT_DELAY)


def test_a_return_recorded_after_the_copy_still_counts() -> None:
    """The copy was made before two returns were read: it carries the deliveries, not crashes,
    so the late records lower the count at the copy's next delivery."""
    carried = 2  # copied at a delivery count of 2, no return known then
    assert redelivered(1, carried, 0) == Reset(3, VERDICT_DELAY)  # had they not come yet
    assert redelivered(1, carried, 2) is None


def test_a_record_read_twice_counts_once() -> None:
    returns = Returns()
    entry: dict[str, Any] = {"t": "returned", "id": "r1", "keys": ["a", "b"]}
    returns.apply(entry)
    returns.apply(entry)
    returns.apply({"t": "returned", "id": "r2", "keys": ["a"]})
    assert (returns.returns("a"), returns.returns("b"), returns.returns("c")) == (2, 1, 0)


async def test_a_note_counts_at_once_is_recorded_and_counts_once_when_read_back() -> None:
    returns = Returns()
    returns.note(["k", "k"])
    assert returns.returns("k") == 1
    recorded: list[dict[str, Any]] = []

    async def append(entry: dict[str, Any]) -> None:
        recorded.append(entry)

    await returns.flush(append)
    assert [e["keys"] for e in recorded] == [["k"]]
    returns.apply(recorded[0])  # our own record, read back from the stream
    assert returns.returns("k") == 1


async def test_a_note_that_could_not_be_recorded_is_kept_for_the_next_try() -> None:
    returns = Returns()
    returns.note(["k"])

    async def refuse(entry: dict[str, Any]) -> None:
        raise TimeoutError

    try:
        await returns.flush(refuse)
    except TimeoutError:
        pass
    recorded: list[dict[str, Any]] = []

    async def append(entry: dict[str, Any]) -> None:
        recorded.append(entry)

    await returns.flush(append)
    assert len(recorded) == 1


def test_keys_and_counts() -> None:
    assert key("q", b"body") == key("q", b"body") != key("other", b"body")
    assert delivery_count({"x-delivery-count": 3}) == 3
    assert delivery_count({"x-delivery-count": True}) == 0
    assert delivery_count({"x-delivery-count": "3"}) == 0
    assert delivery_count(None) == 0
