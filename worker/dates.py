"""Dates the guest understands: the property's time zone, the guest's locale, by Babel.

``format_valid_until`` writes a moment as the locale's medium date and short time, joined as the
locale joins them, then the zone's short name (``EST``, ``GMT``, ``MEZ``) or, where the locale
has none, its offset (``UTC+01:00``):

- ``en``, UTC: ``Nov 26, 2026, 2:00 PM UTC``
- ``fr``, Europe/Paris: ``29 nov. 2026, 00:30 UTC+01:00``
- ``de``, Europe/Berlin: ``29.11.2026, 00:30 MEZ``
- ``fr-CA``, America/Toronto: ``28 nov. 2026, 18 h 30 HNE``
"""

import re
import unicodedata
from datetime import UTC, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale, UnknownLocaleError
from babel import dates as babel_dates

_ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*")
MAX_ZONE_LENGTH = 64


def time_zone(name: str) -> ZoneInfo:
    """The IANA zone ``name`` (``Europe/Paris``); ValueError saying why when it is not one."""
    if len(name) > MAX_ZONE_LENGTH or not _ZONE.fullmatch(name):
        raise ValueError("must be an IANA time zone name such as Europe/Paris")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            "not a time zone this system knows; use an IANA name such as Europe/Paris"
        ) from None


@lru_cache(maxsize=512)  # a few locales recur: parsing one costs more than an SMS render
def babel_locale(tag: str) -> Locale | None:
    """The Babel locale for a BCP 47 tag (``fr-CA``, ``pt_BR``), or None when Babel has none."""
    try:
        return Locale.parse(tag.strip().replace("-", "_"))
    except (UnknownLocaleError, ValueError, TypeError):
        return None


def format_valid_until(moment: datetime, zone: ZoneInfo, locale: Locale) -> str:
    """``moment`` (a naive one is UTC) in ``zone``, written for ``locale``."""
    local = (moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment).astimezone(zone)
    date = babel_dates.format_date(local, "medium", locale=locale)
    time = babel_dates.format_time(local, "short", tzinfo=None, locale=locale)
    pattern = str(babel_dates.get_datetime_format("medium", locale=locale))
    when = pattern.replace("'", "").replace("{0}", time).replace("{1}", date)
    # CLDR puts narrow no-break spaces in some times ("2:00\u202fPM"): plain spaces keep an SMS
    # in GSM-7, where one such character would halve what a segment holds.
    return _plain_spaces(f"{when} {zone_name(local, locale)}")


def zone_name(local: datetime, locale: Locale) -> str:
    """The zone's short name in ``locale`` or, without one, its offset (``UTC+01:00``)."""
    name = babel_dates.get_timezone_name(local, "short", locale=locale)
    if name == babel_dates.get_timezone_gmt(local, "short", locale=locale):
        return str(babel_dates.get_timezone_gmt(local, "long", locale=locale))
    return str(name)


def _plain_spaces(text: str) -> str:
    return "".join(" " if unicodedata.category(c) == "Zs" else c for c in text)
