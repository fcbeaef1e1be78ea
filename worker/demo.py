"""`ikw demo`: stand-ins, a worker and two grants in one process, shown as the guests see them and
as a booking system hears them. The demo is a list of steps (``STEPS``): add one there."""

import asyncio
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from worker import config, events, logs
from worker.broker import topology
from worker.broker.connect import connect
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.commands import Failed
from worker.logs import mask_email, mask_phone
from worker.sandbox import changed, wait_for
from worker.sandbox.all import Sandbox
from worker.service import Service

GUESTS = [
    ("guest-ada", "Ada Lovelace", "+14155550100", None, ["sms", "email"], "en"),
    ("guest-grace", "Grace Hopper", None, "grace@example.com", ["sms", "email"], "fr"),
]
# A booking: sent 3 s from now, check-in at 5 s, checkout at 9 s (its keys go 1 s later).
STAY_GUEST = ("guest-linus", "Linus Pauling", "+14155550123")
STAY = {"deliver_at": 3, "starts_at": 5, "ends_at": 9}
CHECKOUT_GRACE = 1
# What an outcome event is told by, besides its type (worker/events.py, the Outcome models).
OUTCOME_IDS = (
    "grant_id",
    "event_id",
    "user_identity_key",
    "reservation_key",
    "deliver_at",
    "instant_key_id",
    "channel",
    "delivery_reason",
    "why",
)


def grant(
    key: str, name: str, phone: str | None, email: str | None, channels: list[str], locale: str
) -> bytes:
    event = events.granted(
        user_identity_key=key,
        full_name=name,
        phone_number=phone,
        email_address=email,
        channels=channels,
        locale=locale,
    )
    return json.dumps(event).encode()


@dataclass
class Demo:
    """What the steps share: the broker, the stand-ins, the worker, and what was heard."""

    connection: AbstractRobustConnection
    names: Names
    amqp_url: str
    key_lifetime: float
    sandbox: Sandbox
    service: Service | None = None
    publisher: Publisher | None = None  # the booking system's, as it publishes
    outcomes: list[dict[str, Any]] = field(default_factory=list)  # as heard, in order
    keys: dict[str, Any] = field(default_factory=dict)  # the keys delivered, by id

    def heard(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.outcomes if event.get("type") == kind]


Step = Callable[[Demo], Awaitable[None]]


async def start_stand_ins(demo: Demo) -> None:
    sandbox = demo.sandbox
    await sandbox.start()
    print(
        f"stand-ins up: Seam {sandbox.seam.url}, Twilio {sandbox.twilio.url}, "
        f"SMTP {sandbox.smtp.host}:{sandbox.smtp.port}"
    )


async def start_worker(demo: Demo) -> None:
    env = demo.sandbox.env() | {
        "AMQP_URL": demo.amqp_url,
        "IKW_NAMESPACE": demo.names.namespace,
        "IKW_MIN_KEY_LIFETIME": "0",
        "IKW_HTTP_PORT": "0",
        "IKW_CHECKOUT_GRACE": f"{CHECKOUT_GRACE}s",
    }
    demo.service = service = Service(config.load(env))
    await service.start()
    await wait_for(lambda: service.ready, 10, "the worker")
    print(f"worker up on namespace {demo.names.namespace}, consuming {demo.names.grants}")


async def listen_to_outcomes(demo: Demo) -> None:
    """As a booking system does, from a queue of its own bound to the outcomes exchange."""

    async def hear(message: AbstractIncomingMessage) -> None:
        outcome = json.loads(message.body)
        demo.outcomes.append(outcome)
        demo.sandbox.outbox.hear(outcome)  # a scheduled delivery is listed on the outbox page
        changed()

    channel = await demo.connection.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(demo.names.outcomes, "#")
    await queue.consume(hear, no_ack=True)


async def publish_grants(demo: Demo) -> None:
    for guest in GUESTS:
        await _publish(demo, grant(*guest))
        print(f"published access.granted for {guest[0]}")


async def _publish(demo: Demo, body: bytes) -> None:
    if demo.publisher is None:
        channel = await demo.connection.channel(publisher_confirms=True, on_return_raises=True)
        user = config.Settings(amqp_url=demo.amqp_url).broker_user
        demo.publisher = Publisher(channel, demo.names, user)
    await demo.publisher.publish_event("access.granted", body, str(uuid.uuid4()))


async def show_deliveries(demo: Demo) -> None:
    sandbox = demo.sandbox
    await wait_for(
        lambda: sandbox.twilio.outbox and sandbox.smtp.messages, 30, "the SMS and the email"
    )
    show(sandbox)
    print("\nSeam user identities the worker created (one per guest, found again by its key):")
    for identity in sandbox.seam.identities.values():
        print(f"  {identity['user_identity_key']}  user_identity_id {identity['user_identity_id']}")
    print(f"\nthe outbox page, while the demo runs: {sandbox.outbox.page_url}")
    await _outcomes(demo, "access.delivered", len(GUESTS))
    demo.keys = dict(sandbox.seam.keys)


async def show_expiry(demo: Demo) -> None:
    lifetime = demo.key_lifetime
    print(f"\nwaiting for the {len(demo.keys)} keys to expire ({lifetime:.0f} s) ...", flush=True)
    await wait_for(lambda: not demo.sandbox.seam.keys, lifetime + 30, "deletion at expiry")
    for key in demo.keys.values():
        print(
            f"deleted from Seam: instant key {key['instant_key_id']} "
            f"(expired at {key['expires_at']})"
        )
    await _outcomes(demo, "instant_key.deleted", len(demo.keys))


async def show_stay(demo: Demo) -> None:
    """A booking: scheduled at once, its key sent before check-in, deleted at checkout."""
    key, name, phone = STAY_GUEST
    demo.sandbox.seam.key_lifetime = 3600  # Seam's keys outlive this stay: checkout ends it
    start = time.monotonic()
    now = datetime.now(UTC)
    times = {field: now + timedelta(seconds=s) for field, s in STAY.items()}
    stay = {"reservation_key": "res-demo-1", **times}
    event = events.granted(
        user_identity_key=key, full_name=name, phone_number=phone, channels=["sms"], stay=stay
    )
    await _publish(demo, json.dumps(event).encode())
    print(
        f"\npublished access.granted for {key} with a stay: key sent at +{STAY['deliver_at']} s, "
        f"check-in +{STAY['starts_at']} s, checkout +{STAY['ends_at']} s "
        f"(IKW_CHECKOUT_GRACE={CHECKOUT_GRACE}s)"
    )
    await _outcomes(demo, "access.scheduled", 1)
    sandbox = demo.sandbox
    await wait_for(lambda: [m for m in sandbox.twilio.outbox if m["to"] == phone], 30, "the SMS")
    print(f"\n+{time.monotonic() - start:.1f} s: the key is sent, before check-in")
    await _outcomes(demo, "access.delivered", len(GUESTS) + 1, key)
    await wait_for(lambda: _stay_ended(demo), 30, "the checkout")
    print(f"\n+{time.monotonic() - start:.1f} s: checkout: the key is deleted from Seam")
    print(
        f"  instant_key.deleted  instant_key_id={_stay_ended(demo)[0]['instant_key_id']} "
        "why=stay_ended"
    )


def _stay_ended(demo: Demo) -> list[dict[str, Any]]:
    return [e for e in demo.heard("instant_key.deleted") if e.get("why") == "stay_ended"]


async def _outcomes(demo: Demo, kind: str, count: int, guest: str | None = None) -> None:
    """Wait for ``count`` outcomes of ``kind``; print them (``guest``'s only, if given)."""
    await wait_for(lambda: len(demo.heard(kind)) >= count, 30, f"{count} {kind} outcome events")
    print(f"\noutcome events heard on {demo.names.outcomes} (what your booking system hears):")
    for event in demo.heard(kind):
        if guest and event.get("user_identity", {}).get("user_identity_key") != guest:
            continue
        fields = event | event.get("user_identity", {})
        ids = " ".join(f"{name}={fields[name]}" for name in OUTCOME_IDS if fields.get(name))
        print(f"  {kind}  {ids}")


STEPS: list[Step] = [
    start_stand_ins,
    start_worker,
    listen_to_outcomes,
    publish_grants,
    show_deliveries,
    show_expiry,
    show_stay,
]


async def demo(key_lifetime: float) -> int:
    """Everything it starts and declares is stopped and deleted on the way out, however it ends
    (done, failed, Ctrl-C, or SIGTERM: the CLI cancels it like Ctrl-C)."""
    logs.setup("WARNING")
    # A channel opening when Ctrl-C comes is closed with a warning of aiormq's: not news here.
    logging.getLogger("aiormq").setLevel(logging.ERROR)
    amqp_url = os.environ.get("AMQP_URL", config.Settings.amqp_url)
    names = Names(f"ikw_demo_{uuid.uuid4().hex[:8]}")
    connection = await connect(amqp_url, "ikw demo")
    state = Demo(connection, names, amqp_url, key_lifetime, Sandbox(key_lifetime=key_lifetime))
    try:
        await _run(state)
    except TimeoutError as exc:
        if not exc.args:  # the broker's
            raise
        raise Failed(f"demo: {exc}") from None  # a step that waited in vain says for what
    except asyncio.CancelledError:
        print(
            f"ikw demo: stopped; its worker, stand-ins and namespace {names.namespace} are gone",
            file=sys.stderr,
        )
        raise
    print(
        f"\ndemo done: {len(GUESTS)} grants delivered, {len(state.keys)} keys deleted at expiry, "
        "one stay sent before check-in and ended at checkout"
    )
    try_next()
    return 0


async def _run(demo: Demo) -> None:
    try:
        for step in STEPS:
            await step(demo)
            sys.stdout.flush()
    finally:
        try:
            if demo.service is not None:
                await demo.service.stop()
            channel = await demo.connection.channel()
            await topology.delete(channel, demo.names)
            await demo.connection.close()
        finally:
            await demo.sandbox.stop()


def try_next() -> None:
    ikw = ikw_command()
    print(
        f"\nwhat to try next{'' if ikw == 'ikw' else f' ({ikw}: ikw is not on your PATH)'}:\n"
        f"  1. {ikw} sandbox\n"
        "       the stand-ins on fixed ports; it prints the variables a worker needs, then every\n"
        "       SMS and email it accepts (also on its outbox page, http://127.0.0.1:8703/)\n"
        f"  2. in a second terminal, paste the export lines it printed, then: {ikw} run\n"
        f"  3. in a third: {ikw} publish grant --key guest-1 --name 'Ada Lovelace' "
        "--phone +14155550100\n"
        "       and see the SMS arrive in the first terminal and on the outbox page\n"
        f"  4. a stay: {ikw} publish grant --key guest-2 --phone +14155550101 "
        "--reservation res-1 --deliver-at +1m --starts-at +2m --ends-at +5m\n"
        "       scheduled now, sent in a minute, deleted an hour after checkout "
        "(IKW_CHECKOUT_GRACE)"
    )


def ikw_command() -> str:
    """How to call `ikw` from here: by name when the PATH finds this one, else by its path
    (`make demo` installs it in .venv/bin, which is not on the PATH)."""
    script = Path(sys.executable).parent / "ikw"
    found = shutil.which("ikw")
    if found and Path(found).absolute() == script.absolute():
        return "ikw"
    try:
        return str(script.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def show(sandbox: Sandbox) -> None:
    sms = sandbox.twilio.outbox[0]
    print(f"\n--- SMS to {mask_phone(sms['to'])} from {sms['from']} ---\n{sms['body']}")
    mail = sandbox.smtp.messages[0]
    to = mask_email(mail["To"].addresses[0].addr_spec)
    print(f"\n--- email to {to}, subject: {mail['Subject']} ---")
    text = mail.get_body(("plain",))
    print(text.get_content() if text else "(no text part)")
