"""Crashes told from returns, without I/O: what a redelivery becomes, and the records' counts."""

from datetime import UTC, datetime, timedelta
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


def judge(
    count: int,
    carried: int = 0,
    excused: int = 0,
    returned: int = 0,
    losses: int = 0,
    suspect: bool = False,
) -> Reset | DeadLetter | None:
    return redelivered(count, carried, excused, returned, losses, suspect)


def test_a_first_redelivery_is_handled_as_it_is() -> None:
    assert judge(1) is None
    assert judge(1, returned=1) is None


def test_returns_recorded_keep_a_message_from_the_crash_limit_and_a_copy_resets_the_count() -> None:
    assert judge(RESET_AT, returned=RESET_AT) == Reset(RESET_AT)
    # The copy carries the deliveries so far: its own count starts again at 0.
    assert judge(RESET_AT, carried=RESET_AT, returned=2 * RESET_AT) == Reset(2 * RESET_AT)


def test_unexplained_deliveries_are_crashes_dead_lettered_after_a_wait_for_late_returns() -> None:
    assert judge(CRASH_LIMIT - 1) == Reset(CRASH_LIMIT - 1)
    # At the limit it waits in the delay queues first, then is judged again, not handled.
    assert judge(CRASH_LIMIT) == Reset(CRASH_LIMIT, 0, VERDICT_DELAY)
    dead = judge(0, carried=CRASH_LIMIT, suspect=True)
    assert isinstance(dead, DeadLetter) and dead.reason == "crash_loop"
    # Returns recorded meanwhile clear it: handled as usual.
    assert judge(0, carried=CRASH_LIMIT, returned=1, suspect=True) is None
    # Crashes before a copy count after it.
    assert judge(1, carried=CRASH_LIMIT - 1) == Reset(CRASH_LIMIT, 0, VERDICT_DELAY)


def test_a_return_recorded_after_the_copy_still_counts() -> None:
    """The copy was made before two returns were read: it carries the deliveries, not crashes,
    so the late records lower the count at the copy's next delivery."""
    carried = 2  # copied at a delivery count of 2, no return known then
    assert judge(1, carried=carried) == Reset(3, 0, VERDICT_DELAY)  # had they not come yet
    assert judge(1, carried=carried, returned=2) is None


def test_losses_recorded_explain_deliveries_no_worker_saw() -> None:
    """Sent to consumers on a node that went down, a message comes back three times unseen:
    three workers recorded a lost channel meanwhile, so none of it is a crash; the copy keeps
    the excuse, however old the losses get."""
    assert judge(CRASH_LIMIT, losses=CRASH_LIMIT) == Reset(CRASH_LIMIT, CRASH_LIMIT)
    assert judge(1, carried=CRASH_LIMIT, excused=CRASH_LIMIT) is None
    # With no loss recorded, the same deliveries are crashes.
    assert judge(1, carried=CRASH_LIMIT) == Reset(CRASH_LIMIT + 1, 0, VERDICT_DELAY)


def test_losses_are_counted_by_when_they_happened() -> None:
    returns = Returns()
    before = datetime.now(UTC) - timedelta(seconds=1)
    returns.note([], loss=True)
    returns.note(["k"])  # a message handed back: not a lost channel
    an_hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    returns.apply({"t": "returned", "id": "old", "keys": [], "at": an_hour_ago, "loss": True})
    assert returns.losses_since(before) == 1
    assert returns.losses_since(datetime.now(UTC) - timedelta(hours=2)) == 2


def test_records_older_than_a_day_are_forgotten() -> None:
    returns = Returns()
    two_days_ago = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    returns.apply({"t": "returned", "id": "r0", "keys": ["a"], "at": two_days_ago, "loss": True})
    assert returns.returns("a") == 0  # read back from an old stream: not counted at all
    returns.note(["a"], loss=True)
    returns.note(["b"])
    assert (returns.returns("a"), returns.returns("b")) == (1, 1)
    returns.forget(datetime.now(UTC) + timedelta(seconds=1))  # a day later, as a sweep sees it
    assert (returns.returns("a"), returns.returns("b")) == (0, 0)
    assert returns.losses_since(datetime(2020, 1, 1, tzinfo=UTC)) == 0


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
