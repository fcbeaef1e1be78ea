"""What the guest reads: the SMS text and the email (subject, text, HTML) per locale.

Unknown locales fall back to their language (``fr-CA`` → ``fr``), then to English. The guest's
name appears only as ``clean_name`` leaves it, and an SMS that the name would make longer than
``MAX_SMS_SEGMENTS`` is sent without it.
"""

import html
from dataclasses import dataclass
from datetime import UTC, datetime

from worker.guest_name import clean_name
from worker.ports import KeyMessage

MAX_SMS_SEGMENTS = 3

# GSM 03.38: the default alphabet (one septet each) and its extension table (two septets each).
_GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENSION = frozenset("\f^{}\\[~]|€")


@dataclass(frozen=True)
class Texts:
    hello_named: str  # {name}
    hello: str
    months: tuple[str, ...]
    sms: str  # {hello} {url} {expiry}
    subject: str
    text: str  # {hello} {url} {expiry}
    html_intro: str
    html_button: str
    html_expiry: str  # {expiry}
    html_warning: str
    date: str = "{day} {month} {year}, {time} UTC"


_EN = Texts(
    hello_named="Hi {name}",
    hello="Hello",
    months=tuple("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()),
    sms="{hello}, here is your key: {url} It works until {expiry}.",
    subject="Your digital key",
    text=(
        "{hello},\n\n"
        "Here is your digital key. Open this link on your phone when you arrive:\n\n"
        "{url}\n\n"
        "It works until {expiry}.\n\n"
        "Please keep this link to yourself: anyone who has it can open the door.\n"
    ),
    html_intro="Here is your digital key. Open this link on your phone when you arrive:",
    html_button="Open your key",
    html_expiry="It works until {expiry}.",
    html_warning="Please keep this link to yourself: anyone who has it can open the door.",
)

TEXTS: dict[str, Texts] = {
    "en": _EN,
    "fr": Texts(
        hello_named="Bonjour {name}",
        hello="Bonjour",
        months=tuple("janv. févr. mars avr. mai juin juil. août sept. oct. nov. déc.".split()),
        sms="{hello}, voici votre clé : {url} Elle est valable jusqu'au {expiry}.",
        subject="Votre clé numérique",
        text=(
            "{hello},\n\n"
            "Voici votre clé numérique. Ouvrez ce lien sur votre téléphone à votre arrivée :\n\n"
            "{url}\n\n"
            "Elle est valable jusqu'au {expiry}.\n\n"
            "Ne partagez pas ce lien : toute personne qui l'a peut ouvrir la porte.\n"
        ),
        html_intro=(
            "Voici votre clé numérique. Ouvrez ce lien sur votre téléphone à votre arrivée :"
        ),
        html_button="Ouvrir votre clé",
        html_expiry="Elle est valable jusqu'au {expiry}.",
        html_warning="Ne partagez pas ce lien : toute personne qui l'a peut ouvrir la porte.",
    ),
    "es": Texts(
        hello_named="Hola, {name}",
        hello="Hola",
        months=tuple("ene feb mar abr may jun jul ago sept oct nov dic".split()),
        sms="{hello}, aquí tiene su llave: {url} Funciona hasta el {expiry}.",
        subject="Su llave digital",
        text=(
            "{hello},\n\n"
            "Aquí tiene su llave digital. Abra este enlace en su teléfono cuando llegue:\n\n"
            "{url}\n\n"
            "Funciona hasta el {expiry}.\n\n"
            "No comparta este enlace: cualquiera que lo tenga puede abrir la puerta.\n"
        ),
        html_intro="Aquí tiene su llave digital. Abra este enlace en su teléfono cuando llegue:",
        html_button="Abrir su llave",
        html_expiry="Funciona hasta el {expiry}.",
        html_warning="No comparta este enlace: cualquiera que lo tenga puede abrir la puerta.",
    ),
    "de": Texts(
        hello_named="Hallo {name}",
        hello="Hallo",
        months=tuple("Jan. Feb. März Apr. Mai Juni Juli Aug. Sept. Okt. Nov. Dez.".split()),
        sms="{hello}, hier ist Ihr Schlüssel: {url} Er gilt bis {expiry}.",
        subject="Ihr digitaler Schlüssel",
        text=(
            "{hello},\n\n"
            "hier ist Ihr digitaler Schlüssel. Öffnen Sie diesen Link bei Ihrer Ankunft auf "
            "Ihrem Telefon:\n\n"
            "{url}\n\n"
            "Er gilt bis {expiry}.\n\n"
            "Bitte geben Sie den Link nicht weiter: Wer ihn hat, kann die Tür öffnen.\n"
        ),
        html_intro=(
            "hier ist Ihr digitaler Schlüssel. Öffnen Sie diesen Link bei Ihrer Ankunft auf "
            "Ihrem Telefon:"
        ),
        html_button="Schlüssel öffnen",
        html_expiry="Er gilt bis {expiry}.",
        html_warning="Bitte geben Sie den Link nicht weiter: Wer ihn hat, kann die Tür öffnen.",
        date="{day}. {month} {year}, {time} UTC",
    ),
}

_HTML = """<!DOCTYPE html>
<html lang="{lang}">
<body>
<p>{hello},</p>
<p>{intro}</p>
<p><a href="{url}">{button}</a></p>
<p>{expiry}</p>
<p>{warning}</p>
</body>
</html>
"""


def language(locale: str) -> str:
    """The supported language for ``locale``: itself, its language part, else ``en``."""
    tag = locale.strip().lower().replace("_", "-")
    if tag in TEXTS:
        return tag
    base = tag.split("-", 1)[0]
    return base if base in TEXTS else "en"


def format_expiry(moment: datetime, locale: str = "en") -> str:
    """``26 Nov 2026, 14:00 UTC``; a naive datetime is taken as UTC."""
    utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    texts = TEXTS[language(locale)]
    month = texts.months[utc.month - 1]
    return texts.date.format(day=utc.day, month=month, year=utc.year, time=f"{utc:%H:%M}")


def sms_segments(text: str) -> int:
    """How many SMS segments ``text`` takes: GSM-7 (160 septets, 153 per part of a longer
    message) when every character is in the GSM alphabet, else UCS-2 (70 UTF-16 units, 67)."""
    if all(c in _GSM_BASIC or c in _GSM_EXTENSION for c in text):
        units = len(text) + sum(c in _GSM_EXTENSION for c in text)
        single, part = 160, 153
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, part = 70, 67
    return 1 if units <= single else -(-units // part)


def render_sms(message: KeyMessage) -> str:
    """The SMS; without the guest's name when the name would take it past MAX_SMS_SEGMENTS."""
    texts = TEXTS[language(message.locale)]
    expiry = format_expiry(message.expires_at, message.locale)
    name = clean_name(message.full_name)
    text = texts.sms.format(hello=_hello(texts, name), url=message.url, expiry=expiry)
    if name is not None and sms_segments(text) > MAX_SMS_SEGMENTS:
        text = texts.sms.format(hello=texts.hello, url=message.url, expiry=expiry)
    return text


def render_email(message: KeyMessage) -> tuple[str, str, str]:
    """(subject, plain text, HTML)."""
    lang = language(message.locale)
    texts = TEXTS[lang]
    hello = _hello(texts, clean_name(message.full_name))
    expiry = format_expiry(message.expires_at, lang)
    text = texts.text.format(hello=hello, url=message.url, expiry=expiry)
    body = _HTML.format(
        lang=lang,
        hello=html.escape(hello),
        intro=html.escape(texts.html_intro),
        url=html.escape(message.url, quote=True),
        button=html.escape(texts.html_button),
        expiry=html.escape(texts.html_expiry.format(expiry=expiry)),
        warning=html.escape(texts.html_warning),
    )
    return texts.subject, text, body


def _hello(texts: Texts, name: str | None) -> str:
    """The greeting for a name ``clean_name`` has already cleaned."""
    return texts.hello_named.format(name=name) if name else texts.hello
