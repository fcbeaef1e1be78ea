"""Delay routing keys: the arithmetic behind retries and expiry timers."""

from worker.broker.publisher import MAX_DELAY, delay_routing_key, entry_level
from worker.broker.topology import LEVELS, Names, plan


def test_a_delay_is_its_binary_digits_then_the_queue() -> None:
    key = delay_routing_key(5, "instant_keys.cleanup")
    assert key == "0." * 25 + "1.0.1.instant_keys.cleanup"
    assert delay_routing_key(0.2, "q").startswith("0." * 27 + "1.")  # rounds up, never early
    assert delay_routing_key(-3, "q") == "0." * 28 + "q"
    assert delay_routing_key(10**12, "q") == "1." * 28 + "q"  # clamped to 2^28 - 1 s
    assert MAX_DELAY == 2**28 - 1


def test_a_delay_enters_at_its_highest_binary_digit() -> None:
    # Routed from there as from the top: the levels above hold a 0 digit and pass it down.
    delays = (-3, 0, 0.2, 1, 2, 3, 4, 5, 7, 8)
    assert [entry_level(s) for s in delays] == [0, 0, 0, 0, 1, 1, 2, 2, 2, 3]
    assert entry_level(48 * 3600) == 17  # a key's usual expiry timer
    assert entry_level(10**12) == LEVELS - 1


def test_each_level_waits_its_power_of_two_and_falls_to_the_next() -> None:
    rows = {(kind, name): details for kind, name, details in plan(Names("ns"))}
    for level in range(LEVELS):
        queue = rows[("queue", f"ns.delay.{level:02d}")]
        assert queue["x-message-ttl"] == 2**level * 1000
        assert queue["x-dead-letter-strategy"] == "at-least-once"
        assert queue["x-overflow"] == "reject-publish"
        lower = f"ns.delay.{level - 1:02d}" if level else "ns.delay.deliver"
        assert queue["x-dead-letter-exchange"] == lower
    assert rows[("queue", "ns.grants")]["x-delivery-limit"] >= 1
