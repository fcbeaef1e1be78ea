"""Bounded by size and shape, not by goodwill: bodies far over the limit leave the worker's memory
as they came and are dead-lettered cut to 64 KiB; a property's name sends the guest nowhere."""

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.builders import grant
from tests.helpers import AMQP_URL, Connection, Publish, StartWorker, WorkerProcess, dead_letters
from worker.broker import headers
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.events import MAX_BODY_BYTES
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox

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


@pytest.mark.parametrize(
    "hostile",
    [
        "Bellevue: first open https://evil.example/k",
        "Bellevue, front desk +1 415 555 0199",
        "Bellevue (desk 415-555-0199)",
        "Bellevue evil\u3002example",
    ],
)
async def test_a_link_or_a_phone_number_in_the_property_name_never_reaches_the_sms(
    hostile: str, sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    await start_worker(IKW_PROPERTY_NAME="Hotel Bellevue")
    event = grant(channels=("sms",))
    event["delivery"]["property_name"] = hostile
    await publish(event)

    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS")
    [sms] = sandbox.twilio.outbox
    [key] = sandbox.seam.issued
    assert sms["body"].startswith("Hi Ada Lovelace, here is your key for Hotel Bellevue: ")
    assert key["instant_key_url"] in sms["body"]
    assert "evil" not in sms["body"] and "0199" not in sms["body"]
