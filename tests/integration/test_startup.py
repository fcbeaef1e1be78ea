"""Starting before the topology exists: a worker that may not declare it waits, unready."""

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator

import aio_pika
import aiohttp
import pytest

from tests.builders import body, grant
from tests.helpers import AMQP_URL, BROKER_USER, IKW
from worker import config
from worker.broker import topology
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox
from worker.service import Service


@pytest.fixture
async def undeclared(names: Names) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A connection to a namespace nobody declared yet; deleted at the end, whatever happened."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    yield connection
    await topology.delete(await connection.channel(), names)
    await connection.close()


async def readyz(service: Service) -> tuple[int, dict[str, object]]:
    assert service.http is not None
    async with aiohttp.ClientSession() as http, http.get(f"{service.http.url}/readyz") as got:
        return got.status, await got.json()


async def test_a_worker_that_may_not_declare_waits_for_its_topology_then_delivers(
    sandbox: Sandbox,
    names: Names,
    undeclared: aio_pika.abc.AbstractRobustConnection,
    log_lines: list[str],
) -> None:
    env = sandbox.env() | {
        "AMQP_URL": AMQP_URL,
        "IKW_NAMESPACE": names.namespace,
        "IKW_HTTP_PORT": "0",
        "IKW_MIN_KEY_LIFETIME": "1s",
        "IKW_DECLARE": "false",
    }
    service = Service(config.load(env))
    starting = asyncio.create_task(service.start())
    try:
        said = f"exchange {names.exchange} is missing in namespace {names.namespace}: run `ikw "
        await wait_for(lambda: any(said in line for line in log_lines), 15, "the missing line")
        assert await readyz(service) == (
            503,
            {
                "ready": False,
                "why": f"waiting for the topology: exchange {names.exchange} is missing; "
                "run `ikw topology`",
            },
        )

        declared = await asyncio.to_thread(
            subprocess.run,
            [*IKW, "topology"],
            env=os.environ | {"AMQP_URL": AMQP_URL, "IKW_NAMESPACE": names.namespace},
            capture_output=True,
            timeout=60,
        )
        assert declared.returncode == 0, declared.stderr
        await asyncio.wait_for(starting, 30)
        await wait_for(lambda: service.ready, 15, "the worker ready")
        assert await readyz(service) == (200, {"ready": True})

        channel = await undeclared.channel(publisher_confirms=True, on_return_raises=True)
        await Publisher(channel, names, BROKER_USER).publish(
            names.exchange, "access.granted", body(grant())
        )
        await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS")
    finally:
        starting.cancel()
        await service.stop()
    missing = [line for line in log_lines if "is missing in namespace" in line]
    assert len(missing) == 1, missing  # said once, not at every look
    assert any("topology found: starting" in line for line in log_lines)


async def test_a_namespace_declared_by_an_older_version_names_what_it_lacks(
    worker_env: dict[str, str], names: Names, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    """Declared before outcome events had an exchange of their own: `ikw topology` adds it."""
    await (await amqp.channel()).exchange_delete(names.outcomes)
    service = Service(config.load(worker_env | {"IKW_DECLARE": "false"}))
    starting = asyncio.create_task(service.start())
    try:
        await wait_for(lambda: service.http and not service.ready, 15, "the health server")
        await wait_for(lambda: "outcomes" in (service.not_ready_because or ""), 15, "the look")
        assert await readyz(service) == (
            503,
            {
                "ready": False,
                "why": f"waiting for the topology: exchange {names.outcomes} is missing; "
                "run `ikw topology`",
            },
        )
    finally:
        await service.stop()
        await asyncio.wait_for(starting, 15)  # returns, stopped, without starting to consume
    assert service.consumer is None
