"""What the worker remembers, as one replica holds it: typed entries of the record stream merged
into a join-semilattice (per name the latest revoke, per key the latest grant it was delivered
for), so snapshots and records merge in any order, any number of times."""

import math
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from worker.broker.headers import moment

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


def _parts(items: Iterable[tuple[str, Any]], kind: str, field: str) -> Iterator[Entry]:
    """``items`` as entries of ``kind`` holding ``{name: value}`` under ``field``, each part
    about PART_BYTES at most."""
    part: dict[str, Any] = {}
    size = 0
    for name, value in items:
        part[name] = value
        size += len(name) + 32
        if size >= PART_BYTES:
            yield {"t": kind, field: part}
            part, size = {}, 0
    if part:
        yield {"t": kind, field: part}


class Record:
    """The merged state. ``retention``: revokes older than this can fence no grant (a grant that
    old is refused ``stale_grant``) and are dropped; a delivery is dropped once its key expired."""

    def __init__(self, retention: timedelta, clock: Callable[[], datetime]) -> None:
        self.retention = retention
        self.clock = clock
        self.revoked: dict[str, int] = {}  # name -> latest revoke (ms)
        self.delivered: dict[str, tuple[int, int]] = {}  # key id -> (latest grant ms, expiry ms)
        self._handlers: dict[str, tuple[Apply, Dump]] = {}
        self.register("revoke", self._revoke, self._dump_revokes)
        self.register("delivered", self._delivered, self._dump_deliveries)

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
        self.revoked = {n: at for n, at in self.revoked.items() if at >= oldest}
        self.delivered = {k: v for k, v in self.delivered.items() if v[1] > now}

    def revoked_at(self, names: Iterable[str]) -> datetime | None:
        latest = max((self.revoked[n] for n in names if n in self.revoked), default=None)
        return None if latest is None else from_millis(latest)

    def delivered_for(self, instant_key_id: str) -> datetime | None:
        found = self.delivered.get(instant_key_id)
        return None if found is None else from_millis(found[0])

    def __len__(self) -> int:
        return len(self.revoked) + len(self.delivered)

    def memory(self) -> int:
        """Bytes held by the state's containers, names and times (an estimate: shared objects
        are counted once per use)."""
        size = sys.getsizeof(self.revoked) + sys.getsizeof(self.delivered)
        size += sum(sys.getsizeof(n) + sys.getsizeof(at) for n, at in self.revoked.items())
        pair = sys.getsizeof((0, 0)) + 2 * sys.getsizeof(2**40)
        size += sum(sys.getsizeof(k) + pair for k in self.delivered)
        return size

    def _revoke(self, entry: Entry) -> None:
        if "many" in entry:  # a snapshot's part: {name: ms}
            for name, at in entry["many"].items():
                self._revoked(str(name), int(at))
            return
        at = entry.get("at")
        if at is None:  # the first records: an ISO time under "occurred_at"
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
        if "many" in entry:  # {key id: [grant ms, expiry ms]}
            for key, (grant_at, expires_at) in entry["many"].items():
                self._keep_delivery(str(key), int(grant_at), int(expires_at))
            return
        self._keep_delivery(str(entry["key"]), int(entry["grant_at"]), int(entry["expires_at"]))

    def _keep_delivery(self, key: str, grant_at: int, expires_at: int) -> None:
        old = self.delivered.get(key, (grant_at, expires_at))
        self.delivered[key] = (max(grant_at, old[0]), max(expires_at, old[1]))

    def _dump_revokes(self) -> Iterator[Entry]:
        return _parts(dict(self.revoked).items(), "revoke", "many")  # a copy: it changes meanwhile

    def _dump_deliveries(self) -> Iterator[Entry]:
        delivered = dict(self.delivered)
        return _parts(((k, list(v)) for k, v in delivered.items()), "delivered", "many")
