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
        return _check(args.out, contract.stale(args.out), len(contract.render()))
    for name in contract.write(args.out):
        print(f"wrote {args.out / name}")
    return OK


def _check(folder: Path, stale: list[str], count: int) -> int:
    """One line when all is well; else one per file, missing or stale, and how to fix it."""
    fix = f"run `ikw schema --out {folder}`"
    if not folder.is_dir():
        print(f"{folder}/ is missing: {fix}")
        return FAILED
    if not stale:
        print(f"{folder}/ is up to date: {count} files")
        return OK
    for name in stale:
        print(f"{'stale' if (folder / name).exists() else 'missing'}: {folder / name}")
    print(f"{len(stale)} of {count} files to write: {fix}")
    return FAILED
