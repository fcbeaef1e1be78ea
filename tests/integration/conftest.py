"""Real RabbitMQ (AMQP_URL, default 127.0.0.1:5672), real sockets to the shipped stand-ins."""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.builders import body
from tests.helpers import AMQP_URL, BROKER_USER, Cli, WorkerProcess
from worker import config
from worker.broker import topology
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.cli import main
from worker.logs import JsonFormatter
from worker.sandbox import changed
from worker.sandbox.all import Sandbox
from worker.sandbox.twilio import TwilioSandbox
from worker.service import Service


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        changed()  # the worker did something: waiters look again


@pytest.fixture
def log_lines() -> Any:
    handler = Lines()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.fixture
def cli(names: Names, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """`ikw ...` on the test's namespace through the real entry point, in a thread; returns
    (exit code, stdout, stderr)."""
    monkeypatch.setenv("IKW_NAMESPACE", names.namespace)
    monkeypatch.setenv("AMQP_URL", AMQP_URL)

    async def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(main, list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def names() -> Names:
    return Names(f"ikw_test_{uuid.uuid4().hex[:10]}")


@pytest.fixture
async def amqp(names: Names) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    await topology.declare(channel, names)
    yield connection
    channel = await connection.channel()
    await topology.delete(channel, names)
    await connection.close()


@pytest.fixture
async def publish(
    amqp: aio_pika.abc.AbstractRobustConnection, names: Names
) -> Callable[..., Awaitable[None]]:
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    # As a trusted producer does: the broker checks user_id against the connection's user.
    publisher = Publisher(channel, names, BROKER_USER)

    async def send(
        event: dict[str, Any] | bytes, routing_key: str | None = None, **kw: Any
    ) -> None:
        raw = event if isinstance(event, bytes) else body(event)
        key = routing_key or (event["type"] if isinstance(event, dict) else "access.granted")
        await publisher.publish(names.exchange, key, raw, **kw)

    return send


@pytest.fixture
async def sandbox(log_lines: list[str]) -> AsyncIterator[Sandbox]:
    stand_ins = Sandbox()
    await stand_ins.start()
    yield stand_ins
    await stand_ins.stop()
    # The door-key links the stand-in issued never reach a log line.
    urls = [key["instant_key_url"] for key in stand_ins.seam.issued]
    leaked = [line for line in log_lines if any(url in line for url in urls)]
    assert not leaked, f"instant_key_url in logs: {leaked[:2]}"
    phones = {i["phone_number"] for i in stand_ins.seam.identities.values() if i["phone_number"]}
    leaked = [line for line in log_lines if any(p in line for p in phones)]
    assert not leaked, f"unmasked phone number in logs: {leaked[:2]}"


@pytest.fixture
async def twilio() -> AsyncIterator[TwilioSandbox]:
    stand_in = TwilioSandbox()
    await stand_in.start()
    yield stand_in
    await stand_in.stop()


@pytest.fixture
def worker_env(sandbox: Sandbox, names: Names) -> dict[str, str]:
    return sandbox.env() | {
        "AMQP_URL": AMQP_URL,
        "IKW_NAMESPACE": names.namespace,
        "IKW_HTTP_PORT": "0",
        "IKW_MIN_KEY_LIFETIME": "1s",
        "IKW_SHUTDOWN_GRACE": "5s",
    }


@pytest.fixture
async def start_worker(
    worker_env: dict[str, str], amqp: aio_pika.abc.AbstractRobustConnection
) -> AsyncIterator[Callable[..., Awaitable[Service]]]:
    """Start in-process workers (each its own connection); all are stopped at the end."""
    started: list[Service] = []

    async def start(tracer_provider: Any = None, **overrides: str) -> Service:
        service = Service(config.load(worker_env | overrides), tracer_provider)
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        if not service.stopping.is_set():
            await service.stop()


@pytest.fixture
async def processes(
    worker_env: dict[str, str], tmp_path: Path, amqp: Any, sandbox: Sandbox
) -> AsyncIterator[Callable[..., Awaitable[WorkerProcess]]]:
    started: list[WorkerProcess] = []

    async def start(**overrides: str) -> WorkerProcess:
        log = tmp_path / f"worker-{len(started)}.log"
        worker = await WorkerProcess(worker_env | overrides, log).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process and worker.process.returncode is None:
            worker.process.kill()
            await worker.process.wait()
    # The workers' own logs hold no door-key link and no full phone number.
    secrets = [key["instant_key_url"] for key in sandbox.seam.issued]
    secrets += [i["phone_number"] for i in sandbox.seam.identities.values()]
    for worker in started:
        log = worker.log.read_text()
        assert not [s for s in secrets if s in log], f"secret in {worker.log.name}"
