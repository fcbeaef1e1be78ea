"""The routes table and the reasons enum are the one place: every event type has one row, every
queue one type, every dead-letter reason a line the tools and the README show."""

from typing import get_args

from worker.dlq.read import BROKER_REASONS
from worker.errors import REASONS, Reason
from worker.events import MODELS, AccessDeliveryFailed, Event
from worker.queues import Names
from worker.routes import ROUTES


def test_every_event_type_has_one_route_and_one_queue() -> None:
    assert sorted(r.model.__name__ for r in ROUTES) == sorted(m.__name__ for m in get_args(Event))
    assert {(r.type, r.version) for r in ROUTES} == set(MODELS)
    names = Names("ns")
    assert list(names.takes) == [
        "ns.grants",
        "ns.revocations",
        "ns.cleanup",
        "ns.deliveries",
        "ns.checkouts",
    ]
    assert names.work_queues == {
        "ns.grants": "access.granted",
        "ns.revocations": "access.revoked",
        "ns.cleanup": None,
        "ns.deliveries": None,
        "ns.checkouts": None,
    }
    patient = [names.queue(route) for route in ROUTES if route.patient]
    assert patient == [names.revocations, names.cleanup, names.checkouts]


def test_every_reason_has_a_one_line_description() -> None:
    for reason in Reason:
        assert reason.description and "\n" not in reason.description, reason
        assert len(reason.description) <= 80, reason
    assert REASONS == {str(reason) for reason in Reason}
    assert "crash_loop" in REASONS and str(Reason.MAXLEN) == "maxlen"


def test_the_dead_queue_tool_reads_the_brokers_reasons_from_the_enum() -> None:
    assert sorted(BROKER_REASONS) == ["delivery_limit", "expired", "maxlen", "rejected"]
    assert BROKER_REASONS["rejected"] == "rejected without requeue"


def test_the_outcome_schema_names_a_real_reason() -> None:
    field = AccessDeliveryFailed.model_fields["reason"]
    example = (field.description or "").rsplit(" ", 1)[-1]
    assert example in REASONS
