"""What the guest reads: the SMS text and the email (subject, text, HTML), one set per locale.

The words are Jinja2 templates the operator owns: ``<locale>/sms.txt``, ``email_subject.txt``,
``email.txt`` and ``email.html``, shipped in ``worker/templates/`` (en, fr, es, de) and overridden
file by file from ``IKW_TEMPLATES_DIR`` (a file missing there is the shipped one; a new locale
directory needs all four). They render in Jinja2's immutable sandbox with ``StrictUndefined``;
``.html`` is autoescaped. Every template is checked when it is loaded (at start): a syntax error,
a variable not in ``VARIABLES``, a part that fails to render with sample data or leaves out the
link is one line naming the file.

A guest's locale picks the templates by itself, then its language (``fr-CA`` → ``fr``), then
``en``; the date is written by Babel for the guest's locale when it shares the templates'
language (``fr-CA`` reads Canadian French dates in the ``fr`` words), else for the templates'.
The guest's name appears only as ``clean_name`` leaves it, and an SMS that the name would make
longer than ``MAX_SMS_SEGMENTS`` is sent without it.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from babel import Locale
from jinja2 import (
    BaseLoader,
    ChoiceLoader,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    UndefinedError,
    meta,
    select_autoescape,
)
from jinja2.sandbox import ImmutableSandboxedEnvironment

from worker import dates
from worker.errors import Transient
from worker.guest_name import clean_name, clean_property_name
from worker.ports import KeyMessage

MAX_SMS_SEGMENTS = 3
PARTS = ("sms.txt", "email_subject.txt", "email.txt", "email.html")
# What a template may use; `ikw templates check` and the start refuse any other name.
VARIABLES: Mapping[str, str] = {
    "guest_name": "the guest's cleaned name; empty when unusable (greet with {% if guest_name %})",
    "link": "the Instant Key link",
    "valid_until": "when the key stops working, in the property's time zone, for the locale",
    "property_name": "the property's name; empty when neither the event nor the setting has one",
    "locale": "the locale the date is written for, as a BCP 47 tag (fr-CA), e.g. for <html lang>",
    "time_zone": "the IANA name of the time zone valid_until is in (Europe/Paris)",
    "reason": "why it is sent: initial, renewal (a stay's new key before the old one expires) "
    "or stay_changed (the booking moved or the contact changed)",
}
REASONS = ("initial", "renewal", "stay_changed")
SHIPPED = Path(__file__).resolve().parent.parent / "templates"
FALLBACK = "en"
_LOCALE_DIR = re.compile(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*")

# What `check` renders with, and `ikw templates preview` shows unless told otherwise.
SAMPLE_NAME = "Ada Lovelace"
SAMPLE_PROPERTY = "Hotel Bellevue"
SAMPLE_LINK = "https://ik.seam.co/k7Hq2sVb9TzXw4RmPn8dLa"
SAMPLE_EXPIRY = datetime(2026, 11, 28, 23, 30, tzinfo=UTC)

# GSM 03.38: the default alphabet (one septet each) and its extension table (two septets each).
_GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENSION = frozenset("\f^{}\\[~]|€")


class TemplateProblem(Exception):
    """Templates that cannot be used: one line per problem, each naming its file."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Part:
    """One template file as loaded: ``origin`` is ``custom`` (from the directory) or ``shipped``."""

    name: str  # <locale dir>/<part>
    origin: Literal["custom", "shipped"]


def sms_encoding(text: str) -> Literal["GSM-7", "UCS-2"]:
    """GSM-7 when every character is in the GSM alphabet (or its extension), else UCS-2."""
    return "GSM-7" if not_gsm(text) is None else "UCS-2"


def not_gsm(text: str) -> str | None:
    """The first character of ``text`` outside the GSM alphabet (it makes the SMS UCS-2)."""
    return next((c for c in text if c not in _GSM_BASIC and c not in _GSM_EXTENSION), None)


def sms_segments(text: str) -> int:
    """How many SMS segments ``text`` takes: GSM-7 (160 septets, 153 per part of a longer
    message) when every character is in the GSM alphabet, else UCS-2 (70 UTF-16 units, 67)."""
    if sms_encoding(text) == "GSM-7":
        units = len(text) + sum(c in _GSM_EXTENSION for c in text)
        single, part = 160, 153
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, part = 70, 67
    return 1 if units <= single else -(-units // part)


def normalise(tag: str) -> str:
    """``fr_CA`` and ``FR-ca`` both name ``fr-ca``."""
    return tag.strip().lower().replace("_", "-")


class Templates:
    """The loaded, checked templates of the shipped set with ``directory`` over it.

    ``time_zone`` (IANA) and ``property_name`` are the defaults for events that carry none
    (``IKW_TIME_ZONE``, ``IKW_PROPERTY_NAME``). Raises TemplateProblem listing every problem,
    ValueError for an unknown time zone."""

    def __init__(
        self,
        directory: Path | str | None = None,
        *,
        time_zone: str = "UTC",
        property_name: str | None = None,
    ) -> None:
        self.directory = Path(directory) if directory else None
        if self.directory is not None and self.directory.resolve() == SHIPPED:
            self.directory = None  # the shipped set itself, named by its path
        self.zone = dates.time_zone(time_zone)
        self.property_name = clean_property_name(property_name) or ""
        loaders: list[BaseLoader] = [FileSystemLoader(SHIPPED)]
        if self.directory is not None:
            loaders.insert(0, FileSystemLoader(self.directory))
        self._env = ImmutableSandboxedEnvironment(
            loader=ChoiceLoader(loaders),
            autoescape=select_autoescape(("html",), default_for_string=False, default=False),
            undefined=StrictUndefined,
            keep_trailing_newline=True,
            auto_reload=False,
        )
        self.locales: dict[str, str] = {}  # normalised tag -> its directory's name
        self.parts: dict[tuple[str, str], Part] = {}
        self._compiled: dict[tuple[str, str], Template] = {}
        problems = self._load()
        if problems:
            raise TemplateProblem(problems)

    # -- loading and checking --------------------------------------------------------------

    def _load(self) -> list[str]:
        problems: list[str] = []
        if self.directory is not None and not self.directory.is_dir():
            return [f"{self.directory}: not a directory"]
        roots = [root for root in (self.directory, SHIPPED) if root is not None]
        for root in roots:
            for child in sorted(root.iterdir()):
                if child.is_dir() and _LOCALE_DIR.fullmatch(child.name):
                    self.locales.setdefault(normalise(child.name), child.name)
        if FALLBACK not in self.locales:
            problems.append(f"{FALLBACK}/: missing (the locale every other one falls back to)")
        for key, folder in sorted(self.locales.items()):
            for part in PARTS:
                problem = self._compile(key, folder, part)
                if problem:
                    problems.append(problem)
        if not problems:
            problems = self._try_samples()
        return problems

    def _compile(self, key: str, folder: str, part: str) -> str | None:
        name = f"{folder}/{part}"
        custom = self.directory is not None and (self.directory / folder / part).is_file()
        try:
            assert self._env.loader is not None
            template = self._env.get_template(name)
            source = self._env.loader.get_source(self._env, name)[0]
            unknown = sorted(
                meta.find_undeclared_variables(self._env.parse(source, name))
                - VARIABLES.keys()
                - self._env.globals.keys()
            )
        except TemplateNotFound:
            return f"{name}: missing (a locale needs all of {', '.join(PARTS)})"
        except TemplateSyntaxError as exc:
            where = exc.name if exc.name and exc.name != name else ""
            return f"{name}: {where + ': ' if where else ''}line {exc.lineno}: {exc.message}"
        except (TemplateError, OSError, UnicodeDecodeError) as exc:
            return f"{name}: {_describe(exc)}"
        if unknown:
            quoted = " and ".join(f"'{variable}'" for variable in unknown)
            return f"{name}: {quoted} {'is' if len(unknown) == 1 else 'are'} undefined"
        self._compiled[key, part] = template
        self.parts[key, part] = Part(name, "custom" if custom else "shipped")
        return None

    def _try_samples(self) -> list[str]:
        """Render every part with and without a name and a property name; the link must show."""
        problems = []
        for key in sorted(self.locales):
            for name, property_name in ((SAMPLE_NAME, SAMPLE_PROPERTY), ("", "")):
                values = self._values(sample(locale=key, property_name=property_name or None), name)
                values["property_name"] = property_name
                for part in PARTS:
                    problem: str | None = None
                    try:
                        text = self._compiled[key, part].render(values)
                    except Exception as exc:  # any failure, told in one line
                        problem = f"{self.parts[key, part].name}: {_describe(exc)}"
                    else:
                        if part != "email_subject.txt" and SAMPLE_LINK not in text:
                            problem = f"{self.parts[key, part].name}: never shows {{{{ link }}}}"
                    if problem and problem not in problems:
                        problems.append(problem)
        return problems

    # -- rendering --------------------------------------------------------------------------

    def resolve(self, locale: str) -> str:
        """The templates' locale for a guest's: itself, then shorter (``zh-hant-tw`` →
        ``zh-hant`` → ``zh``), then ``en``."""
        tag = normalise(locale)
        while tag:
            if tag in self.locales:
                return tag
            tag = tag.rpartition("-")[0]
        return FALLBACK

    def date_locale(self, locale: str) -> Locale:
        """Babel's locale for the date: the guest's when Babel knows it and it shares the
        templates' language, else the templates' own, else English."""
        key = self.resolve(locale)
        own = dates.babel_locale(key) or Locale("en")
        guest = dates.babel_locale(locale)
        return guest if guest is not None and guest.language == own.language else own

    def values(self, message: KeyMessage) -> dict[str, str]:
        """The variables for ``message``, its name cleaned (empty when unusable)."""
        return self._values(message, clean_name(message.full_name) or "")

    def _values(self, message: KeyMessage, guest_name: str) -> dict[str, str]:
        zone = self._zone(message.time_zone)
        locale = self.date_locale(message.locale)
        return {
            "guest_name": guest_name,
            "link": message.url,
            "valid_until": dates.format_valid_until(message.expires_at, zone, locale),
            "property_name": clean_property_name(message.property_name) or self.property_name,
            "locale": str(locale).replace("_", "-"),
            "time_zone": zone.key,
            "reason": message.reason,
        }

    def _zone(self, name: str | None) -> ZoneInfo:
        if name:
            try:
                return dates.time_zone(name)
            except ValueError:  # checked when the event was parsed; this is a stale message
                pass
        return self.zone

    def _render(self, message: KeyMessage, part: str, values: Mapping[str, str]) -> str:
        key = self.resolve(message.locale)
        try:
            return self._compiled[key, part].render(values)
        except Exception as exc:
            # The class only: an error's text may quote the link.
            raise Transient(
                f"template {self.parts[key, part].name} failed ({type(exc).__name__}); fix it "
                "and the retry will send"
            ) from None

    def sms(self, message: KeyMessage) -> str:
        """The SMS; without the guest's name when the name would take it past
        MAX_SMS_SEGMENTS."""
        values = self.values(message)
        text = self._render(message, "sms.txt", values).strip()
        if values["guest_name"] and sms_segments(text) > MAX_SMS_SEGMENTS:
            values["guest_name"] = ""
            text = self._render(message, "sms.txt", values).strip()
        return text

    def email(self, message: KeyMessage) -> tuple[str, str, str]:
        """(subject on one line, plain text, HTML)."""
        values = self.values(message)
        subject = " ".join(self._render(message, "email_subject.txt", values).split())
        text = self._render(message, "email.txt", values)
        html = self._render(message, "email.html", values)
        return subject, text, html


def sample(
    *,
    locale: str = FALLBACK,
    full_name: str | None = SAMPLE_NAME,
    time_zone: str | None = None,
    property_name: str | None = None,
    expires_at: datetime = SAMPLE_EXPIRY,
    reason: str = "initial",
) -> KeyMessage:
    """A message as a guest would get it, with the sample link."""
    return KeyMessage(
        full_name=full_name,
        phone_number="+14155550100",
        email_address="guest@example.com",
        locale=locale,
        expires_at=expires_at,
        url=SAMPLE_LINK,
        time_zone=time_zone,
        property_name=property_name,
        reason=reason,
    )


def typical_sms(templates: Templates, locale: str) -> str:
    """The SMS of ``locale`` with a typical name, link and date, and the property name the
    worker would use (``IKW_PROPERTY_NAME``, else a typical one)."""
    own = None if templates.property_name else SAMPLE_PROPERTY
    texts = [templates.sms(sample(locale=locale, property_name=own, reason=r)) for r in REASONS]
    return max(texts, key=lambda text: (sms_segments(text), len(text)))  # the costliest


def sms_cost(templates: Templates) -> list[str]:
    """One line per locale whose typical SMS takes more than one segment: its length, its
    encoding and, for UCS-2, the character that made it so (fix the words, or the name)."""
    lines = []
    for key in sorted(templates.locales):
        text = typical_sms(templates, key)
        segments = sms_segments(text)
        if segments == 1 and sms_encoding(text) == "GSM-7":
            continue
        encoding = "GSM-7"
        culprit = not_gsm(text)
        if culprit is not None:
            source = " from IKW_PROPERTY_NAME" if culprit in templates.property_name else ""
            encoding = f"UCS-2 ({culprit!r} U+{ord(culprit):04X}{source})"
        lines.append(
            f"{templates.parts[key, 'sms.txt'].name}: {segments} segment{'s' * (segments != 1)}, "
            f"{encoding}, {len(text)} characters with a typical name, link and date"
        )
    return lines


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UndefinedError | TemplateError):
        return str(exc.message or type(exc).__name__)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@cache
def shipped() -> Templates:
    """The shipped templates, UTC, no property name."""
    return Templates()


def render_sms(message: KeyMessage, templates: Templates | None = None) -> str:
    return (templates or shipped()).sms(message)


def render_email(message: KeyMessage, templates: Templates | None = None) -> tuple[str, str, str]:
    return (templates or shipped()).email(message)
