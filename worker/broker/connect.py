"""Open the robust connection, or say in one line what is wrong: the URL, the credentials, the
virtual host, or that RabbitMQ is not there. Never with the password.

AMQP_URL may name several nodes of one cluster (see ``config.amqp_urls``): every connection
attempt, the first and each reconnect, tries them in turn, starting with the one that worked
last; aio-pika's reconnect pause (``reconnect_interval``) comes only after a whole round failed."""

import asyncio
import logging
import socket
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from yarl import URL

from worker.config import amqp_urls
from worker.logs import quiet_reconnects
from worker.variables import loopback

log = logging.getLogger(__name__)

# What a lost channel or connection looks like when we ack or publish.
BROKER_ERRORS = (
    aio_pika.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,  # a RuntimeError, not an AMQPError
    ConnectionError,
    TimeoutError,
)
NOT_ALLOWED = 530  # RabbitMQ closes Connection.Open with it: no such vhost, or no access to it
CONNECT_TIMEOUT = 15.0  # seconds per address and attempt: a node that hangs is passed over
START_ONE = (
    "start one with `rabbitmq-server -detached` or `docker run -d -p 5672:5672 rabbitmq:3.13`, "
    "or point AMQP_URL at yours"
)


class BrokerError(Exception):
    """One line for the operator; ``exit_code`` 2 when the configuration must change."""

    exit_code = 1


class BrokerUnreachable(BrokerError):
    """No RabbitMQ answered at that address (refused, no such host, TLS failure...)."""


class BrokerRefused(BrokerError):
    """RabbitMQ answered and refused the user, the password or the virtual host."""

    exit_code = 2


class BadBrokerUrl(BrokerError):
    """AMQP_URL cannot be used as it is (a port out of range, not a number...)."""

    exit_code = 2


def where(url: str) -> str:
    """host:port of ``url`` (of each address, for several), never its credentials."""
    if "," in url:
        return ", ".join(where(one) for one in amqp_urls(url))
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    default = 5671 if parts.scheme == "amqps" else 5672
    return f"{parts.hostname}:{port or default}"


def check_url(url: str) -> None:
    """Raise BadBrokerUrl for what the client library would only answer with a traceback."""
    parts = urlsplit(url)
    raw_port = parts.netloc.rpartition("@")[2].rpartition("]")[2].partition(":")[2]
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise BadBrokerUrl(
            f"AMQP_URL: the port must be a number from 1 to 65535, got {raw_port[:20]!r}"
        )
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise BadBrokerUrl(
            f"AMQP_URL: must be an amqp:// or amqps:// URL with a host, got {parts.scheme}://…"
        )


def _vhost(url: str) -> str:
    return unquote(urlsplit(amqp_urls(url)[0]).path[1:]) or "/"


# Every attempt of aio-pika's reconnect loop goes through this private method of
# RobustConnection (aio-pika 9 and 10): the one place to choose the address per attempt.
_ATTEMPT = "_RobustConnection__connect_transport"
if not hasattr(aio_pika.RobustConnection, _ATTEMPT):  # pragma: no cover - a new aio-pika
    raise ImportError(f"aio_pika.RobustConnection.{_ATTEMPT} is gone: review MultiNodeConnection")


class MultiNodeConnection(aio_pika.RobustConnection):
    """A robust connection to the first of ``urls`` that answers. Each connection attempt (the
    first and every reconnect) tries every address once, from the one that worked last; the
    channels, queues and consumers are restored on whichever node took the connection."""

    def __init__(self, urls: list[str], **kwargs: Any) -> None:
        self.urls = [URL(url) for url in urls]
        self.current = 0
        super().__init__(self.urls[0], **kwargs)

    async def _RobustConnection__connect_transport(self) -> None:
        attempt = getattr(super(), _ATTEMPT)
        last: Exception | None = None
        for step in range(len(self.urls)):
            index = (self.current + step) % len(self.urls)
            self.url = self.urls[index]
            try:
                await attempt()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                last = exc
                if len(self.urls) > 1:
                    log.info(
                        "RabbitMQ at %s: %s; trying the next address",
                        where(str(self.url)),
                        type(exc).__name__,
                    )
                continue
            if index != self.current:
                log.warning("connected to RabbitMQ at %s instead", where(str(self.url)))
            self.current = index
            return
        assert last is not None
        raise last


def explain(url: str, exc: BaseException) -> BrokerError:
    """The one line that says what to fix."""
    user = unquote(urlsplit(amqp_urls(url)[0]).username or "guest")
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return BrokerRefused(
            f"RabbitMQ at {where(url)} refused user {user!r} (ACCESS_REFUSED): wrong user or "
            "password in AMQP_URL, or a user that may only connect from localhost (like guest)"
        )
    closed = isinstance(exc, aiormq.exceptions.ConnectionNotAllowed) or (
        isinstance(exc, aiormq.exceptions.ConnectionClosed) and exc.args[:1] == (NOT_ALLOWED,)
    )
    refused_open = isinstance(exc, aiormq.exceptions.InvalidFrameError) and (
        "Connection.OpenOk" in str(exc) and "Connection.Close" in str(exc)
    )
    if closed or refused_open:
        vhost = _vhost(url)
        return BrokerRefused(
            f"RabbitMQ at {where(url)} has no virtual host {vhost!r} open to user {user!r} "
            f"(NOT_ALLOWED): fix the path of AMQP_URL, or create it "
            f"(`rabbitmqctl add_vhost {vhost}`) and give {user!r} permissions on it"
        )
    return BrokerUnreachable(f"cannot reach RabbitMQ at {where(url)} {_why_unreachable(url, exc)}")


def _why_unreachable(url: str, exc: BaseException) -> str:
    """The cause in words, and the advice that fits it: start a broker only when none answers
    on this machine."""
    cause = exc.__cause__ or exc.__context__
    hosts = [urlsplit(one).hostname or "" for one in amqp_urls(url)]
    if isinstance(cause, socket.gaierror):
        named = f"the name {hosts[0]!r}" if len(hosts) == 1 else "a host name in AMQP_URL"
        return f"({named} does not resolve); check the host in AMQP_URL"
    if isinstance(cause, ConnectionRefusedError):
        if all(loopback(host) for host in hosts):
            return f"(connection refused: nothing listens there); {START_ONE}"
        return "(connection refused); check the host and port in AMQP_URL, and that RabbitMQ runs"
    return f"({type(exc).__name__}); check AMQP_URL, and that RabbitMQ runs there"


async def connect(url: str, name: str = "instant-key-worker") -> AbstractRobustConnection:
    """``url``: one AMQP URL, or several separated by commas (a cluster's nodes)."""
    urls = amqp_urls(url)
    for one in urls:
        check_url(one)
    quiet_reconnects()  # a routine reconnect later is not an error-level log line
    # The first connection's failure is told in our one line below, not in aiormq's too.
    aiormq_log = logging.getLogger("aiormq")
    level = aiormq_log.level
    aiormq_log.setLevel(logging.CRITICAL)
    # aio-pika waits 5 s between attempts; a worker that is not connected delivers nothing.
    urls = [
        one
        if "reconnect_interval" in urlsplit(one).query
        else f"{one}{'&' if '?' in one else '?'}reconnect_interval=1"
        for one in urls
    ]
    try:
        connection = MultiNodeConnection(
            urls, fail_fast=True, client_properties={"connection_name": name}
        )
        await connection.connect(timeout=CONNECT_TIMEOUT)
        return connection
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        raise explain(url, exc) from None
    except ValueError:  # yarl's view of the URL; its message may hold the URL, so not shown
        raise BadBrokerUrl("AMQP_URL: not a valid AMQP URL (check its host and port)") from None
    finally:
        aiormq_log.setLevel(level)
