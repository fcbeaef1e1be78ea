"""What the guest reads: locale fallback, the expiry time, escaping, the operator's templates."""

import unicodedata
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests import builders
from worker import config
from worker.channels import CHANNELS
from worker.channels.templates import (
    MAX_SMS_SEGMENTS,
    PARTS,
    SHIPPED,
    TemplateProblem,
    Templates,
    render_email,
    render_sms,
    shipped,
    sms_cost,
    sms_encoding,
    sms_segments,
)
from worker.errors import InvalidEvent
from worker.events import AccessGranted, parse
from worker.ports import KeyMessage
from worker.service import build_channels, load_templates

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
    assert shipped().resolve(locale) == expected


def test_sms_in_the_guest_language_with_link_name_and_expiry() -> None:
    assert render_sms(MESSAGE) == (
        f"Hi Ada Lovelace, here is your key: {URL} It works until Nov 26, 2026, 2:00 PM UTC."
    )
    french = render_sms(replace(MESSAGE, locale="fr"))
    assert french.startswith("Bonjour Ada Lovelace, voici votre clé")
    assert URL in french.split()
    assert "26 nov. 2026, 14:00 TU" in french


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


def valid_until(moment: datetime, locale: str = "en", time_zone: str | None = None) -> str:
    return shipped().values(replace(MESSAGE, expires_at=moment, locale=locale,
                                    time_zone=time_zone))["valid_until"]  # fmt: skip


@pytest.mark.parametrize(
    ("moment", "locale", "expected"),
    [
        (datetime(2026, 11, 26, 14, 0, tzinfo=UTC), "en", "Nov 26, 2026, 2:00 PM UTC"),
        (datetime(2026, 1, 2, 3, 4, tzinfo=UTC), "en", "Jan 2, 2026, 3:04 AM UTC"),
        # another offset is converted to the zone (UTC without one)
        (datetime(2026, 11, 26, 15, 30, tzinfo=timezone(timedelta(hours=1))), "en",
         "Nov 26, 2026, 2:30 PM UTC"),
        (datetime(2026, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=5))), "en",
         "Dec 31, 2025, 7:30 PM UTC"),
        # a naive datetime is taken as UTC
        (datetime(2026, 11, 26, 14, 0), "en", "Nov 26, 2026, 2:00 PM UTC"),
        (datetime(2026, 2, 26, 14, 0, tzinfo=UTC), "fr", "26 févr. 2026, 14:00 TU"),
        (datetime(2026, 3, 26, 14, 0, tzinfo=UTC), "de-CH", "26.03.2026, 14:00 UTC"),
        (datetime(2026, 8, 26, 14, 0, tzinfo=UTC), "es", "26 ago 2026, 14:00 UTC"),
        (datetime(2026, 1, 26, 14, 0, tzinfo=UTC), "de-AT", "26.01.2026, 14:00 UTC"),
    ],
)  # fmt: skip
def test_expiry_is_written_by_babel_for_the_locale(
    moment: datetime, locale: str, expected: str
) -> None:
    assert valid_until(moment, locale) == expected


@pytest.mark.parametrize(
    ("locale", "time_zone", "expected"),
    [
        ("fr", "Europe/Paris", "29 nov. 2026, 00:30 UTC+01:00"),
        ("en", "America/New_York", "Nov 28, 2026, 6:30 PM EST"),
        ("en-GB", "Europe/London", "28 Nov 2026, 23:30 GMT"),
        ("de", "Europe/Berlin", "29.11.2026, 00:30 MEZ"),
        ("es", "Europe/Madrid", "29 nov 2026, 0:30 CET"),
        ("en", "Asia/Kolkata", "Nov 29, 2026, 5:00 AM GMT+05:30"),
        # fr-CA: the fr words, the date as Canadians write it
        ("fr-CA", "America/Toronto", "28 nov. 2026, 18 h 30 HNE"),
        # a locale Babel does not know: its language's
        ("fr-XX", "Europe/Paris", "29 nov. 2026, 00:30 UTC+01:00"),
        # a language without templates reads English, dates included
        ("ja", "Asia/Tokyo", "Nov 29, 2026, 8:30 AM GMT+09:00"),
    ],
)
def test_expiry_in_the_property_time_zone(locale: str, time_zone: str, expected: str) -> None:
    moment = datetime(2026, 11, 28, 23, 30, tzinfo=UTC)
    shown = valid_until(moment, locale, time_zone)
    assert shown == expected
    assert shown.isascii() or locale not in ("en", "en-GB")  # no narrow no-break spaces


def test_the_event_time_zone_wins_over_the_setting() -> None:
    paris = Templates(time_zone="Europe/Paris")
    moment = replace(MESSAGE, expires_at=datetime(2026, 11, 28, 23, 30, tzinfo=UTC), locale="fr")
    assert "29 nov. 2026, 00:30" in paris.sms(moment)
    assert "28 nov. 2026, 18:30" in paris.sms(replace(moment, time_zone="America/New_York"))
    assert paris.values(moment)["time_zone"] == "Europe/Paris"
    with pytest.raises(ValueError, match="IANA"):
        Templates(time_zone="Mars/Olympus_Mons")


def test_email_subject_text_and_html() -> None:
    subject, text, html = render_email(MESSAGE)

    assert subject == "Your digital key"
    assert text.startswith("Hi Ada Lovelace,\n")
    assert f"\n{URL}\n" in text
    assert "Nov 26, 2026, 2:00 PM UTC" in text
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
    assert 'href="https://ik.example.com/k/&#34;&gt;&lt;img src=x&gt;"' in html


def test_html_escapes_an_apostrophe_in_a_name() -> None:
    _, text, html = render_email(replace(MESSAGE, full_name="Jean-Luc O'Brien"))
    assert text.startswith("Hi Jean-Luc O'Brien,\n")
    assert "<p>Hi Jean-Luc O&#39;Brien,</p>" in html


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
    with_long = f"Hi {long}, here is your key: {url} It works until Nov 26, 2026, 2:00 PM UTC."
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


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo"])
@pytest.mark.parametrize("locale", ["en", "fr", "es", "de", "fr-CA", "de-AT"])
def test_every_shipped_sms_is_one_gsm7_segment_with_typical_values(zone: str, locale: str) -> None:
    typical = KeyMessage(
        full_name="Maria Garcia",
        phone_number="+14155550100",
        email_address=None,
        locale=locale,
        expires_at=datetime(2026, 12, 12, 11, 0, tzinfo=UTC),
        url="https://ik.seam.co/" + "k7Hq2sVb9TzXw4RmPn8dLa",  # as long as the stand-in's
        time_zone=zone,
        property_name="Harbor Hotel",
    )
    sms = render_sms(typical)
    assert "Maria Garcia" in sms and "Harbor Hotel" in sms
    assert (sms_encoding(sms), sms_segments(sms)) == ("GSM-7", 1), sms


def test_the_shipped_words_cost_nothing_to_warn_about() -> None:
    assert sms_cost(Templates()) == []
    assert sms_cost(Templates(time_zone="Europe/Paris", property_name="Harbor Hotel")) == []


def test_a_property_name_outside_gsm7_is_named_as_the_cause() -> None:
    lines = sms_cost(Templates(property_name="Hôtel Bellevue"))
    assert len(lines) == 4  # every shipped SMS names the property
    assert lines[3].startswith("fr/sms.txt: 3 segments, UCS-2 ('ô' U+00F4 from IKW_PROPERTY_NAME)")
    assert lines[3].endswith(", 151 characters with a typical name, link and date")


def test_words_outside_gsm7_or_past_one_segment_are_told_per_template(tmp_path: Path) -> None:
    (tmp_path / "es").mkdir()
    (tmp_path / "es" / "sms.txt").write_text("Aquí: {{ link }} {{ valid_until }}")
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "sms.txt").write_text("Welcome! " * 16 + "{{ link }}")
    assert sms_cost(Templates(tmp_path)) == [
        "en/sms.txt: 2 segments, GSM-7, 185 characters with a typical name, link and date",
        "es/sms.txt: 1 segment, UCS-2 ('í' U+00ED), 70 characters with a typical name, link and "
        "date",
    ]


def test_the_worker_warns_at_start_when_an_sms_costs_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    twilio = {"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": "t"}
    twilio |= {"TWILIO_FROM": "+15005550006"}
    with caplog.at_level("WARNING", logger="worker.service"):
        build_channels(config.load(BASE_ENV | twilio | {"IKW_PROPERTY_NAME": "Hôtel Bellevue"}))
    warned = [r.getMessage() for r in caplog.records if r.name == "worker.service"]
    assert len(warned) == 4
    assert warned[3].startswith("SMS over one GSM-7 segment: fr/sms.txt: 3 segments, UCS-2 ('ô'")

    caplog.clear()
    with caplog.at_level("WARNING", logger="worker.service"):
        build_channels(config.load(BASE_ENV | twilio))  # the shipped words: nothing to say
        build_channels(config.load(BASE_ENV | {"IKW_PROPERTY_NAME": "Hôtel"}))  # no SMS channel
    assert caplog.records == []


def test_sms_encoding() -> None:
    assert sms_encoding("Hi Ada, voilà: café €") == "GSM-7"
    assert sms_encoding("Aquí tiene su llave") == "UCS-2"


# -- the operator's templates ------------------------------------------------------------------


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_custom_file_overrides_its_shipped_one_only(tmp_path: Path) -> None:
    custom = Templates(
        write(tmp_path, {"en/sms.txt": "{{ property_name }}: your key {{ link }}\n"}),
        property_name="Hotel Bellevue",
    )
    assert custom.sms(MESSAGE) == f"Hotel Bellevue: your key {URL}"
    assert custom.email(MESSAGE) == Templates(property_name="Hotel Bellevue").email(MESSAGE)
    assert custom.sms(replace(MESSAGE, locale="fr")).startswith("Bonjour Ada Lovelace")
    assert custom.parts["en", "sms.txt"].origin == "custom"
    assert custom.parts["en", "email.txt"].origin == "shipped"


def test_a_new_locale_directory_is_used_with_its_dates(tmp_path: Path) -> None:
    parts = {
        "pt-BR/sms.txt": "Olá{% if guest_name %} {{ guest_name }}{% endif %}: {{ link }} "
        "até {{ valid_until }}",
        "pt-BR/email_subject.txt": "Sua chave",
        "pt-BR/email.txt": "{{ link }} até {{ valid_until }}\n",
        "pt-BR/email.html": '<html lang="{{ locale }}"><a href="{{ link }}">abrir</a></html>\n',
    }
    templates = Templates(write(tmp_path, parts), time_zone="America/Sao_Paulo")
    message = replace(
        MESSAGE, locale="pt_BR", expires_at=datetime(2026, 11, 28, 23, 30, tzinfo=UTC)
    )
    assert templates.sms(message) == f"Olá Ada Lovelace: {URL} até 28 de nov. de 2026 20:30 BRT"
    assert templates.email(message)[2].startswith('<html lang="pt-BR">')
    assert templates.resolve("pt-PT") == "en"  # only pt-BR has words


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({"fr/sms.txt": "Bonjour {{ guset_name }} {{ link }}"},
         "fr/sms.txt: 'guset_name' is undefined"),
        # an unknown name inside a branch the samples would not take is refused too
        ({"en/email.txt": "{% if guest_name == 'x' %}{{ nope }}{% endif %}{{ link }}"},
         "en/email.txt: 'nope' is undefined"),
        ({"de/email.html": "<p>{{ link }</p>"}, "de/email.html: line 1: unexpected '}'"),
        ({"es/email_subject.txt": "{% if property_name %}x"},
         "es/email_subject.txt: line 1: Unexpected end of template."),
        ({"en/sms.txt": "Your key is ready"}, "en/sms.txt: never shows {{ link }}"),
        ({"en/sms.txt": "{{ link }} {{ link.__class__.__mro__ }}"},
         "en/sms.txt: access to attribute '__class__' of 'str' object is unsafe."),
        ({"en/sms.txt": "{{ link }} {{ valid_until | nosuchfilter }}"},
         "en/sms.txt: line 1: No filter named 'nosuchfilter'."),
        ({"it/sms.txt": "Ciao {{ link }}"}, "it/email_subject.txt: missing"),
    ],
)  # fmt: skip
def test_a_broken_template_is_refused_naming_its_file(
    tmp_path: Path, files: dict[str, str], problem: str
) -> None:
    with pytest.raises(TemplateProblem) as raised:
        Templates(write(tmp_path, files))
    assert any(line.startswith(problem) for line in raised.value.problems), raised.value.problems
    assert all("\n" not in line for line in raised.value.problems)


def test_the_html_part_escapes_every_variable() -> None:
    templates = Templates(property_name='Bellevue <script>alert("x")</script> & Spa')
    link = "https://ik.example.com/k/ik_1?a=1&b=\"2\"&c='3'><img src=x>"
    subject, text, html = templates.email(replace(MESSAGE, url=link))

    assert "<script>" not in html and "<img" not in html
    assert "Bellevue &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; Spa" in html
    assert 'href="https://ik.example.com/k/ik_1?a=1&amp;b=&#34;2&#34;&amp;c=&#39;3&#39;&gt;' in html
    # plain text and the subject are not HTML: they read as written
    assert link in text.split("\n")
    assert subject == 'Your digital key for Bellevue <script>alert("x")</script> & Spa'


def test_the_property_name_from_the_event_wins_and_is_cleaned() -> None:
    templates = Templates(property_name="Default Inn")
    assert "key for Default Inn:" in templates.sms(MESSAGE)
    hostile = replace(MESSAGE, property_name="Hôtel\u202e du\r\n\tLac\x1b\u200b 5\u2605")
    assert "key for Hôtel du Lac 5\u2605:" in templates.sms(hostile)
    # nothing visible left: the setting's
    assert "key for Default Inn:" in templates.sms(replace(MESSAGE, property_name="\u200b\x00 "))
    subject = templates.email(replace(MESSAGE, property_name="A\r\nBcc: x@evil.example"))[0]
    assert "\n" not in subject and "\r" not in subject


def test_the_name_rule_holds_with_a_property_name() -> None:
    templates = Templates(property_name="The Grand Budapest Hotel and Spa of Nebelsbad")
    url = "https://ik.example.com/k/" + "x" * 55
    sms = templates.sms(replace(MESSAGE, url=url, full_name="山" * 64))
    assert sms.startswith("Hello, here is your key for The Grand Budapest")
    assert sms_segments(sms) <= MAX_SMS_SEGMENTS


def test_the_shipped_set_is_complete() -> None:
    templates = Templates()
    assert sorted(templates.locales) == ["de", "en", "es", "fr"]
    assert all(part.origin == "shipped" for part in templates.parts.values())
    assert len(templates.parts) == 16
    assert sorted(p.name for p in SHIPPED.iterdir()) == ["de", "en", "es", "fr"]


# -- settings and the event ----------------------------------------------------------------------

BASE_ENV = {"SEAM_API_KEY": "k", "SMTP_HOST": "127.0.0.1", "EMAIL_FROM": "keys@example.com"}


def test_settings_default_to_the_shipped_words_in_utc() -> None:
    settings = config.load(BASE_ENV)
    assert (settings.templates_dir, settings.time_zone, settings.property_name) == (
        None,
        "UTC",
        None,
    )


def test_settings_read_the_templates_time_zone_and_property(tmp_path: Path) -> None:
    write(tmp_path, {"en/sms.txt": "{{ link }}"})
    settings = config.load(
        BASE_ENV
        | {
            "IKW_TEMPLATES_DIR": str(tmp_path),
            "IKW_TIME_ZONE": "Europe/Paris",
            "IKW_PROPERTY_NAME": "  Hôtel\u200b du Lac ",
        }
    )
    assert settings.templates_dir == tmp_path
    assert settings.time_zone == "Europe/Paris"
    assert settings.property_name == "Hôtel du Lac"


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"IKW_TIME_ZONE": "Europe/Pariss"}, "IKW_TIME_ZONE: 'Europe/Pariss': not a time zone"),
        ({"IKW_TIME_ZONE": "+01:00"}, "IKW_TIME_ZONE: '+01:00': must be an IANA time zone name"),
        ({"IKW_PROPERTY_NAME": "x" * 81}, "IKW_PROPERTY_NAME: must be 1 to 80 visible characters"),
        ({"IKW_PROPERTY_NAME": "Inn +1 415 555 0100"}, "IKW_PROPERTY_NAME: must be 1 to 80"),
        ({"IKW_TEMPLATES_DIR": "/nonexistent/ikw"}, "IKW_TEMPLATES_DIR: /nonexistent/ikw is not a"),
    ],
)
def test_a_bad_setting_is_one_line(env: dict[str, str], line: str) -> None:
    with pytest.raises(config.ConfigError) as raised:
        config.load(BASE_ENV | env)
    [problem] = str(raised.value).splitlines()
    assert problem.startswith(line)


def test_a_broken_template_refuses_the_configuration_naming_the_file(tmp_path: Path) -> None:
    write(tmp_path, {"fr/sms.txt": "Bonjour {{ guset_name }} {{ link }}"})
    with pytest.raises(config.ConfigError) as raised:
        config.load(BASE_ENV | {"IKW_TEMPLATES_DIR": str(tmp_path)})
    assert str(raised.value) == "IKW_TEMPLATES_DIR: fr/sms.txt: 'guset_name' is undefined"


def grant_with(**delivery: object) -> bytes:
    event = builders.grant()
    event["delivery"].update(delivery)
    return builders.body(event)


def test_the_event_may_carry_a_time_zone_and_a_property_name() -> None:
    event = parse(grant_with(time_zone="Europe/Paris", property_name="Hôtel"), "application/json")
    assert isinstance(event, AccessGranted)
    assert (event.delivery.time_zone, event.delivery.property_name) == ("Europe/Paris", "Hôtel")
    event = parse(grant_with(), "application/json")
    assert isinstance(event, AccessGranted)
    assert (event.delivery.time_zone, event.delivery.property_name) == (None, None)


@pytest.mark.parametrize(
    "delivery",
    [
        {"time_zone": "Europe/Pariss"},
        {"time_zone": "../../etc/passwd"},
        {"time_zone": "+14155550100"},
        {"time_zone": ""},
        {"time_zone": 1},
        {"property_name": "x" * 81},
    ],
)
def test_a_bad_time_zone_or_property_name_is_an_invalid_event(delivery: dict[str, object]) -> None:
    with pytest.raises(InvalidEvent) as raised:
        parse(grant_with(**delivery), "application/json")
    assert raised.value.reason == "invalid_event"
    assert "14155550100" not in str(raised.value) and "etc/passwd" not in str(raised.value)


def test_the_template_files_are_the_channels_own() -> None:
    """A locale needs the files its channels name in their wiring, no more."""
    assert set(PARTS) == {name for wiring in CHANNELS for name in wiring.templates}
    assert len(PARTS) == sum(len(wiring.templates) for wiring in CHANNELS)


def test_the_worker_compiles_the_templates_once() -> None:
    """config.load checks them by compiling them; the channels get that very set."""
    settings = config.load(BASE_ENV)
    assert settings.templates is not None
    assert load_templates(settings) is settings.templates
    assert replace(settings, time_zone="Europe/Paris").templates is None  # a copy compiles anew
