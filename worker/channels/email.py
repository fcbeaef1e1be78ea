"""Email delivery over SMTP (aiosmtplib): one message with plain-text and HTML alternatives."""

from datetime import UTC, datetime
from email import policy
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import Parser
from email.policy import Policy
from email.utils import format_datetime, getaddresses, make_msgid, parseaddr
from typing import Any

import aiosmtplib
from opentelemetry.trace import Tracer

from worker import tracing
from worker.channels.email_wiring import TlsMode
from worker.channels.templates import Templates, shipped
from worker.errors import ChannelRefused, CredentialsRefused, Transient, WorkerError
from worker.guest_name import clean_name
from worker.ports import KeyMessage

# Replies that mean our login is missing, wrong or not allowed as configured, not the guest's.
_CREDENTIAL_CODES = {530, 534, 535, 538}
_FAILURES = (aiosmtplib.SMTPException, OSError, TimeoutError)


class EmailChannel:
    """Sends the key's link by email, one SMTP connection per message."""

    name = "email"

    def __init__(
        self,
        host: str,
        port: int,
        *,
        sender: str,
        username: str | None = None,
        password: str | None = None,
        tls: TlsMode = "none",
        timeout: float = 10.0,
        cert_bundle: str | None = None,
        templates: Templates | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        if tls not in ("none", "starttls", "tls"):
            raise ValueError(f"tls must be none, starttls or tls, not {tls!r}")
        self._sender = sender
        self._templates = templates or shipped()
        self._domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"
        self._tracer = tracer or tracing.tracer()
        self._span_attributes: dict[str, str | int] = {
            "server.address": host,
            "server.port": port,
            "network.protocol.name": "smtp",
            "ikw.channel": self.name,
        }
        self._connection: dict[str, Any] = {
            "hostname": host,
            "port": port,
            "username": username,
            "password": password,
            "use_tls": tls == "tls",
            "start_tls": tls == "starttls",
            "timeout": timeout,
            "cert_bundle": cert_bundle,
        }

    def reaches(self, message: KeyMessage) -> bool:
        return bool(message.email_address)

    async def send(self, message: KeyMessage) -> str:
        if not message.email_address:
            raise ChannelRefused("the guest has no email address", code="no_email_address")
        email = self._compose(message)
        # A CLIENT span: the server and the reply code, never the address or the body.
        with tracing.client_span(self._tracer, "smtp send", self._span_attributes) as span:
            try:
                # The envelope names the guest's address only, whatever the headers say.
                await aiosmtplib.send(email, recipients=[message.email_address], **self._connection)
            except _FAILURES as exc:
                if code := _reply_code(exc):
                    span.set_attribute("smtp.reply_code", code)
                raise _translate(exc) from None
        return str(email["Message-ID"])

    async def check(self) -> None:
        try:
            async with aiosmtplib.SMTP(**self._connection):
                pass
        except _FAILURES as exc:
            error = _translate(exc)
            # A refusal while connecting or logging in is about the server, not a guest.
            raise (Transient(str(error)) if isinstance(error, ChannelRefused) else error) from None

    async def close(self) -> None:
        """Nothing to close: each message has its own connection."""

    def _compose(self, message: KeyMessage) -> EmailMessage:
        assert message.email_address is not None
        subject, text, html = self._templates.email(message)
        email = EmailMessage()
        email["Subject"] = subject
        email["From"] = self._sender
        try:
            email["To"] = recipient(clean_name(message.full_name), message.email_address)
        except (ValueError, IndexError, HeaderParseError):
            raise ChannelRefused(
                "the email address cannot be used", code="invalid_address"
            ) from None
        email["Date"] = format_datetime(datetime.now(UTC))
        email["Message-ID"] = make_msgid(domain=self._domain)
        email.set_content(text)
        email.add_alternative(html, subtype="html")
        return email


def recipient(name: str | None, address: str) -> Address:
    """The ``To`` address, with the display name only when the header, serialised as it will be
    sent (folded; ASCII or SMTPUTF8) and read back by a strict and a lenient parser, reads
    exactly as the bare address does: one address, the guest's. Raises ValueError when the bare
    address itself does not read back as one address."""
    plain = Address(addr_spec=address)
    bare = [_read_back(plain, sending) for sending in _SENDING]
    if any(read is not None and (len(read[0]), len(read[1])) != (1, 1) for read in bare):
        raise ValueError("the address does not read back as one address")
    if not name:
        return plain
    try:
        named = Address(display_name=name, addr_spec=address)
        same = all(
            _read_back(named, sending) == read for sending, read in zip(_SENDING, bare, strict=True)
        )
    except (ValueError, IndexError, HeaderParseError):  # a name the header cannot carry
        return plain
    return named if same else plain


_SENDING = (policy.SMTP, policy.SMTPUTF8)  # what aiosmtplib serialises with


def _read_back(to: Address, sending: Policy) -> tuple[list[str], list[str]] | None:
    """The addresses in ``To: to`` once serialised with ``sending``, by the strict (email's
    default policy) and the lenient (``getaddresses``) parser; None when it cannot be sent so."""
    probe = EmailMessage(policy=sending)
    probe["To"] = to
    try:
        raw = probe.as_bytes().decode("utf-8", "replace")
    except (ValueError, UnicodeError):
        return None
    parsed = Parser(policy=policy.default).parsestr(raw, headersonly=True)
    strict = [a.addr_spec for a in parsed["To"].addresses]
    unfolded = raw.partition(":")[2].replace("\r\n", "")
    return strict, [spec for _, spec in getaddresses([unfolded])]


def _reply_code(exc: BaseException) -> int | None:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return exc.recipients[0].code if exc.recipients else None
    return exc.code if isinstance(exc, aiosmtplib.SMTPResponseException) else None


def _translate(exc: BaseException) -> WorkerError:
    """The SMTP failure as a worker error; only reply codes, never the server's text (it may
    quote the address)."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        code = exc.recipients[0].code if exc.recipients else 550
    elif isinstance(exc, aiosmtplib.SMTPResponseException):
        code = exc.code
    elif isinstance(exc, aiosmtplib.SMTPNotSupported):
        return ChannelRefused("the smtp server cannot take this address", code="smtputf8")
    else:
        return Transient(f"smtp failed ({type(exc).__name__})")
    if code in _CREDENTIAL_CODES or isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return CredentialsRefused(f"smtp refused the credentials (code {code})", service="smtp")
    if 500 <= code < 600:
        return ChannelRefused(f"smtp refused the message (code {code})", code=str(code))
    return Transient(f"smtp could not take the message (code {code})")
