"""What the guest reads: locale fallback, the expiry time, escaping."""

import unicodedata
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.channels.templates import (
    MAX_SMS_SEGMENTS,
    format_expiry,
    language,
    render_email,
    render_sms,
    sms_segments,
)
from worker.ports import KeyMessage

URL = "https://ik.example.com/k/ik_7Hq2?token=a&v=2"
MESSAGE = KeyMessage(
    full_name="Ada Lovelace",
    phone_number="+14155550100",
    email_address="ada@example.com",
    locale="en",
    expires_at=datetime(2026, 11, 26, 14, 0, tzinfo=UTC),
    url=URL,
)


@pytest.mark.parametrize(
    ("locale", "expected"),
    [
        ("en", "en"),
        ("fr", "fr"),
        ("fr-CA", "fr"),
        ("de_AT", "de"),
        ("ES", "es"),
        ("pt-BR", "en"),
        ("", "en"),
    ],
)
def test_locale_falls_back_to_language_then_english(locale: str, expected: str) -> None:
    assert language(locale) == expected


def test_sms_in_the_guest_language_with_link_name_and_expiry() -> None:
    assert render_sms(MESSAGE) == (
        f"Hi Ada Lovelace, here is your key: {URL} It works until 26 Nov 2026, 14:00 UTC."
    )
    french = render_sms(replace(MESSAGE, locale="fr-CA"))
    assert french.startswith("Bonjour Ada Lovelace, voici votre clé")
    assert URL in french.split()
    assert "26 nov. 2026, 14:00 UTC" in french


def test_unknown_locale_reads_english() -> None:
    assert render_sms(replace(MESSAGE, locale="ja-JP")) == render_sms(MESSAGE)
    assert render_email(replace(MESSAGE, locale="ja-JP")) == render_email(MESSAGE)


def test_english_sms_fits_one_segment() -> None:
    sms = render_sms(MESSAGE)
    assert sms.isascii() and len(sms) <= 160


@pytest.mark.parametrize("name", [None, "", "   "])
def test_neutral_greeting_without_a_name(name: str | None) -> None:
    sms = render_sms(replace(MESSAGE, full_name=name))
    _, text, html = render_email(replace(MESSAGE, full_name=name))
    assert sms.startswith("Hello, here is your key")
    assert text.startswith("Hello,\n")
    assert "<p>Hello,</p>" in html
    assert "None" not in sms + text + html


def test_a_name_cannot_break_the_layout() -> None:
    sms = render_sms(replace(MESSAGE, full_name=" Ada\r\n  Lovelace\t"))
    assert sms.startswith("Hi Ada Lovelace, ")
    assert "\n" not in sms


@pytest.mark.parametrize(
    ("moment", "locale", "expected"),
    [
        (datetime(2026, 11, 26, 14, 0, tzinfo=UTC), "en", "26 Nov 2026, 14:00 UTC"),
        (datetime(2026, 1, 2, 3, 4, tzinfo=UTC), "en", "2 Jan 2026, 03:04 UTC"),
        # another offset is converted to UTC
        (datetime(2026, 11, 26, 15, 30, tzinfo=timezone(timedelta(hours=1))), "en",
         "26 Nov 2026, 14:30 UTC"),
        (datetime(2026, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=5))), "en",
         "31 Dec 2025, 19:30 UTC"),
        # a naive datetime is taken as UTC
        (datetime(2026, 11, 26, 14, 0), "en", "26 Nov 2026, 14:00 UTC"),
        (datetime(2026, 2, 26, 14, 0, tzinfo=UTC), "fr", "26 févr. 2026, 14:00 UTC"),
        (datetime(2026, 3, 26, 14, 0, tzinfo=UTC), "de-CH", "26. März 2026, 14:00 UTC"),
        (datetime(2026, 8, 26, 14, 0, tzinfo=UTC), "es", "26 ago 2026, 14:00 UTC"),
    ],
)  # fmt: skip
def test_expiry_is_readable_and_in_utc(moment: datetime, locale: str, expected: str) -> None:
    assert format_expiry(moment, locale) == expected


def test_email_subject_text_and_html() -> None:
    subject, text, html = render_email(MESSAGE)

    assert subject == "Your digital key"
    assert text.startswith("Hi Ada Lovelace,\n")
    assert f"\n{URL}\n" in text
    assert "26 Nov 2026, 14:00 UTC" in text
    assert '<a href="https://ik.example.com/k/ik_7Hq2?token=a&amp;v=2">Open your key</a>' in html
    assert '<html lang="en">' in html


@pytest.mark.parametrize(
    ("locale", "subject"),
    [
        ("fr-BE", "Votre clé numérique"),
        ("es", "Su llave digital"),
        ("de", "Ihr digitaler Schlüssel"),
    ],
)
def test_email_subject_is_localised(locale: str, subject: str) -> None:
    assert render_email(replace(MESSAGE, locale=locale))[0] == subject


def test_html_escapes_the_link_and_drops_a_name_that_is_markup() -> None:
    hostile = replace(
        MESSAGE,
        full_name='<script>alert("x")</script> & Bob',
        url='https://ik.example.com/k/"><img src=x>',
    )
    _, text, html = render_email(hostile)

    assert "<script>" not in html and "<img" not in html
    assert "script" not in text + html
    assert "<p>Hello,</p>" in html and text.startswith("Hello,\n")
    assert 'href="https://ik.example.com/k/&quot;&gt;&lt;img src=x&gt;"' in html


def test_html_escapes_an_apostrophe_in_a_name() -> None:
    _, text, html = render_email(replace(MESSAGE, full_name="Jean-Luc O'Brien"))
    assert text.startswith("Hi Jean-Luc O'Brien,\n")
    assert "<p>Hi Jean-Luc O&#x27;Brien,</p>" in html


PHISHING = "Ada. Your key has EXPIRED - get a new one at https://evil.example/k"


@pytest.mark.parametrize("locale", ["en", "fr", "es", "de"])
def test_a_name_that_is_a_message_is_left_out(locale: str) -> None:
    message = replace(MESSAGE, full_name=PHISHING, locale=locale)
    sms = render_sms(message)
    subject, text, html = render_email(message)
    hello = render_sms(replace(message, full_name=None))
    assert sms == hello
    for part in (sms, subject, text, html):
        assert "evil" not in part and "EXPIRED" not in part


def test_invisible_and_control_characters_never_reach_the_guest() -> None:
    message = replace(MESSAGE, full_name="\u202eAda\u200b Love\x1b\x07\x00lace\u2066")
    sms = render_sms(message)
    _, text, html = render_email(message)
    assert sms.startswith("Hi Ada Lovelace, ")
    assert text.startswith("Hi Ada Lovelace,\n")
    for part in (sms, text, html):
        assert not any(unicodedata.category(c) in ("Cf", "Co", "Cs", "Cn") for c in part)
        assert not any(unicodedata.category(c) == "Cc" and c != "\n" for c in part)


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("", 1),
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("é" * 160, 1),  # in the GSM alphabet
        ("€" * 80, 1),  # extension table: two septets each
        ("€" * 81, 2),
        ("í" * 70, 1),  # not in GSM-7: UCS-2
        ("í" * 71, 2),
        ("a" * 134 + "í", 3),
        ("🙂" * 35, 1),  # two UTF-16 units each
        ("🙂" * 36, 2),
    ],
)
def test_sms_segments(text: str, segments: int) -> None:
    assert sms_segments(text) == segments


def test_a_name_that_would_make_the_sms_too_long_is_left_out() -> None:
    url = "https://ik.example.com/k/" + "x" * 55
    short = replace(MESSAGE, url=url, full_name="山田 太郎")
    assert render_sms(short).startswith("Hi 山田 太郎, ")
    long = "山" * 64
    with_long = f"Hi {long}, here is your key: {url} It works until 26 Nov 2026, 14:00 UTC."
    assert sms_segments(with_long) > MAX_SMS_SEGMENTS  # UCS-2, past three segments
    sms = render_sms(replace(short, full_name=long))
    assert sms.startswith("Hello, here is your key: ")
    assert sms_segments(sms) <= MAX_SMS_SEGMENTS


@pytest.mark.parametrize("locale", ["en", "fr", "es", "de"])
def test_every_locale_fits_the_segment_limit_with_a_long_name(locale: str) -> None:
    for name in (
        "A" * 64,
        "Ñ" * 64,
        "山" * 64,
        "Анастасия-Мария Константиновна Шереметьева-Голицына",
    ):
        sms = render_sms(replace(MESSAGE, full_name=name, locale=locale))
        assert sms_segments(sms) <= MAX_SMS_SEGMENTS
