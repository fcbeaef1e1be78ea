"""The pure decision, one test per row of the README's failure table, and the trust boundary."""

from datetime import UTC, datetime, timedelta

import pytest

from tests.builders import body, grant, revoke
from worker.broker.decision import (
    PATIENT_BACKOFF,
    Ack,
    DeadLetter,
    Limits,
    Requeue,
    Retry,
    TakenBack,
    Trust,
    backoff,
    check_clock,
    check_event,
    check_publisher,
    decide,
    producer_of,
)
from worker.errors import (
    ChannelRefused,
    CredentialsRefused,
    InvalidEvent,
    Permanent,
    Reason,
    SeamRejected,
    TakenBackError,
    Transient,
)
from worker.events import Event, parse
from worker.routes import ROUTES

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
LIMITS = Limits(max_attempts=5, max_retry_age=timedelta(hours=1))


def decided(error: BaseException | None, *, attempt: int = 1, **kwargs: object) -> object:
    options: dict[str, object] = {
        "held": True,
        "attempt": attempt,
        "first_failed_at": None,
        "now": NOW,
        "limits": LIMITS,
        "jitter": 1.0,
    }
    return decide(error, **(options | kwargs))  # type: ignore[arg-type]


def test_success_is_acked() -> None:
    assert decided(None) == Ack()


@pytest.mark.parametrize(
    "error",
    [
        Transient("seam /instant_keys/list answered 503"),
        Transient("smtp could not take the message (code 451)"),
        TimeoutError(),
        ConnectionResetError(),
    ],
)
def test_a_transient_failure_is_retried_later_with_the_attempt_counted(error: Exception) -> None:
    result = decided(error, attempt=3)
    assert isinstance(result, Retry)
    assert (result.attempt, result.delay, result.first_failed_at) == (4, 4.0, NOW)


def test_the_retry_waits_at_least_for_retry_after() -> None:
    result = decided(Transient("429", retry_after=30))
    assert isinstance(result, Retry) and result.delay == 30


def test_the_first_failure_time_is_carried_across_retries() -> None:
    first = NOW - timedelta(minutes=10)
    result = decided(Transient("503"), attempt=2, first_failed_at=first)
    assert isinstance(result, Retry) and result.first_failed_at == first


def test_past_max_attempts_a_transient_failure_is_dead_lettered() -> None:
    result = decided(Transient("seam answered 503"), attempt=5)
    assert result == DeadLetter("retries_exhausted", "gave up after 5 attempts: seam answered 503")


def test_past_max_retry_age_a_transient_failure_is_dead_lettered() -> None:
    result = decided(Transient("503"), attempt=2, first_failed_at=NOW - timedelta(hours=2))
    assert isinstance(result, DeadLetter) and result.reason == "retries_exhausted"


def test_a_revoke_or_cleanup_waits_for_seam_however_long_it_is_away() -> None:
    long_ago = NOW - timedelta(days=3)
    error = Transient("seam answered 503")
    result = decided(error, attempt=400, first_failed_at=long_ago, patient=True)
    assert isinstance(result, Retry)
    assert result.attempt == 401 and result.first_failed_at == long_ago
    assert result.delay == PATIENT_BACKOFF  # capped: it comes back within minutes of Seam


def test_a_waiting_revoke_still_honours_a_longer_retry_after() -> None:
    error = Transient("seam answered 429", retry_after=900)
    result = decided(error, attempt=50, patient=True)
    assert isinstance(result, Retry) and result.delay == 900


def test_a_revoke_refused_for_good_is_still_dead_lettered() -> None:
    error = Permanent("the event is invalid", reason=Reason.INVALID_EVENT)
    assert decided(error, patient=True) == DeadLetter("invalid_event", "the event is invalid")


@pytest.mark.parametrize(
    "error,reason",
    [
        (
            Permanent(
                "sms: refused (21610); email: not configured", reason=Reason.NO_CHANNEL_ACCEPTED
            ),
            "no_channel_accepted",
        ),
        (InvalidEvent("body is not JSON", reason=Reason.MALFORMED_JSON), "malformed_json"),
        (SeamRejected("seam answered 400 (invalid_input)"), "seam_rejected"),
        (Permanent("x", reason=Reason.UNTRUSTED_PUBLISHER), "untrusted_publisher"),
    ],
)
def test_a_permanent_failure_is_dead_lettered_at_once_with_its_reason(
    error: Permanent, reason: str
) -> None:
    assert decided(error) == DeadLetter(reason, str(error))


def test_refused_credentials_requeue_the_message_unchanged() -> None:
    assert decided(CredentialsRefused("seam refused", service="seam")) == Requeue()


def test_a_message_the_broker_took_back_is_left_to_its_redelivery() -> None:
    assert decided(TakenBackError("channel closed")) == TakenBack()
    assert decided(Transient("503"), held=False) == TakenBack()
    assert decided(Permanent("x"), held=False) == TakenBack()


def test_an_unexpected_error_is_retried_and_named_without_its_message() -> None:
    try:
        raise KeyError("+14155550100")
    except KeyError as exc:
        result = decided(exc)
    assert isinstance(result, Retry)
    assert result.error.startswith("unexpected KeyError at test_decision.py:")
    assert "+1415" not in result.error


def test_a_channel_refusal_that_escapes_the_flow_is_retried() -> None:
    # The flow turns channel refusals into no_channel_accepted; one escaping it is a bug.
    assert isinstance(decided(ChannelRefused("x")), Retry)


def test_backoff_grows_is_capped_and_spreads_with_jitter() -> None:
    assert backoff(1) == 1
    assert backoff(4) == 8
    assert backoff(4, jitter=0.5) == 4
    assert backoff(40) == 3600
    assert backoff(1, retry_after=30) == 30


# --- trust -------------------------------------------------------------------------------

ROUTE = {route.type: route for route in ROUTES}
TRUST = Trust(worker="ikw", publishers={"booking": None, "hotel": ("hotel-a-",)})


def event(raw: dict[str, object]) -> Event:
    return parse(body(raw), "application/json")


def refusal(call: object, *args: object) -> str:
    with pytest.raises(Permanent) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value.reason


def test_the_producer_is_the_user_the_broker_named() -> None:
    assert producer_of("booking", None, TRUST) == "booking"
    assert producer_of(None, None, TRUST) is None
    # A retry or replay the worker republished names its original producer...
    assert producer_of("ikw", "booking", TRUST) == "booking"
    assert producer_of("ikw", "", TRUST) is None
    # ...but only the worker's own user can say so.
    assert producer_of("mallory", "booking", TRUST) == "mallory"


@pytest.mark.parametrize("producer", [None, "mallory"])
def test_an_unlisted_or_unnamed_producer_is_refused(producer: str | None) -> None:
    assert refusal(check_publisher, ROUTE["access.granted"], producer, producer, TRUST) == (
        "untrusted_publisher"
    )


def test_listed_producers_and_the_worker_itself_are_trusted() -> None:
    for producer in ("booking", "hotel", "ikw"):
        check_publisher(ROUTE["access.granted"], producer, producer, TRUST)


def test_only_the_worker_may_order_a_cleanup() -> None:
    check_publisher(ROUTE["instant_key.cleanup"], "ikw", "ikw", TRUST)
    assert refusal(check_publisher, ROUTE["instant_key.cleanup"], "booking", "booking", TRUST) == (
        "untrusted_publisher"
    )
    # The worker's own timer for a grant of booking's: booking hears of the deletion.
    check_publisher(ROUTE["instant_key.cleanup"], "ikw", "booking", TRUST)
    assert refusal(check_publisher, ROUTE["instant_key.cleanup"], "booking", "ikw", TRUST) == (
        "untrusted_publisher"
    )


def test_each_queue_takes_only_its_own_type() -> None:
    assert refusal(check_event, ROUTE["access.revoked"], event(grant("g")), "booking", TRUST) == (
        "wrong_queue"
    )
    assert refusal(check_event, ROUTE["access.granted"], event(revoke("g")), "booking", TRUST) == (
        "wrong_queue"
    )
    check_event(ROUTE["access.granted"], event(grant("g")), "booking", TRUST)


def test_a_prefixed_producer_names_only_keys_with_its_prefix() -> None:
    check_event(ROUTE["access.granted"], event(grant("hotel-a-991")), "hotel", TRUST)
    check_event(ROUTE["access.revoked"], event(revoke("hotel-a-991")), "hotel", TRUST)
    outside = event(grant("hotel-b-991"))
    assert refusal(check_event, ROUTE["access.granted"], outside, "hotel", TRUST) == (
        "identity_out_of_scope"
    )
    by_id = event(grant(user_identity_id="4b0c5f1e-0000-4000-8000-000000000001"))
    assert refusal(check_event, ROUTE["access.granted"], by_id, "hotel", TRUST) == (
        "identity_out_of_scope"
    )
    # An unscoped producer may name any identity, by key or by id.
    check_event(ROUTE["access.granted"], by_id, "booking", TRUST)


# --- the producers' clocks ------------------------------------------------------------------

SKEW = timedelta(minutes=5)


def at(moment: datetime, raw: dict[str, object]) -> Event:
    return event(raw | {"occurred_at": moment.isoformat()})


def test_an_event_from_further_ahead_than_the_skew_is_refused() -> None:
    for raw in (grant("g"), revoke("g")):
        future = at(NOW + timedelta(days=3650), raw)
        assert refusal(check_clock, future, NOW, SKEW) == "occurred_in_future"
        assert refusal(check_clock, at(NOW + SKEW + timedelta(seconds=1), raw), NOW, SKEW) == (
            "occurred_in_future"
        )
        check_clock(at(NOW + SKEW, raw), NOW, SKEW)  # within the skew: a clock that drifts
        check_clock(at(NOW - timedelta(days=1), raw), NOW, SKEW)  # the past is fine


def test_the_refusal_says_how_far_ahead() -> None:
    with pytest.raises(Permanent) as caught:
        check_clock(at(NOW + timedelta(days=3650), grant("g")), NOW, SKEW)
    assert str(caught.value) == (
        "occurred_at is 3650.0d after the worker first received the event "
        "(IKW_MAX_CLOCK_SKEW allows 5.0m)"
    )


def test_the_first_receipt_counts_not_the_retry() -> None:
    # Received an hour ago, dated 30 minutes ago: in the future when it arrived.
    received = NOW - timedelta(hours=1)
    late = at(NOW - timedelta(minutes=30), grant("g"))
    assert refusal(check_clock, late, received, SKEW) == "occurred_in_future"
    check_clock(late, NOW, SKEW)
