"""The email channel's wiring: its settings (SMTP's), its factory, its template files. The
sender is worker/channels/email.py, imported only when a worker builds the channel."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

from worker.channels.wiring import Needs, Wiring
from worker.variables import (
    INSECURE_HINT,
    Reader,
    Variable,
    loopback,
    one_of,
    optional,
    required,
    setting,
)

if TYPE_CHECKING:
    from worker.channels.email import EmailChannel

TlsMode = Literal["none", "starttls", "tls"]


WHY = "for email (SMTP_HOST or EMAIL_FROM turns email on)"
PORTS = {"none": 25, "starttls": 587, "tls": 465}


def _port(r: Reader, v: Variable[int]) -> int:
    """SMTP_PORT, by default the port of SMTP_TLS's mode."""
    tls = (r.text("SMTP_TLS") or "starttls").lower()
    return r.integer(v.name, PORTS.get(tls, v.default), 1, 65535)


def _tls(r: Reader, v: Variable[TlsMode]) -> TlsMode:
    return cast(TlsMode, one_of(*PORTS)(r, cast(Variable[str], v)))


def _readable(r: Reader, v: Variable[str | None]) -> str | None:
    path = r.text(v.name)
    if path is not None:
        try:
            with open(path, "rb") as readable:
                readable.read(1)
        except OSError as exc:
            r.problems.append(f"{v.name}: cannot read {path}: {exc.strerror}")
    return path


@dataclass(frozen=True)
class EmailSettings:
    host: str = setting(
        "SMTP_HOST", "", "SMTP server; with EMAIL_FROM turns email on", required(WHY), switch=True
    )
    sender: str = setting(
        "EMAIL_FROM", "", "sender address of the email", required(WHY), switch=True
    )
    port: int = setting("SMTP_PORT", 587, "SMTP port (default 25, 587 or 465 by SMTP_TLS)", _port)
    tls: TlsMode = setting("SMTP_TLS", "starttls", "none, starttls (default) or tls", _tls)
    username: str | None = setting(
        "SMTP_USERNAME", None, "SMTP user (with SMTP_PASSWORD)", optional
    )
    password: str | None = setting(
        "SMTP_PASSWORD", None, "SMTP password (with SMTP_USERNAME)", optional, secret=True
    )
    ca_file: str | None = setting(
        "SMTP_CA_FILE", None, "CA bundle for the SMTP server's certificate", _readable
    )

    def problems(self, allow_insecure: bool) -> list[str]:
        found = []
        if self.sender and "@" not in self.sender:
            found.append("EMAIL_FROM: must be an email address, such as keys@example.com")
        if bool(self.username) != bool(self.password):
            found.append("SMTP_USERNAME and SMTP_PASSWORD: set both or neither")
        clear = self.password and self.tls == "none" and not loopback(self.host)
        if clear and not allow_insecure:
            found.append(
                "SMTP_PASSWORD: would be sent in clear (SMTP_TLS is none and SMTP_HOST is not "
                f"loopback); use SMTP_TLS=starttls or tls {INSECURE_HINT}"
            )
        return found


def build(e: EmailSettings, needs: Needs) -> "EmailChannel":
    from worker.channels.email import EmailChannel

    return EmailChannel(
        e.host,
        e.port,
        sender=e.sender,
        username=e.username,
        password=e.password,
        tls=e.tls,
        cert_bundle=e.ca_file,
        templates=needs.templates,
        tracer=needs.tracer,
    )


WIRING = Wiring(
    "email", EmailSettings, build, templates=("email_subject.txt", "email.txt", "email.html")
)
