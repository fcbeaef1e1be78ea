"""The floor: the CPU of the raw parts one grant needs, measured on this machine in the same run.

Run as its own process (``throughput.py`` starts it after each worker run, against the same
broker and the same Seam and Twilio stand-ins), so its CPU is the client side alone, as the
worker's is: the stand-ins run in the bench process. Each part is repeated ``--repeat`` times
with ``--concurrency`` in flight (the worker's default prefetch, so batching is alike), and its
CPU per op is user + system CPU of this process over the phase / ops:

- ``publish``: one confirmed publish (persistent, mandatory, publisher confirms) of a grant-sized
  body through the default exchange, as aio-pika does it;
- ``consume_ack``: one delivery of those messages consumed (aio-pika callback, prefetch =
  concurrency) and acked;
- ``seam_call``: one aiohttp POST with a JSON body and the Bearer header to the Seam stand-in, the
  body read and JSON-decoded; measured as the four calls a new guest takes (get, create,
  generate, list) and divided by four;
- ``twilio_send``: one ``client.messages.create_async`` on twilio's stock
  ``AsyncTwilioHttpClient`` (one Client for the phase, as a well-built caller would keep).

Prints one JSON object: CPU seconds per op by part. No worker code is used.
"""

import argparse
import asyncio
import json
import resource
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
import aiohttp
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

# How many of each part one grant for a new guest needs (the worker's hot path).
WEIGHTS = {"consume_ack": 1, "publish": 2, "seam_call": 4, "twilio_send": 1}
SMS_TEXT = (
    "Bench guest 1, your key: https://ik.seam.co/k7Hq2sVb9TzXw4RmPn8dLa "
    "(until Nov 28, 2026, 11:30 PM UTC). Reply HELP for help."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", required=True, help="a scratch queue name (deleted after)")
    parser.add_argument("--seam-url", required=True)
    parser.add_argument("--seam-key", required=True)
    parser.add_argument("--twilio-url", required=True)
    parser.add_argument("--twilio-sid", required=True)
    parser.add_argument("--twilio-token", required=True)
    parser.add_argument("--twilio-from", required=True)
    parser.add_argument("--repeat", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--body-bytes", type=int, default=600, help="size of a grant's body")
    return parser.parse_args(argv)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def phase(count: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> float:
    """CPU seconds to run ``one(i)`` for i < count, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(index: int) -> None:
        async with gate:
            await one(index)

    before = cpu()
    await asyncio.gather(*(gated(i) for i in range(count)))
    return cpu() - before


async def publish(
    channel: AbstractChannel, queue: str, body: bytes, message_id: str | None = None
) -> None:
    """One confirmed publish (persistent, mandatory) through the default exchange."""
    message = aio_pika.Message(
        body,
        message_id=message_id,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    await channel.default_exchange.publish(message, queue, mandatory=True)


async def broker_parts(args: argparse.Namespace) -> dict[str, float]:
    connection = await aio_pika.connect(args.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(args.queue, durable=True)
        body = b"x" * args.body_bytes
        published = await phase(
            args.repeat, args.concurrency, lambda i: publish(channel, args.queue, body, str(i))
        )

        consuming = await connection.channel()
        await consuming.set_qos(prefetch_count=args.concurrency)
        own = await consuming.get_queue(args.queue)
        done = asyncio.Event()
        acked = 0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal acked
            await message.ack()
            acked += 1
            if acked >= args.repeat:
                done.set()

        before = cpu()
        tag = await own.consume(on_message)
        await asyncio.wait_for(done.wait(), 120)
        consumed = cpu() - before
        await own.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
    return {"publish": published / args.repeat, "consume_ack": consumed / args.repeat}


class SeamCalls:
    """A new guest's four Seam calls on one aiohttp session, as a plain client makes them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.headers = {"Authorization": f"Bearer {args.seam_key}", "User-Agent": "floor"}
        self.base = args.seam_url.rstrip("/")
        self.prefix = uuid.uuid4().hex[:8]
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency))

    async def call(self, path: str, body: dict[str, object]) -> dict[str, object]:
        async with self.session.post(self.base + path, json=body, headers=self.headers) as response:
            raw = await response.read()
        data = json.loads(raw)
        assert isinstance(data, dict)
        return data

    async def new_guest(self, name: str) -> None:
        key = f"floor-{self.prefix}-{name}"
        await self.call("/user_identities/get", {"user_identity_key": key})  # 404
        created = await self.call("/user_identities/create", {"user_identity_key": key})
        identity = created["user_identity"]
        assert isinstance(identity, dict)
        who = {"user_identity_id": identity["user_identity_id"]}
        await self.call("/user_identities/generate_instant_key", who | {"max_use_count": 1})
        await self.call("/instant_keys/list", who)


class Sms:
    """twilio's stock ``AsyncTwilioHttpClient``, one Client for the phase."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.http = AsyncTwilioHttpClient(timeout=10)
        self.client = Client(args.twilio_sid, args.twilio_token, http_client=self.http)
        self.client.api.base_url = args.twilio_url.rstrip("/")
        self.client.edge = self.client.region = None
        self.sender = args.twilio_from

    async def send(self, to: str) -> None:
        await self.client.messages.create_async(to=to, from_=self.sender, body=SMS_TEXT)


async def seam_part(args: argparse.Namespace) -> float:
    seam = SeamCalls(args)
    try:
        used = await phase(args.repeat, args.concurrency, lambda i: seam.new_guest(str(i)))
    finally:
        await seam.session.close()
    return used / (4 * args.repeat)


async def twilio_part(args: argparse.Namespace) -> float:
    sms = Sms(args)
    try:
        used = await phase(args.repeat, args.concurrency, lambda i: sms.send(f"+1650{i:07d}"))
    finally:
        await sms.http.close()
    return used / args.repeat


async def pipeline_part(args: argparse.Namespace) -> float:
    """CPU per grant of the same parts chained as the worker chains them for a new guest, with
    no worker code: a delivery consumed, the four Seam calls, a confirmed publish (the cleanup
    timer), the SMS, a confirmed publish (the outcome event), the ack; ``concurrency`` grants
    in flight (the prefetch). What the libraries cost when their calls interleave, which the
    parts measured one kind at a time do not show."""
    connection = await aio_pika.connect(args.amqp_url)
    seam, sms = SeamCalls(args), Sms(args)
    try:
        publishing = await connection.channel(publisher_confirms=True, on_return_raises=True)
        inbox = await publishing.declare_queue(f"{args.queue}.pipeline", durable=True)
        outbox = await publishing.declare_queue(f"{args.queue}.pipeline-out", durable=True)
        body = b"x" * args.body_bytes
        # Filling the inbox is not counted.
        await phase(args.repeat, args.concurrency, lambda i: publish(publishing, inbox.name, body))
        consuming = await connection.channel()
        await consuming.set_qos(prefetch_count=args.concurrency)
        done = asyncio.Event()
        started = finished = 0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal started, finished
            started += 1
            index = started
            await seam.new_guest(f"p{index}")
            await publish(publishing, outbox.name, body)
            await sms.send(f"+1651{index:07d}")
            await publish(publishing, outbox.name, body)
            await message.ack()
            finished += 1
            if finished >= args.repeat:
                done.set()

        before = cpu()
        queue = await consuming.get_queue(inbox.name)
        tag = await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), 300)
        used = cpu() - before
        await queue.cancel(tag)
        await inbox.delete(if_unused=False, if_empty=False)
        await outbox.delete(if_unused=False, if_empty=False)
    finally:
        await seam.session.close()
        await sms.http.close()
        await connection.close()
    return used / args.repeat


async def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    parts = await broker_parts(args)
    parts["seam_call"] = await seam_part(args)
    parts["twilio_send"] = await twilio_part(args)
    parts["pipeline"] = await pipeline_part(args)
    parts["elapsed"] = time.monotonic() - started
    print(json.dumps(parts))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
