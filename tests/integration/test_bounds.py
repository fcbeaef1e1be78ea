"""Bounded by size, not by goodwill: bodies far over the limit leave the worker's memory as they
came, are dead-lettered cut to 64 KiB and are never replayed."""

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika

from tests.integration.conftest import AMQP_URL, WorkerProcess, dead_letters
from worker.broker import headers
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.events import MAX_BODY_BYTES
from worker.sandbox import wait_for

Connection = aio_pika.abc.AbstractRobustConnection
BIG = 10 * 1024 * 1024
COUNT = 20


def memory(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB$", status, re.MULTILINE))
    return {name: int(kb) // 1024 for name, kb in found.items()}


async def test_twenty_bodies_of_ten_mib_leave_memory_bounded(
    processes: Callable[..., Awaitable[WorkerProcess]], amqp: Connection, names: Names
) -> None:
    worker = await processes()  # at the default prefetch, 1024
    assert worker.process is not None
    before = memory(worker.process.pid)

    # As an untrusted producer: no user_id. The size is checked before anything else.
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    publisher = Publisher(channel, names, None)
    for n in range(COUNT):
        raw = b'{"type": "access.granted", "pad": "' + bytes([65 + n]) * BIG + b'"}'
        await publisher.publish(names.exchange, "access.granted", raw, message_id=f"big-{n}")
    await connection.close()

    letters: list[Any] = await dead_letters(amqp, names, COUNT, within=60)
    await wait_for(
        lambda: worker.log.read_text().count('"message dead_lettered"') >= COUNT,
        30,
        "the worker to settle every message",
    )
    after = memory(worker.process.pid)
    print(f"worker memory, MiB: before {before}, after {after}")

    for letter in letters:
        book = headers.read(letter.headers)
        assert (book.reason, book.truncated) == ("too_large", BIG + 37)
        assert len(letter.body) == MAX_BODY_BYTES
    # Before, each body stayed for good (a reference cycle through the refusal's traceback): 74
    # MiB became 275 here. The peak depends on how fast the worker drains its socket.
    assert after["VmRSS"] - before["VmRSS"] < 64, (before, after)
