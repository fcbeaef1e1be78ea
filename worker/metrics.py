"""Prometheus metrics: outcomes by queue, dead letters by reason, deliveries by channel."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


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
        self.deliveries = Counter(
            "ikw_deliveries", "Instant Keys delivered, by channel", ["channel"], registry=r
        )
        self.keys = Counter(
            "ikw_instant_keys", "Instant Keys minted, reused and deleted", ["action"], registry=r
        )
        self.seconds = Histogram(
            "ikw_handle_seconds", "Time to handle one message", ["queue"], registry=r
        )
        self.in_flight = Gauge("ikw_in_flight", "Messages being handled now", registry=r)
        self.ready = Gauge("ikw_ready", "1 when consuming, 0 when paused or stopping", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
