"""The `ikw` command: run, demo, sandbox, publish, topology, dlq, schema."""

import argparse
import asyncio
import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aio_pika

from worker import config, logs
from worker.broker import topology
from worker.broker.connect import BrokerUnreachable, connect
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.errors import InvalidEvent
from worker.events import parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ikw", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("run", help="run the worker, configured from the environment")
    demo = commands.add_parser("demo", help="the whole job once, against the local stand-ins")
    demo.add_argument("--key-lifetime", type=float, default=6.0, help="seconds (default 6)")
    sandbox = commands.add_parser("sandbox", help="serve the Seam, Twilio and SMTP stand-ins")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--seam-port", type=int, default=8701)
    sandbox.add_argument("--twilio-port", type=int, default=8702)
    sandbox.add_argument("--smtp-port", type=int, default=8725)
    sandbox.add_argument("--key-lifetime", type=float, default=48 * 3600, help="seconds")

    publish = commands.add_parser("publish", help="publish a valid event")
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

    topo = commands.add_parser("topology", help="declare and print the RabbitMQ topology")
    mode = topo.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only report what is missing")
    mode.add_argument("--print", action="store_true", help="only print it, touch nothing")
    mode.add_argument("--delete", action="store_true", help="delete the namespace's topology")

    schema = commands.add_parser("schema", help="write the JSON Schemas and AsyncAPI document")
    schema.add_argument("--out", type=Path, default=Path("schemas"))
    schema.add_argument("--check", action="store_true", help="fail when the files are stale")

    from worker import dlq

    dlq.add_parser(commands)

    args = parser.parse_args(argv)
    try:
        return asyncio.run(_dispatch(args))
    except config.ConfigError as exc:
        print(f"ikw: configuration error:\n{exc}", file=sys.stderr)
        return 2
    except BrokerUnreachable as exc:
        print(f"ikw: {exc}", file=sys.stderr)
        return 1
    except InvalidEvent as exc:
        print(f"ikw: the event would be invalid: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


async def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        from worker.service import Service

        logs.setup()
        settings = config.load()
        await Service(settings).run()
        return 0
    if args.command == "demo":
        from worker.demo import demo

        return await demo(args.key_lifetime)
    if args.command == "sandbox":
        from worker.sandbox.all import serve_forever

        await serve_forever(
            args.host, args.seam_port, args.twilio_port, args.smtp_port, args.key_lifetime
        )
        return 0
    if args.command == "schema":
        from worker import contract

        if args.check:
            stale = contract.stale(args.out)
            for name in stale:
                print(f"stale: {args.out / name} (run `make schemas`)")
            return 1 if stale else 0
        for name in contract.write(args.out):
            print(f"wrote {args.out / name}")
        return 0
    if args.command == "dlq":
        from worker import dlq

        return await dlq.run(args)
    settings = config.broker_settings()
    names = Names(settings.namespace)
    if args.command == "topology" and args.print:
        print(topology.describe(names))
        return 0
    connection = await connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        if args.command == "topology":
            return await _topology(args, channel, names)
        body, routing_key, event_id = grant_or_revoke(args)
        await Publisher(channel, names, settings.broker_user).publish_event(
            routing_key, body, event_id
        )
        print(f"published {routing_key} {event_id} to exchange {names.exchange}")
        return 0


async def _topology(
    args: argparse.Namespace, channel: aio_pika.abc.AbstractChannel, names: Names
) -> int:
    if args.check:
        missing = await topology.check(channel, names)
        for line in missing:
            print(f"missing: {line}")
        print("topology complete" if not missing else f"{len(missing)} missing")
        return 1 if missing else 0
    if args.delete:
        await topology.delete(channel, names)
        print(f"deleted the topology of namespace {names.namespace}")
        return 0
    await topology.declare(channel, names)
    print(topology.describe(names))
    return 0


def grant_or_revoke(args: argparse.Namespace) -> tuple[bytes, str, str]:
    event_id = str(uuid.uuid4())
    identity = {
        "user_identity_id": args.user_identity_id,
        "user_identity_key": args.user_identity_key,
    }
    event: dict[str, object] = {
        "version": 1,
        "event_id": event_id,
        "occurred_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "grant_id": args.grant_id or f"cli-{event_id[:8]}",
    }
    if args.kind == "grant":
        event["type"] = "access.granted"
        event["user_identity"] = identity | {
            "full_name": args.full_name,
            "email_address": args.email_address,
            "phone_number": args.phone_number,
        }
        event["delivery"] = {"channels": args.channels.split(","), "locale": args.locale}
        event["instant_key"] = {"max_use_count": args.max_use_count}
    else:
        event["type"] = "access.revoked"
        event["user_identity"] = identity
    body = json.dumps(event).encode()
    parse(body, "application/json")  # fail here, not in the worker, on bad flags
    return body, str(event["type"]), event_id


if __name__ == "__main__":
    sys.exit(main())
