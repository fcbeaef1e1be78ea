"""The `ikw` command: run, demo, sandbox, publish, topology, dlq, schema, templates."""

import argparse
import asyncio
import io
import json
import logging
import os
import signal
import sys
import textwrap
from importlib import metadata
from pathlib import Path
from typing import TextIO, cast

import aio_pika
import aiormq
from opentelemetry import trace

from worker import config, events, logs, tracing
from worker.broker import topology
from worker.broker.connect import BROKER_ERRORS, BadBrokerUrl, BrokerError, connect
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.errors import InvalidEvent
from worker.events import parse
from worker.queues import PRODUCER

# Exit codes, as documented in README ("Exit codes").
OK = 0
FAILED = 1  # the operation failed or was not confirmed; nothing more was done
USAGE = 2  # fix the command line or the configuration (AMQP_URL, credentials, vhost...)
INTERRUPTED = 130  # Ctrl-C (SIGINT)
TERMINATED = 143  # SIGTERM

EXIT_CODES = f"""exit codes:
  {OK}    done
  {FAILED}    the operation failed, or was not confirmed
  {USAGE}    usage or configuration error (command line, environment, AMQP_URL, credentials)
  {INTERRUPTED}  interrupted (Ctrl-C)
  {TERMINATED}  terminated (SIGTERM)"""


class Failed(Exception):
    """One line for the operator; ``exit_code`` says whose move it is."""

    def __init__(self, message: str, exit_code: int = FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(Exception):
    """SIGTERM arrived: the command was cancelled and its cleanups ran."""


def version() -> str:
    try:
        return metadata.version("instant-key-worker")
    except metadata.PackageNotFoundError:
        return "unknown"


def run_epilog() -> str:
    variables = config.VARIABLES + tracing.VARIABLES
    width = max(len(name) for name, _ in variables)
    rows = [f"  {name:<{width}}  {meaning}" for name, meaning in variables]
    secrets = ", ".join(config.SECRETS)
    return "\n".join(
        [
            "environment variables (checked at start; any problem: one line each, exit 2):",
            *rows,
            f"  {'NAME_FILE':<{width}}  a file holding NAME, for {secrets}",
        ]
    )


def parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    top = argparse.ArgumentParser(
        prog="ikw",
        description="instant-key-worker: turns booking events into delivered Seam Instant Keys.",
        epilog=EXIT_CODES,
        formatter_class=raw,
    )
    top.add_argument("--version", action="version", version=f"ikw {version()}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, what: str, epilog: str | None = None) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(
            name,
            help=what,
            description=textwrap.fill(what[0].upper() + what[1:] + ".", 79),
            epilog=epilog,
            formatter_class=raw,
        )
        return sub

    command(
        "run",
        "run the worker, configured from the environment, until SIGTERM or SIGINT",
        epilog=run_epilog(),
    )
    demo = command(
        "demo",
        "the whole job once, against the local stand-ins, in a namespace of its own that is "
        "deleted at the end (also on Ctrl-C or SIGTERM); reads AMQP_URL",
    )
    demo.add_argument("--key-lifetime", type=float, default=6.0, help="seconds (default 6)")
    sandbox = command(
        "sandbox",
        "serve the Seam, Twilio and SMTP stand-ins and their outbox (a page of every SMS and "
        "email they accept), print their env, then every SMS and email in full as it arrives, "
        "links included; until SIGTERM or SIGINT (exit 0)",
        epilog="A port of 0 picks a free one; the banner names the ports in use.",
    )
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--seam-port", type=_port, default=8701)
    sandbox.add_argument("--twilio-port", type=_port, default=8702)
    sandbox.add_argument("--smtp-port", type=_port, default=8725)
    sandbox.add_argument("--outbox-port", type=_port, default=8703, help="the outbox page")
    sandbox.add_argument("--key-lifetime", type=float, default=48 * 3600, help="seconds")

    publish = command(
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

    topo = command(
        "topology",
        "declare (idempotent) and print the namespace's exchanges and queues; or check, print "
        "or delete them (reads AMQP_URL and IKW_NAMESPACE)",
    )
    mode = topo.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only report what is missing")
    mode.add_argument("--print", action="store_true", help="only print it, touch nothing")
    mode.add_argument(
        "--delete",
        action="store_true",
        help="delete every queue and exchange of the namespace, with the dead letters and "
        "expiry timers they hold; says what it would destroy and asks first",
    )
    topo.add_argument("--yes", action="store_true", help="--delete without asking")
    topo.add_argument(
        "--producer",
        action="append",
        default=[],
        type=_producer,
        metavar="NAME",
        help="also the queue of producer NAME's outcome events, <namespace>.outcomes.NAME, "
        "bound with NAME.#; repeat for each producer",
    )

    schema = command("schema", "write the JSON Schemas and AsyncAPI document of the events")
    schema.add_argument("--out", type=Path, default=Path("schemas"))
    schema.add_argument("--check", action="store_true", help="fail when the files are stale")

    from worker import dlq, template_tools

    dlq.add_parser(commands)
    template_tools.add_parser(commands)
    return top


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 0 to 65535, got {text!r}")
    return port


def _producer(text: str) -> str:
    if not PRODUCER.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"a producer is its broker user: 1 to 64 letters, digits, '_' or '-', got {text[:80]!r}"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    real_stdout = sys.stdout
    sys.stdout = stdout = cast(TextIO, PipeSafe(real_stdout))
    try:
        args = parser().parse_args(argv)
        return asyncio.run(_main(args))
    except config.ConfigError as exc:
        print(f"ikw: configuration error:\n{exc}", file=sys.stderr)  # a line per variable
        return USAGE
    except BadBrokerUrl as exc:  # told like the configuration's other problems
        print(f"ikw: configuration error:\n{exc}", file=sys.stderr)
        return USAGE
    except (BrokerError, Failed) as exc:
        print(f"ikw: {exc}", file=sys.stderr)
        return exc.exit_code
    except InvalidEvent as exc:
        print(f"ikw: the event would be invalid: {exc}", file=sys.stderr)
        return USAGE
    except aiormq.exceptions.ChannelAccessRefused as exc:
        print(
            f"ikw: RabbitMQ refused: {_reply(exc)}; give the user of AMQP_URL the permissions",
            file=sys.stderr,
        )
        return USAGE
    except aiormq.exceptions.ChannelClosed as exc:
        print(f"ikw: RabbitMQ refused: {_reply(exc)}", file=sys.stderr)
        return FAILED
    except BROKER_ERRORS as exc:
        print(f"ikw: lost the connection to RabbitMQ ({type(exc).__name__})", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        return INTERRUPTED
    except Terminated:
        return TERMINATED
    finally:
        stdout.flush()
        sys.stdout = real_stdout


def _reply(exc: aiormq.exceptions.ChannelClosed) -> str:
    """The broker's reply text, e.g. "NOT_FOUND - no exchange 'x' in vhost '/'"."""
    return str(exc.args[1]) if len(exc.args) > 1 else type(exc).__name__


class PipeSafe(io.TextIOBase):
    """stdout that a reader may close early (`ikw dlq list | head -1`): the rest of the output
    is dropped, quietly, and the command still finishes what it started."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.gone = True
        try:
            # What is still buffered goes nowhere, and the interpreter's last flush succeeds.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding


async def _main(args: argparse.Namespace) -> int:
    """SIGTERM cancels the command like Ctrl-C does, so its cleanups run (`ikw run` installs
    its own handler: a graceful stop)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        if task:
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, terminate)
    except (ValueError, RuntimeError):  # not the main thread (tests call main() in one)
        task = None
    try:
        return await _dispatch(args)
    except asyncio.CancelledError:
        if terminated:
            raise Terminated from None
        raise
    finally:
        if task:
            loop.remove_signal_handler(signal.SIGTERM)


def _need_the_sandbox() -> None:
    """The stand-ins are an extra: the production image has no aiosmtpd."""
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        raise Failed(
            "the stand-ins are not installed: pip install 'instant-key-worker[sandbox]' "
            "(or use the image's sandbox target)",
            USAGE,
        ) from None


async def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        from worker.service import Service, StartError

        settings = config.load()  # a ConfigError is printed, not logged
        provider = tracing.setup()  # None unless OTEL_* ask for tracing
        logs.setup(settings.log_level)
        if provider is not None:
            trace.set_tracer_provider(provider)
            exporters = tracing.exporter_names(os.environ)
            logging.getLogger("worker.tracing").info(
                "tracing on", extra={"ctx": {"exporters": exporters}}
            )
        try:
            await Service(settings).run()
        except StartError as exc:
            raise Failed(str(exc), USAGE) from None
        finally:
            if provider is not None:  # flushes the spans still batched
                await asyncio.to_thread(provider.shutdown)
        return OK
    if args.command in ("demo", "sandbox"):
        _need_the_sandbox()
    if args.command == "demo":
        from worker.demo import demo

        return await demo(args.key_lifetime)
    if args.command == "sandbox":
        from worker.sandbox.all import serve_forever

        try:
            await serve_forever(
                args.host,
                args.seam_port,
                args.twilio_port,
                args.smtp_port,
                args.key_lifetime,
                args.outbox_port,
            )
        except OSError as exc:  # a port in use, a host that is not ours
            raise Failed(f"sandbox: cannot listen on {args.host}: {exc.strerror or exc}") from None
        return OK
    if args.command == "schema":
        from worker import contract

        if args.check:
            stale = contract.stale(args.out)
            for name in stale:
                print(f"stale: {args.out / name} (run `make schemas`)")
            return FAILED if stale else OK
        for name in contract.write(args.out):
            print(f"wrote {args.out / name}")
        return OK
    if args.command == "dlq":
        from worker import dlq

        return await dlq.run(args)
    if args.command == "templates":
        from worker import template_tools

        return template_tools.run(args)
    if args.command == "topology" and args.yes and not args.delete:
        raise Failed("--yes goes with --delete only", USAGE)
    broker = config.broker_settings()
    names = Names(broker.namespace)
    if args.command == "topology" and args.print:
        print(topology.describe(names, args.producer))
        return OK
    # A bad flag is told before connecting.
    event = grant_or_revoke(args) if args.command == "publish" else None
    provider = tracing.setup() if args.command == "publish" else None
    if provider is not None:
        trace.set_tracer_provider(provider)
    connection = await connect(broker.amqp_url, f"ikw {args.command}")
    async with connection:
        if args.command == "topology":
            return await _topology(args, connection, names)
        assert event is not None
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            # The event starts a trace; with tracing off here, one no SDK records, so the
            # worker's spans and log lines still share the traceparent it gets.
            with trace.use_span(tracing.new_trace() if provider is None else trace.INVALID_SPAN):
                return await _publish(channel, names, broker.broker_user, *event)
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


async def _topology(
    args: argparse.Namespace, connection: aio_pika.abc.AbstractRobustConnection, names: Names
) -> int:
    channel = await connection.channel()
    if args.check:
        missing = await topology.check(channel, names, args.producer)
        for line in missing:
            print(f"missing: {line}")
        print("topology complete" if not missing else f"{len(missing)} missing")
        return FAILED if missing else OK
    if args.delete:
        return await _delete(args, connection, names)
    quorum_size = config.broker_settings().quorum_size
    await topology.declare(channel, names, quorum_size=quorum_size, producers=args.producer)
    print(topology.describe(names, args.producer))
    return OK


async def depths(connection: aio_pika.abc.AbstractRobustConnection, names: Names) -> dict[str, int]:
    """Ready messages of each queue of the namespace that exists (passive declares)."""
    channel = await connection.channel()
    found: dict[str, int] = {}
    try:
        for name in names.all_queues():
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                await channel.reopen()
                continue
            found[name] = queue.declaration_result.message_count or 0
    finally:
        await channel.close()
    return found


def _at_stake(names: Names, found: dict[str, int]) -> list[str]:
    delays = [name for name in found if name.startswith(f"{names.namespace}.delay.")]
    rows = [
        (found.get(names.dead), f"dead letters in {names.dead}"),
        (
            sum(found[name] for name in delays) if delays else None,
            f"pending expiry timers and retries in {names.delay(0)} … .{topology.LEVELS - 1:02d}",
        ),
        (found.get(names.cleanup), f"due expiry timers in {names.cleanup}"),
        (found.get(names.grants), f"grants waiting in {names.grants}"),
        (found.get(names.revocations), f"revocations waiting in {names.revocations}"),
    ]
    return [f"  {count:>7}  {what}" for count, what in rows if count is not None]


async def _delete(
    args: argparse.Namespace, connection: aio_pika.abc.AbstractRobustConnection, names: Names
) -> int:
    from worker.dlq import answer

    found = await depths(connection, names)
    held = sum(found.values())
    if found and not args.yes:
        print(
            f"delete namespace {names.namespace}: {len(found)} queues and their exchanges, "
            f"holding {held} ready messages:"
        )
        print("\n".join(_at_stake(names, found)))
        timers = sum(n for q, n in found.items() if q.startswith(f"{names.namespace}.delay."))
        if timers or found.get(names.cleanup):
            print("Keys whose expiry timers are deleted are never deleted from Seam.")
        if names.fence in found:
            print(
                f"The revokes remembered in {names.fence} are forgotten: a grant retried or "
                "replayed later would no longer be refused."
            )
        if not sys.stdin or not sys.stdin.isatty():
            print(
                f"ikw topology: refusing to delete namespace {names.namespace} without "
                "confirmation: stdin is not a terminal; pass --yes to confirm. "
                "Nothing was changed.",
                file=sys.stderr,
            )
            return FAILED
        print(f"type the namespace ({names.namespace}) to delete it: ", end="", flush=True)
        if (await answer()).strip() != names.namespace:
            print("not confirmed; nothing was changed")
            return FAILED
    channel = await connection.channel()
    await topology.delete(channel, names, args.producer)
    await channel.close()
    if not found:
        print(f"namespace {names.namespace} had no queues; deleted its exchanges, if any")
        return OK
    lost = f", with {held} messages" if held else ""
    print(f"deleted the topology of namespace {names.namespace} ({len(found)} queues{lost})")
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


if __name__ == "__main__":
    sys.exit(main())
