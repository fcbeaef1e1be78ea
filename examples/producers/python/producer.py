"""A booking system's side of instant-key-worker, complete: grant a guest access as the contract
asks, hear the outcome, revoke the access, hear that outcome. Needs aio-pika alone.

    pip install 'aio-pika>=9.4'   # Python 3.11+
    AMQP_URL=amqp://booking:secret@127.0.0.1:5672/ GUEST_PHONE=+14155550100 python producer.py

The broker user of AMQP_URL is the producer: the worker must trust it (IKW_TRUSTED_PUBLISHERS)
and its outcome queue must exist (`ikw topology --producer booking`). Exits 0 when the key was
delivered and revoked, 1 otherwise.
"""

import asyncio
import json
import os
import sys
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from aio_pika.exceptions import ChannelNotFoundEntity, DeliveryError, PublishError

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
NAMESPACE = os.environ.get("IKW_NAMESPACE", "instant_keys")
PHONE = os.environ.get("GUEST_PHONE", "+14155550100")
TIMEOUT = float(os.environ.get("OUTCOME_TIMEOUT", "30"))  # seconds to wait for each outcome
# The broker checks user_id against the connection's user: that is how the worker knows us.
PRODUCER = unquote(urlsplit(AMQP_URL).username or "guest")

# The outcomes that settle each event; any other (instant_key.deleted) is only printed.
FINAL = {
    "access.granted": {"access.delivered", "access.delivery_failed", "access.rejected"},
    "access.revoked": {"access.revoke_completed", "access.rejected"},
}

Event = dict[str, Any]


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def grant(guest: str, grant_id: str) -> Event:
    return {
        "type": "access.granted",
        "version": 1,
        "event_id": str(uuid.uuid4()),
        "occurred_at": now(),
        "grant_id": grant_id,
        "user_identity": {
            "user_identity_key": guest,
            "full_name": "Ada Lovelace",
            "phone_number": PHONE,
        },
        "delivery": {"channels": ["sms"], "locale": "en", "time_zone": "Europe/Paris"},
    }


def revoke(guest: str, grant_id: str) -> Event:
    return {
        "type": "access.revoked",
        "version": 1,
        "event_id": str(uuid.uuid4()),
        "occurred_at": now(),
        "grant_id": grant_id,
        "user_identity": {"user_identity_key": guest},
    }


class Outcomes:
    """Our outcome queue, consumed: each outcome printed, then handed to whoever waits for it."""

    def __init__(self) -> None:
        self.waiting: dict[str, tuple[str, asyncio.Future[Event]]] = {}

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        outcome = json.loads(message.body)
        print(f"heard {message.routing_key}: {json.dumps(outcome)}", flush=True)
        kind, heard = self.waiting.get(outcome.get("event_id"), ("", None))
        if heard is not None and not heard.done() and outcome["type"] in FINAL[kind]:
            heard.set_result(outcome)
        # Outcomes come at least once: a real consumer records them by event_id, then acks.
        await message.ack()

    async def send(self, exchange: AbstractExchange, event: Event) -> Event:
        """Publish ``event`` and wait for the outcome that settles it."""
        heard: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self.waiting[event["event_id"]] = (event["type"], heard)
        message = aio_pika.Message(
            json.dumps(event).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=PRODUCER,
            message_id=event["event_id"],
        )
        # Returns when the broker confirmed it; raises when it was returned (mandatory) or nacked.
        await exchange.publish(message, routing_key=event["type"], mandatory=True)
        print(f"published {event['type']} {event['event_id']} (grant {event['grant_id']})")
        return await asyncio.wait_for(heard, TIMEOUT)


async def run() -> int:
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(NAMESPACE, ensure=False)
        queue = await channel.get_queue(f"{NAMESPACE}.outcomes.{PRODUCER}", ensure=False)
        outcomes = Outcomes()
        await queue.consume(outcomes.on_message)
        guest, grant_id = f"guest-{uuid.uuid4().hex[:8]}", f"booking-{uuid.uuid4().hex[:6]}"
        granted = await outcomes.send(exchange, grant(guest, grant_id))
        if granted["type"] != "access.delivered":
            return 1
        revoked = await outcomes.send(exchange, revoke(guest, grant_id))
        return 0 if revoked["type"] == "access.revoke_completed" else 1


def main() -> int:
    try:
        return asyncio.run(run())
    except ChannelNotFoundEntity as exc:
        print(f"{exc}: have the operator run `ikw topology --producer {PRODUCER}`", file=sys.stderr)
    except (DeliveryError, PublishError) as exc:
        print(f"the broker did not take the event: {exc!r}", file=sys.stderr)
    except TimeoutError:
        print(f"no outcome within {TIMEOUT:g} s: is a worker running?", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
