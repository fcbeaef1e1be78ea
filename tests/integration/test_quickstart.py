"""The README's quickstart, run as a newcomer runs it: its marked shell blocks, in order, each
command a process of its own, against the real broker and `ikw sandbox`. Only the ports and the
namespace differ (free ones, a namespace of the test's own), so it runs beside anything else."""

import asyncio
import os
import re
import shlex
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.helpers import BROKER_USER, Connection
from worker.broker.topology import Names
from worker.sandbox import changed, wait_for

ROOT = Path(__file__).parents[2]
BLOCK = re.compile(r"<!-- quickstart: ([\w ]+) -->\n```sh\n(.*?)```", re.S)
# Blocks this test does not run, and what runs them instead.
ELSEWHERE = {
    "install": "make install: .ci/run runs it before the tests, which run in the .venv it makes",
    "rabbitmq": "starting RabbitMQ: .ci/run starts it when it is down; every test needs it",
    "demo": "make demo: tests/integration/test_cli.py runs `ikw demo` (test_demo_*)",
}
FREE_PORTS = ["--seam-port", "0", "--twilio-port", "0", "--smtp-port", "0", "--outbox-port", "0"]


def quickstart() -> dict[str, list[list[str]]]:
    """Each marked block of the README, in order: its commands, each as argv."""
    text = (ROOT / "README.md").read_text()
    return {
        name: [argv for line in body.splitlines() if (argv := shlex.split(line, comments=True))]
        for name, body in BLOCK.findall(text)
    }


def as_run(argv: list[str]) -> list[str]:
    """``.venv/bin/X`` is the X of the virtualenv running the tests (the same one under `make
    test`); the outcome queue is that of the broker user of AMQP_URL (``guest`` by default)."""
    program = argv[0]
    if program.startswith(".venv/bin/"):
        program = str(Path(sys.executable).parent / program.removeprefix(".venv/bin/"))
    args = argv[1:]
    if args[:2] == ["topology", "--producer"]:
        args = ["topology", "--producer", BROKER_USER, *args[3:]]
    return [program, *args]


class Process:
    """A long-running command of the quickstart (a terminal of its own): what it printed."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, argv: list[str], env: dict[str, str]) -> "Process":
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.lines.append(line.decode().rstrip("\n"))
            changed()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def printed(self, text: str, within: float = 15) -> None:
        await wait_for(lambda: text in self.output, within, f"{text!r} in:\n{self.output}")

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), 30)
        await self._reader


async def run(argv: list[str], env: dict[str, str]) -> str:
    """One command, as typed in terminal 3: its output; it must exit 0."""
    process = await asyncio.create_subprocess_exec(
        *as_run(argv),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, f"{shlex.join(argv)} exited {process.returncode}:\n{out!r}"
    return out.decode()


async def run_until(
    argv: list[str], env: dict[str, str], shows: Callable[[str], bool], within: float = 10
) -> str:
    """Run a lookup again until what it prints shows what happened (the worker's activity
    entries are written just after it settles a message)."""
    deadline = asyncio.get_running_loop().time() + within
    while not shows(out := await run(argv, env)):
        assert asyncio.get_running_loop().time() < deadline, f"{shlex.join(argv)}:\n{out}"
        await asyncio.sleep(0.2)
    return out


@pytest.fixture
async def terminals(
    names: Names, amqp: Connection
) -> AsyncIterator[tuple[dict[str, str], list[Process]]]:
    """The environment every terminal shares (the test's namespace, any free health port) and
    the long-running commands, stopped after; the namespace is deleted by ``amqp``."""
    env = os.environ | {"IKW_NAMESPACE": names.namespace, "IKW_HTTP_PORT": "0"}
    running: list[Process] = []
    yield env, running
    for process in reversed(running):
        await process.stop()
    channel = await amqp.channel()
    await channel.queue_delete(names.outcome_queue(BROKER_USER))


def test_every_quickstart_block_is_run_here_or_elsewhere() -> None:
    blocks = quickstart()
    assert set(blocks) == set(ELSEWHERE) | {
        "terminal 1",
        "terminal 2",
        "terminal 3",
        "outcomes",
        "status",
        "stay",
        "revoke",
    }
    assert blocks["install"] == [["make", "install"]]
    assert blocks["demo"] == [["make", "demo"]]


async def test_the_quickstart_runs_as_written(
    names: Names, terminals: tuple[dict[str, str], list[Process]]
) -> None:
    env, running = terminals
    blocks = quickstart()

    # Terminal 1: the stand-ins; their export lines are what a newcomer pastes.
    [sandbox_command] = blocks["terminal 1"]
    sandbox = await Process.start(as_run(sandbox_command) + FREE_PORTS, env)
    running.append(sandbox)
    await sandbox.printed("# Ctrl-C (or SIGTERM) stops them.")
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in sandbox.lines
        if line.startswith("export ")
    )
    assert {"SEAM_ENDPOINT", "SEAM_API_KEY", "TWILIO_FROM", "SMTP_HOST"} <= set(exports)
    env = env | exports

    # Terminal 2: the worker, with those exports.
    [worker_command] = blocks["terminal 2"]
    worker = await Process.start(as_run(worker_command), env)
    running.append(worker)
    await worker.printed("consuming", within=30)

    # Terminal 3: a grant; the SMS shows in terminal 1.
    [publish] = blocks["terminal 3"]
    assert "published access.granted" in await run(publish, env)
    await sandbox.printed("to +14155550100 from +15005550006")
    await sandbox.printed("Hi Ada Lovelace, here is your key: https://")

    # Listening to outcomes: the example producer hears its delivery and its revoke.
    declare, producer = blocks["outcomes"]
    await run(declare, env)
    heard = await run(producer, env)
    assert f"heard {BROKER_USER}.access.delivered" in heard
    assert f"heard {BROKER_USER}.access.revoke_completed" in heard

    # Status and activity.
    status, activity = blocks["status"]
    shown = await run(status, env)
    assert f"namespace {names.namespace}" in shown and "dead letters: 0" in shown
    await run_until(activity, env, lambda out: "granted: delivered on sms" in out)

    # A stay: scheduled at once (its SMS is due a minute later: tests/integration/test_stays.py
    # holds the delivery to its time).
    stay, lookup = blocks["stay"]
    assert "published access.granted" in await run(stay, env)
    await run_until(lookup, env, lambda out: "scheduled" in out)
    await sandbox.printed("--- scheduled: a key for guest-2 (reservation res-1, revision 0)")
    assert "+14155550101" not in sandbox.output

    # Revoke: the key is deleted; the cancelled stay never sends.
    revoke, cancel, history = blocks["revoke"]
    assert "published access.revoked" in await run(revoke, env)
    assert "published access.revoked" in await run(cancel, env)
    await run_until(history, env, lambda out: "revoked: 1 keys deleted" in out)
    await run_until(lookup, env, lambda out: "revoked: 0 keys deleted" in out)
    assert "+14155550101" not in sandbox.output
