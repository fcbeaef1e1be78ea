"""Throughput and latency of `ikw run` workers against the in-process stand-ins, and their CPU
per grant against the floor measured in the same run.

For each Seam latency in ``--latencies`` (a fresh namespace and stand-ins each time): publishes N
grants for distinct identities (SMS only, one phone number each), waits until every phone number
has its SMS in the Twilio stand-in's outbox, then runs ``floor.py`` against the same broker and
stand-ins. With ``--peer celery``, each round also runs the Celery gevent peer
(``celery_peer.py``) on the same job at ``--peer-latency``. Prints the figures of each run, then
one table: grants/s, the share of the 0 ms rate, latency, CPU per grant, the floor and their
ratio, Seam calls per grant; and the worker's steady rate over the peer's.
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from floor import WEIGHTS
from harness import (
    AMQP_URL,
    Broker,
    CpuMeter,
    Exit,
    StampedList,
    Workers,
    broker_pids,
    children_cpu_seconds,
    grant_body,
    new_names,
    percentile,
    print_figures,
    print_table,
    process_tree,
    self_cpu_seconds,
    worker_env,
)

from worker.config import Settings
from worker.sandbox import wait_for
from worker.sandbox.all import SMS_FROM, Sandbox

if TYPE_CHECKING:
    from celery import Celery

FLOOR = Path(__file__).with_name("floor.py")
PARTS = [*WEIGHTS, "pipeline"]
CELERY = Path(sys.executable).with_name("celery")
QUORUM = {"x-queue-type": "quorum"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grants", type=int, default=6000, help="grants per run (6000)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (1)")
    parser.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help=f"IKW_PREFETCH per worker (unset: the worker's default, {Settings.prefetch})",
    )
    parser.add_argument(
        "--latencies",
        default="0,50,200",
        help="ms added to each Seam call, one run each, comma-separated (0,50,200)",
    )
    parser.add_argument(
        "--rate", type=float, default=0.0, help="publish at this many grants/s (0: all at once)"
    )
    parser.add_argument(
        "--deadline", type=float, default=120.0, help="s to wait for every SMS, per run (120)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times to run the whole series, interleaved (3): the machine is shared, a burst "
        "of someone else's work shows as one round differing from the other",
    )
    parser.add_argument(
        "--no-listener",
        dest="listener",
        action="store_false",
        help="bind no booking-system queue to the outcome events: only the topology's "
        "<ns>.unheard takes them (and keeps none)",
    )
    parser.add_argument(
        "--floor-repeat", type=int, default=2000, help="repeats of each raw part (2000)"
    )
    parser.add_argument(
        "--peer",
        choices=["none", "celery"],
        default="none",
        help="celery: also run the Celery gevent peer (celery_peer.py, needs the bench extra) "
        "once per round at --peer-latency, and print the worker's steady rate over its own",
    )
    parser.add_argument(
        "--peer-latency", type=float, default=200.0, help="ms per Seam call for the peer (200)"
    )
    parser.add_argument(
        "--peer-concurrency", type=int, default=256, help="the peer's greenlets, -c (256)"
    )
    args = parser.parse_args(argv)
    try:
        args.latencies = [float(ms) for ms in str(args.latencies).split(",") if ms.strip()]
    except ValueError:
        parser.error(f"--latencies: comma-separated milliseconds, got {args.latencies!r}")
    if args.peer == "celery" and not CELERY.exists():
        parser.error(f"--peer celery: no {CELERY}; pip install -e '.[bench]'")
    return args


@dataclass
class Run:
    """What one run measured."""

    published_at: dict[str, float]  # phone -> monotonic time its publish started
    delivered_at: dict[str, float]  # phone -> time the Twilio stand-in accepted its first SMS
    seam_calls: int
    twilio_requests: int
    first_publish: float
    last_publish: float
    worker_cpu: float
    self_cpu: float
    broker_cpu: float
    floor: dict[str, float] | None = None  # CPU seconds per op of each raw part
    total_worker_cpu: float = 0.0
    sms: int = 0
    elapsed: float = 0.0
    who: str = "ikw"  # or "celery": the peer

    def rate(self, grants: int) -> float:
        """First publish to last SMS: filling and draining the pipeline included."""
        return grants / (max(self.delivered_at.values()) - self.first_publish)

    def steady_rate(self) -> float:
        """SMS per second between the 10th and the 90th percentile of SMS times: the rate once
        the worker is full, without the first and last grants' latency (one Seam latency per
        call of a grant, which a short run at 200 ms would otherwise count against it)."""
        times = sorted(self.delivered_at.values())
        low, high = round(0.1 * (len(times) - 1)), round(0.9 * (len(times) - 1))
        return (high - low) / (times[high] - times[low]) if high > low else float("nan")

    def floor_per_grant(self) -> float:
        """CPU seconds of the raw parts one grant needs, weighted as floor.WEIGHTS."""
        assert self.floor is not None
        return sum(self.floor[part] * weight for part, weight in WEIGHTS.items())


def phone(index: int) -> str:
    return f"+1415{index:07d}"


def bodies(count: int, prefix: str) -> list[tuple[str, bytes]]:
    out = []
    for index in range(count):
        event_id = str(uuid.uuid4())
        body = grant_body(
            event_id,
            f"{prefix}-{index}",
            name=f"Bench guest {index}",
            phone=phone(index),
            email=None,
            channels=["sms"],
        )
        out.append((event_id, body))
    return out


def first_sms_times(outbox: StampedList) -> dict[str, float]:
    first: dict[str, float] = {}
    for entry, at in zip(outbox, outbox.times, strict=True):
        first.setdefault(entry["to"], at)
    return first


async def listen_to_outcomes(broker: Broker) -> None:
    """A booking system's queue on the outcome events, as production has one (without it the
    topology's ``<ns>.unheard`` takes them). It keeps nothing (x-max-length 0) and goes with our
    connection."""
    assert broker.channel is not None and broker.publisher is not None
    queue = await broker.channel.declare_queue(
        f"{broker.names.namespace}.bench_outcomes", exclusive=True, arguments={"x-max-length": 0}
    )
    # The producer's outcomes, as `ikw topology --producer` binds its queue.
    await queue.bind(broker.names.outcomes, f"{broker.publisher.user_id}.#")


async def measure(
    args: argparse.Namespace,
    sandbox: Sandbox,
    workers: Workers,
    publish: Callable[[], Awaitable[list[float]]],
) -> Run:
    """``publish()`` the grants (their start times, in phone order), wait for every SMS."""
    outbox = StampedList()
    sandbox.twilio.outbox = outbox
    phones = [phone(i) for i in range(args.grants)]
    seam_before, twilio_before = len(sandbox.seam.requests), sandbox.twilio.received
    processes = [pid for worker in workers.pids for pid in process_tree(worker)]
    meters = [CpuMeter(processes), CpuMeter(broker_pids())]
    for meter in meters:
        meter.start()
    self_before = self_cpu_seconds()
    started = await publish()

    wanted: int = args.grants

    def all_sent() -> bool:
        workers.check_alive()  # a worker that died fails the run now, not at the deadline
        # Looked at whenever a stand-in answers: the count first, so that the bench process,
        # on the cores the worker uses, does not walk the whole outbox each time (py-spy: 18%
        # of its CPU did).
        return len(outbox) >= wanted and len(first_sms_times(outbox)) >= wanted

    await wait_for(all_sent, args.deadline, f"{args.grants} SMS")
    worker_cpu, broker_cpu = (meter.stop() for meter in meters)
    sms = len(outbox)
    return Run(
        published_at=dict(zip(phones, started, strict=True)),
        delivered_at=first_sms_times(outbox),
        seam_calls=len(sandbox.seam.requests) - seam_before,
        twilio_requests=sandbox.twilio.received - twilio_before,
        first_publish=min(started),
        last_publish=max(started),
        worker_cpu=worker_cpu,
        self_cpu=self_cpu_seconds() - self_before,
        broker_cpu=broker_cpu,
        sms=sms,
    )


def send_tasks(app: "Celery", grants: int, prefix: str, rate: float) -> list[float]:
    """The peer's grants as Celery tasks (confirmed, one at a time: well above the peer's
    rate), paced at ``rate`` per second when > 0. Returns each one's publish start time."""
    from celery_peer import TASK

    started: list[float] = []
    first = time.monotonic()
    with app.producer_or_acquire() as producer:
        for index in range(grants):
            if rate > 0:
                time.sleep(max(0.0, first + index / rate - time.monotonic()))
            started.append(time.monotonic())
            app.send_task(
                TASK,
                args=[f"{prefix}-{index}", phone(index), f"Bench guest {index}"],
                producer=producer,
                confirm_timeout=10,
            )
    return started


async def start_peer(
    args: argparse.Namespace, sandbox: Sandbox, broker: Broker, workers: Workers
) -> tuple[str, Callable[[], Awaitable[list[float]]]]:
    """Declare the peer's queues, start ``celery -A celery_peer worker``; (its queue, how to
    publish the grants to it)."""
    from celery_peer import make_app

    assert broker.channel is not None and broker.publisher is not None
    ns = broker.names.namespace
    queue = f"{ns}.celery"
    env = {
        "PYTHONPATH": str(FLOOR.parent),
        "PEER_QUEUE": queue,
        "PEER_NAMESPACE": ns,
        "PEER_CLEANUP_QUEUE": f"{ns}.celery_cleanup",
        "PEER_OUTCOME_EXCHANGE": broker.names.outcomes,
        "PEER_OUTCOME_KEY": f"{broker.publisher.user_id}.access.delivered",
        "PEER_CONCURRENCY": str(args.peer_concurrency),
    }
    # Declared before Celery starts so that wait_ready can look: the task queue as Celery
    # declares it (durable, classic), the cleanup queue a quorum queue as the worker's timers.
    await broker.channel.declare_queue(queue, durable=True)
    await broker.channel.declare_queue(env["PEER_CLEANUP_QUEUE"], durable=True, arguments=QUORUM)
    command = [
        str(CELERY),
        "-A",
        "celery_peer",
        "worker",
        "-P",
        "gevent",
        "-c",
        str(args.peer_concurrency),
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-Q",
        queue,
        "--loglevel",
        "WARNING",
        "-n",
        f"{ns}@%h",
    ]
    await workers.start(1, worker_env(sandbox.env(), AMQP_URL, broker.names, env), command)
    app = make_app({"AMQP_URL": AMQP_URL} | env)

    async def publish() -> list[float]:
        return await asyncio.to_thread(send_tasks, app, args.grants, ns, args.rate)

    return queue, publish


async def delete_peer_topology(broker: Broker) -> None:
    """The queues and exchanges of ``start_peer`` and of Celery itself."""
    if broker.connection is None:
        return
    ns = broker.names.namespace
    channel = await (await broker.connection.channel()).get_underlay_channel()
    for queue in (f"{ns}.celery", f"{ns}.celery_cleanup"):
        await channel.queue_delete(queue)
    for exchange in (f"{ns}.celery", f"{ns}.celeryev"):
        await channel.exchange_delete(exchange)


async def measure_floor(
    args: argparse.Namespace, sandbox: Sandbox, broker: Broker, concurrency: int, body_bytes: int
) -> dict[str, float]:
    """``floor.py`` in its own process, against the same broker and stand-ins."""
    env = sandbox.env()
    command = [
        sys.executable,
        str(FLOOR),
        f"--amqp-url={AMQP_URL}",
        f"--queue={broker.names.namespace}.floor",
        f"--seam-url={env['SEAM_ENDPOINT']}",
        f"--seam-key={env['SEAM_API_KEY']}",
        f"--twilio-url={env['TWILIO_API_URL']}",
        f"--twilio-sid={env['TWILIO_ACCOUNT_SID']}",
        f"--twilio-token={env['TWILIO_AUTH_TOKEN']}",
        f"--twilio-from={SMS_FROM}",
        f"--repeat={args.floor_repeat}",
        f"--concurrency={concurrency}",
        f"--body-bytes={body_bytes}",
    ]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
    )
    out, _ = await asyncio.wait_for(process.communicate(), args.deadline)
    if process.returncode != 0:
        raise RuntimeError(f"floor.py exited with {process.returncode}")
    parts = json.loads(out)
    assert isinstance(parts, dict)
    return {str(k): float(v) for k, v in parts.items()}


def report(args: argparse.Namespace, latency: float, run: Run) -> None:
    latencies = [(run.delivered_at[p] - run.published_at[p]) * 1000 for p in run.published_at]
    span = max(run.delivered_at.values()) - run.first_publish
    prefetch = args.prefetch or f"{Settings.prefetch} (default)"
    total_worker_cpu, sms, elapsed = run.total_worker_cpu, run.sms, run.elapsed
    floor = run.floor or {}
    if run.who == "celery":
        n = args.peer_concurrency
        who = ("celery peer", f"1 x gevent -c {n}, prefetch {n}, acks_late")
    else:
        who = ("workers x prefetch", f"{args.workers} x {prefetch}")
    print_figures(
        [
            ("grants", args.grants),
            who,
            ("seam latency added", f"{latency:g} ms"),
            ("publish rate", f"{args.rate:g} grants/s" if args.rate else "all at once"),
            ("publish time", f"{run.last_publish - run.first_publish:.2f} s"),
            ("first publish to last SMS", f"{span:.2f} s"),
            ("throughput", f"{args.grants / span:.1f} grants/s"),
            ("throughput, steady (10th-90th SMS)", f"{run.steady_rate():.1f} grants/s"),
            ("latency p50", f"{percentile(latencies, 0.50):.0f} ms"),
            ("latency p95", f"{percentile(latencies, 0.95):.0f} ms"),
            ("latency p99", f"{percentile(latencies, 0.99):.0f} ms"),
            ("latency max", f"{max(latencies):.0f} ms"),
            ("seam calls per grant", f"{run.seam_calls / args.grants:.2f}"),
            ("twilio requests per grant", f"{run.twilio_requests / args.grants:.2f}"),
            ("SMS sent (duplicates)", f"{sms} ({sms - args.grants})"),
            ("worker CPU during run", f"{run.worker_cpu:.2f} s"),
            ("worker CPU per grant", f"{run.worker_cpu / args.grants * 1000:.2f} ms"),
            ("worker CPU incl. start/stop", f"{total_worker_cpu:.2f} s"),
            ("bench process CPU", f"{run.self_cpu:.2f} s (stand-ins, publisher)"),
            ("RabbitMQ CPU during run", f"{run.broker_cpu:.2f} s"),
            ("elapsed, start and stop included", f"{elapsed:.1f} s"),
        ]
        + [
            (f"floor: {part} CPU", f"{floor[part] * 1000:.3f} ms x {weight}")
            for part, weight in WEIGHTS.items()
            if part in floor
        ]
        + (
            [
                ("floor per grant", f"{run.floor_per_grant() * 1000:.2f} ms"),
                (
                    "worker CPU per grant / floor",
                    f"{run.worker_cpu / args.grants / run.floor_per_grant():.2f}",
                ),
                ("raw pipeline per grant", f"{floor['pipeline'] * 1000:.2f} ms"),
                (
                    "worker CPU per grant / pipeline",
                    f"{run.worker_cpu / args.grants / floor['pipeline']:.2f}",
                ),
            ]
            if all(part in floor for part in PARTS)
            else []
        )
    )
    print()


async def one_run(
    args: argparse.Namespace, latency: float, who: str = "ikw"
) -> tuple[Run | None, bool]:
    """One worker run at ``latency`` ms per Seam call, then the floor; or, ``who`` "celery",
    one run of the peer (no floor). (run or None, hung)."""
    started = time.monotonic()
    peer = who == "celery"
    names = new_names("ikw_peer" if peer else "ikw_bench")
    log_dir = Path(tempfile.mkdtemp(prefix=f"{names.namespace}-"))
    print(f"{who} {latency:g} ms: namespace {names.namespace}, logs in {log_dir}", file=sys.stderr)
    sandbox = Sandbox()
    await sandbox.start()
    sandbox.seam.latency = latency / 1000
    broker = Broker(AMQP_URL, names)
    workers = Workers(log_dir)
    cpu_before = children_cpu_seconds()
    run: Run | None = None
    exits: list[Exit] = []
    try:
        await broker.open()
        if args.listener:
            await listen_to_outcomes(broker)
        assert broker.channel is not None
        body_bytes = 0
        if peer:
            queue, publish = await start_peer(args, sandbox, broker, workers)
        else:
            extra = {"IKW_PREFETCH": str(args.prefetch)} if args.prefetch else {}
            await workers.start(args.workers, worker_env(sandbox.env(), AMQP_URL, names, extra))
            queue, events = names.grants, bodies(args.grants, names.namespace)
            body_bytes = max(len(body) for _, body in events)

            def publish() -> Awaitable[list[float]]:
                return broker.publish_grants(events, rate=args.rate)

        ready = await workers.wait_ready(broker.channel, queue, timeout=60)
        print(f"{len(workers.pids)} {who} consuming after {ready:.1f} s", file=sys.stderr)
        run = await measure(args, sandbox, workers, publish)
        run.who = who
        exits = await workers.stop()
        run.total_worker_cpu = children_cpu_seconds() - cpu_before  # before floor.py, a child too
        if not peer:
            # The floor runs alone: the workers are gone, the broker and stand-ins are the same.
            concurrency = args.prefetch or Settings.prefetch
            run.floor = await measure_floor(args, sandbox, broker, concurrency, body_bytes)
    except (TimeoutError, RuntimeError) as exc:
        print(f"throughput: {exc}; {who} logs in {log_dir}", file=sys.stderr)
        run = None
    finally:
        exits = exits or await workers.stop()
        if peer:
            await delete_peer_topology(broker)
        await broker.close()
        await sandbox.stop()
    if run is not None:
        run.elapsed = time.monotonic() - started
    hung = [e.pid for e in exits if e.killed]
    if hung:
        print(f"workers {hung} did not stop on SIGTERM within 30 s: killed", file=sys.stderr)
    return run, bool(hung)


def table(args: argparse.Namespace, runs: list[tuple[float, Run]]) -> None:
    zero = [run.steady_rate() for latency, run in runs if latency == 0 and run.who == "ikw"]
    base = statistics.median(zero) if zero else None
    rows = []
    for latency, run in runs:
        steady = run.steady_rate()
        latencies = [(run.delivered_at[p] - run.published_at[p]) * 1000 for p in run.published_at]
        per_grant = run.worker_cpu / args.grants
        floor = run.floor_per_grant() if run.floor else None
        pipeline = run.floor["pipeline"] if run.floor else None
        rows.append(
            [
                run.who,
                f"{latency:g}",
                f"{run.rate(args.grants):.0f}",
                f"{steady:.0f}",
                f"{steady / base:.0%}" if base else "-",
                f"{percentile(latencies, 0.50):.0f}",
                f"{percentile(latencies, 0.99):.0f}",
                f"{per_grant * 1000:.2f}",
                f"{floor * 1000:.2f}" if floor else "-",
                f"{per_grant / floor:.2f}" if floor else "-",
                f"{pipeline * 1000:.2f}" if pipeline else "-",
                f"{per_grant / pipeline:.2f}" if pipeline else "-",
                f"{run.seam_calls / args.grants:.2f}",
                f"{run.sms - args.grants}",
            ]
        )
    prefetch = args.prefetch or f"{Settings.prefetch} (default)"
    listening = "a listener on the outcome events" if args.listener else "no outcome listener"
    peer = (
        f"; celery: the peer, 1 x gevent -c {args.peer_concurrency}"
        if args.peer == "celery"
        else ""
    )
    print(
        f"{args.grants} grants per run (new guests, SMS), ikw: {args.workers} worker(s), "
        f"IKW_PREFETCH {prefetch}, {listening}{peer}"
    )
    print_table(
        [
            "run",
            "seam ms",
            "grants/s",
            "steady/s",
            "of 0 ms",
            "p50 ms",
            "p99 ms",
            "CPU/grant ms",
            "floor ms",
            "ratio",
            "pipeline ms",
            "of pipeline",
            "seam calls",
            "dup SMS",
        ],
        rows,
    )
    parts = " + ".join(f"{w} {p}" for p, w in WEIGHTS.items())
    print(
        f"floor = {parts}; ratio = worker CPU per grant / floor; pipeline = the same parts "
        "chained per grant with no worker code (floor.py); of 0 ms = steady rate / median "
        "steady rate of ikw at 0 ms"
    )
    print()
    print(f"median of {args.rounds} round(s) by latency")
    summary = []
    medians: dict[tuple[str, float], float] = {}
    for who, latency in dict.fromkeys((run.who, at) for at, run in runs):
        these = [run for at, run in runs if (run.who, at) == (who, latency)]
        steady = medians[who, latency] = statistics.median(run.steady_rate() for run in these)
        per_grant = statistics.median(run.worker_cpu / args.grants for run in these)
        floors = [run.floor_per_grant() for run in these if run.floor]
        floor = statistics.median(floors) if floors else None
        pipelines = [run.floor["pipeline"] for run in these if run.floor]
        pipeline = statistics.median(pipelines) if pipelines else None
        summary.append(
            [
                who,
                f"{latency:g}",
                f"{steady:.0f}",
                f"{steady / base:.0%}" if base else "-",
                f"{per_grant * 1000:.2f}",
                f"{floor * 1000:.2f}" if floor else "-",
                f"{per_grant / floor:.2f}" if floor else "-",
                f"{pipeline * 1000:.2f}" if pipeline else "-",
                f"{per_grant / pipeline:.2f}" if pipeline else "-",
            ]
        )
    summary.sort(key=lambda row: (row[0] != "ikw", float(row[1])))
    print_table(
        [
            "run",
            "seam ms",
            "steady/s",
            "of 0 ms",
            "CPU/grant ms",
            "floor ms",
            "ratio",
            "pipeline ms",
            "of pipeline",
        ],
        summary,
    )
    at = args.peer_latency
    if ("ikw", at) in medians and ("celery", at) in medians:
        print(
            f"ikw steady/s at {at:g} ms / celery peer steady/s at {at:g} ms = "
            f"{medians['ikw', at] / medians['celery', at]:.2f} (the goal: at least 2.5)"
        )
    print()
    print_table(
        ["seam ms", *(f"{p} ms" for p in PARTS)],
        [
            [f"{latency:g}", *(f"{run.floor[p] * 1000:.3f}" for p in PARTS)]
            for latency, run in runs
            if run.floor
        ],
    )


async def main(args: argparse.Namespace) -> int:
    runs: list[tuple[float, Run]] = []
    failed = False
    series = [("ikw", at) for at in args.latencies]
    if args.peer == "celery":
        series.append(("celery", args.peer_latency))
    for who, latency in [one for _ in range(args.rounds) for one in series]:
        run, hung = await one_run(args, latency, who)
        failed = failed or hung or run is None
        if run is not None:
            report(args, latency, run)
            runs.append((latency, run))
    if runs:
        table(args, runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
