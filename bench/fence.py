"""The revocation fence at scale (`make bench-fence`): fill a fence with N revokes while one
replica follows it and writes snapshots, then start a fresh replica and time it to ready.

Prints the records in the fence, the records the fresh replica read, seconds to ready (from
spawning `ikw run` to /readyz answering 200), records/s, the replica's RSS at ready and its
peak, and the memory its fence says it holds. ``--no-snapshots`` fills with no replica
following, so no snapshot exists and the fresh replica reads the whole stream; ``--tail N``
writes the last N after the follower stopped (at most about 60,000 follow a snapshot: a
replica writes one past 50,000 to 60,000)."""

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from harness import AMQP_URL, Broker, Workers, new_names, print_figures, worker_env

from worker.sandbox.all import Sandbox
from worker.sandbox.record import BATCH, fill_fence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_kib(pid: int, field: str) -> int:
    """VmRSS or VmHWM (the peak) of a live process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def logged(path: Path, message: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines with this message."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("msg") == message:
            found.append(entry)
    return found


async def metric(http: aiohttp.ClientSession, port: int, name: str) -> float:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


async def until_quiet(
    http: aiohttp.ClientSession, port: int, records: int, deadline: float
) -> None:
    """Until the follower has read ``records`` and then read nothing new for 3 s (a snapshot it
    writes is read back by itself)."""
    last, still = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        read = await metric(http, port, "ikw_fence_records_read")
        if read != last:
            last, still = read, time.monotonic()
        elif read >= records and time.monotonic() - still >= 3:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the follower read {last:.0f} of {records} records by the deadline")


async def until_ready(
    http: aiohttp.ClientSession, port: int, workers: Workers, deadline: float
) -> str:
    """Poll /readyz until 200; returns the last 'why' seen while not ready."""
    why = ""
    while time.monotonic() < deadline:
        workers.check_alive()
        try:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                if response.status == 200:
                    return why
                why = (await response.json()).get("why", why)
        except aiohttp.ClientError:
            pass  # not serving yet
        await asyncio.sleep(0.05)
    raise TimeoutError(f"not ready by the deadline ({why})")


@dataclass
class Ready:
    """A fresh replica at ready: seconds from spawning, the last /readyz reason before, its
    RSS and peak (KiB), its "revocation fence caught up" log line, its fence memory gauge."""

    seconds: float
    why: str
    rss_kib: int
    peak_kib: int
    caught: dict[str, Any]
    memory_gauge: float


async def time_fresh_replica(
    http: aiohttp.ClientSession, fresh: Workers, env: Mapping[str, str], deadline: float
) -> Ready:
    """Spawn one `ikw run` and poll its /readyz every 50 ms until 200."""
    port = free_port()
    spawned = time.monotonic()
    await fresh.start(1, {**env, "IKW_HTTP_PORT": str(port)})
    why = await until_ready(http, port, fresh, deadline)
    seconds = time.monotonic() - spawned
    pid = fresh.pids[0]
    rss, peak = rss_kib(pid, "VmRSS"), rss_kib(pid, "VmHWM")
    gauge = await metric(http, port, "ikw_fence_memory_bytes")
    [caught] = logged(fresh.log_dir / "worker-0.log", "revocation fence caught up")
    return Ready(seconds, why, rss, peak, caught, gauge)


async def run(args: argparse.Namespace) -> None:
    names = new_names("ikw_fence")
    log_dir = Path(tempfile.mkdtemp(prefix=f"{names.namespace}-"))
    print(f"namespace {names.namespace}, logs in {log_dir}", file=sys.stderr)
    sandbox, broker = Sandbox(), Broker(AMQP_URL, names)
    await sandbox.start()
    await broker.open()
    follower, fresh = Workers(log_dir / "follower"), Workers(log_dir / "fresh")
    (log_dir / "follower").mkdir()
    (log_dir / "fresh").mkdir()
    deadline = time.monotonic() + args.deadline
    try:
        async with aiohttp.ClientSession() as http:
            follower_port = free_port()
            if not args.no_snapshots:
                env = {"IKW_HTTP_PORT": str(follower_port)}
                await follower.start(1, worker_env(sandbox.env(), AMQP_URL, names, env))
                await until_ready(http, follower_port, follower, deadline)
            assert broker.connection is not None and broker.publisher is not None
            channel = await broker.connection.channel(publisher_confirms=True)
            user = broker.publisher.user_id or ""
            began = time.monotonic()
            followed = args.records - args.tail
            for start in range(0, followed, args.chunk):
                count = min(args.chunk, followed - start)
                now = datetime.now(UTC)
                await fill_fence(channel, names, user, count, now, prefix=f"guest-{start}-")
                print(f"filled {start + count}", file=sys.stderr)
            fill_seconds = time.monotonic() - began
            snapshots = 0
            if not args.no_snapshots:
                await until_quiet(http, follower_port, followed, deadline)
                await follower.stop()
                snapshots = len(logged(log_dir / "follower" / "worker-0.log", SNAPSHOT_LINE))
            now = datetime.now(UTC)
            await fill_fence(channel, names, user, args.tail, now, prefix="tail-")

            env = worker_env(sandbox.env(), AMQP_URL, names, {})
            ready = await time_fresh_replica(http, fresh, env, deadline)
            caught = ready.caught
    finally:
        await fresh.stop()
        await follower.stop()
        await broker.close()
        await sandbox.stop()
    print_figures(
        [
            ("revokes in the fence", args.records),
            ("filled in (s)", f"{fill_seconds:.1f} ({args.records / fill_seconds:,.0f}/s)"),
            ("snapshots written while filling", snapshots),
            ("records the fresh replica read", caught["records"]),
            ("seconds to ready", f"{ready.seconds:.2f}"),
            ("  of which reading the fence", caught["seconds"]),
            ("records/s", f"{caught['records'] / max(caught['seconds'], 1e-3):,.0f}"),
            ("entries held", caught["entries"]),
            ("entries/s", f"{caught['entries'] / max(caught['seconds'], 1e-3):,.0f}"),
            ("fence memory (MiB, estimated)", caught["memory_mib"]),
            ("replica RSS at ready (MiB)", f"{ready.rss_kib / 1024:.0f}"),
            ("replica peak RSS (MiB)", f"{ready.peak_kib / 1024:.0f}"),
            ("last /readyz reason", ready.why or "-"),
        ]
    )


SNAPSHOT_LINE = "wrote a snapshot of the revocation fence"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="revokes to fill with")
    parser.add_argument("--chunk", type=int, default=100 * BATCH, help="progress every N")
    parser.add_argument("--no-snapshots", action="store_true", help="no follower, no snapshot")
    parser.add_argument(
        "--tail",
        type=int,
        default=0,
        help="the last N revokes written after the follower stopped: no snapshot covers them",
    )
    parser.add_argument("--deadline", type=float, default=1800, help="seconds for the whole run")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
