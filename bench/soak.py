"""Fault soak: grants through several `ikw run` workers while Seam answers 503, Twilio 429 and a
proxy cuts every AMQP connection (or, with --cluster, on a three-node cluster: the grants leader
stopped, a node SIGKILLed, then a rolling restart of all three); then count what was delivered,
dead-lettered, sent twice, minted twice and lost. Exits 1 when a grant is lost or dead-lettered
and never delivered, an identity holds two live keys or a worker hangs.

Every event carries its number in the guest's name, written in letters since the worker drops a
name holding a digit ("Guest Eaabq" is event 42: four base-26 digits a-z), which the SMS and the
email quote, so each send maps to exactly one event; each identity has its own phone and email.
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import re
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from harness import (
    AMQP_URL,
    Broker,
    Exit,
    LogSummary,
    StampedList,
    Workers,
    broker_port,
    grant_body,
    new_names,
    print_figures,
    queue_counts,
    with_port,
    worker_env,
)

from worker.broker import topology
from worker.broker.connect import BROKER_ERRORS, connect
from worker.broker.topology import Names
from worker.config import Settings, amqp_urls
from worker.sandbox.all import Sandbox
from worker.sandbox.proxy import Proxy

TAG = re.compile(r"Guest E([a-z]{4})\b")
TAG_LETTERS = 4
LINK = re.compile(r"https://ik\.seam\.co/[A-Za-z0-9_-]+")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--grants", type=int, default=2000, help="distinct grant events (2000)")
    add("--workers", type=int, default=3, help="worker processes (3)")
    add(
        "--prefetch",
        type=int,
        default=None,
        help="IKW_PREFETCH per worker (32; --cluster: the worker's default)",
    )
    add("--rate", type=float, default=None, help="grants/s published (all at once; --cluster: 12)")
    add("--seam-503", type=float, default=0.10, help="share of Seam calls failed with 503")
    add("--twilio-429", type=float, default=0.05, help="share of SMS refused with 20429/429")
    add("--seam-latency", type=float, default=0.0, help="ms added to each Seam call (0)")
    add("--cut-every", type=float, default=3.0, help="s between proxy cuts (0: never)")
    add("--deadline", type=float, default=600.0, help="s to wait for every grant (600)")
    add("--settle", type=float, default=3.0, help="s to wait after the faults stop (3)")
    add("--repeats", type=float, default=0.10, help="share of grants for a repeated identity")
    add("--doubles", type=float, default=0.05, help="share of events published twice")
    add("--email-only", type=float, default=0.10, help="share of identities without a phone")
    add("--max-attempts", type=int, default=20, help="IKW_MAX_ATTEMPTS (20)")
    add("--seed", type=int, default=None, help="random seed for the plan (default: random)")
    add(
        "--cluster",
        action="store_true",
        help="AMQP_URL lists the three nodes of bench/cluster: no proxy; stop the grants "
        "queue's leader, later SIGKILL another node, restart both (run by make soak-cluster)",
    )
    add(
        "--fail-at",
        type=float,
        nargs=3,
        default=[0.1, 0.2, 0.3],
        help="share accounted at the leader's stop, the SIGKILL, the rolling restart",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.grants <= 26**TAG_LETTERS:
        parser.error(f"--grants: 1 to {26**TAG_LETTERS}")
    if args.cluster:
        args.cut_every = 0.0
    if args.rate is None:
        args.rate = 12.0 if args.cluster else 0.0
    if args.prefetch is None:
        args.prefetch = Settings.prefetch if args.cluster else 32
    return args


# ---------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Guest:
    index: int
    key: str
    phone: str | None
    email: str
    channels: list[str]


@dataclass(frozen=True)
class Grant:
    number: int
    event_id: str
    guest: Guest
    copies: int

    def body(self) -> bytes:
        g = self.guest
        name = f"Guest E{tag(self.number)}"
        return grant_body(
            self.event_id, g.key, name=name, phone=g.phone, email=g.email, channels=g.channels
        )


def tag(number: int) -> str:
    """``number`` in TAG_LETTERS base-26 digits a-z: 0 is aaaa, 42 is aabq."""
    letters = ""
    for _ in range(TAG_LETTERS):
        number, digit = divmod(number, 26)
        letters = chr(ord("a") + digit) + letters
    return letters


def untag(letters: str) -> int:
    number = 0
    for letter in letters:
        number = number * 26 + ord(letter) - ord("a")
    return number


def make_guests(count: int, email_only: float, rng: random.Random, prefix: str) -> list[Guest]:
    guests = []
    for index in range(count):
        phone = None if rng.random() < email_only else f"+1415{index:07d}"
        channels = ["sms", "email"] if phone else ["email"]
        email = f"soak{index}@example.com"
        guests.append(Guest(index, f"{prefix}-{index}", phone, email, channels))
    return guests


def make_grants(args: argparse.Namespace, rng: random.Random, prefix: str) -> list[Grant]:
    repeats = round(args.grants * args.repeats)
    guests = make_guests(args.grants - repeats, args.email_only, rng, prefix)
    popular = guests[: max(1, repeats // 2)]  # about three grants each
    owners = guests + [rng.choice(popular) for _ in range(repeats)]
    doubled = set(rng.sample(range(args.grants), round(args.grants * args.doubles)))
    return [
        Grant(number, str(uuid.uuid4()), owner, 2 if number in doubled else 1)
        for number, owner in enumerate(owners)
    ]


def publish_order(grants: list[Grant], rng: random.Random) -> list[Grant]:
    """Every copy once, shuffled; half the repeated identities' grants come in one burst and
    half the second copies follow their first at once, so replicas race for the same identity."""
    by_guest: dict[int, list[Grant]] = {}
    for grant in grants:
        by_guest.setdefault(grant.guest.index, []).append(grant)
    blocks: list[list[Grant]] = []
    for own in by_guest.values():
        burst = len(own) > 1 and rng.random() < 0.5
        blocks.extend([list(own)] if burst else [[g] for g in own])
    home = {grant.number: block for block in blocks for grant in block}
    for grant in grants:
        if grant.copies == 2:
            if rng.random() < 0.5:
                home[grant.number].append(grant)
            else:
                blocks.append([grant])
    rng.shuffle(blocks)
    return [grant for block in blocks for grant in block]


# ------------------------------------------------------------------------------ the tally


@dataclass
class DeadLetter:
    number: int | None  # None: not one of our grants (a cleanup)
    reason: str


@dataclass
class Tally:
    """Sends seen in the stand-ins and dead letters read from ``<ns>.dead``, per event number."""

    grants: list[Grant]
    sends: Counter[int] = field(default_factory=Counter)
    by_channel: Counter[str] = field(default_factory=Counter)
    links: dict[int, set[str]] = field(default_factory=dict)  # guest index -> links received
    dead: list[DeadLetter] = field(default_factory=list)
    unidentified: int = 0
    _sms_seen: int = 0
    _mail_seen: int = 0

    def __post_init__(self) -> None:
        self.numbers = {g.event_id: g.number for g in self.grants}

    def scan(self, sandbox: Sandbox) -> None:
        outbox = sandbox.twilio.outbox
        for entry in outbox[self._sms_seen :]:
            self._count("sms", entry["body"])
        self._sms_seen = len(outbox)
        messages = sandbox.smtp.messages
        for message in messages[self._mail_seen :]:
            part = message.get_body(preferencelist=("plain",))
            self._count("email", part.get_content() if part is not None else "")
        self._mail_seen = len(messages)

    def _count(self, channel: str, text: str) -> None:
        found = TAG.search(text)
        if found is None or untag(found[1]) >= len(self.grants):
            self.unidentified += 1
            return
        number = untag(found[1])
        self.sends[number] += 1
        self.by_channel[channel] += 1
        guest = self.grants[number].guest.index
        self.links.setdefault(guest, set()).update(LINK.findall(text))

    def on_dead(self, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        reason = _text(headers.get("x-ikw-reason"))
        if reason is None:  # the latest death (x-death, newest first): a retry first "died" by TTL
            deaths = headers.get("x-death")
            last = deaths[0] if isinstance(deaths, list) and deaths else None
            said = _text(last.get("reason")) if isinstance(last, dict) else None
            reason = f"broker:{said or '?'}"
        try:
            event_id = json.loads(message.body).get("event_id")
        except (ValueError, AttributeError):
            event_id = None
        self.dead.append(DeadLetter(self.numbers.get(event_id), reason))

    async def on_dead_message(self, message: AbstractIncomingMessage) -> None:
        self.on_dead(message)
        with contextlib.suppress(*BROKER_ERRORS):
            await message.ack()  # unacked, a dead letter in flight survives a node's restart

    def dead_count(self) -> Counter[int]:
        return Counter(d.number for d in self.dead if d.number is not None)

    def unaccounted(self) -> list[Grant]:
        """Grants with fewer sends plus dead letters than copies published."""
        dead = self.dead_count()
        return [g for g in self.grants if self.sends[g.number] + dead[g.number] < g.copies]


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------------- the soak itself


@dataclass
class Faults:
    sandbox: Sandbox
    proxy: Proxy
    every: float
    cuts: int = 0
    task: asyncio.Task[None] | None = None

    def start(self, seam_503: float, twilio_429: float) -> None:
        self.sandbox.seam.fail_rate, self.sandbox.seam.fail_status = seam_503, 503
        self.sandbox.twilio.fail_rate = twilio_429
        self.sandbox.twilio.fail_code, self.sandbox.twilio.fail_status = 20429, 429
        if self.every > 0:
            self.task = asyncio.create_task(self._cut_forever())

    async def _cut_forever(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            self.proxy.cut()
            self.cuts += 1

    async def stop(self) -> None:
        self.sandbox.seam.fail_rate = 0.0
        self.sandbox.twilio.fail_rate = 0.0
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


@dataclass
class Watch:
    """How the wait went: when everything was accounted for, and how many workers were
    consuming the grants queue at each look (every 0.25 s)."""

    after: float | None = None
    consumers: list[int] = field(default_factory=list)
    samples: list[tuple[float, int | None]] = field(default_factory=list)  # None: no answer


async def wait_accounted(
    tally: Tally,
    sandbox: Sandbox,
    workers: Workers,
    faults: Faults,
    broker: Broker,
    deadline: float,
) -> Watch:
    """Until every grant is delivered or dead-lettered (``after`` set), or the deadline."""
    assert broker.channel is not None
    watch = Watch()
    started = time.monotonic()
    next_note = started + 10
    while True:
        tally.scan(sandbox)
        left = len(tally.unaccounted())
        now = time.monotonic()
        if left == 0:
            watch.after = now - started
            return watch
        if now - started > deadline:
            return watch
        if now >= next_note:
            note = f"{now - started:5.0f} s: {left} grants not yet accounted for, "
            print(note + f"{len(tally.dead)} dead letters, {faults.cuts} cuts", file=sys.stderr)
            next_note += 10
        workers.check_alive()
        try:
            consumers: int | None = (
                await asyncio.wait_for(queue_counts(broker.channel, broker.names.grants), 5)
            )[1]
        except BROKER_ERRORS:  # our own connection failing over: no look this time
            consumers = None
        watch.samples.append((time.monotonic(), consumers))
        if consumers is not None:
            watch.consumers.append(consumers)
        await asyncio.sleep(0.25)


@dataclass
class Leftovers:
    """What was still queued after the workers stopped (the dead queue aside)."""

    grants: Counter[str] = field(default_factory=Counter)  # queue -> grant copies
    others: Counter[str] = field(default_factory=Counter)  # queue -> cleanups and the like
    numbers: set[int] = field(default_factory=set)  # events with a copy still queued


async def census(channel: AbstractChannel, names: Names, tally: Tally) -> Leftovers:
    """Read (and remove) every message left in the namespace's queues but the dead one and the
    fence."""
    left = Leftovers()
    for name in names.all_queues():
        # The fence, its index and the activity are streams (no basic.get), not grants.
        streams = (names.fence, names.fence_index, names.activity)
        if name in (names.dead, *streams) or (await queue_counts(channel, name))[0] == 0:
            continue
        queue = await channel.get_queue(name)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            number = tally.numbers.get(json.loads(message.body).get("event_id"))
            if number is None:
                left.others[name] += 1
            else:
                left.grants[name] += 1
                left.numbers.add(number)
    return left


async def drain_dead(channel: AbstractChannel, names: Names, tally: Tally) -> None:
    """Read the rest of ``<ns>.dead`` (the live consumer may lag) into the tally."""
    queue = await channel.get_queue(names.dead)
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        tally.on_dead(message)


async def publish(broker: Broker, order: list[Grant], rate: float) -> None:
    """Every copy, all at once or at ``rate`` per second; at a rate, while nodes fail, each is
    published again until confirmed (the soak's own connection fails over too)."""
    started = time.monotonic()
    if rate <= 0:
        await broker.publish_grants((g.event_id, g.body()) for g in order)
    else:
        assert broker.publisher is not None
        publisher = broker.publisher

        async def one(grant: Grant) -> None:
            while True:
                try:
                    return await publisher.publish_event(
                        "access.granted", grant.body(), grant.event_id
                    )
                except BROKER_ERRORS:
                    await asyncio.sleep(0.5)

        tasks = []
        for index, grant in enumerate(order):
            await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(grant)))
        await asyncio.gather(*tasks)
    print(f"published {len(order)} in {time.monotonic() - started:.1f} s", file=sys.stderr)


# ------------------------------------------------------------------------------ failovers

CLUSTER = Path(__file__).with_name("cluster")


async def cluster(*args: str, timeout: float = 300) -> str:
    """Run ``bench/cluster ARGS``; its stdout, or RuntimeError with its stderr."""
    process = await asyncio.create_subprocess_exec(
        str(CLUSTER),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    if process.returncode:
        raise RuntimeError(f"bench/cluster {' '.join(args)}: {err.decode().strip()[-400:]}")
    return out.decode().strip()


@dataclass
class Failure:
    node: int
    how: str  # "stopped" (rabbitmqctl shutdown), "SIGKILL" or "restarted" (rolling)
    was_leader: bool  # of the grants queue
    leads_none: bool  # of the work queues
    at: float  # monotonic: the stop or kill was issued
    gone: float = 0.0  # monotonic: the node's process was gone
    back: float | None = None  # monotonic: restarted and booted


@dataclass
class Failovers:
    """Failures mid-load, each node restarted ``downtime`` s after: the grants queue's leader
    stopped, then a node that leads none of the work queues (else one that does not lead the
    grants) SIGKILLed, then a rolling restart (nodes 1, 2, 3 stopped and started in turn). The
    soak's own connection fails over like the workers'; its dead-letter reader acks."""

    queue: str
    work_queues: tuple[str, ...]
    fail_at: tuple[float, float, float]
    deadline: float = 600.0
    downtime: float = 5.0
    failures: list[Failure] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    error: str | None = None
    busy: bool = False  # a node is being stopped, killed or restarted: let that finish
    planned: int = 5

    def start(self, progress: Callable[[], float]) -> None:
        self.task = asyncio.create_task(self._run(progress))

    async def _run(self, progress: Callable[[], float]) -> None:
        try:
            await self._until(progress, self.fail_at[0])
            leader = await self._leader(self.queue)
            await self._fail(leader, "stop-node")
            await self._until(progress, self.fail_at[1])
            leading = {await self._leader(queue) for queue in self.work_queues}
            leader = await self._leader(self.queue)
            others = [n for n in (1, 2, 3) if n != leader]
            await self._fail(next((n for n in others if n not in leading), others[0]), "kill-node")
            await self._until(progress, self.fail_at[2])
            for node in (1, 2, 3):
                await self._fail(node, "restart")
        except Exception as exc:  # told in the report; the soak's accounting goes on
            self.error = f"{type(exc).__name__}: {exc}"
            print(f"failovers stopped: {self.error}", file=sys.stderr)

    async def _until(self, progress: Callable[[], float], share: float) -> None:
        for _ in range(round(self.deadline * 4)):  # the soak's deadline cancels us anyway
            if progress() >= share:
                return
            await asyncio.sleep(0.25)
        raise TimeoutError(f"{share:.0%} never accounted for")

    async def _leader(self, queue: str) -> int:
        name = await cluster("leader", queue)  # ikw2@localhost
        return int(name.partition("@")[0].removeprefix("ikw"))

    async def _fail(self, node: int, command: str) -> None:
        how = {"stop-node": "stopped", "kill-node": "SIGKILL", "restart": "restarted"}[command]
        self.busy = True
        leader = await self._leader(self.queue)
        leading = {await self._leader(queue) for queue in self.work_queues}
        failure = Failure(node, how, node == leader, node not in leading, time.monotonic())
        self.failures.append(failure)
        print(f"failover: ikw{node} {how} (grants leader ikw{leader})", file=sys.stderr)
        await cluster("kill-node" if command == "kill-node" else "stop-node", str(node))
        failure.gone = time.monotonic()
        await asyncio.sleep(self.downtime)
        await cluster("start-node", str(node))
        failure.back = time.monotonic()
        self.busy = False
        print(f"failover: ikw{node} back after {failure.back - failure.at:.1f} s", file=sys.stderr)

    async def stop(self) -> None:
        """Cancel what is pending and bring back any node left down."""
        if self.task is not None:
            if self.busy:  # bounded: each bench/cluster call has its timeout
                await asyncio.gather(self.task, return_exceptions=True)
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for failure in self.failures:
            if failure.back is None:
                with contextlib.suppress(Exception):
                    await cluster("start-node", str(failure.node))
                    failure.back = time.monotonic()


def send_times(sandbox: Sandbox) -> list[float]:
    times = list(getattr(sandbox.twilio.outbox, "times", []))
    times += getattr(sandbox.smtp.messages, "times", [])
    return sorted(times)


def pause_at(times: list[float], at: float, within: float = 30.0) -> tuple[float, float]:
    """(longest gap between consecutive sends that ends after ``at`` and starts before
    ``at + within``, longest gap in the ``within`` s before ``at``): the pause, and the normal."""
    gaps = list(itertools.pairwise(times))
    during = [b - a for a, b in gaps if b > at and a < at + within]
    before = [b - a for a, b in gaps if at - within <= a and b <= at]
    return max(during, default=float("nan")), max(before, default=float("nan"))


def consumers_back(samples: list[tuple[float, int | None]], at: float, workers: int) -> str:
    """How far the grants queue's consumer count fell after ``at``, and when all were back."""
    after = [(t, n) for t, n in samples if t >= at and n is not None]
    dip = next((i for i, (_, n) in enumerate(after) if n < workers), None)
    if dip is None:
        return f"never below {workers} in the looks (every 0.25 s)"
    back = next((t for t, n in after[dip:] if n >= workers), None)
    low = min(n for t, n in after[dip:] if back is None or t <= back)
    shown = f"all back {back - at:.1f} s after" if back is not None else "not all back"
    return f"{workers} -> {low} -> {workers} consumers, {shown}"


def failover_rows(o: "Outcome") -> list[tuple[str, object]]:
    f = o.failovers
    if f is None:
        return []
    times = send_times(o.sandbox)
    rows: list[tuple[str, object]] = []
    for number, failure in enumerate(f.failures, 1):
        pause, normal = pause_at(times, failure.at)
        lead = (
            "the grants leader"
            if failure.was_leader
            else "leads no work queue"
            if failure.leads_none
            else "not the grants leader"
        )
        goal = 10 if failure.was_leader or not failure.leads_none else 5
        back = f"back {failure.back - failure.at:.1f} s after" if failure.back else "not back"
        rows.append(
            (
                f"failover {number}",
                f"ikw{failure.node} ({lead}) {failure.how} at "
                f"{failure.at - o.published_at:.1f} s after the first publish, gone in "
                f"{failure.gone - failure.at:.1f} s, {back}",
            )
        )
        rows.append(
            (
                f"  consumption paused {number}",
                f"{pause:.2f} s, goal {goal} s (longest gap between sends; the 30 s before: "
                f"{normal:.2f} s)",
            )
        )
        rows.append(
            (f"  consumers {number}", consumers_back(o.watch.samples, failure.at, o.args.workers))
        )
    if f.error or len(f.failures) < f.planned:
        rows.append(("failovers incomplete", f.error or f"{len(f.failures)} of {f.planned} made"))
    return rows


# -------------------------------------------------------------------------------- figures


@dataclass
class Outcome:
    args: argparse.Namespace
    grants: list[Grant]
    tally: Tally
    sandbox: Sandbox
    watch: Watch
    elapsed: float
    cuts: int
    exits: list[Exit]
    left: Leftovers
    logs: LogSummary
    failovers: "Failovers | None" = None
    published_at: float = 0.0

    def lost(self) -> list[Grant]:
        return self.tally.unaccounted()

    def never_delivered(self) -> int:
        """Grants dead-lettered and never delivered: for the guest, a key that never came."""
        t = self.tally
        dead = t.dead_count()
        return sum(1 for g in self.grants if t.sends[g.number] == 0 and dead[g.number])

    def duplicate_keys(self) -> int:
        seam = self.sandbox.seam
        return sum(1 for i in seam.identities if len(seam.live_keys(i)) > 1)

    def hung(self) -> list[int]:
        return [e.pid for e in self.exits if e.killed]


def plan_rows(o: Outcome) -> list[tuple[str, object]]:
    guests = Counter(g.guest.index for g in o.grants)
    published = sum(g.copies for g in o.grants)
    cuts = f"cut every {o.args.cut_every:g} s" if o.args.cut_every > 0 else "no cuts"
    if o.args.cluster:
        cuts = "3-node cluster: leader stopped, a node SIGKILLed, rolling restart; no proxy"
    return [
        ("grants (distinct events)", len(o.grants)),
        ("identities", f"{len(guests)} ({sum(1 for n in guests.values() if n > 1)} repeated)"),
        ("published messages", f"{published} ({published - len(o.grants)} events twice)"),
        (
            "faults",
            f"Seam 503 {o.args.seam_503:.0%} (+{o.args.seam_latency:g} ms), "
            f"Twilio 429 {o.args.twilio_429:.0%}, "
            f"{cuts}, {o.args.workers} workers x prefetch {o.args.prefetch}",
        ),
    ]


def delivery_rows(o: Outcome) -> list[tuple[str, object]]:
    t = o.tally
    delivered = sum(1 for g in o.grants if t.sends[g.number] > 0)
    reasons = Counter(d.reason for d in t.dead)
    beyond_event = sum(max(0, t.sends[g.number] - 1) for g in o.grants)
    beyond_copy = sum(max(0, t.sends[g.number] - g.copies) for g in o.grants)
    shown = ", ".join(f"{r} {n}" for r, n in reasons.most_common()) or "none"
    return [
        (
            "delivered (events)",
            f"{delivered} (sms {t.by_channel['sms']}, email {t.by_channel['email']} sends)",
        ),
        ("dead-lettered (messages)", f"{len(t.dead)}: {shown}"),
        (
            "duplicate sends",
            f"{beyond_event} beyond one per event, {beyond_copy} beyond one per published copy",
        ),
        ("unidentified sends", t.unidentified),
        ("identities sent >1 link", sum(1 for links in t.links.values() if len(links) > 1)),
    ]


def key_rows(o: Outcome) -> list[tuple[str, object]]:
    seam, twilio = o.sandbox.seam, o.sandbox.twilio
    live = sum(len(seam.live_keys(i)) for i in seam.identities)
    return [
        ("seam calls per grant", f"{len(seam.requests) / len(o.grants):.2f}"),
        (
            "twilio requests",
            f"{twilio.received} ({twilio.received - len(twilio.outbox)} refused or failed)",
        ),
        ("seam identities", len(seam.identities)),
        ("keys minted / live", f"{len(seam.issued)} / {live}"),
        ("duplicate keys", o.duplicate_keys()),
    ]


def end_rows(o: Outcome) -> list[tuple[str, object]]:
    lost = o.lost()
    still = sum(1 for g in lost if g.number in o.left.numbers)
    left = dict(o.left.grants)
    after = o.watch.after
    accounted = f"{after:.1f} s" if after is not None else "no: deadline hit"
    samples = o.watch.consumers
    connected = sum(samples) / len(samples) / o.args.workers if samples else float("nan")
    return [
        ("lost", f"{len(lost)} ({still} still in a queue at the end, {len(lost) - still} nowhere)"),
        ("dead-lettered, never delivered", o.never_delivered()),
        ("grant copies left in queues", left or 0),
        ("cuts made", o.cuts),
        ("workers consuming, on average", f"{connected:.0%} of the time"),
        ("all accounted for after", accounted),
        ("elapsed", f"{o.elapsed:.1f} s"),
        (
            "worker exits",
            ", ".join(f"{e.returncode}{' (killed)' if e.killed else ''}" for e in o.exits),
        ),
        ("worker outcomes", dict(o.logs.outcomes.most_common())),
        ("acked at attempt", dict(sorted(o.logs.acked_attempts.items()))),
        ("worker log lines", dict(o.logs.levels.most_common())),
    ]


def report(o: Outcome) -> int:
    print_figures(plan_rows(o) + delivery_rows(o) + key_rows(o) + end_rows(o) + failover_rows(o))
    for grant in o.lost()[:10]:
        where = "still queued" if grant.number in o.left.numbers else "in no queue"
        print(
            f"not accounted for: E{tag(grant.number)} {grant.event_id} ({where})", file=sys.stderr
        )
    incomplete = o.failovers is not None and (
        o.failovers.error or len(o.failovers.failures) < o.failovers.planned
    )
    failed = o.lost() or o.never_delivered() or o.duplicate_keys() or o.hung() or incomplete
    return 1 if failed else 0


# ------------------------------------------------------------------------------------ main


async def soak(args: argparse.Namespace, names: Names, log_dir: Path) -> Outcome:
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"plan seed {seed} (--seed {seed} repeats this plan)", file=sys.stderr)
    rng = random.Random(seed)
    grants = make_grants(args, rng, names.namespace)
    order = publish_order(grants, rng)
    urls = amqp_urls(AMQP_URL)
    sandbox, proxy = Sandbox(), Proxy("127.0.0.1", broker_port(urls[0]))
    sandbox.seam.latency = args.seam_latency / 1000
    sandbox.twilio.outbox, sandbox.smtp.messages = StampedList(), StampedList()
    quorum_size = 3 if args.cluster else None
    failovers: Failovers | None = None
    if args.cluster:
        if len(urls) != 3:
            raise SystemExit("--cluster: AMQP_URL must list bench/cluster's three nodes")
        # Our own connection goes to the last node, which never fails (see Failovers).
        broker_url = ",".join(urls[-1:] + urls[:-1])
        work = tuple(names.work_queues)
        failovers = Failovers(names.grants, work, tuple(args.fail_at), args.deadline)
    else:
        broker_url = AMQP_URL
    broker, workers = Broker(broker_url, names, quorum_size), Workers(log_dir)
    tally = Tally(grants)
    faults = Faults(sandbox, proxy, args.cut_every)
    started = time.monotonic()
    published_at = started
    try:
        await sandbox.start()
        if args.cluster:
            # Declared through the first node, which then leads every queue of the namespace.
            first = await connect(urls[0], f"bench {names.namespace} declare")
            async with first:
                await topology.declare(await first.channel(), names, quorum_size=quorum_size)
        else:
            await proxy.start()
        await broker.open()
        assert broker.channel is not None and broker.connection is not None
        extra = {
            "IKW_PREFETCH": str(args.prefetch),
            "IKW_MAX_ATTEMPTS": str(args.max_attempts),
            "IKW_MAX_RETRY_AGE": "1d",
        }
        if quorum_size:
            extra["IKW_QUORUM_SIZE"] = str(quorum_size)
        amqp = AMQP_URL if args.cluster else with_port(AMQP_URL, proxy.port)
        await workers.start(args.workers, worker_env(sandbox.env(), amqp, names, extra))
        await workers.wait_ready(broker.channel, names.grants, timeout=60)
        dead_channel = await broker.connection.channel()
        dead_queue = await dead_channel.get_queue(names.dead)
        await dead_queue.consume(tally.on_dead_message)
        faults.start(args.seam_503, args.twilio_429)
        published_at = time.monotonic()
        publishing = asyncio.create_task(publish(broker, order, args.rate))
        if args.rate <= 0:
            await publishing
        if failovers is not None:
            failovers.start(lambda: 1 - len(tally.unaccounted()) / len(grants))
        watch = await wait_accounted(tally, sandbox, workers, faults, broker, args.deadline)
        await publishing
        if failovers is not None and len(failovers.failures) < failovers.planned:
            print("all accounted for before the last failover", file=sys.stderr)
        if failovers is not None:
            await failovers.stop()
        await faults.stop()
        await asyncio.sleep(args.settle)
        exits = await workers.stop()
        await dead_channel.close()
        await drain_dead(broker.channel, names, tally)
        tally.scan(sandbox)
        left = await census(broker.channel, names, tally)
    finally:
        if failovers is not None:
            await failovers.stop()
        await faults.stop()
        await workers.stop()
        await broker.close()
        if not args.cluster:
            await proxy.stop()
        await sandbox.stop()
    return Outcome(
        args,
        grants,
        tally,
        sandbox,
        watch,
        time.monotonic() - started,
        faults.cuts,
        exits,
        left,
        workers.log_summary(),
        failovers,
        published_at,
    )


async def main(args: argparse.Namespace) -> int:
    names = new_names("ikw_soak")
    log_dir = Path(tempfile.mkdtemp(prefix=f"{names.namespace}-"))
    print(f"namespace {names.namespace}, worker logs in {log_dir}", file=sys.stderr)
    return report(await soak(args, names, log_dir))


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
