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
from aio_pika.abc import AbstractIncomingMessage
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


async def broker_parts(args: argparse.Namespace) -> dict[str, float]:
    connection = await aio_pika.connect(args.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(args.queue, durable=True)
        body = b"x" * args.body_bytes

        async def publish(index: int) -> None:
            message = aio_pika.Message(
                body,
                message_id=str(index),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await channel.default_exchange.publish(message, args.queue, mandatory=True)

        published = await phase(args.repeat, args.concurrency, publish)

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


async def seam_part(args: argparse.Namespace) -> float:
    headers = {"Authorization": f"Bearer {args.seam_key}", "User-Agent": "floor"}
    base = args.seam_url.rstrip("/")
    prefix = uuid.uuid4().hex[:8]
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(path: str, body: dict[str, object]) -> dict[str, object]:
            async with session.post(base + path, json=body, headers=headers) as response:
                raw = await response.read()
            data = json.loads(raw)
            assert isinstance(data, dict)
            return data

        async def new_guest(index: int) -> None:
            key = f"floor-{prefix}-{index}"
            await call("/user_identities/get", {"user_identity_key": key})  # 404
            created = await call("/user_identities/create", {"user_identity_key": key})
            identity = created["user_identity"]
            assert isinstance(identity, dict)
            who = {"user_identity_id": identity["user_identity_id"]}
            await call("/user_identities/generate_instant_key", who | {"max_use_count": 1})
            await call("/instant_keys/list", who)

        used = await phase(args.repeat, args.concurrency, new_guest)
    return used / (4 * args.repeat)


async def twilio_part(args: argparse.Namespace) -> float:
    http = AsyncTwilioHttpClient(timeout=10)
    client = Client(args.twilio_sid, args.twilio_token, http_client=http)
    client.api.base_url = args.twilio_url.rstrip("/")
    client.edge = client.region = None

    async def send(index: int) -> None:
        await client.messages.create_async(
            to=f"+1650{index:07d}", from_=args.twilio_from, body=SMS_TEXT
        )

    try:
        used = await phase(args.repeat, args.concurrency, send)
    finally:
        await http.close()
    return used / args.repeat


async def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    parts = await broker_parts(args)
    parts["seam_call"] = await seam_part(args)
    parts["twilio_send"] = await twilio_part(args)
    parts["elapsed"] = time.monotonic() - started
    print(json.dumps(parts))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
