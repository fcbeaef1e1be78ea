"""The events the worker takes, one row each: type and version (from the model), work queue, who
may publish it, and whether a dead letter of it is announced to its producer. Adding an event
type: its model (in ``events.Event``), a row here, a flow method; mypy then names each ``match``
that must handle it (``Consumer._dispatch``, the trust checks, ``events.event_key``)."""

from dataclasses import dataclass

from worker.events import AccessGranted, AccessRevoked, Event, KeyCleanup, literal


@dataclass(frozen=True)
class Route:
    model: type[Event]
    queue: str  # the work queue: <namespace>.<queue>
    public: bool  # producers publish it, routing key its type; else only the worker does
    announces_failure: bool = False  # dead-lettered: access.delivery_failed to its producer

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
    Route(AccessRevoked, "revocations", public=True),
    Route(KeyCleanup, "cleanup", public=False),
)
