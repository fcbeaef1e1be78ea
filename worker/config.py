"""Settings read from the environment and validated at start, with one plain line per problem.

Each variable is declared once, on the field of the group that uses it (``setting()``, see
worker/variables.py): the broker's, the guest text's, the worker's own here; each channel's in
its wiring (worker/channels/*_wiring.py). ``ikw run --help`` lists them and a test holds the
README's table to them."""

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from worker.channels import CHANNELS
from worker.queues import PRODUCER
from worker.variables import (
    DURATION_HINT,
    INSECURE_HINT,
    ConfigError,
    Reader,
    Variable,
    declared,
    duration,
    flag,
    insecure,
    loopback,
    one_of,
    parse_duration,
    read_group,
    required,
    setting,
    text,
    url,
    whole,
)

if TYPE_CHECKING:
    from worker.channels.templates import Templates

__all__ = ["DURATION_HINT", "ConfigError", "Settings", "amqp_urls", "load", "parse_duration"]

LOG_LEVELS = ("debug", "info", "warning", "error")


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


def _amqp_url(r: Reader, v: Variable[str]) -> str:
    """Every address checked, one line for the first bad one; the password is never shown."""
    raw = r.text(v.name, v.default, v.secret) or v.default
    urls = amqp_urls(raw)
    for number, address in enumerate(urls, 1):
        which = f"AMQP_URL: address {number} of {len(urls)}:" if len(urls) > 1 else "AMQP_URL:"
        parts = urlsplit(address)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            r.problems.append(
                f"{which} must be an amqp or amqps URL with a host (or host:port after the "
                f"first), got {_shown(address, parts.scheme)!r}"
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
    return ",".join(address.rstrip("/") for address in urls)


def _shown(address: str, scheme: str) -> str:
    """What was given, unless it may hold a password (anything with an @)."""
    if "@" not in address:
        return address[:60]
    return f"{scheme}://…" if scheme else "…"


def _namespace(r: Reader, v: Variable[str]) -> str:
    value = text(r, v)
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        r.problems.append(
            f"IKW_NAMESPACE: use 1 to 64 letters, digits, '_' or '-', got {value[:80]!r}"
        )
    return value


# broker user -> the user_identity_key prefixes it may name (None: any identity)
Publishers = dict[str, tuple[str, ...] | None]


def _publishers(r: Reader, v: Variable[Publishers]) -> Publishers:
    """``name`` trusts a broker user for any identity; ``name:prefix`` for user_identity_keys
    starting with prefix only (repeat the entry for several prefixes)."""
    anything: set[str] = set()
    scoped: dict[str, list[str]] = {}
    for entry in filter(None, (e.strip() for e in (r.text(v.name) or "").split(","))):
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


def _time_zone(r: Reader, v: Variable[str]) -> str:
    from worker.dates import time_zone

    zone = r.text(v.name)
    if zone is None:
        return v.default
    try:
        time_zone(zone)
        return zone
    except ValueError as exc:
        r.problems.append(f"{v.name}: {zone[:70]!r}: {exc}")
        return v.default


def _property_name(r: Reader, v: Variable[str | None]) -> str | None:
    from worker.guest_name import MAX_PROPERTY_NAME, clean_property_name

    name = r.text(v.name)
    if name is not None and (len(name) > MAX_PROPERTY_NAME or not clean_property_name(name)):
        r.problems.append(
            f"{v.name}: must be 1 to {MAX_PROPERTY_NAME} visible characters, "
            "with no link, email address or phone number"
        )
        return None
    return clean_property_name(name) if name is not None else None


def _directory(r: Reader, v: Variable[Path | None]) -> Path | None:
    directory = r.text(v.name)
    if directory is not None and not Path(directory).is_dir():
        r.problems.append(f"{v.name}: {directory} is not a directory")
        return None
    return Path(directory) if directory is not None else None


@dataclass(frozen=True)
class BrokerSettings:
    """RabbitMQ: what the worker and the broker commands (publish, topology, dlq) connect to."""

    # Secrets are left out of repr, so a logged or printed Settings never shows them.
    amqp_url: str = setting(
        "AMQP_URL",
        "amqp://guest:guest@localhost:5672/",
        "RabbitMQ URL, or a cluster's: URLs (or host:port) separated by commas",
        _amqp_url,
        secret=True,
    )
    namespace: str = setting(
        "IKW_NAMESPACE",
        "instant_keys",
        "prefix of every exchange and queue (default instant_keys)",
        _namespace,
    )
    quorum_size: int | None = setting(
        "IKW_QUORUM_SIZE",
        None,  # the broker's default
        "replicas of each new quorum queue and stream (default: the broker's)",
        whole(1, 99),
    )
    activity_retention: timedelta = setting(
        "IKW_ACTIVITY_RETENTION",
        timedelta(days=7),
        "how far back `ikw activity` sees (the activity stream's age; 7d)",
        duration,
    )
    allow_insecure: bool = setting(
        "IKW_ALLOW_INSECURE",
        False,
        "allow plaintext or unverified transport to remote hosts",
        flag,
    )

    @property
    def amqp_urls(self) -> list[str]:
        return amqp_urls(self.amqp_url)

    @property
    def broker_user(self) -> str:
        """The user the broker knows the worker as: what it puts in every message's user_id."""
        return unquote(urlsplit(self.amqp_urls[0]).username or "guest")

    def problems(self) -> list[str]:
        """Plaintext or unverified transport to a broker that is not loopback."""
        found: list[str] = []
        if not self.allow_insecure:
            for address in self.amqp_urls:
                _amqp_transport(found, urlsplit(address))
        return found


@dataclass(frozen=True)
class GuestText:
    """What the guest reads (``ikw templates`` reads only these): the templates, checked and
    compiled once, in ``templates``."""

    templates_dir: Path | None = setting(
        "IKW_TEMPLATES_DIR",
        None,
        "the guest's words: <locale>/sms.txt, email_subject.txt, email.txt, ...",
        _directory,
    )
    time_zone: str = setting(
        "IKW_TIME_ZONE",
        "UTC",
        "IANA zone of the times guests read, unless the event has one (UTC)",
        _time_zone,
    )
    property_name: str | None = setting(
        "IKW_PROPERTY_NAME", None, "the property's name, unless the event has one", _property_name
    )
    # Compiled by load(); not copied by dataclasses.replace, so a changed copy compiles anew.
    templates: "Templates | None" = field(default=None, init=False, repr=False, compare=False)

    def compile(self, problems: list[str]) -> None:
        """Compile the templates into ``templates``, or add a line per problem."""
        from worker.channels.templates import TemplateProblem, Templates

        try:
            compiled = Templates(
                self.templates_dir, time_zone=self.time_zone, property_name=self.property_name
            )
        except TemplateProblem as exc:
            problems.extend(f"IKW_TEMPLATES_DIR: {problem}" for problem in exc.problems)
        except OSError as exc:
            problems.append(f"IKW_TEMPLATES_DIR: cannot read {self.templates_dir}: {exc.strerror}")
        except ValueError as exc:  # a time zone no reader checked (a copy made with replace())
            problems.append(f"IKW_TIME_ZONE: {exc}")
        else:
            object.__setattr__(self, "templates", compiled)


@dataclass(frozen=True)
class Settings(GuestText, BrokerSettings):
    """Everything ``ikw run`` reads: the broker's, the guest text's, Seam's, the channels' (by
    name, each its channel's own settings group) and the worker's own."""

    # Enough to hide ~200 ms per Seam call at what one core can do (docs/scaling.md).
    prefetch: int = setting(
        "IKW_PREFETCH",
        1024,
        "messages handled at once; sizes the HTTP pools too (default 1024)",
        whole(1, 10_000),
    )
    seam_endpoint: str = setting(
        "SEAM_ENDPOINT",
        "https://connect.getseam.com",
        "Seam API (default https://connect.getseam.com)",
        url("http", "https"),
    )
    seam_api_key: str = setting(
        "SEAM_API_KEY",
        "",
        "Seam API key (required)",
        required("(the Seam API key, or SEAM_API_KEY_FILE)"),
        secret=True,
    )
    http_port: int = setting(
        "IKW_HTTP_PORT",
        8080,
        "health and metrics port (default 8080; 0: any free port)",
        whole(0, 65535),
    )
    min_key_lifetime: timedelta = setting(
        "IKW_MIN_KEY_LIFETIME",
        timedelta(hours=1),
        "reuse a key only with this much left (default 1h)",
        duration,
    )
    max_attempts: int = setting(
        "IKW_MAX_ATTEMPTS",
        10,
        "tries before a grant's transient failure is dead-lettered (default 10)",
        whole(1, 1000),
    )
    max_retry_age: timedelta = setting(
        "IKW_MAX_RETRY_AGE",
        timedelta(days=1),
        "... or this long after the first failure (default 1d)",
        duration,
    )
    shutdown_grace: timedelta = setting(
        "IKW_SHUTDOWN_GRACE",
        timedelta(seconds=30),
        "on SIGTERM, time for in-flight messages (default 30s)",
        duration,
    )
    message_deadline: timedelta = setting(
        "IKW_MESSAGE_DEADLINE",
        timedelta(minutes=2),
        "one message's work; past it, it is retried later (default 2m)",
        duration,
    )
    trusted_publishers: Publishers = setting(
        "IKW_TRUSTED_PUBLISHERS",
        {},
        "broker users whose events count: name or name:key-prefix",
        _publishers,
    )
    revoke_retention: timedelta = setting(
        "IKW_REVOKE_RETENTION",
        timedelta(days=30),
        "how long revokes are remembered (default 30d)",
        duration,
    )
    max_clock_skew: timedelta = setting(
        "IKW_MAX_CLOCK_SKEW",
        timedelta(minutes=5),
        "refuse events that occurred this much after receipt (default 5m)",
        duration,
    )
    delivery_lead: timedelta = setting(
        "IKW_DELIVERY_LEAD",
        timedelta(hours=24),
        "a stay's key is sent this long before check-in (default 24h)",
        duration,
    )
    checkout_grace: timedelta = setting(
        "IKW_CHECKOUT_GRACE",
        timedelta(hours=1),
        "a stay's keys are deleted this long after checkout (default 1h)",
        duration,
    )
    renew_before: timedelta = setting(
        "IKW_RENEW_BEFORE",
        timedelta(hours=2),
        "a stay's key expiring before checkout is replaced this long before (default 2h)",
        duration,
    )
    declare: bool = setting(
        "IKW_DECLARE",
        True,
        "declare the topology at start (default true; false: check only)",
        flag,
    )
    log_level: str = setting(
        "IKW_LOG_LEVEL", "info", "debug, info (default), warning or error", one_of(*LOG_LEVELS)
    )
    log_format: str = setting(
        "IKW_LOG_FORMAT",
        "auto",
        "auto (default: text at a terminal, else JSON), json or text",
        one_of("auto", "json", "text"),
    )
    # Each configured channel's settings, by its name in the event ("sms"): see worker/channels.
    channels: Mapping[str, Any] = field(default_factory=dict)

    def problems(self) -> list[str]:
        found = []
        if self.revoke_retention < self.max_retry_age:
            found.append(
                "IKW_REVOKE_RETENTION: must be at least IKW_MAX_RETRY_AGE, so a revoke is "
                "remembered as long as an older grant may still be retried"
            )
        if self.message_deadline < timedelta(seconds=1):
            found.append("IKW_MESSAGE_DEADLINE: must be at least 1s")
        if not self.channels:
            found.append(
                "TWILIO_ACCOUNT_SID / SMTP_HOST: no delivery channel is configured; set the "
                "TWILIO_* variables for SMS or SMTP_HOST and EMAIL_FROM for email"
            )
        found += super().problems()
        seam = urlsplit(self.seam_endpoint)
        if not self.allow_insecure and seam.scheme == "http" and not loopback(seam.hostname):
            found.append(insecure("SEAM_ENDPOINT"))
        return found


def _amqp_transport(found: list[str], amqp: SplitResult) -> None:
    if not amqp.hostname or loopback(amqp.hostname):  # no host: already told
        return
    problems = []
    if amqp.scheme == "amqp":
        problems.append(
            f"AMQP_URL: plaintext amqp:// to a host that is not loopback; use amqps:// "
            f"{INSECURE_HINT}"
        )
    verify = parse_qs(amqp.query, keep_blank_values=True).get("no_verify_ssl", [])
    if amqp.scheme == "amqps" and any(value != "0" for value in verify):
        problems.append(
            f"AMQP_URL: no_verify_ssl turns off the broker's certificate check; drop it "
            f"(cafile= names a private CA) {INSECURE_HINT}"
        )
    found.extend(p for p in problems if p not in found)  # once for all addresses


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Read and check every setting; raise ConfigError listing every problem."""
    r = Reader(os.environ if env is None else env)
    settings = read_group(r, Settings)
    channels = {wiring.name: wiring.read(r) for wiring in CHANNELS}
    settings = replace(settings, channels={n: c for n, c in channels.items() if c is not None})
    if not r.problems:
        settings.compile(r.problems)
    r.problems.extend(p for p in settings.problems() if p not in r.problems)
    for group in settings.channels.values():
        r.problems.extend(group.problems(settings.allow_insecure))
    if r.problems:
        raise ConfigError("\n".join(r.problems))
    return settings


def guest_settings(env: Mapping[str, str] | None = None) -> GuestText:
    """Only what the guest reads needs (`ikw templates`): the templates, time zone, property."""
    r = Reader(os.environ if env is None else env)
    settings = read_group(r, GuestText)
    if not r.problems:
        settings.compile(r.problems)
    if r.problems:
        raise ConfigError("\n".join(r.problems))
    return settings


def broker_settings(env: Mapping[str, str] | None = None) -> BrokerSettings:
    """Only what the broker commands (publish, topology, dlq) need."""
    r = Reader(os.environ if env is None else env)
    settings = read_group(r, BrokerSettings)
    r.problems.extend(p for p in settings.problems() if p not in r.problems)
    if r.problems:
        raise ConfigError("\n".join(r.problems))
    return settings


def variables() -> list[Variable[Any]]:
    """Every variable the worker reads, the channels' included, group by group."""
    groups: list[type[Any]] = [Settings, *(wiring.settings for wiring in CHANNELS)]
    found: dict[str, Variable[Any]] = {}
    for group in groups:
        for _, variable in declared(group):
            found.setdefault(variable.name, variable)
    return list(found.values())


# For `ikw run --help`.
VARIABLES: tuple[tuple[str, str], ...] = tuple((v.name, v.doc) for v in variables())
SECRETS: tuple[str, ...] = tuple(v.name for v in variables() if v.secret)
