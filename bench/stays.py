"""Stays at scale (`make bench-stays`): schedule N stays days ahead, read the broker's memory and
disk per pending stay, then time a fresh replica to ready with them in the record.

Each stay is an `access.granted` with a `stay` for its own guest and reservation, delivered 2 to
30 days from now. The first ``--through-worker`` are published by a trusted producer and taken by
a running `ikw run`, timed: the worker's own rate. The rest are written directly, as the worker
writes them: the record entry of `record_stay` on `<ns>.fence` and the two timers of
`schedule_stay` (delivery, end) through the worker's publisher into `<ns>.delay.NN`. That replica
follows the stream meanwhile (and writes snapshots, as in `make bench-fence`).

The broker's figures are RabbitMQ's own, read with `rabbitmqctl` on this machine (the
management plugin is not enabled here): `list_queues name messages memory` for the namespace's
queues, `status` for the node, and the size on disk of the namespace's quorum-queue and stream
directories under the node's data directory, plus the quorum queues' shared write-ahead log.
Before and after; the namespace is deleted at the end, its timers with it."""

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from fence import free_port, time_fresh_replica, until_quiet, until_ready
from harness import AMQP_URL, Broker, Workers, new_names, print_figures, print_table, worker_env

from worker.broker.fence import stay_entry
from worker.broker.publisher import announce_to
from worker.events import AccessGranted, IdentityRef, StayDelivery, StayEnd, granted
from worker.queues import LEVELS, Names
from worker.record import StayRecord, identity_names, millis, reservation_name
from worker.sandbox.all import Sandbox
from worker.stays import DEFAULT_STAY_TIMES, deliver_at

BATCH = 500  # stays written at once: 1,500 publishes awaited together
DAY = timedelta(days=1)


def stay_grant(index: int, rng: random.Random, now: datetime) -> dict[str, Any]:
    """A producer's grant for stay ``index``: delivered 2 to 30 days out, check-in a day later
    (the default lead), 1 to 7 nights."""
    starts = now + timedelta(seconds=rng.uniform(2, 30) * 86400) + DAY
    ends = starts + rng.randint(1, 7) * DAY
    event = granted(
        user_identity_key=f"stay-guest-{index}",
        full_name=f"Stay guest {index}",
        phone_number=f"+1415{index:07d}",
        channels=["sms"],
        occurred_at=now,
    )
    times = {"starts_at": starts.isoformat(), "ends_at": ends.isoformat()}
    return event | {"stay": {"reservation_key": f"res-{index}"} | times}


def written(event: AccessGranted) -> tuple[bytes, StayDelivery, StayEnd]:
    """What the worker writes on accepting the grant (worker/stays.py `accept`)."""
    stay, guest = event.stay, event.user_identity
    assert stay is not None
    due = deliver_at(stay, DEFAULT_STAY_TIMES.delivery_lead)
    names = (*identity_names(None, guest.user_identity_key), reservation_name(stay.reservation_key))
    record = StayRecord(
        stay.revision,
        millis(event.occurred_at),
        event.event_id,
        names,
        millis(due),
        millis(stay.starts_at),
        millis(stay.ends_at),
    )
    entry = stay_entry(record, stay.reservation_key) | {"m": uuid.uuid4().hex}  # its read-back
    delivery = StayDelivery(
        type="stay.delivery", version=1, reason="initial", due_at=due, grant=event
    )
    end = StayEnd(
        type="stay.end",
        version=1,
        reservation_key=stay.reservation_key,
        revision=stay.revision,
        due_at=stay.ends_at + DEFAULT_STAY_TIMES.checkout_grace,
        user_identity=IdentityRef(user_identity_id=None, user_identity_key=guest.user_identity_key),
    )
    return json.dumps(entry).encode(), delivery, end


def written_bytes(grant: dict[str, Any]) -> str:
    entry, delivery, end = written(AccessGranted.model_validate_json(json.dumps(grant)))
    return f"{len(entry)}, {len(delivery.model_dump_json())} + {len(end.model_dump_json())}"


async def pending_timers(broker: Broker) -> int:
    return sum([await queue_ready(broker, broker.names.delay(level)) for level in range(LEVELS)])


async def queue_ready(broker: Broker, queue: str) -> int:
    assert broker.channel is not None
    declared = await (await broker.channel.get_underlay_channel()).queue_declare(
        queue, passive=True
    )
    return declared.message_count or 0


async def through_worker(broker: Broker, grants: list[dict[str, Any]], deadline: float) -> float:
    """Publish the grants as a trusted producer; seconds until the worker scheduled them all."""
    began = time.monotonic()
    await broker.publish_grants((g["event_id"], json.dumps(g).encode()) for g in grants)
    await until_timers(broker, 2 * len(grants), deadline)
    return time.monotonic() - began


async def until_timers(broker: Broker, count: int, deadline: float) -> None:
    while (pending := await pending_timers(broker)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{pending} of {count} timers in the delay queues by the deadline")
        await asyncio.sleep(0.5)


async def directly(broker: Broker, grants: list[dict[str, Any]]) -> float:
    """Write what the worker would, a batch at a time; the seconds it took."""
    assert broker.publisher is not None
    publisher, fence = broker.publisher, broker.names.fence
    announce_to.set(publisher.user_id)  # the producer the timers name, as when the worker writes
    began = time.monotonic()
    for start in range(0, len(grants), BATCH):
        sends = []
        for grant in grants[start : start + BATCH]:
            entry, delivery, end = written(AccessGranted.model_validate_json(json.dumps(grant)))
            sends += [
                publisher.to_queue(fence, entry),
                publisher.schedule_stay(delivery),
                publisher.schedule_stay(end),
            ]
        await asyncio.gather(*sends)
        if (start // BATCH) % 20 == 19:
            print(f"written {start + BATCH}", file=sys.stderr)
    return time.monotonic() - began


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=120
    ).stdout


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk (as du counts them) under ``path``."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    total = 0
    for file in files:
        try:
            total += file.stat().st_blocks * 512
        except FileNotFoundError:
            pass  # a segment rolled away meanwhile
    return total


# Each of the namespace's quorum queues (vhost "/"): its data directory, and the bytes of its
# entries held in memory until the shared write-ahead log rolls over (its "mem tables").
QUORUM = """[begin
  U = ra_directory:uid_of(quorum_queues, element(1, amqqueue:get_pid(Q))),
  Tids = [element(4, T) || T <- ets:lookup(ra_log_open_mem_tables, U)]
    ++ [element(tuple_size(T), T) || T <- ets:lookup(ra_log_closed_mem_tables, U)],
  Words = [case ets:info(T, memory) of N when is_integer(N) -> N; _ -> 0 end || T <- Tids],
  {element(4, amqqueue:get_name(Q)), ra_env:server_data_dir(quorum_queues, U),
   lists:sum(Words) * erlang:system_info(wordsize)}
 end || Q <- rabbit_amqqueue:list(<<"/">>), amqqueue:get_type(Q) =:= rabbit_quorum_queue,
  binary:longest_common_prefix([element(4, amqqueue:get_name(Q)), <<"@NS@">>]) =:= @SIZE@]."""
ROLL_OVER = "ra_log_wal:force_roll_over(ra_log_wal)."


def broker_figures(names: Names) -> dict[str, int]:
    """RabbitMQ's own memory and disk figures for the namespace, and for the node."""
    mine = names.namespace + "."
    queues = json.loads(
        rabbitmqctl("list_queues", "name", "messages", "memory", "--formatter", "json")
    )
    ours = [q for q in queues if q["name"].startswith(mine)]
    delay_prefix = names.delay(0)[:-2]
    delay = [q for q in ours if q["name"].startswith(delay_prefix)]
    node = json.loads(rabbitmqctl("status", "--formatter", "json"))["memory"]
    data = Path(rabbitmqctl("eval", "rabbit_mnesia:dir().").strip().strip('"'))
    query = QUORUM.replace("@NS@", mine).replace("@SIZE@", str(len(mine.encode())))
    found = re.findall(r'<<"([^"]+)">>,\s*"([^"]+)",\s*(\d+)\}', rabbitmqctl("eval", query))
    delays = [(Path(d), int(m)) for q, d, m in found if q.startswith(delay_prefix)]
    others = [(Path(d), int(m)) for q, d, m in found if not q.startswith(delay_prefix)]
    streams = list((data / "stream").glob(f"*_{names.namespace}_fence*"))
    wal = list((data / "quorum").glob("*/*.wal"))
    return {
        "delay queues: queue processes": sum(q["memory"] for q in delay),
        "delay queues: entries in memory": sum(m for _, m in delays),
        "delay queues: on disk": sum(disk_bytes(d) for d, _ in delays),
        "other queues: queue processes": sum(q["memory"] for q in ours if q not in delay),
        "other queues: entries in memory": sum(m for _, m in others),
        "other queues: on disk": sum(disk_bytes(d) for d, _ in others),
        "record stream disk": sum(disk_bytes(s) for s in streams),
        "whole node memory": node["total"]["rss"],
        "whole node quorum_ets": node["quorum_ets"],
        "whole node write-ahead log": sum(disk_bytes(w) for w in wal),
    }


def timers(names: Names) -> int:
    """Messages in the namespace's delay queues, by RabbitMQ's queue statistics."""
    queues = json.loads(rabbitmqctl("list_queues", "name", "messages", "--formatter", "json"))
    return sum(q["messages"] for q in queues if q["name"].startswith(names.delay(0)[:-2]))


def rate(count: int, seconds: float) -> str:
    return f"{count} in {seconds:.1f} s ({count / max(seconds, 1e-3):,.0f}/s)"


def figures_table(before: dict[str, int], *after: dict[str, int], stays: int) -> None:
    """MiB before and at each later reading, and bytes per stay grown since before."""
    header = ["broker (RabbitMQ's figures)", "before", "after", "rolled over", "B/stay", "rolled"]
    rows = []
    for name, value in before.items():
        now = [reading[name] for reading in after]
        mib = [f"{v / 2**20:,.1f}" for v in (value, *now)]
        grown = [f"{(v - value) / stays:,.0f}" for v in now]
        shared = name.startswith("whole node")  # other work on the broker moves it too
        rows.append([name, *mib, *(["-"] * len(now) if shared else grown)])
    print_table(header, rows)


async def settled(names: Names, count: int) -> dict[str, int]:
    """The figures once RabbitMQ's queue statistics (emitted every few seconds) count them all."""
    for _ in range(15):
        if timers(names) >= count:
            break
        await asyncio.sleep(2)
    return broker_figures(names)


async def rolled_over(names: Names) -> dict[str, int]:
    """Roll the quorum queues' write-ahead log over (RabbitMQ does at 512 MiB of writes): their
    entries move from memory to each queue's segment files."""
    rabbitmqctl("eval", ROLL_OVER)
    for _ in range(30):
        await asyncio.sleep(2)
        figures = broker_figures(names)
        if figures["delay queues: entries in memory"] < 2**20:
            break
    return figures


async def run(args: argparse.Namespace) -> None:
    names = new_names("ikw_stays")
    log_dir = Path(tempfile.mkdtemp(prefix=f"{names.namespace}-"))
    print(f"namespace {names.namespace}, logs in {log_dir}", file=sys.stderr)
    now, rng = datetime.now(UTC), random.Random(args.seed)
    grants = [stay_grant(i, rng, now) for i in range(args.stays)]
    sample = grants if args.through_worker is None else grants[: args.through_worker]
    sandbox, broker = Sandbox(), Broker(AMQP_URL, names)
    follower, fresh = Workers(log_dir / "follower"), Workers(log_dir / "fresh")
    (log_dir / "follower").mkdir()
    (log_dir / "fresh").mkdir()
    deadline = time.monotonic() + args.deadline
    await sandbox.start()
    await broker.open()
    try:
        before = broker_figures(names)
        async with aiohttp.ClientSession() as http:
            follower_port = free_port()
            env = worker_env(sandbox.env(), AMQP_URL, names, {})
            await follower.start(1, {**env, "IKW_HTTP_PORT": str(follower_port)})
            await until_ready(http, follower_port, follower, deadline)
            worker_seconds = await through_worker(broker, sample, deadline) if sample else 0.0
            direct_seconds = await directly(broker, grants[len(sample) :])
            await until_quiet(http, follower_port, args.stays, deadline)
            await until_timers(broker, 2 * args.stays, deadline)
            after = await settled(names, 2 * args.stays)
            pending = timers(names)
            rolled = await rolled_over(names)
            await follower.stop()
            ready = await time_fresh_replica(http, fresh, env, deadline)
    finally:
        await fresh.stop()
        await follower.stop()
        await broker.close()
        await sandbox.stop()
    left = [q for q in rabbitmqctl("list_queues", "name").split() if q.startswith(names.namespace)]
    direct = args.stays - len(sample)
    rows: list[tuple[str, object]] = [
        ("stays scheduled", args.stays),
        ("  through the worker", rate(len(sample), worker_seconds)),
        ("  written directly", rate(direct, direct_seconds)),
        ("bytes of a stay's record entry, timers", written_bytes(grants[0])),
        ("pending timers (delay queues)", pending),
        ("fresh replica: records read", ready.caught["records"]),
        ("  seconds to ready", f"{ready.seconds:.2f}"),
        ("  of which reading the record", ready.caught["seconds"]),
        ("  entries held", ready.caught["entries"]),
        ("  fence memory gauge (MiB)", f"{ready.memory_gauge / 2**20:.1f}"),
        (
            "  RSS at ready / peak (MiB)",
            f"{ready.rss_kib / 1024:.0f} / {ready.peak_kib / 1024:.0f}",
        ),
        ("  last /readyz reason", ready.why or "-"),
        ("namespace queues left after", len(left)),
    ]
    print_figures(rows)
    figures_table(before, after, rolled, stays=args.stays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stays", type=int, default=100_000, help="stays to schedule")
    parser.add_argument(
        "--through-worker",
        type=int,
        help="of them, published through the worker (default all); the rest written directly",
    )
    parser.add_argument("--seed", type=int, default=16, help="the stays' windows")
    parser.add_argument("--deadline", type=float, default=1800, help="seconds for the whole run")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
