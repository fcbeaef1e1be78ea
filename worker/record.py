"""What the worker remembers, as one replica holds it: typed entries of the record stream merged
into a join-semilattice (per name the latest revoke, per key the latest grant it was delivered
for, per reservation its highest revision), so snapshots and records merge in any order, any
number of times."""

import math
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

Entry = dict[str, Any]
Apply = Callable[[Entry], None]
Dump = Callable[[], Iterable[Entry]]

# A snapshot part's items: well under a 512 KiB message whatever the names' lengths (a name is at
# most a few hundred characters; most are under 40).
PART_BYTES = 256 * 1024


def millis(moment: datetime, up: bool = False) -> int:
    """Times as whole milliseconds (an int takes half a datetime's memory); ``up`` rounds up, so
    a revoke never moves before a grant it followed."""
    return (math.ceil if up else math.floor)(moment.timestamp() * 1000)


def from_millis(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _parts(
    items: Iterable[tuple[str, Any]], kind: str, field: str, sized: bool = False
) -> Iterator[Entry]:
    """``items`` as entries of ``kind`` holding ``{name: value}`` under ``field``, each part
    about PART_BYTES at most (``sized``: values of any length, measured; else about 32 bytes)."""
    part: dict[str, Any] = {}
    size = 0
    for name, value in items:
        part[name] = value
        size += len(name) + (len(str(value)) if sized else 32)
        if size >= PART_BYTES:
            yield {"t": kind, field: part}
            part, size = {}, 0
    if part:
        yield {"t": kind, field: part}


class StayRecord(NamedTuple):
    """A reservation's latest revision as recorded (times in ms). Of two records, the one with
    the higher (revision, grant_at, event_id) wins."""

    revision: int
    grant_at: int
    event_id: str
    names: tuple[str, ...]  # the identity's names, and "res:<reservation_key>"
    deliver_at: int
    starts_at: int
    ends_at: int


class Delivery(NamedTuple):
    """A key's latest delivery: the grant it was for, the key's expiry, the stay (reservation
    key) and a digest of the contact it went to."""

    grant_at: int
    expires_at: int
    reservation: str | None = None
    contact: str | None = None


def identity_names(user_identity_id: str | None, user_identity_key: str | None) -> list[str]:
    """How the fence names an identity: by its key and by its id, whichever are known."""
    names = [f"key:{user_identity_key}"] if user_identity_key else []
    return names + ([f"id:{user_identity_id}"] if user_identity_id else [])


def reservation_name(reservation_key: str) -> str:
    return f"res:{reservation_key}"


class Record:
    """The merged state. ``retention``: revokes older than this can fence no grant (a grant that
    old is refused ``stale_grant``) and are dropped, unless they name a stay still kept; a
    delivery is dropped once its key expired; a stay ``retention`` after its checkout."""

    def __init__(self, retention: timedelta, clock: Callable[[], datetime]) -> None:
        self.retention = retention
        self.clock = clock
        self.revoked: dict[str, int] = {}  # name -> latest revoke (ms)
        self.delivered: dict[str, Delivery] = {}  # key id -> its latest delivery
        self.stays: dict[str, StayRecord] = {}  # reservation key -> its latest revision
        self.stays_by_name: dict[str, set[str]] = {}  # identity name -> its reservation keys
        self._handlers: dict[str, tuple[Apply, Dump]] = {}
        self.register("revoke", self._revoke, self._dump_revokes)
        self.register("delivered", self._delivered, self._dump_deliveries)
        self.register("stay", self._stay, self._dump_stays)

    def register(self, kind: str, apply: Apply, dump: Dump = tuple) -> None:
        """Entries ``{"t": kind, ...}`` go to ``apply``; ``dump`` gives entries of that kind that
        rebuild what ``apply`` keeps (for snapshots; each entry under 256 KiB as JSON). The keys
        ``t``, ``m`` and ``from`` are the stream's own."""
        self._handlers[kind] = (apply, dump)

    def apply(self, entry: Entry) -> bool:
        """Merge one entry; False when it is malformed or of a kind nobody handles."""
        kind = entry.get("t", "revoke")  # the first records had no type: revokes
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            return False
        try:
            handler[0](entry)
        except (KeyError, TypeError, ValueError, OverflowError):
            return False
        return True

    def dump(self) -> Iterator[Entry]:
        """Entries that rebuild this state, as a snapshot, without what the retention dropped."""
        self.prune()
        for _, dump in self._handlers.values():
            yield from dump()

    def prune(self) -> None:
        now = millis(self.clock())
        oldest = now - int(self.retention.total_seconds() * 1000)
        self.stays = {r: s for r, s in self.stays.items() if s.ends_at >= oldest}
        self.stays_by_name = {}
        for key, stay in self.stays.items():
            for name in stay.names:
                self.stays_by_name.setdefault(name, set()).add(key)
        self.revoked = {
            n: at for n, at in self.revoked.items() if at >= oldest or n in self.stays_by_name
        }
        self.delivered = {k: v for k, v in self.delivered.items() if v.expires_at > now}

    def revoked_at(self, names: Iterable[str]) -> datetime | None:
        latest = max((self.revoked[n] for n in names if n in self.revoked), default=None)
        return None if latest is None else from_millis(latest)

    def delivered_for(self, instant_key_id: str) -> datetime | None:
        found = self.delivered.get(instant_key_id)
        return None if found is None else from_millis(found.grant_at)

    def stays_of(self, names: Iterable[str]) -> dict[str, StayRecord]:
        """The stays recorded for an identity known by any of ``names``."""
        keys = set().union(*(self.stays_by_name.get(n, ()) for n in names))
        return {key: self.stays[key] for key in keys if key in self.stays}

    def live(self, stay: StayRecord) -> bool:
        """Not ended by a revoke of its identity or reservation that followed its grant."""
        revoked = max((self.revoked.get(n, -1) for n in stay.names), default=-1)
        return revoked < stay.grant_at

    def __len__(self) -> int:
        return len(self.revoked) + len(self.delivered) + len(self.stays)

    def memory(self) -> int:
        """Bytes held by the state's containers, names and times (an estimate: shared objects
        are counted once per use)."""
        size = sys.getsizeof(self.revoked) + sys.getsizeof(self.delivered)
        size += sum(sys.getsizeof(n) + sys.getsizeof(at) for n, at in self.revoked.items())
        pair = sys.getsizeof(Delivery(0, 0)) + 2 * sys.getsizeof(2**40)
        size += sum(sys.getsizeof(k) + pair for k in self.delivered)
        size += sys.getsizeof(self.stays) + sys.getsizeof(self.stays_by_name)
        for key, stay in self.stays.items():
            size += sys.getsizeof(key) + sys.getsizeof(stay) + 5 * sys.getsizeof(2**40)
            size += sys.getsizeof(stay.event_id) + sum(sys.getsizeof(n) for n in stay.names)
        return size

    def _revoke(self, entry: Entry) -> None:
        if "many" in entry:  # a snapshot's part: {name: ms}
            for name, at in entry["many"].items():
                self._revoked(str(name), int(at))
            return
        at = entry.get("at")
        if at is None:  # the first records: an ISO time under "occurred_at"
            from worker.broker.headers import moment  # not at import: the contract's too

            when = moment(entry["occurred_at"])
            if when is None:
                raise ValueError("no time")
            at = millis(when, up=True)
        names = entry["names"]
        if not isinstance(names, list):
            raise TypeError("names is not a list")
        for name in names:
            self._revoked(str(name), int(at))

    def _revoked(self, name: str, at: int) -> None:
        if at > self.revoked.get(name, -1):
            self.revoked[name] = at

    def _delivered(self, entry: Entry) -> None:
        if "many" in entry:  # {key id: [grant ms, expiry ms, reservation?, contact?]}
            for key, value in entry["many"].items():
                self._keep_delivery(str(key), _delivery(*value))
            return
        self._keep_delivery(
            str(entry["key"]),
            _delivery(entry["grant_at"], entry["expires_at"], entry.get("r"), entry.get("c")),
        )

    def _keep_delivery(self, key: str, new: Delivery) -> None:
        old = self.delivered.get(key, new)
        latest = max(old, new, key=lambda d: (d.grant_at, d.reservation or "", d.contact or ""))
        self.delivered[key] = latest._replace(expires_at=max(old.expires_at, new.expires_at))

    def _stay(self, entry: Entry) -> None:
        if "many" in entry:  # {reservation key: [revision, grant ms, event id, names, ...]}
            for key, value in entry["many"].items():
                self._keep_stay(str(key), _stay_record(*value))
            return
        self._keep_stay(
            str(entry["r"]),
            _stay_record(
                entry["rev"],
                entry["grant_at"],
                entry["event"],
                entry["names"],
                entry["deliver"],
                entry["start"],
                entry["end"],
            ),
        )

    def _keep_stay(self, key: str, new: StayRecord) -> None:
        old = self.stays.get(key)
        if old is None or new[:3] > old[:3]:
            self.stays[key] = new
            for name in new.names:
                self.stays_by_name.setdefault(name, set()).add(key)

    def _dump_revokes(self) -> Iterator[Entry]:
        return _parts(dict(self.revoked).items(), "revoke", "many")  # a copy: it changes meanwhile

    def _dump_deliveries(self) -> Iterator[Entry]:
        delivered = dict(self.delivered)
        return _parts(((k, list(v)) for k, v in delivered.items()), "delivered", "many", sized=True)

    def _dump_stays(self) -> Iterator[Entry]:
        stays = dict(self.stays)
        return _parts(((k, list(v)) for k, v in stays.items()), "stay", "many", sized=True)


def _delivery(
    grant_at: object, expires_at: object, reservation: object = None, contact: object = None
) -> Delivery:
    return Delivery(
        int(grant_at),  # type: ignore[call-overload]
        int(expires_at),  # type: ignore[call-overload]
        None if reservation is None else str(reservation),
        None if contact is None else str(contact),
    )


def _stay_record(
    revision: object,
    grant_at: object,
    event_id: object,
    names: object,
    deliver_at: object,
    starts_at: object,
    ends_at: object,
) -> StayRecord:
    if not isinstance(names, list | tuple):
        raise TypeError("names is not a list")
    times = [int(t) for t in (grant_at, deliver_at, starts_at, ends_at)]  # type: ignore[call-overload]
    return StayRecord(
        int(revision),  # type: ignore[call-overload]
        times[0],
        str(event_id),
        tuple(str(n) for n in names),
        *times[1:],
    )
