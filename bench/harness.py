"""What the throughput bench and the fault soak share: a namespace on the broker, `ikw run`
worker processes, CPU readings from /proc, timestamped outboxes and event bodies."""

import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from worker import config
from worker.broker import topology
from worker.broker.connect import connect
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.events import granted

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
IKW = Path(sys.executable).with_name("ikw")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Worker settings the bench owns: anything of these in our own environment is dropped.
OWNED_PREFIXES = ("AMQP_", "IKW_", "SEAM_", "TWILIO_", "SMTP_", "EMAIL_")


class StampedList(list[Any]):
    """A list that notes ``time.monotonic()`` at each append: the moment a stand-in accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: Any) -> None:
        self.times.append(time.monotonic())
        super().append(item)


def with_port(url: str, port: int) -> str:
    """``url`` pointed at 127.0.0.1:``port`` (credentials and vhost kept)."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def broker_port(url: str) -> int:
    return urlsplit(url).port or 5672


def new_names(prefix: str) -> Names:
    return Names(f"{prefix}_{uuid.uuid4().hex[:10]}")


def grant_body(
    event_id: str,
    key: str,
    *,
    name: str,
    phone: str | None,
    email: str | None,
    channels: list[str],
) -> bytes:
    """An ``access.granted`` v1 event as a producer writes it (the worker's one builder)."""
    event = granted(
        user_identity_key=key,
        full_name=name,
        phone_number=phone,
        email_address=email,
        channels=channels,
        event_id=event_id,
        grant_id=f"bench-{event_id[:12]}",
    )
    return json.dumps(event).encode()


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (``share`` from 0 to 1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(share * len(ordered) + 0.5)))
    return ordered[rank - 1]


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process, from /proc/<pid>/stat; 0 when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants, from /proc/<pid>/task/*/children."""
    pids, index = [pid], 0
    while index < len(pids):
        for task in Path(f"/proc/{pids[index]}/task").glob("*"):
            with contextlib.suppress(OSError):
                pids.extend(int(child) for child in (task / "children").read_text().split())
        index += 1
    return pids


def broker_pids() -> list[int]:
    """The local RabbitMQ's Erlang VM(s), to show what the broker spends."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "beam.smp":
                    pids.append(int(entry.name))
    return pids


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    """CPU of every child process that has exited and been reaped."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuMeter:
    """CPU seconds of a set of processes between ``start`` and ``stop``."""

    pids: list[int]
    started: dict[int, float] = field(default_factory=dict)
    used: float = 0.0

    def start(self) -> None:
        self.started = {pid: proc_cpu_seconds(pid) for pid in self.pids}

    def stop(self) -> float:
        self.used = sum(proc_cpu_seconds(pid) - self.started[pid] for pid in self.pids)
        return self.used


def worker_env(
    stand_ins: Mapping[str, str], amqp_url: str, names: Names, extra: Mapping[str, str]
) -> dict[str, str]:
    """Our environment minus any worker setting, plus the stand-ins, broker and namespace."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(OWNED_PREFIXES)}
    return (
        base
        | dict(stand_ins)
        | {
            "AMQP_URL": amqp_url,
            "IKW_NAMESPACE": names.namespace,
            "IKW_HTTP_PORT": "0",
            "IKW_SHUTDOWN_GRACE": "5s",
        }
        | dict(extra)
    )


@dataclass
class Exit:
    pid: int
    returncode: int | None
    killed: bool


async def queue_counts(channel: AbstractChannel, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) now: a passive declare on the underlying channel, since the
    robust channel hands back its cached first answer."""
    result = await (await channel.get_underlay_channel()).queue_declare(queue, passive=True)
    return result.message_count or 0, result.consumer_count or 0


class Workers:
    """K ``ikw run`` processes, each logging to its own file."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[asyncio.subprocess.Process] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    async def start(
        self, count: int, env: Mapping[str, str], command: Sequence[str] = (str(IKW), "run")
    ) -> None:
        """``count`` processes of ``command`` (``ikw run`` unless told)."""
        for index in range(count):
            with (self.log_dir / f"worker-{index}.log").open("wb") as log:
                process = await asyncio.create_subprocess_exec(
                    *command,
                    env=dict(env),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # a Ctrl-C reaches us; we stop them
                )
            self.processes.append(process)

    def check_alive(self) -> None:
        for index, process in enumerate(self.processes):
            if process.returncode is not None:
                tail = self.log_tail(index)
                raise RuntimeError(f"worker {index} exited with {process.returncode}:\n{tail}")

    def log_tail(self, index: int, lines: int = 5) -> str:
        path = self.log_dir / f"worker-{index}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def wait_ready(self, channel: AbstractChannel, queue: str, timeout: float) -> float:
        """Until the queue has one consumer per worker; returns the seconds it took."""
        started = time.monotonic()
        while True:
            self.check_alive()
            consumers = (await queue_counts(channel, queue))[1]
            if consumers >= len(self.processes):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(
                    f"{consumers} of {len(self.processes)} workers consuming "
                    f"after {timeout:.0f} s; logs in {self.log_dir}"
                )
            await asyncio.sleep(0.1)

    async def stop(self, timeout: float = 30.0) -> list[Exit]:
        """SIGTERM each, wait up to ``timeout`` s, SIGKILL what is left (a hang)."""
        for process in self.processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        return list(await asyncio.gather(*(self._reap(p, timeout) for p in self.processes)))

    @staticmethod
    async def _reap(process: asyncio.subprocess.Process, timeout: float) -> Exit:
        try:
            code = await asyncio.wait_for(process.wait(), timeout)
            return Exit(process.pid, code, killed=False)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            return Exit(process.pid, await process.wait(), killed=True)

    def log_summary(self) -> "LogSummary":
        summary = LogSummary()
        for path in sorted(self.log_dir.glob("worker-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                summary.add(line)
        return summary


@dataclass
class LogSummary:
    """The workers' JSON log lines, counted: by level, outcome, and attempt of acked messages."""

    levels: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    acked_attempts: Counter[int] = field(default_factory=Counter)

    def add(self, line: str) -> None:
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            self.levels["not json"] += 1
            return
        self.levels[str(entry.get("level", "?"))] += 1
        outcome = entry.get("outcome")
        if isinstance(outcome, str):
            self.outcomes[outcome] += 1
            attempt = entry.get("attempt")
            if outcome == "acked" and isinstance(attempt, int):
                self.acked_attempts[attempt] += 1


class Broker:
    """A direct (unproxied) connection for declaring, publishing, reading and deleting. ``url``
    may list several nodes (AMQP_URL's comma form): the worker's own connect() tries them."""

    def __init__(self, url: str, names: Names, quorum_size: int | None = None) -> None:
        self.url = url
        self.names = names
        self.quorum_size = quorum_size
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractChannel | None = None
        self.publisher: Publisher | None = None

    async def open(self) -> None:
        self.connection = await connect(self.url, f"bench {self.names.namespace}")
        # Declared on a channel closed after: a robust channel declares it all again on every
        # reconnect, which fails while the node of the classic queue <ns>.unheard is down.
        declaring = await self.connection.channel()
        await topology.declare(declaring, self.names, quorum_size=self.quorum_size)
        await declaring.close()
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        self.publisher = Publisher(
            self.channel, self.names, config.Settings(amqp_url=self.url).broker_user
        )

    async def publish_grants(
        self, bodies: Iterable[tuple[str, bytes]], *, rate: float = 0.0, concurrency: int = 100
    ) -> list[float]:
        """Publish (event_id, body) pairs with confirms, at most ``concurrency`` in flight and,
        when ``rate`` > 0, at ``rate`` per second. Returns each one's publish start time."""
        assert self.publisher is not None
        publisher = self.publisher
        gate = asyncio.Semaphore(concurrency)

        async def one(event_id: str, body: bytes) -> float:
            async with gate:
                started = time.monotonic()
                await publisher.publish_event("access.granted", body, event_id)
                return started

        tasks = []
        first = time.monotonic()
        for index, (event_id, body) in enumerate(bodies):
            if rate > 0:
                await asyncio.sleep(max(0.0, first + index / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(event_id, body)))
        return list(await asyncio.gather(*tasks))

    async def close(self) -> None:
        """Delete the namespace's topology and close."""
        if self.connection is None:
            return
        channel = await self.connection.channel()
        await topology.delete(channel, self.names)
        await self.connection.close()


def print_figures(rows: list[tuple[str, object]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    sys.stdout.flush()


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A plain-text table, columns right-aligned (the first left-aligned)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first, *rest = cells
        return "  ".join(
            [first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))]
        )

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    sys.stdout.flush()
