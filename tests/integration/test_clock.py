"""Producers' clocks: an event dated ahead of its first receipt is refused, and a retry is judged
by when the worker first received it, not by when it came back."""

from datetime import UTC, datetime, timedelta

from tests.builders import grant, revoke
from tests.helpers import Connection, Publish, StartWorker, dead_letters
from worker.broker import headers
from worker.broker.topology import Names
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox


async def test_an_event_from_ten_years_ahead_is_refused_before_seam(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, amqp: Connection, names: Names
) -> None:
    await start_worker()
    ahead = datetime.now(UTC) + timedelta(days=3650)
    await publish(grant("guest-future", occurred_at=ahead.isoformat()), message_id="evt-grant")
    await publish(revoke("guest-future", occurred_at=ahead), message_id="evt-revoke")

    letters = await dead_letters(amqp, names, 2)

    assert sorted(str(m.message_id) for m in letters) == ["evt-grant", "evt-revoke"]
    for letter in letters:
        book = headers.read(letter.headers)
        assert book.reason == "occurred_in_future"
        assert book.error is not None and book.error.startswith("occurred_at is 36")
        assert book.received_at is not None
    # Nothing reached Seam (but the worker's own credentials check) or a guest.
    assert {path for _, path, _ in sandbox.seam.requests} <= {"/user_identities/list"}
    assert sandbox.twilio.outbox == [] and sandbox.smtp.messages == []


async def test_a_retry_is_judged_by_its_first_receipt(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    amqp: Connection,
    names: Names,
) -> None:
    # Seam fails twice: the grant is retried once (a second later), then dead-lettered.
    sandbox.seam.fail_next(503, count=2, path="/user_identities/get")
    await start_worker(IKW_MAX_ATTEMPTS="2")
    await publish(grant("guest-retried"), message_id="evt-retried")

    [letter] = await dead_letters(amqp, names, 1)
    book = headers.read(letter.headers)
    assert book.reason == "retries_exhausted"
    # Stamped when first received, before the first failure: the retry kept it.
    assert book.received_at is not None and book.first_failed_at is not None
    assert book.received_at <= book.first_failed_at

    # A copy received an hour ago and dated half an hour ago was from the future when it came.
    stamped = {headers.RECEIVED_AT: (datetime.now(UTC) - timedelta(hours=1)).isoformat()}
    late = grant("guest-late", occurred_at=(datetime.now(UTC) - timedelta(minutes=30)).isoformat())
    await publish(late, message_id="evt-late", headers=stamped)
    [letter] = await dead_letters(amqp, names, 1)
    assert headers.read(letter.headers).reason == "occurred_in_future"

    # The same event, new to the worker, is on time.
    await publish(late, message_id="evt-on-time")
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS")
