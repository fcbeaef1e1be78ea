"""`ikw schema`: write, or check, the JSON Schemas and AsyncAPI document of the events."""

import argparse
from pathlib import Path

from worker.commands import FAILED, OK, Subcommands, command


def add_parser(commands: Subcommands) -> None:
    schema = command(
        commands, "schema", "write the JSON Schemas and AsyncAPI document of the events"
    )
    schema.add_argument("--out", type=Path, default=Path("schemas"))
    schema.add_argument("--check", action="store_true", help="fail when the files are stale")


async def run(args: argparse.Namespace) -> int:
    from worker import contract

    if args.check:
        stale = contract.stale(args.out)
        for name in stale:
            print(f"stale: {args.out / name} (run `make schemas`)")
        return FAILED if stale else OK
    for name in contract.write(args.out):
        print(f"wrote {args.out / name}")
    return OK
