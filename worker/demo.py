"""`ikw demo`: stand-ins, a worker and two grants in one process, shown as the guests see them."""

import json
import os
import uuid

from aio_pika.abc import AbstractRobustConnection

from worker import config, events, logs
from worker.broker import topology
from worker.broker.connect import connect
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.logs import mask_email, mask_phone
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox
from worker.service import Service

GUESTS = [
    ("guest-ada", "Ada Lovelace", "+14155550100", None, ["sms", "email"], "en"),
    ("guest-grace", "Grace Hopper", None, "grace@example.com", ["sms", "email"], "fr"),
]


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


async def demo(key_lifetime: float) -> int:
    """Everything it starts and declares is stopped and deleted on the way out, however it ends
    (done, failed, Ctrl-C, or SIGTERM: the CLI cancels it like Ctrl-C)."""
    logs.setup("WARNING")
    amqp_url = os.environ.get("AMQP_URL", config.Settings.amqp_url)
    names = Names(f"ikw_demo_{uuid.uuid4().hex[:8]}")
    connection = await connect(amqp_url, "ikw demo")
    sandbox = Sandbox(key_lifetime=key_lifetime)
    service: Service | None = None
    try:
        await sandbox.start()
        print(
            f"stand-ins up: Seam {sandbox.seam.url}, Twilio {sandbox.twilio.url}, "
            f"SMTP {sandbox.smtp.host}:{sandbox.smtp.port}"
        )
        env = sandbox.env() | {
            "AMQP_URL": amqp_url,
            "IKW_NAMESPACE": names.namespace,
            "IKW_MIN_KEY_LIFETIME": "0",
            "IKW_HTTP_PORT": "0",
        }
        service = Service(config.load(env))
        await service.start()
        await wait_for(lambda: service is not None and service.ready, 10, "the worker")
        print(f"worker up on namespace {names.namespace}, consuming {names.grants}", flush=True)
        return await _grants(connection, names, sandbox, key_lifetime)
    finally:
        try:
            if service is not None:
                await service.stop()
            channel = await connection.channel()
            await topology.delete(channel, names)
            await connection.close()
        finally:
            await sandbox.stop()


async def _grants(
    connection: AbstractRobustConnection, names: Names, sandbox: Sandbox, key_lifetime: float
) -> int:
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    user = config.Settings(amqp_url=os.environ.get("AMQP_URL", config.Settings.amqp_url))
    publisher = Publisher(channel, names, user.broker_user)
    for guest in GUESTS:
        await publisher.publish_event("access.granted", grant(*guest), str(uuid.uuid4()))
        print(f"published access.granted for {guest[0]}")
    await wait_for(
        lambda: sandbox.twilio.outbox and sandbox.smtp.messages, 30, "the SMS and the email"
    )
    show(sandbox)
    keys = dict(sandbox.seam.keys)
    print(f"\nwaiting for the {len(keys)} keys to expire ({key_lifetime:.0f} s) ...", flush=True)
    await wait_for(lambda: not sandbox.seam.keys, key_lifetime + 30, "deletion at expiry")
    for key in keys.values():
        print(
            f"deleted from Seam: instant key {key['instant_key_id']} "
            f"(expired at {key['expires_at']})"
        )
    print("\ndemo done: 2 grants delivered, 2 keys deleted at expiry")
    return 0


def show(sandbox: Sandbox) -> None:
    sms = sandbox.twilio.outbox[0]
    print(f"\n--- SMS to {mask_phone(sms['to'])} from {sms['from']} ---\n{sms['body']}")
    mail = sandbox.smtp.messages[0]
    to = mask_email(mail["To"].addresses[0].addr_spec)
    print(f"\n--- email to {to}, subject: {mail['Subject']} ---")
    text = mail.get_body(("plain",))
    print(text.get_content() if text else "(no text part)")
