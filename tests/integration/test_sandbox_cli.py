"""`ikw sandbox` from the command line: its ports, failures on demand (--fail, POST /fail), and
the deliveries scheduled for stays (--outcomes)."""

import asyncio
import os
import signal
import sys
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from tests.builders import grant
from tests.helpers import AMQP_URL, Publish, StartWorker
from worker.broker.topology import Names
from worker.cli import parser
from worker.sandbox.all import Sandbox


def test_the_help_names_the_ports_and_how_to_inject_failures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["sandbox", "--help"])
    shown = capsys.readouterr().out
    for port in ("--seam-port PORT      the Seam API (8701)", "--outbox-port PORT    the outbox"):
        assert port in shown
    assert "ports: Seam 8701, Twilio 8702, SMTP 8725, the outbox 8703;" in shown
    assert "curl -d seam=503:3 http://127.0.0.1:8703/fail" in shown


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ("seam=99", "not SERVICE=CODE[:COUNT][@TARGET]: 'seam=99'; e.g. seam=503:3"),
        ("fax=503", "not SERVICE=CODE[:COUNT][@TARGET]: 'fax=503'"),
        ("twilio=503", "twilio: a code from 10000 to 99999, a count from 1: 'twilio=503'"),
        ("smtp=451:0", "smtp: a code from 400 to 599, a count from 1: 'smtp=451:0'"),
        ("smtp=451@x", "smtp takes no @TARGET"),
    ],
)
def test_a_bad_failure_is_a_usage_error(
    spec: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        parser().parse_args(["sandbox", "--fail", spec])
    assert raised.value.code == 2
    assert said in capsys.readouterr().err.splitlines()[-1]


async def seam_list(session: aiohttp.ClientSession, sandbox: Sandbox, path: str) -> int:
    headers = {"Authorization": f"Bearer {sandbox.seam.api_key}"}
    async with session.post(sandbox.seam.url + path, json={}, headers=headers) as response:
        return response.status


async def test_failures_posted_to_the_outbox_hit_the_next_calls() -> None:
    sandbox = Sandbox()
    await sandbox.start()
    try:
        async with aiohttp.ClientSession() as session:
            posted = await session.post(
                sandbox.outbox.url + "/fail", data="seam=503:2@/instant_keys/list twilio=21610"
            )
            assert posted.status == 200
            assert await posted.text() == (
                "seam: the next 2 calls to /instant_keys/list fail with 503\n"
                "twilio: the next call fails with 21610\n"
            )
            assert await seam_list(session, sandbox, "/user_identities/list") == 200
            assert [await seam_list(session, sandbox, "/instant_keys/list") for _ in "abc"] == [
                503,
                503,
                200,
            ]
            bad = await session.post(sandbox.outbox.url + "/fail?seam=5")
            assert (bad.status, (await bad.text()).split(";")[0]) == (
                400,
                "not SERVICE=CODE[:COUNT][@TARGET]: 'seam=5'",
            )
    finally:
        await sandbox.stop()


async def test_the_banner_names_the_ports_and_the_failures_given() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.cli", "sandbox",
        "--seam-port", "0", "--twilio-port", "0", "--smtp-port", "0", "--outbox-port", "0",
        "--fail", "seam=503:3",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []
    try:
        while not lines or not lines[-1].startswith("# Ctrl-C"):
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            assert line, lines
            lines.append(line.decode().rstrip("\n"))
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    assert lines[0].startswith("# Seam http://127.0.0.1:")
    assert ", Twilio http://127.0.0.1:" in lines[0] and ", SMTP 127.0.0.1:" in lines[0]
    assert "#   seam: the next 3 calls fail with 503" in lines
    assert any(
        line.startswith("# Failures on demand: curl -d seam=503:3 http://") for line in lines
    )


async def test_with_outcomes_the_sandbox_lists_the_deliveries_scheduled_for_stays(
    start_worker: StartWorker, publish: Publish, names: Names
) -> None:
    env = os.environ | {"AMQP_URL": AMQP_URL, "IKW_NAMESPACE": names.namespace}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.cli", "sandbox", "--outcomes",
        "--seam-port", "0", "--twilio-port", "0", "--smtp-port", "0", "--outbox-port", "0",
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []

    async def until(start: str) -> str:
        while not lines or not lines[-1].startswith(start):
            line = await asyncio.wait_for(process.stdout.readline(), 30)  # type: ignore[union-attr]
            assert line, lines
            lines.append(line.decode().rstrip("\n"))
        return lines[-1]

    try:
        await start_worker()
        await until("# following")
        stay = {"reservation_key": "res-7", "starts_at": at(3600), "ends_at": at(7200)}
        await publish(grant("guest-7") | {"stay": stay | {"deliver_at": at(600)}})
        scheduled = await until("--- scheduled")
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    assert scheduled.startswith("--- scheduled: a key for guest-7 (reservation res-7, revision 0)")
    assert "+1415555" not in "\n".join(lines)  # a scheduled delivery shows no contact yet


def at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()
