"""A revoke wins: once it is acked, no grant that occurred before it delivers a working key, from
the delay queues, from another replica, from the dead-letter queue or after a restart."""

import asyncio
import json
import os
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from tests.builders import grant, revoke
from tests.helpers import (
    AMQP_URL,
    BROKER_USER,
    Publish,
    StartWorker,
    WorkerProcess,
    dead_letters,
    drain,
)
from worker import config
from worker.broker import fence
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox
from worker.sandbox.proxy import Proxy
from worker.sandbox.record import fill_fence
from worker.service import Service


def at(seconds_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds_ago)).isoformat()


def settled(service: Service, queue: str, outcome: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "ikw_messages_total", {"queue": queue, "outcome": outcome}
    )
    return value or 0.0


def live_keys(sandbox: Sandbox, key: str) -> list[Any]:
    ids = [i["user_identity_id"] for i in sandbox.seam.identities.values()]
    found = [i for i in ids if sandbox.seam.identities[i]["user_identity_key"] == key]
    return [k for i in found for k in sandbox.seam.live_keys(i)]


async def test_a_grant_waiting_in_the_delay_queues_is_overtaken_by_a_revoke(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Any
) -> None:
    service = await start_worker()
    sandbox.seam.fail_next(503, path="/user_identities/generate_instant_key")
    await publish(grant("guest-1", occurred_at=at(5)))
    await wait_for(lambda: settled(service, names.grants, "retried") == 1, 15, "the retry")

    await publish(revoke("guest-1") | {"occurred_at": at(1)})
    await wait_for(lambda: settled(service, names.revocations, "acked") == 1, 15, "the revoke")
    await wait_for(lambda: settled(service, names.grants, "revoked") == 1, 20, "the fenced grant")

    assert sandbox.twilio.outbox == [] and sandbox.smtp.messages == []
    assert live_keys(sandbox, "guest-1") == []
    assert await drain(amqp, names.dead) == []  # acked as revoked, not dead-lettered


async def test_a_new_booking_after_a_revoke_is_delivered(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names
) -> None:
    service = await start_worker()
    await publish(revoke("guest-1") | {"occurred_at": at(5)})
    await wait_for(lambda: settled(service, names.revocations, "acked") == 1, 15, "the revoke")
    await publish(grant("guest-1", occurred_at=at(0)))
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the new booking's SMS")
    [key] = live_keys(sandbox, "guest-1")
    assert key["instant_key_url"] in sandbox.twilio.outbox[0]["body"]


async def test_a_restarted_worker_still_fences(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names
) -> None:
    first = await start_worker()
    await publish(revoke("guest-1") | {"occurred_at": at(1)})
    await wait_for(lambda: settled(first, names.revocations, "acked") == 1, 15, "the revoke")
    await first.stop()

    second = await start_worker()  # reads the revoke back from the stream
    await publish(grant("guest-1", occurred_at=at(10)))
    await wait_for(lambda: settled(second, names.grants, "revoked") == 1, 15, "the fenced grant")
    assert sandbox.twilio.outbox == [] and sandbox.seam.issued == []


async def test_a_pre_revoke_grant_replayed_from_the_dead_letter_queue_is_fenced(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    names: Names,
    amqp: Any,
    worker_env: dict[str, str],
) -> None:
    service = await start_worker()
    sandbox.seam.fail_next(400, "invalid_input", path="/user_identities/get")
    event = grant("guest-1", occurred_at=at(10))
    await publish(event)
    [dead] = await dead_letters(amqp, names, 1)
    # Back where it was, as the operator's `ikw dlq list` would leave it.
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    await Publisher(channel, names, "guest").to_queue(
        names.dead, dead.body, headers=dict(dead.headers), message_id=dead.message_id
    )
    await publish(revoke("guest-1") | {"occurred_at": at(1)})
    await wait_for(lambda: settled(service, names.revocations, "acked") == 1, 15, "the revoke")

    replay = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "dlq",
        "replay",
        "--all",
        "--yes",
        env=os.environ | {"AMQP_URL": AMQP_URL, "IKW_NAMESPACE": names.namespace},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await replay.communicate()
    assert (replay.returncode, out.decode().strip()) == (0, "replayed 1, failed 0")
    await wait_for(lambda: settled(service, names.grants, "revoked") == 1, 15, "the fenced grant")
    assert sandbox.twilio.outbox == [] and sandbox.seam.issued == []
    assert json.loads(dead.body)["event_id"] == event["event_id"]


async def test_two_worker_processes_racing_grants_and_revokes_leave_no_live_key(
    sandbox: Sandbox,
    processes: Callable[..., Awaitable[WorkerProcess]],
    publish: Publish,
    names: Names,
    amqp: Any,
) -> None:
    sandbox.seam.latency = 0.03  # widen the windows in which the two overlap
    workers = [await processes(IKW_PREFETCH="16") for _ in range(2)]
    guests = [f"guest-{n}" for n in range(12)]
    for n, key in enumerate(guests):
        phone = f"+1415555{n:04d}"
        # Each guest's grant and revoke at once: one replica may take the grant, the other the
        # revoke, in either order.
        await publish(grant(key, phone=phone, email=f"g{n}@example.com", occurred_at=at(2)))
        await publish(revoke(key) | {"occurred_at": at(1)})

    def settled_in_logs(queue: str) -> int:
        lines = (line for w in workers for line in w.log.read_text().splitlines())
        done = ("acked", "revoked", "dead_lettered")
        return sum(
            1
            for line in lines
            if f'"queue": "{queue}"' in line and any(f'"outcome": "{o}"' in line for o in done)
        )

    await wait_for(
        lambda: (
            settled_in_logs(names.grants) == len(guests)
            and settled_in_logs(names.revocations) == len(guests)
        ),
        60,
        "every grant and revoke settled",
    )
    for key in guests:
        assert live_keys(sandbox, key) == [], f"{key} still holds a working key"
    assert await drain(amqp, names.dead) == []


async def test_a_revoke_during_a_seam_outage_fences_at_once_and_deletes_once_seam_is_back(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Any
) -> None:
    # Limits that would have dead-lettered the revoke within seconds, were it a grant.
    service = await start_worker(IKW_MAX_ATTEMPTS="2", IKW_MAX_RETRY_AGE="2s")
    await publish(grant("guest-1", occurred_at=at(60)))
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the first booking's SMS")
    [key] = live_keys(sandbox, "guest-1")

    sandbox.seam.fail_rate = 1.0  # Seam answers 503 to everything
    await publish(revoke("guest-1") | {"occurred_at": at(30)})
    await wait_for(lambda: settled(service, names.revocations, "retried") >= 3, 30, "3 retries")
    # An older grant arriving now is refused at once, before any call to Seam.
    await publish(grant("guest-1", occurred_at=at(45)))
    await wait_for(lambda: settled(service, names.grants, "revoked") == 1, 15, "the fenced grant")
    assert len(sandbox.twilio.outbox) == 1 and live_keys(sandbox, "guest-1") == [key]
    retry_age = service.metrics.registry.get_sample_value(
        "ikw_retry_age_seconds", {"queue": names.revocations}
    )
    assert retry_age is not None and retry_age > 0

    sandbox.seam.fail_rate = 0.0
    await wait_for(lambda: settled(service, names.revocations, "acked") == 1, 30, "the revoke")
    assert live_keys(sandbox, "guest-1") == []
    assert len(sandbox.twilio.outbox) == 1
    assert await drain(amqp, names.dead) == []


async def test_a_late_revoke_leaves_the_newer_bookings_key_alive(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names
) -> None:
    service = await start_worker()
    await publish(grant("guest-1", grant_id="booking-1", occurred_at=at(7200)))
    await wait_for(lambda: len(sandbox.twilio.outbox) == 1, 15, "booking-1's SMS")
    await publish(grant("guest-1", grant_id="booking-2", occurred_at=at(0)))
    await wait_for(lambda: len(sandbox.twilio.outbox) == 2, 15, "booking-2's SMS")
    [key] = live_keys(sandbox, "guest-1")  # the same key, delivered for booking-2 too
    # A key the worker never delivered (made before the record existed) counts as revoked.
    unknown = dict(key, instant_key_id=str(uuid.uuid4()), instant_key_url="https://ik.example/x")
    sandbox.seam.add_key(unknown)

    await publish(revoke("guest-1") | {"grant_id": "booking-1", "occurred_at": at(3600)})
    await wait_for(lambda: settled(service, names.revocations, "acked") == 1, 15, "the revoke")
    assert live_keys(sandbox, "guest-1") == [key]
    assert key["instant_key_url"] in sandbox.twilio.outbox[1]["body"]
    # booking-1 stays revoked: its grant replayed now is fenced.
    await publish(grant("guest-1", grant_id="booking-1", occurred_at=at(7200)))
    await wait_for(lambda: settled(service, names.grants, "revoked") == 1, 15, "the fenced grant")
    assert len(sandbox.twilio.outbox) == 2


async def test_another_replica_knows_which_grant_a_key_was_delivered_for(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names
) -> None:
    first = await start_worker()
    await publish(grant("guest-1", occurred_at=at(0)))
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS")
    await first.stop()

    second = await start_worker()  # reads the delivery back from the record
    await publish(revoke("guest-1") | {"occurred_at": at(3600)})
    await wait_for(lambda: settled(second, names.revocations, "acked") == 1, 15, "the revoke")
    assert len(live_keys(sandbox, "guest-1")) == 1


async def test_a_replica_starts_from_the_latest_snapshot_of_a_large_fence_and_fences(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    names: Names,
    amqp: Any,
    log_lines: list[str],
    monkeypatch: pytest.MonkeyPatch,
    worker_env: dict[str, str],
) -> None:
    monkeypatch.setattr(fence, "SNAPSHOT_EVERY", 2000)
    channel = await amqp.channel(publisher_confirms=True)
    await fill_fence(channel, names, BROKER_USER, 20_000, datetime.now(UTC))
    first = Service(config.load(worker_env))  # reads all 20,000, then writes a snapshot
    starting = asyncio.create_task(first.start())
    try:
        await wait_for(lambda: first.fence and 0 < first.fence.read < 10_000, 30, "reading")
        assert first.http is not None
        async with aiohttp.ClientSession() as http, http.get(f"{first.http.url}/readyz") as got:
            assert got.status == 503
            why = (await got.json())["why"]
        assert re.fullmatch(r"catching up with the revocation fence: \d+ records read", why)
        await starting
        assert first.fence is not None and first.fence.read > 20_000
        await wait_for(lambda: any("wrote a snapshot" in x for x in log_lines), 30, "a snapshot")
    finally:
        await first.stop()

    second = await start_worker()
    assert second.fence is not None and second.fence.read < 100  # the snapshot's parts, a marker
    assert len(second.fence.record.revoked) == 20_000
    await publish(grant("guest-0", occurred_at=at(60)))  # revoked first of all
    await wait_for(lambda: settled(second, names.grants, "revoked") == 1, 15, "the fenced grant")
    assert sandbox.twilio.outbox == [] and sandbox.seam.issued == []


async def test_after_a_reconnect_the_fence_reads_on_from_where_it_was(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names, amqp: Any
) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    await fill_fence(channel, names, BROKER_USER, 3000, datetime.now(UTC))
    proxy = Proxy("127.0.0.1", 5672)
    await proxy.start()
    service = await start_worker(
        AMQP_URL=AMQP_URL.replace(":5672", f":{proxy.port}") + "?reconnect_interval=0.5"
    )
    assert service.fence is not None
    before = service.fence.read
    assert before > 3000
    proxy.cut()
    await wait_for(lambda: not service.ready, 15, "the worker to see the cut")
    # A revoke recorded by another replica while this one was away.
    await fill_fence(channel, names, BROKER_USER, 1, datetime.now(UTC), prefix="away-")
    await wait_for(lambda: service.ready, 30, "the worker to be ready again")
    assert service.fence.read - before < 10  # the new revoke and markers, not 3,000 again
    await publish(grant("away-0", occurred_at=at(60)))
    await wait_for(lambda: settled(service, names.grants, "revoked") == 1, 15, "the fenced grant")
    await service.stop()
    await proxy.stop()
