"""`ikw templates check` and `ikw templates preview`: the words before a guest reads them."""

import argparse
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from worker import config
from worker.channels.templates import (
    MAX_SMS_SEGMENTS,
    PARTS,
    SAMPLE_NAME,
    SHIPPED,
    VARIABLES,
    TemplateProblem,
    Templates,
    sample,
    sms_cost,
    sms_encoding,
    sms_segments,
    typical_sms,
)
from worker.commands import MOMENT_HELP, moment
from worker.dates import time_zone

OK, FAILED, USAGE = 0, 1, 2  # as worker.cli's exit codes


def add_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    variables = "\n".join(f"  {name:<14} {meaning}" for name, meaning in VARIABLES.items())
    templates = commands.add_parser(
        "templates",
        help="check or preview the words guests read (SMS, email subject, text and HTML)",
        description="Check or preview the templates of what guests read: "
        f"<locale>/{', '.join(PARTS)}, shipped for en, fr, es, de, overridden file by file "
        "from IKW_TEMPLATES_DIR.",
        epilog=f"template variables:\n{variables}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = templates.add_subparsers(dest="templates_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="load and render every part of every locale with sample data; exit 1 on a problem",
        description="Load DIR over the shipped templates as the worker would, render every "
        "part of every locale with sample data, print where each comes from and the SMS length "
        "in segments and encoding. Exit 1 with one line per problem, naming the file.",
    )
    check.add_argument(
        "dir", nargs="?", type=Path, metavar="DIR", help="default: IKW_TEMPLATES_DIR, else shipped"
    )
    preview = actions.add_parser(
        "preview",
        help="print exactly what a guest would get (reads IKW_TEMPLATES_DIR, IKW_TIME_ZONE, "
        "IKW_PROPERTY_NAME)",
        description="Print what a guest would get, with a sample link: the SMS text, or the "
        "email's subject, plain text and HTML. Reads IKW_TEMPLATES_DIR, IKW_TIME_ZONE and "
        "IKW_PROPERTY_NAME; the options stand for what an event may carry.",
    )
    preview.add_argument("--channel", choices=["sms", "email"], default="email")
    preview.add_argument("--locale", default="en", help="the event's delivery.locale (default en)")
    preview.add_argument(
        "--time-zone", help="the event's delivery.time_zone (default IKW_TIME_ZONE, else UTC)"
    )
    preview.add_argument(
        "--property-name", help="the event's delivery.property_name (default IKW_PROPERTY_NAME)"
    )
    preview.add_argument(
        "--name", default=SAMPLE_NAME, help=f"the guest's full_name (default {SAMPLE_NAME!r})"
    )
    preview.add_argument(
        "--expires-at",
        type=moment,
        help=f"when the key expires: {MOMENT_HELP} (default: 48 hours from now)",
    )
    preview.add_argument(
        "--reason",
        choices=["initial", "renewal", "stay_changed"],
        default="initial",
        help="why it is sent: a stay's renewal has its own words (default initial)",
    )
    preview.add_argument("--dir", type=Path, help="templates directory (default IKW_TEMPLATES_DIR)")


def run(args: argparse.Namespace) -> int:
    if args.templates_command == "check":
        return check(args.dir)
    return preview(args)


def check(directory: Path | None) -> int:
    # The time zone and property name the worker would use; DIR stands for IKW_TEMPLATES_DIR.
    env = {k: v for k, v in os.environ.items() if directory is None or k != "IKW_TEMPLATES_DIR"}
    settings = config.guest_settings(env)
    if directory is None:
        directory = settings.templates_dir
    if directory is not None and not directory.is_dir():
        print(f"ikw: {directory} is not a directory", file=sys.stderr)
        return USAGE
    try:
        templates = Templates(
            directory, time_zone=settings.time_zone, property_name=settings.property_name
        )
    except TemplateProblem as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(
            f"ikw: templates in {directory or SHIPPED}: {count} problem{'s' * (count != 1)}",
            file=sys.stderr,
        )
        return FAILED
    except OSError as exc:
        print(f"ikw: cannot read {directory}: {exc.strerror}", file=sys.stderr)
        return FAILED
    for line in _listing(templates):
        print(line)
    for warning in sms_cost(templates):
        print(f"warning: {warning}", file=sys.stderr)
    custom = sum(part.origin == "custom" for part in templates.parts.values())
    source = templates.directory or "the shipped set"
    print(
        f"templates ok: {len(templates.locales)} locales ({', '.join(sorted(templates.locales))})"
        f", {custom} of {len(templates.parts)} files from {source}"
    )
    return OK


def _listing(templates: Templates) -> list[str]:
    """A line per part: where it comes from and, for the SMS, its length with sample data."""
    width = max(len(part.name) for part in templates.parts.values())
    lines = []
    for (key, name), part in sorted(
        templates.parts.items(), key=lambda item: (item[0][0], PARTS.index(item[0][1]))
    ):
        line = f"{part.name:<{width}}  {part.origin:<7}"
        if name == "sms.txt":
            sms = typical_sms(templates, key)
            segments = sms_segments(sms)
            line += (
                f"  {segments} segment{'s' * (segments != 1)}, {sms_encoding(sms)}, "
                f"{len(sms)} characters with sample data"
            )
            bare = templates.sms(sample(locale=key, full_name=None))
            if sms_segments(bare) > MAX_SMS_SEGMENTS:
                line += f" (over {MAX_SMS_SEGMENTS} segments even without the guest's name)"
        lines.append(line.rstrip())
    return lines


def preview(args: argparse.Namespace) -> int:
    settings = config.guest_settings()
    if args.time_zone is not None:
        try:
            time_zone(args.time_zone)
        except ValueError as exc:
            print(f"ikw: --time-zone {args.time_zone!r}: {exc}", file=sys.stderr)
            return USAGE
    if args.dir is not None and not args.dir.is_dir():
        print(f"ikw: {args.dir} is not a directory", file=sys.stderr)
        return USAGE
    try:
        templates = (  # compiled by guest_settings(), unless --dir names others
            Templates(args.dir, time_zone=settings.time_zone, property_name=settings.property_name)
            if args.dir is not None or settings.templates is None
            else settings.templates
        )
    except TemplateProblem as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print("ikw: the templates have problems; see `ikw templates check`", file=sys.stderr)
        return FAILED
    expires_at = args.expires_at or (
        datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=48)
    )
    message = sample(
        locale=args.locale,
        full_name=args.name or None,
        time_zone=args.time_zone,
        property_name=args.property_name,
        expires_at=expires_at,
        reason=args.reason,
    )
    if args.channel == "sms":
        sms = templates.sms(message)
        print(sms)
        segments = sms_segments(sms)
        print(
            f"({segments} segment{'s' * (segments != 1)}, {sms_encoding(sms)}, "
            f"{len(sms)} characters)",
            file=sys.stderr,
        )
        return OK
    subject, text, html = templates.email(message)
    print(f"Subject: {subject}")
    print("----- text/plain -----")
    print(text, end="" if text.endswith("\n") else "\n")
    print("----- text/html -----")
    print(html, end="" if html.endswith("\n") else "\n")
    return OK
