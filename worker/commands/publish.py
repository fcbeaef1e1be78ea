"""`ikw publish`: one valid access.granted or access.revoked event to the namespace's exchange."""

import argparse
import asyncio
import json
from typing import Any, TypedDict, get_args

import aio_pika
import aiormq
from opentelemetry import trace

from worker import config, events, tracing
from worker.broker.connect import connect
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.commands import MOMENT_HELP, OK, USAGE, Failed, Subcommands, command, moment
from worker.events import RevokeReason, parse


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
    publish.add_argument("--time-zone", help="IANA zone of the times the guest reads")
    publish.add_argument("--property-name", help="the property's name as guests know it")
    publish.add_argument("--max-use-count", type=int, default=1)
    stay = publish.add_argument_group(
        "a stay (grant: --reservation, --starts-at and --ends-at; revoke: --reservation and "
        "--reason end that stay only)"
    )
    stay.add_argument("--reservation", dest="reservation_key", metavar="KEY")
    stay.add_argument("--starts-at", type=moment, metavar="T", help=f"check-in: {MOMENT_HELP}")
    stay.add_argument("--ends-at", type=moment, metavar="T", help="checkout")
    stay.add_argument("--deliver-at", type=moment, metavar="T", help="default: the worker's lead")
    stay.add_argument("--revision", type=int, help="the booking's revision (default 0)")
    stay.add_argument("--reason", choices=get_args(RevokeReason), help="why the stay ends")


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
    event = _grant(args) if args.kind == "grant" else _revoke(args)
    body = json.dumps(event).encode()
    parse(body, "application/json")  # fail here, not in the worker, on bad flags
    if args.kind == "grant":
        _reaches(args)
    return body, str(event["type"]), str(event["event_id"])


CONTACTS = {"sms": ("phone_number", "--phone"), "email": ("email_address", "--email")}
STAY_FLAGS = {"starts_at": "--starts-at", "ends_at": "--ends-at", "deliver_at": "--deliver-at"}


class _Ids(TypedDict):
    user_identity_id: str | None
    user_identity_key: str | None
    grant_id: str | None


def _ids(args: argparse.Namespace) -> _Ids:
    return _Ids(
        user_identity_id=args.user_identity_id,
        user_identity_key=args.user_identity_key,
        grant_id=args.grant_id,
    )


def _grant(args: argparse.Namespace) -> dict[str, Any]:
    if args.reason is not None:
        raise Failed("--reason goes with `ikw publish revoke`", USAGE)
    return events.granted(
        **_ids(args),
        full_name=args.full_name,
        email_address=args.email_address,
        phone_number=args.phone_number,
        channels=args.channels.split(","),
        locale=args.locale,
        time_zone=args.time_zone,
        property_name=args.property_name,
        max_use_count=args.max_use_count,
        stay=_stay(args),
    )


def _reaches(args: argparse.Namespace) -> None:
    """A grant the worker could deliver: a contact for one of its channels (else it would be
    published, then dead-lettered)."""
    channels = args.channels.split(",")
    if not any(getattr(args, CONTACTS[name][0]) for name in channels):
        flags = " or ".join(CONTACTS[name][1] for name in channels)
        raise Failed(f"no contact for channels {args.channels}: give {flags}", USAGE)


def _stay(args: argparse.Namespace) -> dict[str, Any] | None:
    given = {name: getattr(args, name) for name in STAY_FLAGS if getattr(args, name) is not None}
    if args.reservation_key is None:
        if given or args.revision is not None:
            raise Failed("a stay needs --reservation KEY", USAGE)
        return None
    if "starts_at" not in given or "ends_at" not in given:
        raise Failed("a stay needs --starts-at and --ends-at", USAGE)
    revision = {} if args.revision is None else {"revision": args.revision}
    return {"reservation_key": args.reservation_key, **given, **revision}


def _revoke(args: argparse.Namespace) -> dict[str, Any]:
    for name, flag in (*STAY_FLAGS.items(), ("revision", "--revision")):
        if getattr(args, name) is not None:
            raise Failed(f"{flag} goes with `ikw publish grant`", USAGE)
    return events.revoked(
        **_ids(args),
        reservation_key=args.reservation_key,
        reason=args.reason,
    )
