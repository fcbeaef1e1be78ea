"""What tests share besides fixtures: the fixtures' types, the broker's address and user, and
helpers that read queues and metrics."""

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import aio_pika

from worker import config
from worker.broker.topology import Names
from worker.sandbox import changed, wait_for
from worker.service import Service

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
BROKER_USER = config.Settings(amqp_url=AMQP_URL).broker_user
IKW = [sys.executable, "-m", "worker.cli"]  # `ikw` as a process of its own
USER_PASSWORD = uuid.uuid4().hex  # of the broker users tests make

# The types of the fixtures of tests/integration/conftest.py.
Connection: TypeAlias = aio_pika.abc.AbstractRobustConnection
Publish: TypeAlias = Callable[..., Awaitable[None]]
StartWorker: TypeAlias = Callable[..., Awaitable[Service]]
Json: TypeAlias = dict[str, Any]
Cli: TypeAlias = Callable[..., Awaitable[tuple[int, str, str]]]


async def drain(connection: Connection, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message now in ``queue``, acked."""
    channel = await connection.channel()
    q = await channel.get_queue(queue)
    messages = []
    while (message := await q.get(fail=False)) is not None:
        await message.ack()
        messages.append(message)
    await channel.close()
    return messages


async def dead_letters(amqp: Any, names: Names, count: int, within: float = 20) -> list[Any]:
    """Wait until ``count`` dead letters arrived; return them (taken off the dead queue)."""
    found: list[Any] = []

    async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        found.append(message)
        changed()

    channel = await amqp.channel()
    queue = await channel.get_queue(names.dead)
    await queue.consume(take)
    try:
        await wait_for(lambda: len(found) >= count, within, f"{count} dead letters")
    finally:
        await channel.close()
    return found


def dead_lettered(service: Service) -> float:
    """How many messages the worker dead-lettered, whatever the reason (its metric)."""
    return sum(
        sample.value
        for metric in service.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == "ikw_dead_letters_total"
    )


def settled(service: Service, queue: str, outcome: str) -> float:
    """How many messages of ``queue`` the worker settled with ``outcome`` (its metric)."""
    value = service.metrics.registry.get_sample_value(
        "ikw_messages_total", {"queue": queue, "outcome": outcome}
    )
    return value or 0.0


class WorkerProcess:
    """`ikw run` in its own process, logging to a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> "WorkerProcess":
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                *IKW, "run", env=os.environ | self.env, stderr=out
            )
        await wait_for(lambda: '"consuming"' in self.log.read_text(), 30, "the worker to consume")
        return self

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def exit_code(self, within: float = 30) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), within)


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextmanager
def broker_users(*roles: str) -> Iterator[dict[str, str]]:
    """A broker user per role (role -> ``<role>_<run>``), password USER_PASSWORD, with broad
    rights (the worker's refusals are under test, not the broker's); removed after, even when the
    test fails."""
    run = uuid.uuid4().hex[:8]
    made = {role: f"{role}_{run}" for role in roles}
    try:
        for user in made.values():
            rabbitmqctl("add_user", user, USER_PASSWORD)
            rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield made
    finally:
        for user in made.values():
            subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True)


def user_url(user: str) -> str:
    """AMQP_URL as one of the users ``broker_users`` made."""
    parts = urlsplit(AMQP_URL)
    netloc = f"{user}:{USER_PASSWORD}@{parts.hostname}:{parts.port}"
    return parts._replace(netloc=netloc).geturl()
