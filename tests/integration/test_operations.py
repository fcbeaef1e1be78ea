"""`ikw status` and `ikw activity` on a real broker, with a running worker and the stand-ins."""

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from aio_pika.abc import AbstractIncomingMessage

from tests.builders import grant
from tests.helpers import AMQP_URL, Cli, Connection, Publish, StartWorker, dead_lettered, settled
from worker.broker.fence import consume_stream
from worker.cli import main
from worker.queues import Names
from worker.sandbox import changed, wait_for
from worker.sandbox.all import Sandbox
from worker.service import Service


async def recorded(worker: Service) -> None:
    """The worker's activity entries so far are written to the stream."""
    assert worker.activity is not None
    await asyncio.wait_for(worker.activity.flushed(), 5)


async def raw_entries(amqp: Connection, names: Names, count: int) -> list[bytes]:
    """The first ``count`` bodies of the activity stream, as stored."""
    bodies: list[bytes] = []

    async def take(message: AbstractIncomingMessage) -> None:
        bodies.append(message.body)
        await message.ack()
        changed()

    channel = await amqp.channel()
    await channel.set_qos(prefetch_count=100)
    await consume_stream(channel, names.activity, take, "first")
    try:
        await wait_for(lambda: len(bodies) >= count, 10, f"{count} activity entries")
    finally:
        await channel.close()
    return bodies


async def test_status_on_a_fresh_namespace_shows_no_messages_and_the_worker_consuming(
    start_worker: StartWorker, names: Names, cli: Cli
) -> None:
    worker = await start_worker()
    assert worker.http is not None
    await wait_for(lambda: worker.ready, 10, "the worker to consume")

    code, out, err = await cli("status", "--json", "--replica", worker.http.url)

    assert (code, err) == (0, "")
    report = json.loads(out)
    queues = {q["queue"]: q for q in report["queues"]}
    assert set(queues) == {*names.work_queues, names.unroutable, names.dead}
    assert all(q["ready"] == 0 for q in queues.values())
    assert queues[names.grants]["consumers"] == 1
    assert queues[names.dead]["consumers"] == 0
    assert report["delayed"] == {"messages": 0, "nearest_level": None, "farthest_level": None}
    assert report["dead_letters"] == {}
    assert report["streams"][names.fence]["entries_about"] >= 1  # the worker's catch-up marker
    assert report["replicas"] == [{"replica": worker.http.url, "ready": True, "why": None}]

    code, out, _ = await cli("status", "--replica", "http://127.0.0.1:1")
    assert code == 0
    assert f"  {names.grants}  " in out
    assert "delayed (retries, expiry timers): 0 messages waiting" in out
    assert "dead letters: 0" in out
    assert "replica http://127.0.0.1:1: unreachable" in out


async def test_status_without_the_topology_is_one_line_naming_ikw_topology(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IKW_NAMESPACE", f"ikw_none_{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("AMQP_URL", AMQP_URL)

    code = await asyncio.to_thread(main, ["status"])

    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    [line] = err.splitlines()
    assert "has no complete topology" in line and "run `ikw topology`" in line


async def test_a_delivered_grant_shows_in_its_activity_and_no_contact_is_recorded(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    amqp: Connection,
    names: Names,
    cli: Cli,
) -> None:
    worker = await start_worker()
    event = grant(channels=("sms",))
    await publish(event, message_id=event["event_id"])
    await wait_for(lambda: settled(worker, names.grants, "acked") == 1, 15, "the grant")
    await recorded(worker)

    code, out, err = await cli("activity", "--grant", event["grant_id"], "--since", "1h")

    assert (code, err) == (0, "")
    [entry, summary] = out.splitlines()
    [key] = sandbox.seam.keys
    assert f"access.granted  granted: delivered on sms, key {key}" in entry
    assert f"event {event['event_id']}" in entry
    assert summary.startswith(f"1 entry for grant {event['grant_id']} of ")
    # By the identity's key too, as JSON lines.
    code, out, _ = await cli(
        "activity", "--identity", event["user_identity"]["user_identity_key"], "--json"
    )
    [found] = map(json.loads, out.splitlines())
    assert (found["action"], found["channel"], found["grant_id"]) == (
        "granted",
        "sms",
        event["grant_id"],
    )

    secrets = [k["instant_key_url"] for k in sandbox.seam.issued]
    secrets += ["+14155550100", "ada@example.com", "Ada Lovelace"]
    for body in await raw_entries(amqp, names, 3):  # the entry and the two commands' markers
        assert not [s for s in secrets if s.encode() in body], body


async def test_a_dead_lettered_grant_shows_why_in_status_and_activity(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, cli: Cli
) -> None:
    sandbox.seam.fail_next(400, path="/user_identities/get")
    worker = await start_worker()
    event = grant()
    await publish(event, message_id=event["event_id"])
    await wait_for(lambda: dead_lettered(worker) == 1, 15, "the dead letter")
    await recorded(worker)

    code, out, _ = await cli("status", "--json")
    assert code == 0
    report = json.loads(out)
    [reason] = report["dead_letters"]
    assert report["dead_letters"] == {reason: 1}
    assert {q["queue"]: q["ready"] for q in report["queues"]}[names.dead] == 1

    code, out, _ = await cli("activity", "--event", event["event_id"])
    assert code == 0
    [entry, _] = out.splitlines()
    assert f"access.granted  dead-lettered: {reason}: " in entry
    # Looking did not take the dead letter.
    code, out, _ = await cli("status")
    assert f"       1  {reason}" in out


async def test_a_stay_s_activity_tells_its_scheduling_delivery_and_checkout(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, cli: Cli
) -> None:
    worker = await start_worker(IKW_CHECKOUT_GRACE="1s")
    now = datetime.now(UTC)
    stay = {
        "reservation_key": "res-act-1",
        "deliver_at": (now + timedelta(seconds=2)).isoformat(),
        "starts_at": (now + timedelta(seconds=3)).isoformat(),
        "ends_at": (now + timedelta(seconds=4)).isoformat(),
    }
    await publish(grant(channels=("sms",)) | {"stay": stay})
    await wait_for(lambda: settled(worker, names.checkouts, "acked") == 1, 20, "the checkout")
    await recorded(worker)

    code, out, _ = await cli("activity", "--reservation", "res-act-1")

    assert code == 0
    [scheduled, delivered, ended, summary] = out.splitlines()
    assert "access.granted  scheduled: the key is sent at the stay's deliver_at" in scheduled
    [key] = sandbox.seam.issued
    assert f"stay.delivery  granted: delivered on sms, key {key['instant_key_id']}" in delivered
    assert "stay.end  stay ended: 1 keys deleted" in ended
    assert summary.startswith("3 entries for reservation res-act-1 of ")
