"""What a handled event did (``Outcome``, its ``Action``), as the flows return it and the
consumer's observers log, count and record it."""

from dataclasses import dataclass, field
from enum import StrEnum

from worker.ports import InstantKey


class Action(StrEnum):
    GRANTED = "granted"
    FENCED = "fenced"  # the grant occurred before a revoke of its identity: nothing delivered
    REVOKED = "revoked"
    CLEANED_UP = "cleaned_up"
    CLEANUP_RESCHEDULED = "cleanup_rescheduled"
    # Our own outcome event back from the alternate exchange (a topology without <ns>.unheard).
    UNHEARD = "unheard"
    # Stays
    SCHEDULED = "scheduled"  # recorded; its key is sent at deliver_at
    STALE_REVISION = "stale_revision"  # a revision no higher than the one applied: nothing done
    STALE_TIMER = "stale_timer"  # a stay's timer for a revision since replaced: dropped
    STAY_ENDED = "stay_ended"  # checkout: its keys deleted (or, for a grant, too late to send)
    ALREADY_HELD = "already_held"  # the guest holds a working key for the stay: not sent again
    TIMER_RESCHEDULED = "timer_rescheduled"


# Counted in ikw_stays_total by what happened.
STAY_ACTIONS = frozenset(
    {
        Action.SCHEDULED,
        Action.STALE_REVISION,
        Action.STALE_TIMER,
        Action.STAY_ENDED,
        Action.ALREADY_HELD,
    }
)


@dataclass
class Outcome:
    """What a handled event did, for logs and metrics."""

    action: Action
    channel: str | None = None
    key_id: str | None = None
    minted: bool = False
    deleted: int = 0
    provider_message_id: str | None = None
    identity_id: str | None = None
    created: bool = False  # the grant created the identity in Seam
    key: InstantKey | None = field(default=None, repr=False)  # the key delivered
