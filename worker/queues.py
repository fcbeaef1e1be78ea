"""The names of one namespace's exchanges and queues, and which message type each queue takes."""

import re
from dataclasses import dataclass

from worker.routes import ROUTES, Route

LEVELS = 28  # delay levels: 2^0 s .. 2^27 s, so delays up to 2^28 - 1 s
DELIVERY_LIMIT = 5  # a message that kills the worker this often is dead-lettered
# A producer's broker user, as IKW_TRUSTED_PUBLISHERS and `ikw topology --producer` take it: the
# first word of its outcomes' routing keys, so no dot (`a`'s binding `a.#` would take `a.b`'s).
PRODUCER = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Names:
    namespace: str = "instant_keys"

    @property
    def exchange(self) -> str:
        return self.namespace

    @property
    def grants(self) -> str:
        return f"{self.namespace}.grants"

    @property
    def revocations(self) -> str:
        return f"{self.namespace}.revocations"

    @property
    def cleanup(self) -> str:
        return f"{self.namespace}.cleanup"

    @property
    def deliveries(self) -> str:
        """Stays' keys due: first deliveries and renewals."""
        return f"{self.namespace}.deliveries"

    @property
    def checkouts(self) -> str:
        """Stays' ends due: their keys deleted."""
        return f"{self.namespace}.checkouts"

    @property
    def dead(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def deliver(self) -> str:
        return f"{self.namespace}.delay.deliver"

    @property
    def fence(self) -> str:
        """The stream of revokes every replica replays: a revoke wins over older grants."""
        return f"{self.namespace}.fence"

    @property
    def fence_index(self) -> str:
        """Where the latest snapshot of the fence starts: a starting replica reads from there."""
        return f"{self.namespace}.fence.index"

    @property
    def activity(self) -> str:
        """The stream of what became of each message (``ikw activity``): ids, never a contact."""
        return f"{self.namespace}.activity"

    @property
    def unroutable(self) -> str:
        """The main exchange's alternate exchange, and its queue, for events no queue takes."""
        return f"{self.namespace}.unroutable"

    @property
    def unheard(self) -> str:
        """Bound to every outcome event, keeping none: with no queue of their producer's, the
        broker drops them here instead of returning them to the worker as unroutable."""
        return f"{self.namespace}.unheard"

    @property
    def outcomes(self) -> str:
        """The topic exchange of the outcome events, routing key ``<producer>.<type>``; only the
        worker writes it."""
        return f"{self.namespace}.outcomes"

    def outcome_queue(self, producer: str) -> str:
        """One producer's queue of its own outcome events (`ikw topology --producer`)."""
        return f"{self.outcomes}.{producer}"

    def delay(self, level: int) -> str:
        return f"{self.namespace}.delay.{level:02d}"

    def queue(self, route: Route) -> str:
        return f"{self.namespace}.{route.queue}"

    @property
    def work_queues(self) -> dict[str, str | None]:
        """Work queue -> the routing key producers use for it (None: internal only)."""
        return {self.queue(route): route.type if route.public else None for route in ROUTES}

    @property
    def takes(self) -> dict[str, Route]:
        """Work queue -> the route of the one message type it accepts."""
        return {self.queue(route): route for route in ROUTES}

    def all_queues(self) -> list[str]:
        return [
            *self.work_queues,
            self.dead,
            self.unroutable,
            self.unheard,
            self.fence,
            self.fence_index,
            self.activity,
            *(self.delay(n) for n in range(LEVELS)),
        ]

    def all_exchanges(self) -> list[str]:
        return [
            self.exchange,
            self.unroutable,
            self.outcomes,
            self.deliver,
            *(self.delay(n) for n in range(LEVELS)),
        ]
