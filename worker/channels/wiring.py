"""What a channel brings: its settings group, its factory and its template files."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from opentelemetry.trace import Tracer

from worker.ports import Channel
from worker.variables import Reader, declared, read_group

if TYPE_CHECKING:
    from worker.channels.templates import Templates


class ChannelSettings(Protocol):
    def problems(self, allow_insecure: bool) -> list[str]:
        """What is wrong across its variables (each variable's own problems are told already),
        plaintext to a host that is not loopback included unless ``allow_insecure``."""


S = TypeVar("S", bound=ChannelSettings)


@dataclass(frozen=True)
class Needs:
    """What the service hands every channel it builds."""

    templates: "Templates"
    connections: int  # IKW_PREFETCH: one connection per message in flight
    tracer: Tracer | None = None


@dataclass(frozen=True)
class Wiring(Generic[S]):
    """A channel as the worker wires it. Its settings group declares its variables with
    ``setting()``; one marked ``switch=True`` being set turns the channel on."""

    name: str  # as the event's delivery.channels names it
    settings: type[S]
    build: Callable[[S, Needs], Channel]
    templates: tuple[str, ...]  # its files in each locale directory of the templates

    def read(self, r: Reader) -> S | None:
        """Its settings, or None when none of its switches is set."""
        switches = [v for _, v in declared(self.settings) if v.switch]
        if not any(r.text(v.name, secret=v.secret) for v in switches):
            return None
        return read_group(r, self.settings)
