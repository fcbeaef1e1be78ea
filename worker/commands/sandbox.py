"""`ikw sandbox`: serve the Seam, Twilio and SMTP stand-ins and their outbox."""

import argparse

from worker.commands import OK, Failed, Subcommands, command, need_the_sandbox


def add_parser(commands: Subcommands) -> None:
    sandbox = command(
        commands,
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


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 0 to 65535, got {text!r}")
    return port


async def run(args: argparse.Namespace) -> int:
    need_the_sandbox()
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
