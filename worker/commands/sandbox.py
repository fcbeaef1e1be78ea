"""`ikw sandbox`: serve the Seam, Twilio and SMTP stand-ins and their outbox."""

import argparse
import re
import textwrap
from typing import NamedTuple

from worker.commands import OK, Failed, Subcommands, command, need_the_sandbox


class Failure(NamedTuple):
    """Failures on demand, as ``ikw sandbox --fail`` and ``POST /fail`` take them:
    ``SERVICE=CODE[:COUNT][@TARGET]``."""

    service: str  # seam, twilio or smtp
    code: int  # seam: the HTTP status; twilio: Twilio's error code; smtp: the reply code
    times: int
    target: str | None  # seam: the path (/instant_keys/list); twilio: the To number

    @classmethod
    def parse(cls, text: str) -> "Failure":
        """ValueError, saying what is expected, when ``text`` is not one."""
        found = _FAILURE.fullmatch(text.strip())
        if found is None:
            raise ValueError(f"not SERVICE=CODE[:COUNT][@TARGET]: {text[:60]!r}; {FAILURE_HELP}")
        service, code, count, target = found.groups()
        failure = cls(service, int(code), int(count or 1), target)
        low, high = (10000, 99999) if service == "twilio" else (400, 599)
        if not low <= failure.code <= high or failure.times < 1:
            raise ValueError(f"{service}: a code from {low} to {high}, a count from 1: {text!r}")
        if target and service == "smtp":
            raise ValueError("smtp takes no @TARGET")
        return failure


_FAILURE = re.compile(r"(seam|twilio|smtp)=(\d{3,5})(?::(\d{1,6}))?(?:@(\S{1,200}))?")
FAILURE_HELP = (
    "e.g. seam=503:3 (the next 3 Seam calls answer 503), seam=429@/instant_keys/list, "
    "twilio=21610:2@+14155550100 (Twilio's error 21610 for that number), smtp=451"
)


def add_parser(commands: Subcommands) -> None:
    sandbox = command(
        commands,
        "sandbox",
        "serve the Seam, Twilio and SMTP stand-ins and their outbox (a page of every SMS and "
        "email they accept), print their env, then every SMS and email in full as it arrives, "
        "links included; until SIGTERM or SIGINT (exit 0)",
        epilog="ports: Seam 8701, Twilio 8702, SMTP 8725, the outbox 8703; a port of 0 picks\n"
        "a free one; the banner names the ports in use.\n\n"
        "failures on demand: --fail at start, or at any time\n"
        "  curl -d seam=503:3 http://127.0.0.1:8703/fail\n"
        + textwrap.fill(f"SERVICE=CODE[:COUNT][@TARGET], {FAILURE_HELP}.", 79),
    )
    sandbox.add_argument("--host", default="127.0.0.1")
    for name, port, what in (
        ("seam", 8701, "the Seam API"),
        ("twilio", 8702, "the Twilio API"),
        ("smtp", 8725, "the SMTP server"),
        ("outbox", 8703, "the outbox page"),
    ):
        sandbox.add_argument(
            f"--{name}-port", type=_port, default=port, metavar="PORT", help=f"{what} ({port})"
        )
    sandbox.add_argument("--key-lifetime", type=float, default=48 * 3600, help="seconds")
    sandbox.add_argument(
        "--outcomes",
        action="store_true",
        help="also list the deliveries scheduled for stays, from the outcome events of "
        "IKW_NAMESPACE on AMQP_URL (once `ikw topology` has declared it)",
    )
    sandbox.add_argument(
        "--fail",
        action="append",
        default=[],
        type=_failure,
        metavar="SERVICE=CODE[:COUNT][@TARGET]",
        help="fail the next calls to a stand-in; repeat for more",
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 0 to 65535, got {text!r}")
    return port


def _failure(text: str) -> Failure:
    try:
        return Failure.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def run(args: argparse.Namespace) -> int:
    need_the_sandbox()
    from worker import config
    from worker.queues import Names
    from worker.sandbox.all import serve_forever

    outcomes = None
    if args.outcomes:
        broker = config.broker_settings()
        outcomes = (broker.amqp_url, Names(broker.namespace))

    try:
        await serve_forever(
            args.host,
            args.seam_port,
            args.twilio_port,
            args.smtp_port,
            args.key_lifetime,
            args.outbox_port,
            args.fail,
            outcomes,
        )
    except OSError as exc:  # a port in use, a host that is not ours
        raise Failed(f"sandbox: cannot listen on {args.host}: {exc.strerror or exc}") from None
    return OK
