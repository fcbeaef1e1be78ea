"""The email channel against the SMTP stand-in over real sockets."""

import shutil
import subprocess
import traceback
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Literal

import pytest

from worker import config
from worker.channels.email import EmailChannel
from worker.errors import ChannelRefused, CredentialsRefused, Transient
from worker.ports import KeyMessage
from worker.sandbox.smtp import SmtpSandbox
from worker.service import build_channels

SENDER = "Front desk <keys@example.com>"
GUEST = "ada@example.com"
URL = "https://ik.example.com/instant-keys/ik_7Hq2sVb9?token=s3cr3t&v=2"
MESSAGE = KeyMessage(
    full_name="Ada Lovelace",
    phone_number="+14155550100",
    email_address=GUEST,
    locale="en",
    expires_at=datetime(2026, 11, 26, 14, 0, tzinfo=UTC),
    url=URL,
)


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpSandbox]:
    stand_in = SmtpSandbox(username="mailer", password="hunter2")
    await stand_in.start()
    yield stand_in
    await stand_in.stop()


def channel_for(
    smtp: SmtpSandbox,
    *,
    password: str | None = "hunter2",
    tls: Literal["none", "starttls", "tls"] = "none",
    timeout: float = 10.0,
    cert_bundle: str | None = None,
) -> EmailChannel:
    return EmailChannel(
        smtp.host,
        smtp.port,
        sender=SENDER,
        username="mailer" if password is not None else None,
        password=password,
        tls=tls,
        timeout=timeout,
        cert_bundle=cert_bundle,
    )


def assert_no_secrets(exc: BaseException) -> None:
    """Nothing a log shows of the error, chained causes included, holds the link or the address
    (SMTP servers quote it in their replies)."""
    shown = []
    error: BaseException | None = exc
    while error is not None:
        shown += [*traceback.format_exception_only(error), repr(error), repr(vars(error))]
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    assert URL not in "".join(shown)
    assert GUEST not in "".join(shown)


async def test_guest_gets_text_and_html_with_the_link(smtp: SmtpSandbox) -> None:
    message_id = await channel_for(smtp).send(MESSAGE)

    [mail] = smtp.messages
    assert smtp.envelopes == [("keys@example.com", [GUEST])]
    assert mail["Message-ID"] == message_id
    assert mail["To"].addresses == (Address("Ada Lovelace", addr_spec=GUEST),)
    assert mail["From"].addresses[0].addr_spec == "keys@example.com"
    assert mail["Subject"] == "Your digital key"
    assert mail.get_content_type() == "multipart/alternative"
    text = mail.get_body(("plain",))
    html = mail.get_body(("html",))
    assert text is not None and html is not None
    assert URL in text.get_content().split()
    assert "Hi Ada Lovelace," in text.get_content()
    assert "Nov 26, 2026, 2:00 PM UTC" in text.get_content()
    assert f'<a href="{URL.replace("&", "&amp;")}">' in html.get_content()


async def test_subject_and_body_follow_the_guest_locale(smtp: SmtpSandbox) -> None:
    channel = channel_for(smtp)
    await channel.send(replace(MESSAGE, locale="fr-CA"))
    await channel.send(replace(MESSAGE, locale="de"))

    french, german = smtp.messages
    assert french["Subject"] == "Votre clé numérique"
    assert german["Subject"] == "Ihr digitaler Schlüssel"
    french_text = french.get_body(("plain",))
    assert french_text is not None
    assert "Bonjour Ada Lovelace" in french_text.get_content()


def test_reaches_only_guests_with_an_email_address() -> None:
    channel = EmailChannel("127.0.0.1", 25, sender=SENDER)
    assert channel.reaches(MESSAGE)
    assert not channel.reaches(replace(MESSAGE, email_address=None))


@pytest.mark.parametrize("stage", ["rcpt", "data"])
async def test_permanent_refusal_falls_through_to_the_next_channel(
    smtp: SmtpSandbox, stage: Literal["rcpt", "data"]
) -> None:
    smtp.refuse_next(550, "5.1.1 <{address}>: Recipient address rejected", stage=stage)

    with pytest.raises(ChannelRefused) as raised:
        await channel_for(smtp).send(MESSAGE)

    assert raised.value.code == "550"
    assert_no_secrets(raised.value)
    assert smtp.messages == []


@pytest.mark.parametrize("stage", ["rcpt", "data"])
async def test_temporary_refusal_is_retried_later(
    smtp: SmtpSandbox, stage: Literal["rcpt", "data"]
) -> None:
    smtp.refuse_next(451, "4.7.1 <{address}>: greylisted, try again", stage=stage)
    channel = channel_for(smtp)

    with pytest.raises(Transient) as raised:
        await channel.send(MESSAGE)
    await channel.send(MESSAGE)

    assert_no_secrets(raised.value)
    assert len(smtp.messages) == 1


async def test_wrong_password_is_a_credentials_problem(smtp: SmtpSandbox) -> None:
    channel = channel_for(smtp, password="wrong")

    with pytest.raises(CredentialsRefused) as on_send:
        await channel.send(MESSAGE)
    with pytest.raises(CredentialsRefused) as on_check:
        await channel.check()

    assert on_send.value.service == on_check.value.service == "smtp"
    assert "535" in str(on_send.value)
    assert_no_secrets(on_send.value)
    assert smtp.messages == []


async def test_missing_login_is_a_credentials_problem(smtp: SmtpSandbox) -> None:
    with pytest.raises(CredentialsRefused):
        await channel_for(smtp, password=None).send(MESSAGE)


async def test_check_passes_with_good_credentials(smtp: SmtpSandbox) -> None:
    await channel_for(smtp).check()
    assert smtp.messages == []


async def test_slow_server_is_transient(smtp: SmtpSandbox) -> None:
    smtp.latency = 1.0

    with pytest.raises(Transient) as raised:
        await channel_for(smtp, timeout=0.2).send(MESSAGE)

    assert_no_secrets(raised.value)


async def test_unreachable_server_is_transient() -> None:
    gone = SmtpSandbox()
    host, port = await gone.start()
    await gone.stop()
    channel = EmailChannel(host, port, sender=SENDER)

    with pytest.raises(Transient):
        await channel.send(MESSAGE)
    with pytest.raises(Transient):
        await channel.check()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1, made with the openssl command line."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not on PATH")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.mark.parametrize("tls", ["starttls", "tls"])
async def test_tls_delivers_and_verifies_the_certificate(
    certificate: tuple[str, str], tls: Literal["starttls", "tls"]
) -> None:
    cert, key = certificate
    smtp = SmtpSandbox(username="mailer", password="hunter2", tls=tls, certfile=cert, keyfile=key)
    await smtp.start()
    try:
        with pytest.raises(Transient):  # the self-signed certificate is not trusted by default
            await channel_for(smtp, tls=tls).send(MESSAGE)
        await channel_for(smtp, tls=tls, cert_bundle=cert).send(MESSAGE)
    finally:
        await smtp.stop()

    [mail] = smtp.messages
    text = mail.get_body(("plain",))
    assert text is not None and URL in text.get_content()


async def test_soak_failure_rate_makes_every_send_transient(smtp: SmtpSandbox) -> None:
    smtp.fail_rate = 1.0

    with pytest.raises(Transient) as raised:
        await channel_for(smtp).send(MESSAGE)

    assert "451" in str(raised.value)
    assert smtp.messages == []


FOLDED_ATTACK = (
    "Ada Lovelace and so on and so forth and so on and so forth and so forth: "
    "attacker@evil.example, x"
)
HIDDEN = "\u202eAda\u200b Love\x1b\x07\x00lace\u2066\ufeff"


def addresses(mail: EmailMessage) -> tuple[list[str], list[str]]:
    """The To addresses as the strict parser and as the lenient one read them."""
    return (
        [a.addr_spec for a in mail["To"].addresses],
        [spec for _, spec in getaddresses([str(mail["To"])])],
    )


@pytest.mark.parametrize(
    "name",
    [
        FOLDED_ATTACK,
        "x" * 70 + ": attacker@evil.example, y",
        "Lovelace, Ada <attacker@evil.example>",
        'Ada "Countess" Lovelace of Lovelace and of Ockham and so forth: a@evil.example, b',
        "Zoë Ñúñez " * 12 + ": attacker@evil.example, x",
    ],
)
@pytest.mark.parametrize("cleaned", [True, False], ids=["cleaned", "raw"])
async def test_to_and_envelope_name_the_guest_only(
    smtp: SmtpSandbox, monkeypatch: pytest.MonkeyPatch, name: str, cleaned: bool
) -> None:
    if not cleaned:  # the header check holds even for a name nobody cleaned
        monkeypatch.setattr("worker.channels.email.clean_name", lambda raw: raw)

    await channel_for(smtp).send(replace(MESSAGE, full_name=name))

    [mail] = smtp.messages
    assert smtp.envelopes == [("keys@example.com", [GUEST])]
    assert addresses(mail) == ([GUEST], [GUEST])
    if cleaned:
        assert "evil" not in str(mail["To"])


@pytest.mark.parametrize("name", ["Zoë Ñúñez", "山田 太郎", "Jean-Luc O'Brien", "Ólafur " * 6])
async def test_a_real_name_stays_in_to(smtp: SmtpSandbox, name: str) -> None:
    await channel_for(smtp).send(replace(MESSAGE, full_name=name))

    [mail] = smtp.messages
    [to] = mail["To"].addresses
    assert to.addr_spec == GUEST
    # Python's reader puts a space between two folded encoded-words; RFC 2047 readers do not.
    assert "".join(to.display_name.split()) == "".join(name.split())
    assert smtp.envelopes == [("keys@example.com", [GUEST])]


async def test_phishing_name_and_hidden_characters_never_reach_the_inbox(
    smtp: SmtpSandbox,
) -> None:
    channel = channel_for(smtp)
    await channel.send(
        replace(MESSAGE, full_name="Ada. Your key has EXPIRED - see https://evil.example/k")
    )
    await channel.send(replace(MESSAGE, full_name=HIDDEN))

    phishing, hidden = smtp.messages
    for mail, hello in ((phishing, "Hello,"), (hidden, "Hi Ada Lovelace,")):
        text, html = mail.get_body(("plain",)), mail.get_body(("html",))
        assert text is not None and html is not None
        assert text.get_content().startswith(f"{hello}\r\n")
        shown = str(mail["To"]) + str(mail["Subject"]) + text.get_content() + html.get_content()
        assert "evil" not in shown
        assert [c for c in shown if unicodedata.category(c)[0] == "C" and c not in "\r\n"] == []
    assert hidden["To"].addresses == (Address("Ada Lovelace", addr_spec=GUEST),)


async def test_smtp_ca_file_trusts_a_private_ca(certificate: tuple[str, str]) -> None:
    cert, key = certificate
    smtp = SmtpSandbox(username="mailer", password="hunter2", tls="tls", certfile=cert, keyfile=key)
    await smtp.start()
    env = {
        "SEAM_API_KEY": "k",
        "SMTP_HOST": smtp.host,
        "SMTP_PORT": str(smtp.port),
        "SMTP_TLS": "tls",
        "SMTP_USERNAME": "mailer",
        "SMTP_PASSWORD": "hunter2",
        "EMAIL_FROM": "keys@example.com",
    }
    try:
        with pytest.raises(Transient):  # without it, the certificate is not trusted
            await build_channels(config.load(env))["email"].send(MESSAGE)
        channel = build_channels(config.load(env | {"SMTP_CA_FILE": cert}))["email"]
        await channel.check()
        await channel.send(MESSAGE)
    finally:
        await smtp.stop()

    [mail] = smtp.messages
    assert smtp.envelopes == [("keys@example.com", [GUEST])]
    text = mail.get_body(("plain",))
    assert text is not None and URL in text.get_content()
