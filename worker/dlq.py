"""`ikw dlq`: list, show, replay and purge dead letters."""

import argparse


def add_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    commands.add_parser("dlq", help="inspect, replay and purge dead letters")


async def run(args: argparse.Namespace) -> int:
    return 0
