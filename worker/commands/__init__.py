"""The `ikw` subcommands, one module each with `add_parser(commands)` and `run(args)`; what
they share: the exit codes, `Failed`, and the shape of a subcommand's help."""

import argparse
import re
import textwrap
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

# Exit codes, as documented in README ("Exit codes").
OK = 0
FAILED = 1  # the operation failed or was not confirmed; nothing more was done
USAGE = 2  # fix the command line or the configuration (AMQP_URL, credentials, vhost...)
INTERRUPTED = 130  # Ctrl-C (SIGINT)
TERMINATED = 143  # SIGTERM

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

_RELATIVE = re.compile(r"\+(\d{1,6})([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
MOMENT_HELP = (
    "RFC 3339 with an offset (2026-12-10T15:00:00+01:00, or Z), or from now: +90s, +2m, +4h, +3d"
)


class Failed(Exception):
    """One line for the operator; ``exit_code`` says whose move it is."""

    def __init__(self, message: str, exit_code: int = FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def command(
    commands: Subcommands, name: str, what: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand whose help is `what` and whose description is `what` as a sentence."""
    sub: argparse.ArgumentParser = commands.add_parser(
        name,
        help=what,
        description=textwrap.fill(what[0].upper() + what[1:] + ".", 79),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return sub


def moment(text: str) -> datetime:
    """An argparse type: a moment as MOMENT_HELP says."""
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        amount, unit = relative.groups()
        return datetime.now(UTC).replace(microsecond=0) + timedelta(**{_UNITS[unit]: int(amount)})
    try:
        parsed = datetime.fromisoformat(text.strip().replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text[:40]!r}; give {MOMENT_HELP}") from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} needs an offset or Z, e.g. 2026-11-28T23:30Z"
        )
    return parsed


def need_the_sandbox() -> None:
    """The stand-ins are an extra: the production image has no aiosmtpd."""
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        raise Failed(
            "the stand-ins are not installed: pip install 'instant-key-worker[sandbox]' "
            "(or use the image's sandbox target)",
            USAGE,
        ) from None
