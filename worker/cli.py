"""The `ikw` command: run, demo, sandbox, publish, topology, status, activity, schema, dlq,
templates."""

import argparse
import asyncio
import inspect
import io
import os
import signal
import sys
from collections.abc import Awaitable
from importlib import metadata
from typing import Protocol, TextIO, cast

import aiormq

from worker import config, dlq, template_tools
from worker.broker.connect import BROKER_ERRORS, BadBrokerUrl, BrokerError
from worker.commands import (
    FAILED,
    INTERRUPTED,
    OK,
    TERMINATED,
    USAGE,
    Failed,
    Subcommands,
    activity,
    demo,
    publish,
    run,
    sandbox,
    schema,
    status,
    topology,
)
from worker.errors import InvalidEvent

EXIT_CODES = f"""exit codes:
  {OK}    done
  {FAILED}    the operation failed, or was not confirmed
  {USAGE}    usage or configuration error (command line, environment, AMQP_URL, credentials)
  {INTERRUPTED}  interrupted (Ctrl-C)
  {TERMINATED}  terminated (SIGTERM)"""


class Command(Protocol):
    """A module of worker/commands (or dlq/, template_tools.py): its parser and its run."""

    def add_parser(self, commands: Subcommands) -> None: ...

    def run(self, args: argparse.Namespace) -> int | Awaitable[int]: ...


# By name, in the order of `ikw --help`; adding a command is a module and a line here.
COMMANDS: dict[str, Command] = {
    "run": run,
    "demo": demo,
    "sandbox": sandbox,
    "publish": publish,
    "topology": topology,
    "status": status,
    "activity": activity,
    "schema": schema,
    "dlq": dlq,
    "templates": template_tools,
}


class Terminated(Exception):
    """SIGTERM arrived: the command was cancelled and its cleanups ran."""


def version() -> str:
    try:
        return metadata.version("instant-key-worker")
    except metadata.PackageNotFoundError:
        return "unknown"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="ikw",
        description="instant-key-worker: turns booking events into delivered Seam Instant Keys.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"ikw {version()}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(commands)
    return top


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


async def _dispatch(args: argparse.Namespace) -> int:
    done = COMMANDS[args.command].run(args)
    return await done if inspect.isawaitable(done) else done


if __name__ == "__main__":
    sys.exit(main())
