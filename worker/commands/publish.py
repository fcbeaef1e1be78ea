"""`ikw publish`: one valid access.granted or access.revoked event to the namespace's exchange."""

import argparse
import asyncio
import json

import aio_pika
import aiormq
from opentelemetry import trace

from worker import config, events, tracing
from worker.broker.connect import connect
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.commands import OK, Failed, Subcommands, command
from worker.events import parse


def add_parser(commands: Subcommands) -> None:
    publish = command(
        commands,
        "publish",
        "publish one valid access.granted or access.revoked event to the namespace's exchange "
        "(reads AMQP_URL and IKW_NAMESPACE)",
    )
    publish.add_argument("kind", choices=["grant", "revoke"])
    publish.add_argument("--key", dest="user_identity_key", help="user_identity_key")
    publish.add_argument("--id", dest="user_identity_id", help="user_identity_id")
    publish.add_argument("--grant-id", default=None)
    publish.add_argument("--name", dest="full_name")
    publish.add_argument("--email", dest="email_address")
    publish.add_argument("--phone", dest="phone_number")
    publish.add_argument("--channels", default="sms,email", help="in order (default sms,email)")
    publish.add_argument("--locale", default="en")
    publish.add_argument("--max-use-count", type=int, default=1)


async def run(args: argparse.Namespace) -> int:
    settings = config.broker_settings()
    names = Names(settings.namespace)
    event = grant_or_revoke(args)  # a bad flag is told before connecting
    provider = tracing.setup()
    if provider is not None:
        trace.set_tracer_provider(provider)
    connection = await connect(settings.amqp_url, "ikw publish")
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            # The event starts a trace; with tracing off here, one no SDK records, so the
            # worker's spans and log lines still share the traceparent it gets.
            with trace.use_span(tracing.new_trace() if provider is None else trace.INVALID_SPAN):
                return await _publish(channel, names, settings.broker_user, *event)
        finally:
            if provider is not None:
                await asyncio.to_thread(provider.shutdown)


async def _publish(
    channel: aio_pika.abc.AbstractChannel,
    names: Names,
    user: str,
    body: bytes,
    key: str,
    event_id: str,
) -> int:
    try:
        # user_id names us to the worker; the broker refuses it unless it is our own user.
        await Publisher(channel, names, user).publish_event(key, body, event_id)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise Failed(
            f"exchange {names.exchange} does not exist; run `ikw topology` first "
            "(or check IKW_NAMESPACE)"
        ) from None
    except aio_pika.exceptions.DeliveryError as exc:
        why = "routed to no queue" if isinstance(exc, aiormq.exceptions.PublishError) else "nacked"
        raise Failed(
            f"{key} {event_id} was {why} by exchange {names.exchange}; run `ikw topology` "
            "to declare and bind the queues"
        ) from None
    print(f"published {key} {event_id} to exchange {names.exchange}")
    return OK


def grant_or_revoke(args: argparse.Namespace) -> tuple[bytes, str, str]:
    ids = {"user_identity_id": args.user_identity_id, "user_identity_key": args.user_identity_key}
    event = (
        events.granted(
            **ids,
            grant_id=args.grant_id,
            full_name=args.full_name,
            email_address=args.email_address,
            phone_number=args.phone_number,
            channels=args.channels.split(","),
            locale=args.locale,
            max_use_count=args.max_use_count,
        )
        if args.kind == "grant"
        else events.revoked(**ids, grant_id=args.grant_id)
    )
    body = json.dumps(event).encode()
    parse(body, "application/json")  # fail here, not in the worker, on bad flags
    return body, str(event["type"]), str(event["event_id"])
