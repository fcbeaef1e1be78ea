"""IKW_LOG_FORMAT: readable lines at a terminal, JSON elsewhere, the same fields and masks."""

import io
import json
import logging
import re
import sys

import pytest

from worker import config, logs

BASE = {"SEAM_API_KEY": "k", "SMTP_HOST": "localhost", "EMAIL_FROM": "keys@example.com"}
PHONE, EMAIL = "+14155550100", "ada@example.com"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(msg: str, ctx: dict[str, object], exc: BaseException | None = None) -> logging.LogRecord:
    """A line as the worker writes one: ``log.info(msg, extra={"ctx": ctx})``."""
    made = logging.LogRecord("worker.flows", logging.INFO, __file__, 1, msg, None, None)
    made.ctx = ctx
    if exc is not None:
        made.exc_info = (type(exc), exc, None)
    return made


def test_a_text_line_is_time_level_logger_message_then_the_fields() -> None:
    # As worker/flows.py writes "created user identity": the contacts masked by the caller.
    ctx = {
        "event_id": "evt-1",
        "phone": logs.mask_phone(PHONE),
        "email": logs.mask_email(EMAIL),
        "channels": ["email", "sms"],
        "minted": True,
        "ms": 12.5,
        "error": "Seam said: no such key",
    }
    line = logs.TextFormatter().format(record("created user identity", ctx))
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d info    worker\.flows created user identity event_id=evt-1 "
        r'phone=\+1\*{8}00 email=a\*\*\*@example\.com channels=\["email","sms"\] minted=true '
        r'ms=12\.5 error="Seam said: no such key"',
        line,
    ), line
    assert PHONE not in line and EMAIL not in line


def test_text_and_json_show_the_same_fields() -> None:
    failing = record("could not send\nthe SMS", {"to": logs.mask_phone(PHONE)}, KeyError("x"))
    text = logs.TextFormatter().format(failing)
    entry = json.loads(logs.JsonFormatter().format(failing))
    assert "\n" not in text  # one line, whatever the message holds
    assert text.endswith(r"could not send\nthe SMS to=+1********00 exc=KeyError")
    assert {k: entry[k] for k in ("to", "exc")} == {"to": "+1********00", "exc": "KeyError"}


@pytest.mark.parametrize(
    ("log_format", "stream", "kind"),
    [
        ("auto", io.StringIO(), logs.JsonFormatter),  # a pipe, a file, a log collector
        ("auto", Terminal(), logs.TextFormatter),
        ("json", Terminal(), logs.JsonFormatter),
        ("text", io.StringIO(), logs.TextFormatter),
    ],
)
def test_auto_is_text_at_a_terminal_and_json_otherwise(
    log_format: str, stream: io.StringIO, kind: type[logging.Formatter]
) -> None:
    assert type(logs.formatter(log_format, stream)) is kind


def test_setup_looks_at_stderr_where_the_lines_go(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    try:
        logs.setup("info", config.load(BASE).log_format)
        logging.getLogger("worker.service").info("consuming", extra={"ctx": {"queue": "q"}})
    finally:
        root.handlers[:], root.level = handlers, level
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d info    worker\.service consuming queue=q\n", terminal.getvalue()
    )


def test_a_bad_log_format_is_one_line_naming_the_variable() -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(BASE | {"IKW_LOG_FORMAT": "pretty"})
    assert str(caught.value) == "IKW_LOG_FORMAT: must be auto, json or text, got 'pretty'"
