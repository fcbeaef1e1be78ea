"""`ikw dlq` against real dead letters: made by the worker or by RabbitMQ, read without loss."""

import asyncio
import hashlib
import os
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path

import aio_pika
import aiormq
import pamqp.commands
import pamqp.header
import pytest

from tests.builders import body, grant
from tests.helpers import AMQP_URL, Cli, Connection, Publish, StartWorker, dead_lettered
from worker import dlq
from worker.queues import DELIVERY_LIMIT, Names
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox
from worker.service import Service

Ikw = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def ikw(cli: Cli) -> Ikw:
    """`ikw dlq ...` through the real entry point; returns (exit code, stdout, stderr)."""
    return partial(cli, "dlq")


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """stdin is a real pseudo-terminal; ``terminal("2\\n")`` is the operator typing."""
    keyboard, tty = os.openpty()
    stdin = open(tty, encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)

    def type_line(text: str) -> None:
        os.write(keyboard, text.encode())

    yield type_line
    stdin.close()
    os.close(keyboard)


async def depth(amqp: Connection, queue: str) -> int:
    channel = await amqp.channel()
    declared = await channel.declare_queue(queue, passive=True)
    await channel.close()
    return declared.declaration_result.message_count or 0


async def dead_lettered_by(worker: Service, count: int) -> None:
    """Wait until ``worker`` has dead-lettered ``count`` messages, each confirmed in the dead
    queue before it counts it; its log line wakes the wait."""
    await wait_for(lambda: dead_lettered(worker) == count, 15, f"{count} dead letters")


async def holds(amqp: Connection, queue: str, count: int, timeout: float = 15) -> None:
    """Wait until ``queue`` holds exactly ``count`` ready messages: only where nothing signals
    (the broker's own dead-lettering, a replay by another process)."""
    deadline = time.monotonic() + timeout
    while (now := await depth(amqp, queue)) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{queue} holds {now} messages, not {count}, after {timeout} s")
        await asyncio.sleep(0.05)


def rows(out: str) -> list[list[str]]:
    """The table under the ID header of `dlq list`, split on runs of 2+ spaces."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ID "))
    table = [line for line in lines[start + 1 :] if line.strip() and not line.startswith("…")]
    return [re.split(r"\s{2,}", line.strip()) for line in table]


def counts(out: str) -> dict[str, int]:
    found = re.findall(r"^\s+(\d+)\s+(\S+)$", out, re.MULTILINE)
    return {reason: int(n) for n, reason in found}


async def test_list_counts_by_reason_then_one_line_each_newest_first(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    amqp: Connection,
    names: Names,
    ikw: Ikw,
) -> None:
    sandbox.seam.fail_next(400, path="/user_identities/get")
    worker = await start_worker()
    await publish(b"{not json", "access.granted")
    await dead_lettered_by(worker, 1)
    await publish(grant(phone="12345"), message_id="evt-bad-phone")
    await dead_lettered_by(worker, 2)
    await publish(grant(), message_id="evt-seam-400")
    await dead_lettered_by(worker, 3)
    await publish(b"{not json either", "access.granted")
    await dead_lettered_by(worker, 4)

    code, out, _ = await ikw("list")

    assert code == 0
    assert out.startswith(f"4 dead letters in {names.dead}\n")
    assert counts(out) == {"malformed_json": 2, "invalid_phone_number": 1, "seam_rejected": 1}
    table = rows(out)
    assert [row[1] for row in table] == [
        "malformed_json",
        "seam_rejected",
        "invalid_phone_number",
        "malformed_json",
    ]
    assert [row[0] for row in table[1:3]] == ["evt-seam-400", "evt-bad-phone"]
    assert re.fullmatch(r"[0-9a-f]{32}", table[3][0])  # aiormq gives every publish an id
    assert all(row[2] == names.grants and row[3] == "1" for row in table)
    assert table[1][5].startswith("seam /user_identities/get answered 400 (invalid_input)")
    assert table[2][5] == (
        r"user_identity.phone_number: String should match pattern '^\+[1-9][0-9]{6,14}$'"
    )
    assert "12345" not in out and "Ada" not in out  # bodies only in `show`
    assert await depth(amqp, names.dead) == 4  # looking took nothing

    code, out, _ = await ikw("list", "--reason", "malformed_json", "--limit", "1")
    assert out.startswith(f"2 dead letters in {names.dead} (of 4)\n")
    assert len(rows(out)) == 1
    assert "1 older not shown" in out
    code, out, _ = await ikw("list", "--older-than", "1h")
    assert (code, out) == (0, f"none of the 4 dead letters in {names.dead} match\n")
    assert (await ikw("list", "--newer-than", "1h"))[1].startswith("4 dead letters")


async def test_listing_sorts_by_dead_lettered_at_not_by_queue_order(
    start_worker: StartWorker, publish: Publish, amqp: Connection, names: Names, ikw: Ikw
) -> None:
    worker = await start_worker(IKW_PREFETCH="1")  # one at a time: dead-lettered in publish order
    for n in range(150):
        await publish(b"{broken %d" % n, "access.granted", message_id=f"bad-{n:03d}")
    await dead_lettered_by(worker, 150)
    newest_first = [f"bad-{n:03d}" for n in reversed(range(150))]

    # Each read hands the messages back in a new order; the listing must not show it.
    for _ in range(3):
        code, out, _ = await ikw("list", "--limit", "0")
        assert code == 0
        assert [row[0] for row in rows(out)] == newest_first
    assert await depth(amqp, names.dead) == 150


async def test_show_prints_reason_headers_and_the_body(
    start_worker: StartWorker, publish: Publish, amqp: Connection, names: Names, ikw: Ikw
) -> None:
    worker = await start_worker()
    event = grant(phone="12345")
    await publish(event, message_id="evt-phone")
    await publish(event, message_id="evt-phone")  # a producer that published twice
    await dead_lettered_by(worker, 2)
    await publish(b"{not json", "access.granted")
    await dead_lettered_by(worker, 3)
    [malformed_id] = [row[0] for row in rows((await ikw("list"))[1]) if row[0] != "evt-phone"]

    code, out, _ = await ikw("show", "evt-phone")
    assert code == 0
    assert out.startswith("dead letter evt-phone (1 of 2 with this id)\n")
    assert "\ndead letter evt-phone (2 of 2 with this id)\n" in out
    assert out.count("reason:           invalid_phone_number\n") == 2
    assert f"source queue:     {names.grants}\n" in out
    assert "content_type:     application/json\n" in out
    assert "  x-ikw-routing-key: access.granted\n" in out
    assert "x-delivery-count" not in out
    assert f"body ({len(body(event))} bytes, JSON):\n{{\n" in out
    assert f'\n  "event_id": "{event["event_id"]}",\n' in out  # pretty JSON
    assert '\n    "phone_number": "12345"\n' in out

    code, out, _ = await ikw("show", malformed_id)
    assert code == 0
    assert "reason:           malformed_json\n" in out
    assert (
        "error:            body is not JSON: Expecting property name enclosed in double quotes "
        "at line 1, column 2\n"
    ) in out  # where, never the text
    assert out.endswith("body (9 bytes, not JSON, shown as Python bytes):\nb'{not json'\n")

    code, _, err = await ikw("show", "no-such-id")
    assert code == 1
    assert f"no dead letter with id no-such-id in {names.dead}" in err


def test_without_a_message_id_the_id_is_a_hash_of_the_body() -> None:
    # aiormq gives every publish a message_id, so only other clients' messages lack one.
    delivered = aiormq.abc.DeliveredMessage(
        delivery=pamqp.commands.Basic.GetOk(routing_key="q", exchange=""),
        header=pamqp.header.ContentHeader(properties=pamqp.commands.Basic.Properties()),
        body=b"{not json",
        channel=None,  # type: ignore[arg-type]
    )
    message = aio_pika.IncomingMessage(delivered, no_ack=True)
    assert dlq.letter_id(message) == hashlib.sha256(b"{not json").hexdigest()[:12]
    assert dlq.describe(message, "guest").reason == "unknown"


async def test_replay_of_a_fixed_failure_delivers_the_sms_and_empties_the_dead_queue(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    amqp: Connection,
    names: Names,
    ikw: Ikw,
) -> None:
    sandbox.seam.fail_next(400, path="/user_identities/get")  # once; healthy afterwards
    worker = await start_worker()
    event = grant("guest-replayed")
    await publish(event, message_id=event["event_id"])
    await dead_lettered_by(worker, 1)
    assert sandbox.twilio.outbox == []

    code, out, _ = await ikw("replay", event["event_id"], "--yes")

    assert code == 0
    assert out.strip().endswith("replayed 1, failed 0")
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS after the replay")
    [key] = sandbox.seam.keys.values()
    assert key["instant_key_url"] in sandbox.twilio.outbox[0]["body"]
    assert await depth(amqp, names.dead) == 0
    assert (await ikw("list"))[1] == f"no dead letters in {names.dead}\n"


async def test_replay_by_reason_leaves_the_others(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    amqp: Connection,
    names: Names,
    ikw: Ikw,
) -> None:
    sandbox.seam.fail_next(400, path="/user_identities/get")
    worker = await start_worker()
    await publish(grant())
    await dead_lettered_by(worker, 1)
    await publish(b"{not json", "access.granted")
    await publish(b"[]", "access.granted")
    await dead_lettered_by(worker, 3)

    code, out, _ = await ikw("replay", "--reason", "seam_rejected", "--yes")

    assert code == 0
    assert out.strip().endswith("replayed 1, failed 0")
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS after the replay")
    code, out, _ = await ikw("list")
    assert counts(out) == {"malformed_json": 2}


async def test_a_broker_dead_letter_shows_its_queue_and_replays_clean(
    sandbox: Sandbox,
    start_worker: StartWorker,
    publish: Publish,
    amqp: Connection,
    names: Names,
    ikw: Ikw,
) -> None:
    # A crash loop without a worker: take the message and hand it back until the quorum
    # queue's x-delivery-limit dead-letters it.
    event = grant("guest-crash")
    await publish(event, message_id="evt-crash")
    channel = await amqp.channel()
    grants = await channel.get_queue(names.grants)
    for _ in range(DELIVERY_LIMIT + 1):
        message = await grants.get(fail=False, timeout=5)
        assert message is not None
        await message.nack(requeue=True)
    await holds(amqp, names.dead, 1)

    code, out, _ = await ikw("list")
    assert counts(out) == {"delivery_limit": 1}
    [row] = rows(out)
    assert row[:4] == ["evt-crash", "delivery_limit", names.grants, "1"]
    assert "x-delivery-limit" in row[5]

    code, out, _ = await ikw("replay", "evt-crash", "--yes")
    assert (code, out.strip()) == (0, "replayed 1, failed 0")
    await holds(amqp, names.grants, 1)
    replayed = await grants.get(fail=False, timeout=5)
    assert replayed is not None
    assert replayed.body == body(event)
    assert (replayed.message_id, replayed.content_type) == ("evt-crash", "application/json")
    assert replayed.headers == {"x-ikw-routing-key": "access.granted", "x-delivery-count": 0}
    await replayed.nack(requeue=True)
    await channel.close()

    await start_worker()
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS after the replay")
    assert await depth(amqp, names.dead) == 0


async def test_replay_of_many_prints_progress_and_a_summary(
    start_worker: StartWorker, publish: Publish, amqp: Connection, names: Names, ikw: Ikw
) -> None:
    worker = await start_worker()
    for n in range(250):
        await publish(b"{broken %d" % n, "access.granted")
    await dead_lettered_by(worker, 250)
    await worker.stop()  # so the replayed messages wait in the work queue to be counted

    code, out, _ = await ikw("replay", "--all", "--yes")

    assert code == 0
    assert out.splitlines() == [
        "… 100 of 250 done, 0 failed",
        "… 200 of 250 done, 0 failed",
        "… 250 of 250 done, 0 failed",
        "replayed 250, failed 0",
    ]
    assert await depth(amqp, names.dead) == 0
    assert await depth(amqp, names.grants) == 250


async def test_replay_refuses_a_source_queue_outside_the_namespace_and_keeps_it(
    amqp: Connection, names: Names, ikw: Ikw
) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    headers: aio_pika.abc.HeadersType = {
        "x-ikw-reason": "seam_rejected",
        "x-ikw-source-queue": "elsewhere.grants",
    }
    message = aio_pika.Message(b"{}", headers=headers, message_id="evt-elsewhere", user_id="guest")
    await channel.default_exchange.publish(message, names.dead)
    await channel.close()

    code, out, _ = await ikw("replay", "evt-elsewhere", "missing-id", "--yes")

    assert code == 1
    assert "failed: no dead letter with id missing-id" in out
    assert "failed: evt-elsewhere: its source queue (elsewhere.grants) is not a work queue" in out
    assert out.strip().endswith("replayed 0, failed 2")
    assert await depth(amqp, names.dead) == 1


async def test_replay_to_a_deleted_work_queue_fails_and_keeps_every_copy(
    start_worker: StartWorker, publish: Publish, amqp: Connection, names: Names, ikw: Ikw
) -> None:
    worker = await start_worker()
    event = grant(phone="12345")
    for _ in range(3):  # copies share a message_id, the one key a return is matched by
        await publish(event, message_id="evt-twin")
    await dead_lettered_by(worker, 3)
    await worker.stop()
    channel = await amqp.channel()
    await channel.queue_delete(names.grants)
    await channel.close()

    code, out, _ = await ikw("replay", "evt-twin", "--yes")

    assert code == 1
    assert (
        out.count("failed: evt-twin: not republished (PublishError); it stays a dead letter") == 3
    )
    assert out.strip().endswith("replayed 0, failed 3")
    assert await depth(amqp, names.dead) == 3


async def test_purge_yes_empties_the_dead_queue(
    start_worker: StartWorker, publish: Publish, amqp: Connection, names: Names, ikw: Ikw
) -> None:
    worker = await start_worker()
    for raw in (b"{not json", b"[]", b"null"):
        await publish(raw, "access.granted")
    await dead_lettered_by(worker, 3)

    code, out, _ = await ikw("purge", "--yes")

    assert (code, out) == (0, f"purged 3 dead letters from {names.dead}\n")
    assert await depth(amqp, names.dead) == 0


async def test_purge_without_yes_and_without_a_terminal_refuses_and_keeps_them(
    start_worker: StartWorker, publish: Publish, amqp: Connection, names: Names
) -> None:
    worker = await start_worker()
    await publish(b"{not json", "access.granted")
    await publish(grant(phone="12345"))
    await dead_lettered_by(worker, 2)

    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "ikw"),
        "dlq",
        "purge",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=os.environ | {"IKW_NAMESPACE": names.namespace, "AMQP_URL": AMQP_URL},
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)

    assert process.returncode == 1
    assert out.decode().startswith(f"purge 2 dead letters from {names.dead}:\n")
    assert "refusing to purge without confirmation: stdin is not a terminal" in err.decode()
    assert "pass --yes" in err.decode()
    assert await depth(amqp, names.dead) == 2


async def test_purge_asks_and_removes_only_what_the_operator_confirmed(
    start_worker: StartWorker,
    publish: Publish,
    amqp: Connection,
    names: Names,
    ikw: Ikw,
    terminal: Callable[[str], None],
) -> None:
    worker = await start_worker()
    await publish(b"{not json", "access.granted")
    await publish(b"[]", "access.granted")
    await publish(grant(phone="12345"))
    await dead_lettered_by(worker, 3)

    terminal("no\n")
    code, out, _ = await ikw("purge", "--reason", "malformed_json")
    assert code == 1
    assert "type 2 or y to purge them: not confirmed; nothing was changed" in out
    await holds(amqp, names.dead, 3)  # what it held comes back as its connection closes

    terminal("2\n")
    code, out, _ = await ikw("purge", "--reason", "malformed_json")
    assert code == 0
    assert out.strip().endswith(f"purged 2 dead letters from {names.dead}")
    await holds(amqp, names.dead, 1)
    code, out, _ = await ikw("list")
    assert counts(out) == {"invalid_phone_number": 1}


async def test_a_missing_dead_queue_is_one_clear_line(
    ikw: Ikw, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IKW_NAMESPACE", f"ikw_test_absent_{uuid.uuid4().hex[:6]}")
    code, out, err = await ikw("list")
    assert (code, out) == (1, "")
    assert "does not exist; check IKW_NAMESPACE or run `ikw topology`" in err


async def dead(amqp: Connection, names: Names, reason: str, message_id: str, raw: bytes) -> None:
    """A dead letter as the worker writes it, put straight into the dead queue."""
    channel = await amqp.channel(publisher_confirms=True)
    headers: aio_pika.abc.HeadersType = {
        "x-ikw-reason": reason,
        "x-ikw-source-queue": names.grants,
        "x-ikw-error": "test",
    }
    message = aio_pika.Message(raw, headers=headers, message_id=message_id, user_id="guest")
    await channel.default_exchange.publish(message, names.dead)
    await channel.close()


async def test_an_unknown_reason_is_one_line_with_the_reasons_there_are(
    amqp: Connection, names: Names, ikw: Ikw
) -> None:
    await dead(amqp, names, "malformed_json", "evt-1", b"{")
    await dead(amqp, names, "seam_rejected", "evt-2", b"{}")

    for command in (["list"], ["replay", "--yes"], ["purge", "--yes"]):
        code, out, err = await ikw(*command, "--reason", "bogus")
        assert (code, out) == (2, ""), command
        [line] = err.splitlines()
        assert line.startswith(
            f"ikw dlq: unknown reason 'bogus'; in {names.dead} now: malformed_json, "
            "seam_rejected; known reasons: crash_loop, delivery_limit, expired, "
        )
        assert "no_channel_accepted" in line
    assert await depth(amqp, names.dead) == 2

    # A known reason that no dead letter has is an empty selection, not a mistake.
    code, out, _ = await ikw("list", "--reason", "too_large")
    assert (code, out) == (0, f"none of the 2 dead letters in {names.dead} match\n")
    # A reason only a newer worker knows is still found.
    await dead(amqp, names, "brand_new_reason", "evt-3", b"{}")
    await holds(amqp, names.dead, 3)  # the earlier commands' holds are back
    code, out, _ = await ikw("list", "--reason", "brand_new_reason")
    assert code == 0 and counts(out) == {"brand_new_reason": 1}


async def test_purge_by_id_takes_only_those(amqp: Connection, names: Names, ikw: Ikw) -> None:
    for n in range(3):
        await dead(amqp, names, "malformed_json", f"evt-{n}", b"{")

    code, out, _ = await ikw("purge", "evt-0", "evt-2", "--yes")
    assert (code, out) == (0, f"purged 2 dead letters from {names.dead}\n")
    assert [row[0] for row in rows((await ikw("list"))[1])] == ["evt-1"]

    code, out, _ = await ikw("purge", "evt-1", "evt-gone", "--yes")
    assert code == 1
    assert out == (
        f"failed: no dead letter with id evt-gone\npurged 1 dead letter from {names.dead}\n"
    )
    assert await depth(amqp, names.dead) == 0


async def test_show_cuts_a_long_body_unless_full(amqp: Connection, names: Names, ikw: Ikw) -> None:
    raw = b'{"padding": "' + b"a" * 70_000 + b'"}'
    await dead(amqp, names, "too_large", "evt-big", raw)

    code, out, _ = await ikw("show", "evt-big")
    assert code == 0
    assert len(out) < dlq.BODY_CHARS + 2000
    assert out.rstrip().endswith("more characters not shown (--full shows all)")

    code, out, _ = await ikw("show", "evt-big", "--full")
    assert code == 0
    assert '"a' + "a" * 69_999 + '"' in out
    assert "not shown" not in out


async def test_show_masks_contacts_unless_revealed(
    amqp: Connection, names: Names, ikw: Ikw
) -> None:
    event = grant(phone="+14155550100", email="ada.lovelace@example.com")
    event["user_identity"]["full_name"] = "Ada, call +44 20 7946 0958"
    await dead(amqp, names, "no_channel_accepted", "evt-contacts", body(event))

    code, out, _ = await ikw("show", "evt-contacts")
    assert code == 0
    assert '"phone_number": "+1********00"' in out
    assert '"email_address": "a***@example.com"' in out
    assert '"full_name": "Ada, call +4************58"' in out
    assert "4155550100" not in out and "ada.lovelace" not in out and "7946" not in out
    assert f'"event_id": "{event["event_id"]}"' in out  # ids are not contacts

    code, out, _ = await ikw("show", "evt-contacts", "--reveal")
    assert code == 0
    assert '"phone_number": "+14155550100"' in out and "ada.lovelace@example.com" in out


async def test_a_body_over_the_limit_is_kept_cut_and_never_replayed(
    start_worker: StartWorker, publish: Publish, amqp: Connection, names: Names, ikw: Ikw
) -> None:
    worker = await start_worker()
    raw = body(grant() | {"pad": "x" * 1_000_000})
    await publish(raw, "access.granted", message_id="evt-huge")
    await dead_lettered_by(worker, 1)

    code, out, _ = await ikw("show", "evt-huge")
    assert code == 0
    assert "reason:           too_large\n" in out
    assert f"truncated:        only the first 65536 of {len(raw)} bytes were kept" in out
    assert f"  x-ikw-truncated: {len(raw)}\n" in out

    code, out, _ = await ikw("replay", "evt-huge", "--yes")
    assert code == 1
    assert out == (
        f"failed: evt-huge: its body was cut to 65536 of {len(raw)} bytes when dead-lettered "
        "(too_large); it cannot be replayed\nreplayed 0, failed 1\n"
    )
    assert await depth(amqp, names.dead) == 1
