"""`ikw run`: the worker, configured from the environment, until SIGTERM or SIGINT."""

import argparse
import asyncio
import logging
import os

from opentelemetry import trace

from worker import config, logs, tracing
from worker.commands import OK, USAGE, Failed, Subcommands, command


def epilog() -> str:
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


def add_parser(commands: Subcommands) -> None:
    command(
        commands,
        "run",
        "run the worker, configured from the environment, until SIGTERM or SIGINT",
        epilog=epilog(),
    )


async def run(args: argparse.Namespace) -> int:
    from worker.service import Service, StartError

    settings = config.load()  # a ConfigError is printed, not logged
    provider = tracing.setup()  # None unless OTEL_* ask for tracing
    logs.setup(settings.log_level, settings.log_format)
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
