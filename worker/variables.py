"""Environment variables declared once: ``setting()`` on a settings field names the variable, its
default, its one-line doc, how it is read and whether it is a secret. worker/config.py and each
channel's module declare their groups with it; ``ikw run --help`` and ``load()`` read them."""

import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar, cast
from urllib.parse import urlsplit

T = TypeVar("T")


class ConfigError(Exception):
    """Raised with every problem found, one per line, each naming its variable."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
DURATION_HINT = "a duration such as 90, 90s, 15m, 2h or 1d"
_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_duration(raw: str) -> timedelta | None:
    """The duration, or None when ``raw`` is not one."""
    match = _DURATION.match(raw)
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]]) if match else None


class Reader:
    """Reads variables from ``env``, collecting a line per problem in ``problems``."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def text(self, name: str, default: str | None = None, secret: bool = False) -> str | None:
        file_name = self.env.get(f"{name}_FILE")
        if secret and file_name:
            try:
                return Path(file_name).read_text().strip() or None
            except OSError as exc:
                self.problems.append(f"{name}_FILE: cannot read {file_name}: {exc.strerror}")
                return None
        value = self.env.get(name, "").strip()
        return value or default

    def integer(self, name: str, default: T, low: int, high: int) -> int | T:
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
            shown = raw
            self.problems.append(
                f"{name}: must be {an(schemes[0])} {' or '.join(schemes)} URL with a host, "
                f"got {shown!r}"
            )
        return raw.rstrip("/")

    def require(self, name: str, why: str, secret: bool = False) -> str:
        told = len(self.problems)
        value = self.text(name, secret=secret)
        if value is None and len(self.problems) == told:  # an unreadable NAME_FILE: told already
            file_name = self.env.get(f"{name}_FILE") if secret else None
            self.problems.append(
                f"{name}_FILE: {file_name} is empty" if file_name else f"{name}: required {why}"
            )
        return value or ""


def an(word: str) -> str:
    """The article before a name read letter by letter ("an amqp", "an http", "a tcp")."""
    return "an" if word[:1].lower() in "aefhilmnorsx" else "a"


G = TypeVar("G")


@dataclass(frozen=True)
class Variable(Generic[T]):
    """One environment variable: read by ``read`` into its field, ``default`` when unset."""

    name: str
    default: T
    doc: str
    read: Callable[[Reader, "Variable[T]"], T]
    secret: bool = False  # also read from NAME_FILE; never shown, never in a repr
    switch: bool = False  # setting it turns its channel on


def setting(
    name: str,
    default: T,
    doc: str,
    read: Callable[[Reader, "Variable[T]"], T],
    *,
    secret: bool = False,
    switch: bool = False,
) -> T:
    """Declare the field's variable; the one place a setting is named, documented and read."""
    variable = Variable(name, default, doc, read, secret, switch)
    metadata = {"variable": variable}
    if isinstance(default, dict):  # a mutable default: each instance gets its own copy
        copy = cast(Callable[[], T], default.copy)
        return field(default_factory=copy, repr=not secret, metadata=metadata)
    return field(default=default, repr=not secret, metadata=metadata)


def declared(group: type[Any]) -> Iterator[tuple[Field[Any], Variable[Any]]]:
    for one in fields(group):
        if "variable" in one.metadata:
            yield one, one.metadata["variable"]


def read_group(r: Reader, group: type[G]) -> G:
    """The group with each declared field read from the environment."""
    return group(**{one.name: variable.read(r, variable) for one, variable in declared(group)})


# Readers, for ``setting(read=...)``.


def text(r: Reader, v: Variable[str]) -> str:
    return r.text(v.name, v.default, v.secret) or v.default


def optional(r: Reader, v: Variable[str | None]) -> str | None:
    return r.text(v.name, secret=v.secret)


def duration(r: Reader, v: Variable[timedelta]) -> timedelta:
    return r.duration(v.name, v.default)


def flag(r: Reader, v: Variable[bool]) -> bool:
    return r.flag(v.name, v.default)


def whole(low: int, high: int) -> Callable[[Reader, Variable[Any]], Any]:
    return lambda r, v: r.integer(v.name, v.default, low, high)


def url(*schemes: str) -> Callable[[Reader, Variable[str]], str]:
    return lambda r, v: r.url(v.name, v.default, schemes)


def required(why: str) -> Callable[[Reader, Variable[str]], str]:
    return lambda r, v: r.require(v.name, why, v.secret)


def one_of(*choices: str) -> Callable[[Reader, Variable[str]], str]:
    def read(r: Reader, v: Variable[str]) -> str:
        value = (r.text(v.name) or v.default).lower()
        if value not in choices:
            told = ", ".join(choices[:-1]) + f" or {choices[-1]}"
            r.problems.append(f"{v.name}: must be {told}, got {value[:20]!r}")
        return value

    return read


INSECURE_HINT = "or set IKW_ALLOW_INSECURE=1"


def insecure(name: str) -> str:
    return f"{name}: plain http:// to a host that is not loopback; use https:// {INSECURE_HINT}"


def loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 or localhost."""
    name = (host or "").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
