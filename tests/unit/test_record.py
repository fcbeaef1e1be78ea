"""The record as one replica holds it: entries merge in any order, snapshots rebuild it, the
retention drops what can no longer fence, and a new entry type is one handler."""

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from worker.record import PART_BYTES, Record, millis

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
HOUR = 3_600_000


def record() -> Record:
    return Record(timedelta(days=30), lambda: NOW)


def entries() -> list[dict[str, Any]]:
    now = millis(NOW)
    return [
        {"t": "revoke", "names": ["key:a"], "occurred_at": (NOW - timedelta(hours=2)).isoformat()},
        {"t": "revoke", "names": ["key:a", "id:1"], "occurred_at": NOW.isoformat()},
        {"names": ["key:b"], "occurred_at": (NOW - timedelta(hours=1)).isoformat()},  # untyped
        {"t": "delivered", "key": "k1", "grant_at": now - HOUR, "expires_at": now + HOUR},
        {"t": "delivered", "key": "k1", "grant_at": now - 2 * HOUR, "expires_at": now + HOUR},
        {"t": "delivered", "key": "k2", "grant_at": now, "expires_at": now + 2 * HOUR},
        {"t": "delivered", "key": "k3", "grant_at": now, "expires_at": now + HOUR, "r": "res-1"},
        stay("res-1", 0, now - HOUR),
        stay("res-1", 2, now - 2 * HOUR),  # the higher revision wins, whatever its time
        stay("res-1", 1, now),
    ]


def stay(reservation: str, revision: int, grant_at: int, ends_in: int = 48) -> dict[str, Any]:
    now = millis(NOW)
    return {
        "t": "stay",
        "r": reservation,
        "rev": revision,
        "grant_at": grant_at,
        "event": f"e-{revision}",
        "names": ["key:a", f"res:{reservation}"],
        "deliver": now,
        "start": now,
        "end": now + ends_in * HOUR,
    }


def state(r: Record) -> tuple[object, ...]:
    return r.revoked, r.delivered, r.stays


def test_entries_merge_to_the_same_state_in_any_order_and_twice() -> None:
    one, other = record(), record()
    for entry in entries():
        assert one.apply(entry)
    shuffled = entries() * 2
    random.Random(7).shuffle(shuffled)
    for entry in shuffled:
        other.apply(entry)
    assert state(one) == state(other)
    assert one.revoked_at(["key:a"]) == NOW and one.revoked_at(["id:2"]) is None
    assert one.delivered_for("k1") == NOW - timedelta(hours=1)  # the latest grant delivered for
    assert one.stays["res-1"].revision == 2 and one.delivered["k3"].reservation == "res-1"
    assert list(one.stays_of(["key:a"])) == ["res-1"] and one.stays_of(["key:b"]) == {}


def test_a_snapshot_rebuilds_the_state_in_parts_of_bounded_size() -> None:
    full = record()
    for entry in entries():
        full.apply(entry)
    for n in range(30_000):
        full.apply({"t": "revoke", "names": [f"key:guest-{n:08d}"], "occurred_at": NOW.isoformat()})
    parts = [json.dumps(part) for part in full.dump()]
    assert len(parts) > 1 and max(len(p) for p in parts) < PART_BYTES * 1.5 < 512 * 1024
    rebuilt = record()
    for part in parts:
        assert rebuilt.apply(json.loads(part))
    assert state(rebuilt) == state(full)


def test_the_retention_drops_old_revokes_and_expired_deliveries() -> None:
    r = record()
    old = (NOW - timedelta(days=31)).isoformat()
    r.apply({"t": "revoke", "names": ["key:old"], "occurred_at": old})
    r.apply({"t": "revoke", "names": ["key:new"], "occurred_at": NOW.isoformat()})
    r.apply({"t": "delivered", "key": "gone", "grant_at": 0, "expires_at": millis(NOW) - 1})
    r.prune()
    assert (list(r.revoked), r.delivered) == (["key:new"], {})
    assert r.memory() > 0


def test_a_revoke_is_kept_past_the_retention_while_a_stay_it_ends_is_kept() -> None:
    r = record()
    old = (NOW - timedelta(days=40)).isoformat()
    r.apply(stay("res-9", 0, millis(NOW - timedelta(days=41)), ends_in=24 * 20))
    r.apply({"t": "revoke", "names": ["res:res-9"], "occurred_at": old})
    r.apply({"t": "revoke", "names": ["key:other"], "occurred_at": old})
    r.prune()
    assert list(r.revoked) == ["res:res-9"]  # a booking 60 days ahead stays cancelled
    assert not r.live(r.stays["res-9"])
    r.apply(stay("res-9", 1, millis(NOW)))  # rebooked after the cancellation
    assert r.live(r.stays["res-9"])


def test_a_revoke_never_rounds_to_before_a_grant_it_followed() -> None:
    r = record()
    revoked = NOW + timedelta(microseconds=400)
    r.apply({"t": "revoke", "names": ["key:a"], "occurred_at": revoked.isoformat()})
    at = r.revoked_at(["key:a"])
    assert at is not None and at >= revoked


def test_malformed_and_unknown_entries_are_refused_and_a_new_type_is_one_handler() -> None:
    r = record()
    assert not r.apply({"t": "revoke", "names": ["key:a"]})  # no time
    assert not r.apply({"t": "revoke", "names": "key:a", "occurred_at": NOW.isoformat()})
    assert r.revoked == {}
    assert not r.apply({"t": "returned", "message_id": "m1"})
    returned: set[str] = set()
    r.register(
        "returned",
        lambda entry: returned.add(entry["message_id"]),
        lambda: [{"t": "returned", "message_id": m} for m in sorted(returned)],
    )
    assert r.apply({"t": "returned", "message_id": "m1"})
    assert {"t": "returned", "message_id": "m1"} in list(r.dump())
