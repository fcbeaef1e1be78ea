"""Prometheus metrics: outcomes by queue, dead letters by reason, deliveries by channel."""

import platform
from datetime import UTC, datetime
from importlib import metadata
from typing import TYPE_CHECKING

from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from worker.broker.decision import Ack, Decision, Retry
from worker.errors import REASONS

if TYPE_CHECKING:
    from worker.broker.fence import StreamFence

# From a tenth of a second to an hour: a healthy backlog is seconds; an alert is minutes.
WAIT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def version() -> str:
    try:
        return metadata.version("instant-key-worker")
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "ikw_messages",
            "Messages settled, by queue and outcome",
            ["queue", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "ikw_dead_letters", "Messages dead-lettered, by reason", ["reason"], registry=r
        )
        # Every reason starts at 0, so increase() sees the first dead letter of each.
        for reason in sorted(REASONS):
            self.dead_letters.labels(reason)
        self.deliveries = Counter(
            "ikw_deliveries", "Instant Keys delivered, by channel", ["channel"], registry=r
        )
        self.keys = Counter(
            "ikw_instant_keys", "Instant Keys minted, reused and deleted", ["action"], registry=r
        )
        what = "scheduled, stale_revision, stale_timer, stay_ended, already_held"
        self.stays = Counter("ikw_stays", f"Stay events: {what}", ["what"], registry=r)
        self.seconds = Histogram(
            "ikw_handle_seconds", "Time to handle one message", ["queue"], registry=r
        )
        self.queue_wait = Histogram(
            "ikw_queue_wait_seconds",
            "Time from publish (AMQP timestamp, else the event's occurred_at) to the start of "
            "handling; messages back from the delay queues (retries, cleanups) are not counted",
            ["queue"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.retry_age = Gauge(
            "ikw_retry_age_seconds",
            "How long the last message retried from this queue has been failing; 0 once a "
            "message that had failed is done. Revokes and cleanups wait for Seam for ever.",
            ["queue"],
            registry=r,
        )
        self.reconnects = Counter(
            "ikw_broker_reconnects",
            "Connections to RabbitMQ lost, each followed by a reconnect; a channel error is none",
            registry=r,
        )
        self.in_flight = Gauge("ikw_in_flight", "Messages being handled now", registry=r)
        self.ready = Gauge("ikw_ready", "1 when consuming, 0 when paused or stopping", registry=r)
        self.credentials = Gauge(
            "ikw_credentials_refused",
            "1 while the worker is paused because this service refuses its credentials",
            ["service"],
            registry=r,
        )
        self._services = {"seam"}  # the others appear when they first refuse, then stay
        self.credentials.labels("seam")
        self.build = Info("ikw_build", "Version of the worker and of Python", registry=r)
        self.build.info({"version": version(), "python": platform.python_version()})

    def follow(self, fence: "StreamFence") -> None:
        """Gauges of what the revocation fence holds."""
        entries = Gauge(
            "ikw_fence_entries",
            "Revokes and deliveries the revocation fence holds in memory",
            registry=self.registry,
        )
        entries.set_function(lambda: float(len(fence.record)))
        held = Gauge(
            "ikw_fence_memory_bytes",
            "Memory the revocation fence holds (estimated at its last catch-up or snapshot)",
            registry=self.registry,
        )
        held.set_function(lambda: float(fence.memory))
        read = Gauge(
            "ikw_fence_records_read",
            "Records read from the fence since start",
            registry=self.registry,
        )
        read.set_function(lambda: float(fence.read))

    def refused(self, service: str) -> None:
        """Paused for ``service`` (1), every other service 0; "" when consuming again."""
        if service:
            self._services.add(service)
        for known in self._services:
            self.credentials.labels(known).set(float(known == service))

    def waited(self, queue: str, decided: Decision, first_failed_at: datetime | None) -> None:
        """Keep ``ikw_retry_age_seconds`` for ``queue``: the age of a retry, 0 after a success."""
        if isinstance(decided, Retry):
            age = (datetime.now(UTC) - decided.first_failed_at).total_seconds()
            self.retry_age.labels(queue).set(max(age, 0.0))
        elif isinstance(decided, Ack) and first_failed_at is not None:
            self.retry_age.labels(queue).set(0.0)

    def observe_wait(
        self, queue: str, message: AbstractIncomingMessage, occurred_at: datetime | None = None
    ) -> None:
        """How long ``message`` waited before a worker took it: from its AMQP timestamp, else
        from the parsed event's ``occurred_at``. Never raises."""
        if message.headers and "x-death" in message.headers:
            return  # through the delay queues: the wait was scheduled, not backlog
        sent = message.timestamp or occurred_at
        if sent is None:
            return
        if sent.tzinfo is None:
            sent = sent.replace(tzinfo=UTC)
        waited = (datetime.now(UTC) - sent).total_seconds()
        self.queue_wait.labels(queue).observe(max(waited, 0.0))  # clocks skew: never below 0

    def render(self) -> bytes:
        return generate_latest(self.registry)
