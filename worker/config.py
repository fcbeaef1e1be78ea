"""Settings read from the environment and validated at start, with one plain line per problem."""

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from worker.queues import PRODUCER

# Every variable the reader below uses, for `ikw run --help`: add a row when you read a new one.
VARIABLES: tuple[tuple[str, str], ...] = (
    ("AMQP_URL", "RabbitMQ URL, or a cluster's: URLs (or host:port) separated by commas"),
    ("IKW_NAMESPACE", "prefix of every exchange and queue (default instant_keys)"),
    ("IKW_PREFETCH", "messages handled at once; sizes the HTTP pools too (default 1024)"),
    ("SEAM_ENDPOINT", "Seam API (default https://connect.getseam.com)"),
    ("SEAM_API_KEY", "Seam API key (required)"),
    ("TWILIO_ACCOUNT_SID", "Twilio account; any TWILIO_* turns SMS on"),
    ("TWILIO_AUTH_TOKEN", "Twilio auth token"),
    ("TWILIO_FROM", "SMS sender number or id (or TWILIO_MESSAGING_SERVICE_SID)"),
    ("TWILIO_MESSAGING_SERVICE_SID", "SMS sender service (or TWILIO_FROM)"),
    ("TWILIO_API_URL", "Twilio API (default https://api.twilio.com)"),
    ("SMTP_HOST", "SMTP server; with EMAIL_FROM turns email on"),
    ("EMAIL_FROM", "sender address of the email"),
    ("SMTP_PORT", "SMTP port (default 25, 587 or 465 by SMTP_TLS)"),
    ("SMTP_TLS", "none, starttls (default) or tls"),
    ("SMTP_USERNAME", "SMTP user (with SMTP_PASSWORD)"),
    ("SMTP_PASSWORD", "SMTP password (with SMTP_USERNAME)"),
    ("IKW_HTTP_PORT", "health and metrics port (default 8080; 0: any free port)"),
    ("IKW_MIN_KEY_LIFETIME", "reuse a key only with this much left (default 1h)"),
    ("IKW_MAX_ATTEMPTS", "tries before a transient failure is dead-lettered (default 10)"),
    ("IKW_MAX_RETRY_AGE", "... or this long after the first failure (default 1d)"),
    ("IKW_SHUTDOWN_GRACE", "on SIGTERM, time for in-flight messages (default 30s)"),
    ("IKW_MESSAGE_DEADLINE", "one message's work; past it, it is retried later (default 2m)"),
    ("IKW_TRUSTED_PUBLISHERS", "broker users whose events count: name or name:key-prefix"),
    ("IKW_REVOKE_RETENTION", "how long revokes are remembered (default 30d)"),
    ("IKW_MAX_CLOCK_SKEW", "refuse events that occurred this much after receipt (default 5m)"),
    ("IKW_DECLARE", "declare the topology at start (default true; false: check only)"),
    ("IKW_ALLOW_INSECURE", "allow plaintext or unverified transport to remote hosts"),
    ("SMTP_CA_FILE", "CA bundle for the SMTP server's certificate"),
    ("IKW_LOG_LEVEL", "debug, info (default), warning or error"),
    ("IKW_TEMPLATES_DIR", "the guest's words: <locale>/sms.txt, email_subject.txt, email.txt, ..."),
    ("IKW_TIME_ZONE", "IANA zone of the times guests read, unless the event has one (UTC)"),
    ("IKW_PROPERTY_NAME", "the property's name, unless the event has one"),
    ("IKW_QUORUM_SIZE", "replicas of each new quorum queue and stream (default: the broker's)"),
)


class ConfigError(Exception):
    """Raised with every problem found, one per line, each naming its variable."""


@dataclass(frozen=True)
class SmsSettings:
    account_sid: str
    auth_token: str = field(default="", repr=False)
    from_: str | None = None
    messaging_service_sid: str | None = None
    api_url: str = "https://api.twilio.com"


@dataclass(frozen=True)
class EmailSettings:
    host: str
    port: int
    sender: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: Literal["none", "starttls", "tls"] = "starttls"
    ca_file: str | None = None


# broker user -> the user_identity_key prefixes it may name (None: any identity)
Publishers = dict[str, tuple[str, ...] | None]


@dataclass(frozen=True)
class Settings:
    # Secrets are left out of repr, so a logged or printed Settings never shows them.
    amqp_url: str = field(default="amqp://guest:guest@localhost:5672/", repr=False)
    namespace: str = "instant_keys"
    # Enough to hide ~200 ms per Seam call at what one core can do (README, "Scaling").
    prefetch: int = 1024
    seam_endpoint: str = "https://connect.getseam.com"
    seam_api_key: str = field(default="", repr=False)
    sms: SmsSettings | None = None
    email: EmailSettings | None = None
    http_port: int = 8080
    min_key_lifetime: timedelta = timedelta(hours=1)
    max_attempts: int = 10
    max_retry_age: timedelta = timedelta(days=1)
    shutdown_grace: timedelta = timedelta(seconds=30)
    message_deadline: timedelta = timedelta(minutes=2)
    trusted_publishers: Publishers = field(default_factory=dict)
    revoke_retention: timedelta = timedelta(days=30)
    max_clock_skew: timedelta = timedelta(minutes=5)
    declare: bool = True
    log_level: str = "info"
    templates_dir: Path | None = None
    time_zone: str = "UTC"
    property_name: str | None = None
    quorum_size: int | None = None  # None: the broker's default

    @property
    def amqp_urls(self) -> list[str]:
        return amqp_urls(self.amqp_url)

    @property
    def broker_user(self) -> str:
        """The user the broker knows the worker as: what it puts in every message's user_id."""
        return unquote(urlsplit(self.amqp_urls[0]).username or "guest")


def amqp_urls(value: str) -> list[str]:
    """The addresses in AMQP_URL, in the order they are tried: URLs separated by commas; an
    entry without ``://`` (``host:port``) takes scheme, user, password, vhost and options from
    the first URL: ``amqp://u:p@10.0.0.1:5672/,10.0.0.2:5672,10.0.0.3:5672``."""
    entries = [entry.strip() for entry in value.split(",")]
    first = urlsplit(entries[0])
    auth = first.netloc.rpartition("@")[0]
    return [entries[0]] + [
        entry
        if "://" in entry
        else first._replace(netloc=f"{auth}@{entry}" if auth else entry).geturl()
        for entry in entries[1:]
    ]


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
DURATION_HINT = "a duration such as 90, 90s, 15m, 2h or 1d"
_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_duration(raw: str) -> timedelta | None:
    """The duration, or None when ``raw`` is not one."""
    match = _DURATION.match(raw)
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]]) if match else None


LOG_LEVELS = ("debug", "info", "warning", "error")
SECRETS = ("SEAM_API_KEY", "TWILIO_AUTH_TOKEN", "SMTP_PASSWORD", "AMQP_URL")


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def text(self, name: str, default: str | None = None) -> str | None:
        file_name = self.env.get(f"{name}_FILE")
        if name in SECRETS and file_name:
            try:
                return Path(file_name).read_text().strip() or None
            except OSError as exc:
                self.problems.append(f"{name}_FILE: cannot read {file_name}: {exc.strerror}")
                return None
        value = self.env.get(name, "").strip()
        return value or default

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        if not raw.isdigit() or not low <= int(raw) <= high:
            self.problems.append(
                f"{name}: must be a whole number from {low} to {high}, got {raw!r}"
            )
            return default
        return int(raw)

    def duration(self, name: str, default: timedelta) -> timedelta:
        raw = self.text(name)
        if raw is None:
            return default
        value = parse_duration(raw)
        if value is None:
            self.problems.append(f"{name}: must be {DURATION_HINT}, got {raw!r}")
            return default
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        if raw.lower() not in _FLAGS:
            self.problems.append(
                f"{name}: must be true or false (or 1, 0, yes, no), got {raw[:40]!r}"
            )
            return default
        return _FLAGS[raw.lower()]

    def url(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        raw = self.text(name, default) or default
        parts = urlsplit(raw)
        if parts.scheme not in schemes or not parts.hostname:
            shown = raw if name not in SECRETS else f"{parts.scheme}://…"
            self.problems.append(
                f"{name}: must be a {' or '.join(schemes)} URL with a host, got {shown!r}"
            )
        return raw.rstrip("/")

    def require(self, name: str, why: str) -> str:
        value = self.text(name)
        if value is None:
            self.problems.append(f"{name}: required {why}")
            return ""
        return value


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Read and check every setting; raise ConfigError listing every problem."""
    r = _Reader(os.environ if env is None else env)
    settings = Settings(
        amqp_url=_amqp_url(r),
        namespace=_namespace(r),
        prefetch=r.integer("IKW_PREFETCH", Settings.prefetch, 1, 10_000),
        seam_endpoint=r.url("SEAM_ENDPOINT", Settings.seam_endpoint, ("http", "https")),
        seam_api_key=r.require("SEAM_API_KEY", "(the Seam API key, or SEAM_API_KEY_FILE)"),
        sms=_sms(r),
        email=_email(r),
        http_port=r.integer("IKW_HTTP_PORT", Settings.http_port, 0, 65535),
        min_key_lifetime=r.duration("IKW_MIN_KEY_LIFETIME", Settings.min_key_lifetime),
        max_attempts=r.integer("IKW_MAX_ATTEMPTS", Settings.max_attempts, 1, 1000),
        max_retry_age=r.duration("IKW_MAX_RETRY_AGE", Settings.max_retry_age),
        shutdown_grace=r.duration("IKW_SHUTDOWN_GRACE", Settings.shutdown_grace),
        message_deadline=r.duration("IKW_MESSAGE_DEADLINE", Settings.message_deadline),
        trusted_publishers=_publishers(r),
        revoke_retention=r.duration("IKW_REVOKE_RETENTION", Settings.revoke_retention),
        max_clock_skew=r.duration("IKW_MAX_CLOCK_SKEW", Settings.max_clock_skew),
        declare=r.flag("IKW_DECLARE", Settings.declare),
        log_level=(r.text("IKW_LOG_LEVEL") or Settings.log_level).lower(),
        **guest_text(r),
        quorum_size=r.integer("IKW_QUORUM_SIZE", 0, 1, 99) or None,
    )
    if settings.log_level not in LOG_LEVELS:
        r.problems.append(
            f"IKW_LOG_LEVEL: must be debug, info, warning or error, got {settings.log_level[:20]!r}"
        )
    if settings.revoke_retention < settings.max_retry_age:
        r.problems.append(
            "IKW_REVOKE_RETENTION: must be at least IKW_MAX_RETRY_AGE, so a revoke is remembered "
            "as long as an older grant may still be retried"
        )
    if settings.message_deadline < timedelta(seconds=1):
        r.problems.append("IKW_MESSAGE_DEADLINE: must be at least 1s")
    if not r.problems and settings.sms is None and settings.email is None:
        r.problems.append(
            "TWILIO_ACCOUNT_SID / SMTP_HOST: no delivery channel is configured; set the "
            "TWILIO_* variables for SMS or SMTP_HOST and EMAIL_FROM for email"
        )
    _transport(r, settings)
    if r.problems:
        raise ConfigError("\n".join(r.problems))
    return settings


def guest_text(r: "_Reader") -> dict[str, Any]:
    """IKW_TEMPLATES_DIR, IKW_TIME_ZONE and IKW_PROPERTY_NAME, the templates loaded and checked
    (a problem in a file: ``IKW_TEMPLATES_DIR: fr/sms.txt: 'guset_name' is undefined``)."""
    from worker.channels.templates import TemplateProblem, Templates
    from worker.dates import time_zone
    from worker.guest_name import MAX_PROPERTY_NAME, clean_property_name

    found: dict[str, Any] = {}
    zone = r.text("IKW_TIME_ZONE")
    if zone is not None:
        try:
            time_zone(zone)
            found["time_zone"] = zone
        except ValueError as exc:
            r.problems.append(f"IKW_TIME_ZONE: {zone[:70]!r}: {exc}")
    name = r.text("IKW_PROPERTY_NAME")
    if name is not None:
        if len(name) > MAX_PROPERTY_NAME or not clean_property_name(name):
            r.problems.append(
                f"IKW_PROPERTY_NAME: must be 1 to {MAX_PROPERTY_NAME} visible characters, "
                "with no link, email address or phone number"
            )
        else:
            found["property_name"] = clean_property_name(name)
    directory = r.text("IKW_TEMPLATES_DIR")
    if directory is not None:
        if not Path(directory).is_dir():
            r.problems.append(f"IKW_TEMPLATES_DIR: {directory} is not a directory")
            return found
        found["templates_dir"] = Path(directory)
        try:
            Templates(found["templates_dir"])
        except TemplateProblem as exc:
            r.problems.extend(f"IKW_TEMPLATES_DIR: {problem}" for problem in exc.problems)
        except OSError as exc:
            r.problems.append(f"IKW_TEMPLATES_DIR: cannot read {directory}: {exc.strerror}")
    return found


def _amqp_url(r: _Reader) -> str:
    """Every address checked, one line for the first bad one; the password is never shown."""
    raw = r.text("AMQP_URL", Settings.amqp_url) or Settings.amqp_url
    urls = amqp_urls(raw)
    for number, url in enumerate(urls, 1):
        which = f"AMQP_URL: address {number} of {len(urls)}:" if len(urls) > 1 else "AMQP_URL:"
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            r.problems.append(
                f"{which} must be a amqp or amqps URL with a host (or host:port after the "
                f"first), got {parts.scheme + '://…' if parts.scheme else '…'!r}"
            )
            return raw
        try:
            port_ok = parts.port is None or 1 <= parts.port <= 65535
        except ValueError:
            port_ok = False
        if not port_ok:
            raw_port = parts.netloc.rpartition("@")[2].rpartition("]")[2].partition(":")[2]
            r.problems.append(
                f"{which} the port must be a number from 1 to 65535, got {raw_port[:20]!r}"
            )
            return raw
        if parts.username != urlsplit(urls[0]).username:
            r.problems.append(
                f"{which} names another user than the first; every address must use "
                "the same user (the worker puts it in each message's user_id)"
            )
            return raw
    return ",".join(url.rstrip("/") for url in urls)


def _publishers(r: _Reader) -> Publishers:
    """``name`` trusts a broker user for any identity; ``name:prefix`` for user_identity_keys
    starting with prefix only (repeat the entry for several prefixes)."""
    anything: set[str] = set()
    scoped: dict[str, list[str]] = {}
    for entry in filter(
        None, (e.strip() for e in (r.text("IKW_TRUSTED_PUBLISHERS") or "").split(","))
    ):
        name, colon, prefix = (part.strip() for part in entry.partition(":"))
        if not PRODUCER.fullmatch(name) or (colon and not prefix):
            r.problems.append(
                "IKW_TRUSTED_PUBLISHERS: use comma-separated broker users, each `name` or "
                "`name:prefix`, a name being 1 to 64 letters, digits, '_' or '-', got "
                f"{entry[:60]!r}"
            )
        elif colon:
            scoped.setdefault(name, []).append(prefix)
        else:
            anything.add(name)
    for name in anything & scoped.keys():
        r.problems.append(
            f"IKW_TRUSTED_PUBLISHERS: {name!r} is listed both with and without a prefix"
        )
    return dict.fromkeys(anything) | {name: tuple(p) for name, p in scoped.items()}


def _namespace(r: _Reader) -> str:
    value = r.text("IKW_NAMESPACE", Settings.namespace) or Settings.namespace
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        r.problems.append(
            f"IKW_NAMESPACE: use 1 to 64 letters, digits, '_' or '-', got {value[:80]!r}"
        )
    return value


def _sms(r: _Reader) -> SmsSettings | None:
    names = (
        "TWILIO_ACCOUNT_SID",
        "TWILIO_AUTH_TOKEN",
        "TWILIO_FROM",
        "TWILIO_MESSAGING_SERVICE_SID",
    )
    if not any(r.text(n) for n in names):
        return None
    why = "for SMS (any TWILIO_* variable turns SMS on)"
    sid = r.require("TWILIO_ACCOUNT_SID", why)
    token = r.require("TWILIO_AUTH_TOKEN", why)
    from_, service = r.text("TWILIO_FROM"), r.text("TWILIO_MESSAGING_SERVICE_SID")
    if not (from_ or service):
        r.problems.append(f"TWILIO_FROM or TWILIO_MESSAGING_SERVICE_SID: one is required {why}")
    if from_ and not re.fullmatch(r"\+[1-9][0-9]{6,14}|[A-Za-z0-9 ]{1,11}", from_):
        r.problems.append("TWILIO_FROM: must be an E.164 number or an alphanumeric sender id")
    api_url = r.url("TWILIO_API_URL", SmsSettings.api_url, ("http", "https"))
    return SmsSettings(sid, token, from_, service, api_url)


def _email(r: _Reader) -> EmailSettings | None:
    host = r.text("SMTP_HOST")
    sender = r.text("EMAIL_FROM")
    if not (host or sender):
        return None
    why = "for email (SMTP_HOST or EMAIL_FROM turns email on)"
    host = r.require("SMTP_HOST", why)
    sender = r.require("EMAIL_FROM", why)
    if sender and "@" not in sender:
        r.problems.append("EMAIL_FROM: must be an email address, such as keys@example.com")
    tls = (r.text("SMTP_TLS", "starttls") or "starttls").lower()
    if tls not in ("none", "starttls", "tls"):
        r.problems.append(f"SMTP_TLS: must be none, starttls or tls, got {tls!r}")
    port = r.integer("SMTP_PORT", {"none": 25, "starttls": 587, "tls": 465}.get(tls, 587), 1, 65535)
    username, password = r.text("SMTP_USERNAME"), r.text("SMTP_PASSWORD")
    if bool(username) != bool(password):
        r.problems.append("SMTP_USERNAME and SMTP_PASSWORD: set both or neither")
    ca_file = r.text("SMTP_CA_FILE")
    if ca_file is not None:
        try:
            with open(ca_file, "rb") as readable:
                readable.read(1)
        except OSError as exc:
            r.problems.append(f"SMTP_CA_FILE: cannot read {ca_file}: {exc.strerror}")
    return EmailSettings(
        host,
        port,
        sender,
        username,
        password,
        cast(Literal["none", "starttls", "tls"], tls),
        ca_file,
    )


_INSECURE_HINT = "or set IKW_ALLOW_INSECURE=1"


def _transport(r: _Reader, settings: Settings) -> None:
    """Refuse plaintext or unverified transport to a host that is not loopback, unless
    IKW_ALLOW_INSECURE says so."""
    if r.flag("IKW_ALLOW_INSECURE", False):
        return
    for url in settings.amqp_urls:
        _amqp_transport(r, urlsplit(url))
    urls = {"SEAM_ENDPOINT": settings.seam_endpoint}
    if settings.sms:
        urls["TWILIO_API_URL"] = settings.sms.api_url
    for name, url in urls.items():
        parts = urlsplit(url)
        if parts.scheme == "http" and not _loopback(parts.hostname):
            r.problems.append(
                f"{name}: plain http:// to a host that is not loopback; use https:// "
                f"{_INSECURE_HINT}"
            )
    email = settings.email
    if email and email.password and email.tls == "none" and not _loopback(email.host):
        r.problems.append(
            f"SMTP_PASSWORD: would be sent in clear (SMTP_TLS is none and SMTP_HOST is not "
            f"loopback); use SMTP_TLS=starttls or tls {_INSECURE_HINT}"
        )


def _amqp_transport(r: _Reader, amqp: SplitResult) -> None:
    if not amqp.hostname or _loopback(amqp.hostname):  # no host: already told
        return
    problems = []
    if amqp.scheme == "amqp":
        problems.append(
            f"AMQP_URL: plaintext amqp:// to a host that is not loopback; use amqps:// "
            f"{_INSECURE_HINT}"
        )
    verify = parse_qs(amqp.query, keep_blank_values=True).get("no_verify_ssl", [])
    if amqp.scheme == "amqps" and any(value != "0" for value in verify):
        problems.append(
            f"AMQP_URL: no_verify_ssl turns off the broker's certificate check; drop it "
            f"(cafile= names a private CA) {_INSECURE_HINT}"
        )
    r.problems.extend(p for p in problems if p not in r.problems)  # once for all addresses


def _loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 or localhost."""
    name = (host or "").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def guest_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Only what the guest reads needs (`ikw templates`): the templates, time zone, property."""
    r = _Reader(os.environ if env is None else env)
    settings = Settings(**guest_text(r))
    if r.problems:
        raise ConfigError("\n".join(r.problems))
    return settings


def broker_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Only what the broker commands (publish, topology, dlq) need."""
    r = _Reader(os.environ if env is None else env)
    settings = Settings(
        amqp_url=_amqp_url(r),
        namespace=_namespace(r),
        quorum_size=r.integer("IKW_QUORUM_SIZE", 0, 1, 99) or None,
    )
    _transport(r, settings)
    if r.problems:
        raise ConfigError("\n".join(r.problems))
    return settings
