"""AMQP_URL naming several nodes of a cluster: expansion, validation, the address per attempt."""

import aio_pika
import pytest

from worker.broker import topology
from worker.broker.connect import BrokerUnreachable, MultiNodeConnection, connect, where
from worker.config import ConfigError, amqp_urls, broker_settings
from worker.queues import Names

ATTEMPT = "_RobustConnection__connect_transport"


def test_short_form_borrows_scheme_credentials_vhost_and_options_from_the_first() -> None:
    value = "amqp://u:p@127.0.0.1:5701/v?heartbeat=5, 127.0.0.1:5702,amqp://u:q@[::1]:5703/"
    assert amqp_urls(value) == [
        "amqp://u:p@127.0.0.1:5701/v?heartbeat=5",
        "amqp://u:p@127.0.0.1:5702/v?heartbeat=5",
        "amqp://u:q@[::1]:5703/",
    ]
    assert amqp_urls("amqp://h/") == ["amqp://h/"]


def test_settings_keep_every_address_and_take_the_user_from_the_first() -> None:
    settings = broker_settings({"AMQP_URL": "amqp://u:p@127.0.0.1:5701/,127.0.0.1:5702"})
    assert settings.amqp_urls == ["amqp://u:p@127.0.0.1:5701", "amqp://u:p@127.0.0.1:5702"]
    assert settings.broker_user == "u"
    assert "p@" not in repr(settings)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("amqp://u:secret@127.0.0.1:5701/,http://u:secret@h/", "address 2 of 2: must be an amqp"),
        ("amqp://u:secret@127.0.0.1:5701/,127.0.0.1:99999", "address 2 of 2: the port must be"),
        ("amqp://u:secret@127.0.0.1:5701/,", "address 2 of 2: must be an amqp"),
        ("amqp://u:secret@127.0.0.1/,amqp://v:secret@127.0.0.2/", "another user"),
        ("amqp://u:secret@127.0.0.1/,10.0.0.2", "plaintext amqp://"),
    ],
)
def test_every_address_is_checked_in_one_line_without_the_password(value: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        broker_settings({"AMQP_URL": value})
    message = str(caught.value)
    assert message.startswith("AMQP_URL: ") and says in message
    assert "\n" not in message and "secret" not in message


def test_quorum_size_is_a_setting_and_reaches_the_queue_arguments() -> None:
    assert broker_settings({}).quorum_size is None
    assert broker_settings({"IKW_QUORUM_SIZE": "3"}).quorum_size == 3
    with pytest.raises(ConfigError, match="IKW_QUORUM_SIZE"):
        broker_settings({"IKW_QUORUM_SIZE": "0"})
    names = Names("ns")
    default = {name: args for kind, name, args in topology.plan(names) if kind == "queue"}
    assert not any("x-quorum-initial-group-size" in a for a in default.values())
    sized = {n: a for kind, n, a in topology.plan(names, quorum_size=3) if kind == "queue"}
    assert sized[names.grants]["x-quorum-initial-group-size"] == 3
    assert sized[names.fence]["x-initial-cluster-size"] == 3
    assert "x-quorum-initial-group-size" not in sized[names.fence]


def test_where_names_every_address_and_no_credentials() -> None:
    assert where("amqp://u:secret@h1:5701/,h2:5702") == "h1:5701, h2:5702"


async def test_connect_tries_every_address_before_giving_up() -> None:
    with pytest.raises(BrokerUnreachable) as caught:
        await connect("amqp://u:secret@127.0.0.1:1/,127.0.0.1:2")
    assert "127.0.0.1:1, 127.0.0.1:2" in str(caught.value)
    assert "secret" not in str(caught.value)


async def test_each_attempt_starts_from_the_address_that_worked_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tried: list[int | None] = []

    async def attempt(self: MultiNodeConnection) -> None:  # aio-pika's one attempt, stubbed
        tried.append(self.url.port)
        if self.url.port != 2:
            raise ConnectionRefusedError

    monkeypatch.setattr(aio_pika.RobustConnection, ATTEMPT, attempt)
    connection = MultiNodeConnection([f"amqp://127.0.0.1:{port}/" for port in (1, 2, 3)])
    await getattr(connection, ATTEMPT)()
    await getattr(connection, ATTEMPT)()  # a reconnect: the node that answered last comes first
    assert tried == [1, 2, 2]
    assert connection.current == 1
    monkeypatch.setattr(aio_pika.RobustConnection, ATTEMPT, lambda self: attempt(self))
    tried.clear()
    connection.current = 2
    await getattr(connection, ATTEMPT)()
    assert tried == [3, 1, 2]
