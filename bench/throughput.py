"""Throughput and latency of `ikw run` workers against the in-process stand-ins.

Publishes N grants for distinct identities (SMS only, one phone number each), waits until every
phone number has its SMS in the Twilio stand-in's outbox, and prints grants/s, publish-to-SMS
latency, Seam calls per grant and the CPU the processes used.
"""

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from harness import (
    AMQP_URL,
    Broker,
    CpuMeter,
    StampedList,
    Workers,
    broker_pids,
    children_cpu_seconds,
    grant_body,
    new_names,
    percentile,
    print_figures,
    self_cpu_seconds,
    worker_env,
)

from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grants", type=int, default=1000, help="grants to publish (1000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--prefetch", type=int, default=32, help="IKW_PREFETCH per worker (32)")
    parser.add_argument(
        "--seam-latency", type=float, default=50.0, help="ms added to each Seam call (50)"
    )
    parser.add_argument(
        "--rate", type=float, default=0.0, help="publish at this many grants/s (0: all at once)"
    )
    parser.add_argument(
        "--deadline", type=float, default=120.0, help="s to wait for every SMS (120)"
    )
    return parser.parse_args(argv)


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


async def measure(
    args: argparse.Namespace, sandbox: Sandbox, broker: Broker, workers: Workers
) -> Run:
    outbox = StampedList()
    sandbox.twilio.outbox = outbox
    events = bodies(args.grants, broker.names.namespace)
    phones = [phone(i) for i in range(args.grants)]
    seam_before, twilio_before = len(sandbox.seam.requests), sandbox.twilio.received
    meters = [CpuMeter(workers.pids), CpuMeter(broker_pids())]
    for meter in meters:
        meter.start()
    self_before = self_cpu_seconds()
    started = await broker.publish_grants(events, rate=args.rate)

    wanted: int = args.grants

    def all_sent() -> bool:
        workers.check_alive()  # a worker that died fails the run now, not at the deadline
        return len(first_sms_times(outbox)) >= wanted

    await wait_for(all_sent, args.deadline, f"{args.grants} SMS")
    worker_cpu, broker_cpu = (meter.stop() for meter in meters)
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
    )


def report(
    args: argparse.Namespace, run: Run, total_worker_cpu: float, sms: int, elapsed: float
) -> None:
    latencies = [(run.delivered_at[p] - run.published_at[p]) * 1000 for p in run.published_at]
    span = max(run.delivered_at.values()) - run.first_publish
    print_figures(
        [
            ("grants", args.grants),
            ("workers x prefetch", f"{args.workers} x {args.prefetch}"),
            ("seam latency added", f"{args.seam_latency:g} ms"),
            ("publish rate", f"{args.rate:g} grants/s" if args.rate else "all at once"),
            ("publish time", f"{run.last_publish - run.first_publish:.2f} s"),
            ("first publish to last SMS", f"{span:.2f} s"),
            ("throughput", f"{args.grants / span:.1f} grants/s"),
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
    )


async def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    names = new_names("ikw_bench")
    log_dir = Path(tempfile.mkdtemp(prefix=f"{names.namespace}-"))
    print(f"namespace {names.namespace}, worker logs in {log_dir}", file=sys.stderr)
    sandbox = Sandbox()
    await sandbox.start()
    sandbox.seam.latency = args.seam_latency / 1000
    broker = Broker(AMQP_URL, names)
    workers = Workers(log_dir)
    try:
        await broker.open()
        extra = {"IKW_PREFETCH": str(args.prefetch)}
        await workers.start(args.workers, worker_env(sandbox.env(), AMQP_URL, names, extra))
        assert broker.channel is not None
        ready = await workers.wait_ready(broker.channel, names.grants, timeout=60)
        print(f"{args.workers} workers consuming after {ready:.1f} s", file=sys.stderr)
        run = await measure(args, sandbox, broker, workers)
    except TimeoutError as exc:
        print(f"throughput: {exc}; worker logs in {log_dir}", file=sys.stderr)
        return 1
    finally:
        exits = await workers.stop()
        await broker.close()
        await sandbox.stop()
    elapsed = time.monotonic() - started
    report(args, run, children_cpu_seconds(), len(sandbox.twilio.outbox), elapsed)
    hung = [e.pid for e in exits if e.killed]
    if hung:
        print(f"workers {hung} did not stop on SIGTERM within 30 s: killed", file=sys.stderr)
    return 1 if hung else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
