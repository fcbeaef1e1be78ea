"""The producers of examples/producers/, run as a booking system runs them: a process of their
own, as a trusted broker user, against a worker and the stand-ins. Each grants, hears
access.delivered, revokes, hears access.revoke_completed."""

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import IKW, StartWorker, broker_users, user_url
from worker.broker.topology import Names
from worker.sandbox.all import Sandbox

EXAMPLES = Path(__file__).parents[2] / "examples" / "producers"
NODE = EXAMPLES / "node"
PHONE = "+14155550123"


@pytest.fixture(scope="module")
def booking() -> Iterator[str]:
    with broker_users("booking") as users:
        yield users["booking"]


@pytest.fixture
async def producer_env(
    booking: str, names: Names, worker_env: dict[str, str], start_worker: StartWorker, amqp: Any
) -> AsyncIterator[dict[str, str]]:
    """A worker trusting `booking`, whose outcome queue the operator declared; the example's
    environment."""
    declared = await asyncio.create_subprocess_exec(
        *IKW,
        "topology",
        "--producer",
        booking,
        env=os.environ | worker_env,
        stdout=subprocess.DEVNULL,
    )
    assert await declared.wait() == 0
    await start_worker(IKW_TRUSTED_PUBLISHERS=booking)
    yield {
        "AMQP_URL": user_url(booking),
        "IKW_NAMESPACE": names.namespace,
        "GUEST_PHONE": PHONE,
        "OUTCOME_TIMEOUT": "20",
    }
    await (await amqp.channel()).queue_delete(names.outcome_queue(booking))


async def run_example(env: dict[str, str], *command: str | Path) -> str:
    process = await asyncio.create_subprocess_exec(
        *command,
        env=os.environ | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    printed = out.decode()
    assert process.returncode == 0, printed
    return printed


def delivered_and_revoked(printed: str, sandbox: Sandbox, booking: str) -> None:
    """What the booking system and the guest saw."""
    assert f"heard {booking}.access.delivered" in printed
    assert f"heard {booking}.access.revoke_completed" in printed
    [key] = sandbox.seam.issued
    [sms] = sandbox.twilio.outbox
    assert sms["to"] == PHONE and key["instant_key_url"] in sms["body"]
    assert not sandbox.seam.keys  # the revoke deleted it
    assert key["instant_key_url"] not in printed and PHONE not in printed


async def test_the_python_producer_grants_revokes_and_hears_both(
    producer_env: dict[str, str], sandbox: Sandbox, booking: str
) -> None:
    printed = await run_example(producer_env, sys.executable, EXAMPLES / "python" / "producer.py")
    delivered_and_revoked(printed, sandbox, booking)


@pytest.fixture(scope="module")
def node() -> str:
    """node, with the example's locked dependencies installed (npm ci, again when the lock
    changed)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("needs node and npm on PATH")
    installed = NODE / "node_modules" / ".package-lock.json"
    lock = NODE / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"npm ci in {NODE}: {done.stderr[-2000:]}"
    return node


async def test_the_node_producer_grants_revokes_and_hears_both(
    node: str, producer_env: dict[str, str], sandbox: Sandbox, booking: str
) -> None:
    printed = await run_example(producer_env, node, NODE / "producer.js")
    delivered_and_revoked(printed, sandbox, booking)
