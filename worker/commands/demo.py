"""`ikw demo`: the whole job once, against the local stand-ins, in a namespace of its own."""

import argparse

from worker.commands import Subcommands, command, need_the_sandbox


def add_parser(commands: Subcommands) -> None:
    demo = command(
        commands,
        "demo",
        "the whole job once, against the local stand-ins, in a namespace of its own that is "
        "deleted at the end (also on Ctrl-C or SIGTERM); reads AMQP_URL",
    )
    demo.add_argument("--key-lifetime", type=float, default=6.0, help="seconds (default 6)")


async def run(args: argparse.Namespace) -> int:
    need_the_sandbox()
    from worker.demo import demo

    return await demo(args.key_lifetime)
