"""The `ikw` subcommands, one module each with `add_parser(commands)` and `run(args)`; what
they share: the exit codes, `Failed`, and the shape of a subcommand's help."""

import argparse
import textwrap
from typing import TypeAlias

# Exit codes, as documented in README ("Exit codes").
OK = 0
FAILED = 1  # the operation failed or was not confirmed; nothing more was done
USAGE = 2  # fix the command line or the configuration (AMQP_URL, credentials, vhost...)
INTERRUPTED = 130  # Ctrl-C (SIGINT)
TERMINATED = 143  # SIGTERM

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


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
