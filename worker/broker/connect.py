"""Open the robust connection, or say in one line that RabbitMQ is not there."""

import logging
from urllib.parse import urlsplit

import aio_pika
from aio_pika.abc import AbstractRobustConnection

# What a lost channel or connection looks like when we ack or publish.
BROKER_ERRORS = (
    aio_pika.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,  # a RuntimeError, not an AMQPError
    ConnectionError,
    TimeoutError,
)


class BrokerUnreachable(Exception):
    pass


async def connect(url: str, name: str = "instant-key-worker") -> AbstractRobustConnection:
    # The first connection's failure is told in our one line below, not in aiormq's too.
    aiormq_log = logging.getLogger("aiormq")
    level = aiormq_log.level
    aiormq_log.setLevel(logging.CRITICAL)
    if "reconnect_interval" not in urlsplit(url).query:
        # aio-pika waits 5 s between attempts; a worker that is not connected delivers nothing.
        url += ("&" if "?" in url else "?") + "reconnect_interval=1"
    try:
        return await aio_pika.connect_robust(
            url, fail_fast=True, client_properties={"connection_name": name}
        )
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        parts = urlsplit(url)
        raise BrokerUnreachable(
            f"cannot reach RabbitMQ at {parts.hostname}:{parts.port or 5672} "
            f"({type(exc).__name__}); start one with `rabbitmq-server -detached` or "
            "`docker run -d -p 5672:5672 rabbitmq:3.13`, or point AMQP_URL at yours"
        ) from None
    finally:
        aiormq_log.setLevel(level)
