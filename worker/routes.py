"""The events the worker takes, one row each: type and version (from the model), work queue, who
may publish it, and whether its dead letter is announced as a failed delivery. Adding an event
type: its model (in ``events.Event``), a row here, a flow method called from ``handle``; mypy
then names each other ``match`` that must handle it (the trust checks, ``events.event_key``)."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import assert_never

from worker.actions import Outcome
from worker.events import (
    AccessGranted,
    AccessRevoked,
    Event,
    KeyCleanup,
    StayDelivery,
    StayEnd,
    literal,
)
from worker.flows import Flows


@dataclass(frozen=True)
class Route:
    model: type[Event]
    queue: str  # the work queue: <namespace>.<queue>
    public: bool  # producers publish it, routing key its type; else only the worker does
    # Dead-lettered once read: access.delivery_failed to its producer (else access.rejected).
    announces_failure: bool = False
    # Retried for as long as Seam is away, never dead-lettered for it: a key must not outlive it.
    patient: bool = False

    @property
    def type(self) -> str:
        return str(literal(self.model, "type"))

    @property
    def version(self) -> int:
        version = literal(self.model, "version")
        assert isinstance(version, int)
        return version

    @property
    def schema(self) -> str:
        """Its JSON Schema's name, as in schemas/."""
        return f"{self.type}.v{self.version}"


ROUTES = (
    Route(AccessGranted, "grants", public=True, announces_failure=True),
    Route(AccessRevoked, "revocations", public=True, patient=True),
    Route(KeyCleanup, "cleanup", public=False, patient=True),
    # A stay's key due (first delivery or renewal): a grant's work, at its time.
    Route(StayDelivery, "deliveries", public=False, announces_failure=True),
    Route(StayEnd, "checkouts", public=False, patient=True),
)


async def handle(flows: Flows, event: Event, still_held: Callable[[], bool]) -> Outcome:
    """The flow of each event type."""
    match event:
        case AccessGranted():
            return await flows.grant(event, still_held)
        case AccessRevoked():
            return await flows.revoke(event)
        case KeyCleanup():
            return await flows.cleanup(event)
        case StayDelivery():
            return await flows.stay_delivery(event, still_held)
        case StayEnd():
            return await flows.stay_end(event)
        case _:
            assert_never(event)
