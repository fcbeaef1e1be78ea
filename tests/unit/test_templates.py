"""What the guest reads: locale fallback, the expiry time, escaping."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.channels.templates import format_expiry, language, render_email, render_sms
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


def test_html_escapes_the_name_and_the_link() -> None:
    hostile = replace(
        MESSAGE,
        full_name='<script>alert("x")</script> & Bob',
        url='https://ik.example.com/k/"><img src=x>',
    )
    _, text, html = render_email(hostile)

    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; Bob" in html
    assert 'href="https://ik.example.com/k/&quot;&gt;&lt;img src=x&gt;"' in html
    # the plain-text part shows them as they are
    assert '<script>alert("x")</script> & Bob' in text
