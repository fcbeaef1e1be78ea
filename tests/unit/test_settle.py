"""The executor's every settle branch against a stub of the broker port (as dramatiq's
StubBroker): what is published where, with which headers, and whether the original is acked,
nacked or left to the broker. The same branches run on the real broker in tests/integration."""

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelClosed

from tests.builders import grant
from worker.broker import headers
from worker.broker.decision import (
    Ack,
    DeadLetter,
    Decision,
    Requeue,
    Reset,
    Retry,
    Settled,
    TakenBack,
)
from worker.broker.headers import Bookkeeping
from worker.broker.returns import Returns, key
from worker.broker.settle import Handling, Settler, refusal
from worker.errors import CredentialsRefused, Reason
from worker.events import (
    MAX_BODY_BYTES,
    AccessDeliveryFailed,
    AccessGranted,
    AccessRejected,
    StayDelivery,
    parse,
)
from worker.routes import ROUTES, Route

QUEUE, DEAD = "ns.grants", "ns.dead"
FAILED_AT = datetime(2026, 12, 5, 21, 0, tzinfo=UTC)
GRANTS, REVOCATIONS, CLEANUP, DELIVERIES, CHECKOUTS = ROUTES


@dataclass
class StubChannel:
    is_closed: bool = False


@dataclass(eq=False)
class StubMessage:
    """The parts of an incoming message settling touches; ack and nack may fail as on a cut."""

    body: bytes = b'{"type": "access.granted"}'
    headers: dict[str, Any] = field(default_factory=lambda: {"traceparent": "00-x"})
    message_id: str = "m-1"
    content_type: str = "application/json"
    content_encoding: str | None = None
    routing_key: str = "access.granted"
    user_id: str = "booking"
    channel: StubChannel = field(default_factory=StubChannel)
    ack_fails: bool = False
    acked: bool = False
    nacked: bool = False

    async def ack(self) -> None:
        if self.ack_fails:
            raise ChannelClosed(406, "PRECONDITION_FAILED")
        self.acked = True

    async def nack(self, requeue: bool = True) -> None:
        assert requeue
        self.nacked = True


@dataclass
class Sent:
    queue: str
    body: bytes
    delay: float | None
    properties: dict[str, Any]

    @property
    def book(self) -> Bookkeeping:
        return headers.read(self.properties["headers"])


@dataclass
class StubPort:
    """The publisher's side of settling: records each confirmed copy; may fail or lose the
    original's channel while waiting for the connection."""

    sent: list[Sent] = field(default_factory=list)
    fails: bool = False
    closes: StubChannel | None = None

    async def ready(self) -> None:
        if self.closes is not None:
            self.closes.is_closed = True

    async def to_queue(self, queue: str, body: bytes, **kwargs: Any) -> None:
        await self._send(queue, body, None, kwargs)

    async def delayed(self, queue: str, body: bytes, seconds: float, **kwargs: Any) -> None:
        await self._send(queue, body, seconds, kwargs)

    async def _send(self, queue: str, body: bytes, delay: float | None, kw: dict[str, Any]) -> None:
        if self.fails:
            raise ChannelClosed(404, "NOT_FOUND")
        self.sent.append(Sent(queue, body, delay, kw))


@dataclass
class Case:
    port: StubPort = field(default_factory=StubPort)
    message: StubMessage = field(default_factory=StubMessage)
    returns: Returns = field(default_factory=Returns)
    refused: list[CredentialsRefused] = field(default_factory=list)
    error: Exception | None = None

    async def settle(self, decided: Decision) -> Settled:
        settler = Settler(self.port, DEAD, self.returns, self.refused.append)
        message = cast(AbstractIncomingMessage, self.message)
        settler.holding[message] = QUEUE
        book = Bookkeeping(attempt=2, first_failed_at=FAILED_AT, received_at=FAILED_AT)
        h = Handling(QUEUE, message, book, producer="booking", error=self.error)
        return await settler.carry_out(h, decided)


@pytest.fixture
def case() -> Case:
    return Case()


async def test_a_success_is_acked_and_nothing_published(case: Case) -> None:
    assert await case.settle(Ack()) is Settled.ACKED
    assert case.message.acked and case.port.sent == []


async def test_an_ack_lost_with_the_channel_is_redelivered(case: Case) -> None:
    case.message.ack_fails = True
    assert await case.settle(Ack()) is Settled.REDELIVERED
    assert not case.message.nacked


async def test_a_message_taken_back_is_left_alone(case: Case) -> None:
    assert await case.settle(TakenBack()) is Settled.TAKEN_BACK
    assert case.port.sent == [] and not case.message.acked and not case.message.nacked


async def test_a_retry_goes_through_the_delay_queues_with_the_next_attempt(case: Case) -> None:
    decided = Retry(8.0, 3, FAILED_AT, "seam answered 503")
    assert await case.settle(decided) is Settled.RETRIED
    (sent,) = case.port.sent
    assert (sent.queue, sent.delay, sent.body) == (QUEUE, 8.0, case.message.body)
    assert (sent.book.attempt, sent.book.last_error) == (3, "seam answered 503")
    assert (sent.book.publisher, sent.book.routing_key) == ("booking", "access.granted")
    assert sent.properties["headers"]["traceparent"] == "00-x"  # the producer's own kept
    assert sent.properties["message_id"] == "m-1" and case.message.acked


async def test_refused_credentials_requeue_unchanged_and_say_so(case: Case) -> None:
    case.error = CredentialsRefused("twilio refused", service="twilio")
    assert await case.settle(Requeue()) is Settled.REQUEUED
    (sent,) = case.port.sent
    assert (sent.queue, sent.delay, sent.book.attempt) == (QUEUE, None, 2)
    assert case.refused == [case.error] and case.message.acked


@pytest.mark.parametrize("delay", [0.0, 10.0])
async def test_a_fresh_copy_carries_its_deliveries(case: Case, delay: float) -> None:
    assert await case.settle(Reset(deliveries=2, excused=1, delay=delay)) is Settled.REQUEUED
    (sent,) = case.port.sent
    assert (sent.book.deliveries, sent.book.excused) == (2, 1)
    assert sent.book.copied_at is not None and sent.book.suspect is (delay > 0)
    assert sent.delay == (delay or None) and case.message.acked


async def test_a_dead_letter_carries_its_reason_to_the_dead_queue(case: Case) -> None:
    decided = DeadLetter(Reason.NO_CHANNEL_ACCEPTED, "sms: refused (21610)")
    assert await case.settle(decided) is Settled.DEAD_LETTERED
    (sent,) = case.port.sent
    assert (sent.queue, sent.body, sent.book.truncated) == (DEAD, case.message.body, None)
    assert (sent.book.reason, sent.book.error) == ("no_channel_accepted", "sms: refused (21610)")
    assert (sent.book.attempts_made, sent.book.source_queue) == (2, QUEUE)
    assert sent.book.first_failed_at == FAILED_AT and sent.book.dead_lettered_at is not None
    assert case.message.acked


async def test_a_dead_letter_over_the_size_limit_is_kept_in_part(case: Case) -> None:
    case.message.body = b"x" * (MAX_BODY_BYTES + 10)
    assert await case.settle(DeadLetter(Reason.TOO_LARGE, "too big")) is Settled.DEAD_LETTERED
    (sent,) = case.port.sent
    assert len(sent.body) == MAX_BODY_BYTES and sent.book.truncated == MAX_BODY_BYTES + 10


async def test_a_failed_copy_hands_the_message_back_as_a_return(case: Case) -> None:
    case.port.fails = True
    decided = Retry(1.0, 3, FAILED_AT, "timeout")
    assert await case.settle(decided) is Settled.REDELIVERED
    assert case.message.nacked and not case.message.acked
    # The broker failed us, not the message: a return, not a crash.
    assert case.returns.returns(key(QUEUE, case.message.body)) == 1


async def test_a_channel_lost_while_waiting_publishes_no_copy(case: Case) -> None:
    case.port.closes = case.message.channel
    assert await case.settle(Retry(1.0, 3, FAILED_AT, "timeout")) is Settled.TAKEN_BACK
    assert case.port.sent == [] and not case.message.acked


async def test_a_copy_whose_ack_is_lost_is_redelivered(case: Case) -> None:
    case.message.ack_fails = True
    assert await case.settle(Retry(1.0, 3, FAILED_AT, "timeout")) is Settled.REDELIVERED
    assert len(case.port.sent) == 1


async def test_settling_that_fails_nacks_as_a_last_resort(case: Case) -> None:
    settler = Settler(case.port, DEAD, case.returns, case.refused.append)
    message = cast(AbstractIncomingMessage, case.message)
    settler.holding[message] = QUEUE
    assert await settler.give_back(message, RuntimeError("a bug")) is Settled.NACKED
    assert case.message.nacked and message not in settler.holding
    assert case.returns.returns(key(QUEUE, case.message.body)) == 0  # a bug: a crash


async def test_settling_that_fails_on_a_closed_channel_leaves_it_to_the_broker(
    case: Case,
) -> None:
    case.message.channel.is_closed = True
    settler = Settler(case.port, DEAD, case.returns, case.refused.append)
    message = cast(AbstractIncomingMessage, case.message)
    assert await settler.give_back(message, RuntimeError("cut")) is Settled.REDELIVERED
    assert not case.message.nacked


def dead_handling(body: bytes, event: Any = None) -> Handling:
    message = cast(AbstractIncomingMessage, StubMessage(body=body))
    h = Handling(QUEUE, message, Bookkeeping(), producer="booking", event=event)
    h.decided = DeadLetter(Reason.INVALID_EVENT, "delivery.time_zone: unknown")
    return h


def test_a_grant_read_then_dead_lettered_is_a_failed_delivery_and_nothing_else() -> None:
    event = parse(json.dumps(grant("guest-1")).encode(), "application/json")
    assert isinstance(event, AccessGranted)
    refused = refusal(dead_handling(b"{}", event), GRANTS)
    assert isinstance(refused, AccessDeliveryFailed)
    assert (refused.event_id, refused.reason) == (event.event_id, "invalid_event")


@pytest.mark.parametrize("route", [GRANTS, REVOCATIONS, None], ids=["grants", "revokes", "none"])
def test_an_event_refused_before_it_was_read_is_rejected_with_what_could_be_read(
    route: Route | None,
) -> None:
    raw = json.dumps(grant("guest-1", event_id="e-1", grant_id="g-1") | {"delivery": 3})
    refused = refusal(dead_handling(raw.encode()), route)
    assert isinstance(refused, AccessRejected)
    assert (refused.event_id, refused.grant_id, refused.event_type) == (
        "e-1",
        "g-1",
        "access.granted",
    )
    assert (refused.reason, refused.error) == ("invalid_event", "delivery.time_zone: unknown")


def test_a_body_that_is_not_json_is_rejected_with_nothing_read() -> None:
    refused = refusal(dead_handling(b"event_id=e-1"), GRANTS)
    assert isinstance(refused, AccessRejected)
    assert (refused.event_id, refused.grant_id, refused.event_type) == (None, None, None)


def test_a_stays_key_dead_lettered_when_due_is_a_failed_delivery_of_its_grant() -> None:
    event = parse(json.dumps(grant("guest-1")).encode(), "application/json")
    assert isinstance(event, AccessGranted)
    due = StayDelivery(
        type="stay.delivery", version=1, reason="initial", due_at=event.occurred_at, grant=event
    )
    refused = refusal(dead_handling(b"{}", due), DELIVERIES)
    assert isinstance(refused, AccessDeliveryFailed) and refused.grant_id == event.grant_id


def test_the_workers_own_timers_and_settled_messages_announce_nothing() -> None:
    assert refusal(dead_handling(b"{}"), CLEANUP) is None
    assert refusal(dead_handling(b"{}"), CHECKOUTS) is None
    h = dead_handling(b"{}")
    h.decided = Ack()
    assert refusal(h, GRANTS) is None
