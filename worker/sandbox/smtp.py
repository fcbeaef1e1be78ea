"""SMTP sink on aiosmtpd: keeps every message it accepts, with AUTH, TLS and refusals on demand."""

import asyncio
import hmac
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from worker.sandbox import changed

EMAIL_FROM = "keys@example.com"

# aiosmtpd itself sets the deprecated Session.login_data on every login and logs a warning.
logging.getLogger("mail.log").addFilter(
    lambda record: "login_data is deprecated" not in record.getMessage()
)


@dataclass
class _Refusal:
    code: int
    text: str
    count: int
    stage: str


class SmtpSandbox:
    """A mail server on a real socket: ``messages`` (parsed with the default policy) and
    ``envelopes`` (``(mail_from, rcpt_tos)``, same order) hold what it accepted; each of
    ``listeners`` is called with every accepted message and its envelope.

    With ``username``/``password`` it requires AUTH (PLAIN or LOGIN, TLS not required) and
    answers 535 to bad credentials, 530 to mail without login. ``tls`` is ``"starttls"`` or
    ``"tls"`` (implicit) with ``certfile``/``keyfile``. ``refuse_next``, ``fail_rate`` and
    ``latency`` make it misbehave.
    """

    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: Literal["none", "starttls", "tls"] = "none",
        certfile: str | None = None,
        keyfile: str | None = None,
    ) -> None:
        self.username = username
        self.password = password
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.listeners: list[Callable[[EmailMessage, tuple[str, list[str]]], None]] = []
        self.latency = 0.0
        self.fail_rate = 0.0
        self.fail_code = 451
        self.host = ""
        self.port = 0
        self._tls = tls
        self._ssl: ssl.SSLContext | None = None
        if tls != "none":
            if certfile is None:
                raise ValueError("tls needs certfile (and keyfile unless the key is in it)")
            self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl.load_cert_chain(certfile, keyfile)
        self._refusals: list[_Refusal] = []
        self._server: asyncio.Server | None = None
        self._sessions: list[SMTP] = []

    def env(self) -> dict[str, str]:
        """The email channel's settings for a worker that uses this stand-in."""
        return {
            "SMTP_HOST": self.host,
            "SMTP_PORT": str(self.port),
            "SMTP_TLS": self._tls,
            "EMAIL_FROM": EMAIL_FROM,
        }

    def refuse_next(
        self,
        code: int,
        text: str = "<{address}>: refused by the sandbox",
        *,
        count: int = 1,
        stage: Literal["rcpt", "data"] = "rcpt",
    ) -> None:
        """Answer the next ``count`` RCPT (or DATA) commands with ``code text``; ``{address}``
        in ``text`` becomes the recipient, as real servers quote it."""
        if stage not in ("rcpt", "data"):
            raise ValueError("stage is rcpt or data")
        self._refusals.append(_Refusal(code, text, count, stage))

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._session, host, port, ssl=self._ssl if self._tls == "tls" else None
        )
        self.host = "127.0.0.1" if host == "0.0.0.0" else host
        self.port = self._server.sockets[0].getsockname()[1]
        return self.host, self.port

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for session in self._sessions:
            if session.transport is not None:
                session.transport.close()
        self._sessions.clear()
        await self._server.wait_closed()
        self._server = None

    def _session(self) -> SMTP:
        auth = self.username is not None
        session = SMTP(
            self,
            hostname="smtp.sandbox.localhost",
            ident="instant-key-worker SMTP sandbox",
            enable_SMTPUTF8=True,
            tls_context=self._ssl if self._tls == "starttls" else None,
            require_starttls=self._tls == "starttls",
            authenticator=self._authenticate if auth else None,
            # aiosmtpd's auth_required=True with TLS optional emits a warning: we check in MAIL.
            auth_require_tls=not auth,
            loop=asyncio.get_running_loop(),
        )
        self._sessions = [s for s in self._sessions if s.transport is not None]
        self._sessions.append(session)
        return session

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        good = (
            isinstance(data, LoginPassword)
            and self.username is not None
            and self.password is not None
            and hmac.compare_digest(data.login, self.username.encode())
            and hmac.compare_digest(data.password, self.password.encode())
        )
        return AuthResult(success=good, handled=False)

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.username is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        refusal = self._take_refusal("rcpt")
        if refusal is not None:
            return f"{refusal.code} {refusal.text.replace('{address}', address)}"
        if self.fail_rate and random.random() < self.fail_rate:
            return f"{self.fail_code} 4.3.0 <{address}>: try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        refusal = self._take_refusal("data")
        if refusal is not None:
            address = envelope.rcpt_tos[0] if envelope.rcpt_tos else ""
            return f"{refusal.code} {refusal.text.replace('{address}', address)}"
        raw = envelope.content if isinstance(envelope.content, bytes) else b""
        parsed = message_from_bytes(raw, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        accepted = (envelope.mail_from or "", list(envelope.rcpt_tos))
        self.messages.append(parsed)
        self.envelopes.append(accepted)
        for listener in self.listeners:
            listener(parsed, accepted)
        changed()
        return "250 OK: queued"

    def _take_refusal(self, stage: str) -> _Refusal | None:
        for refusal in self._refusals:
            if refusal.stage == stage:
                refusal.count -= 1
                if refusal.count <= 0:
                    self._refusals.remove(refusal)
                return refusal
        return None
