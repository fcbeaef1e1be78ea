"""The commands a newcomer runs first: `ikw demo`, and what it says without a broker."""

import asyncio
import json
import logging
import re
import signal
import socket
import subprocess
import uuid
from importlib import metadata
from pathlib import Path

import aio_pika
import aiormq
import pytest

from tests.helpers import AMQP_URL, IKW, Connection
from worker import config, contract
from worker.broker.connect import connect
from worker.broker.topology import Names
from worker.logs import quiet_reconnects
from worker.sandbox import wait_for
from worker.sandbox.proxy import Proxy

PACKAGE = "instant-key-worker"


def env(namespace: str = "instant_keys", amqp_url: str = AMQP_URL) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "AMQP_URL": amqp_url, "IKW_NAMESPACE": namespace}


def ikw(
    *args: str, amqp_url: str = AMQP_URL, namespace: str = "instant_keys"
) -> subprocess.CompletedProcess[str]:
    """`ikw ...` as a process, stdin not a terminal."""
    return subprocess.run(
        [*IKW, *args],
        env=env(namespace, amqp_url),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def aikw(*args: str, namespace: str) -> subprocess.CompletedProcess[str]:
    """The same without blocking the loop the test's own connection runs on."""
    return await asyncio.to_thread(ikw, *args, namespace=namespace)


async def missing_queues(amqp: Connection, names: Names) -> list[str]:
    """The namespace's queues a passive declare does not find."""
    channel = await amqp.channel()
    missing = []
    for name in names.all_queues():
        try:
            await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            missing.append(name)
            await channel.reopen()
    await channel.close()
    return missing


def test_demo_shows_the_sms_the_email_and_the_deletion() -> None:
    result = ikw("demo", "--key-lifetime", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    sms = re.search(r"--- SMS to \+1\*+00 .*?---\n(.*)\n", out)
    assert sms and re.search(r"https://ik\.seam\.co/\S+", sms[1]), out
    assert re.search(r"--- email to g\*\*\*@example\.com, subject: .+ ---", out), out
    assert out.count("deleted from Seam: instant key") == 2
    # A stay: scheduled at once, its key sent before check-in, deleted at checkout.
    assert re.search(
        r"^  access\.scheduled  .*reservation_key=res-demo-1 deliver_at=\S+$", out, re.M
    )
    sent = re.search(r"^\+(\d+\.\d) s: the key is sent, before check-in$", out, re.MULTILINE)
    ended = re.search(r"^\+(\d+\.\d) s: checkout: the key is deleted from Seam$", out, re.M)
    assert sent and ended, out
    assert 3 <= float(sent[1]) < 5 and 10 <= float(ended[1]) < 15  # +3 s, check-in +5, out +9+1
    assert re.search(r"^  instant_key\.deleted  instant_key_id=\S+ why=stay_ended$", out, re.M)
    assert "\ndemo done: 2 grants delivered, 2 keys deleted at expiry, one stay sent" in out


def test_the_demo_names_what_it_made_what_was_heard_and_what_to_try_next() -> None:
    result = ikw("demo", "--key-lifetime", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for key in ("guest-ada", "guest-grace"):  # the identities it created in Seam
        assert re.search(rf"^  {key}  user_identity_id [0-9a-f-]{{36}}$", out, re.MULTILINE), out
    assert re.search(r"^the outbox page, while the demo runs: http://127\.0\.0\.1:\d+/$", out, re.M)
    delivered = re.findall(
        r"^  access\.delivered  grant_id=\S+ event_id=\S+ user_identity_key=(guest-\w+) "
        r"instant_key_id=\S+ channel=(\w+)$",
        out,
        re.MULTILINE,
    )
    assert sorted(delivered) == [("guest-ada", "sms"), ("guest-grace", "email")], out
    deleted = re.findall(r"^  instant_key\.deleted  .*instant_key_id=\S+ why=expired$", out, re.M)
    assert len(deleted) == 2, out
    # ikw is not on the PATH of `make demo`: the commands name it by its path.
    _, _, after = out.partition("\nwhat to try next (")
    ikw_path = after.partition(":")[0]
    assert Path(ikw_path).name == "ikw" and Path(ikw_path).exists(), after
    steps = re.findall(r"^  \d\. .*", after, re.MULTILINE)
    assert [step.count(f"{ikw_path} ") for step in steps] == [1, 1, 1, 1], after
    assert f"{ikw_path} sandbox" in steps[0] and f"{ikw_path} publish grant" in steps[2]


def test_without_rabbitmq_the_demo_says_so_in_one_line() -> None:
    result = ikw("demo", amqp_url="amqp://guest:guest@127.0.0.1:1/")
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("ikw: cannot reach RabbitMQ at 127.0.0.1:1")
    assert "rabbitmq-server -detached" in line


# --- Operating it: one line, a documented exit code -------------------------------------------


def test_version_is_the_package_version() -> None:
    result = ikw("--version")
    assert (result.returncode, result.stdout) == (0, f"ikw {metadata.version(PACKAGE)}\n")


COMMANDS = [
    "run",
    "demo",
    "sandbox",
    "publish",
    "topology",
    "status",
    "activity",
    "schema",
    "dlq",
    "templates",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command_says_what_it_does(command: str) -> None:
    result = ikw(command, "--help")
    assert result.returncode == 0
    usage, _, rest = result.stdout.partition("\n\n")
    assert usage.startswith(f"usage: ikw {command}")
    assert len(rest.split("\n\n")[0]) > 30, result.stdout  # a sentence, not just the flags


def test_run_help_lists_every_variable_the_configuration_reads() -> None:
    modules = [Path(config.__file__), *Path(config.__file__).parent.glob("channels/*_wiring.py")]
    source = "".join(module.read_text() for module in modules)
    read = set(re.findall(r'"((?:AMQP|IKW|SEAM|TWILIO|SMTP|EMAIL)_[A-Z_]+)"', source))
    read -= {"SEAM_API_KEY_FILE"}  # a hint in a message; every secret's _FILE is one line
    help_text = ikw("run", "--help").stdout
    listed = set(re.findall(r"^  ([A-Z][A-Z_]+)  ", help_text, re.MULTILINE))
    assert read <= listed, f"not in `ikw run --help`: {sorted(read - listed)}"
    assert {name for name, _ in config.VARIABLES} <= listed
    assert "NAME_FILE" in listed


BROKER_URL_CASES = [
    (
        "amqp://guest:s3cret-pw@127.0.0.1:5672/",
        2,
        "ikw: RabbitMQ at 127.0.0.1:5672 refused user 'guest' (ACCESS_REFUSED): wrong user or "
        "password in AMQP_URL",
    ),
    (
        "amqp://guest:guest@127.0.0.1:5672/nope",
        2,
        "ikw: RabbitMQ at 127.0.0.1:5672 has no virtual host 'nope' open to user 'guest' "
        "(NOT_ALLOWED): fix the path of AMQP_URL, or create it",
    ),
    (
        "amqp://guest:s3cret-pw@127.0.0.1:99999/",
        2,
        "ikw: AMQP_URL: the port must be a number from 1 to 65535, got '99999'",
    ),
    (
        "amqp://guest:s3cret-pw@127.0.0.1:1/",
        1,
        "ikw: cannot reach RabbitMQ at 127.0.0.1:1 (connection refused: nothing listens there); "
        "start one with `rabbitmq-server -detached`",
    ),
    (
        "amqps://guest:s3cret-pw@nosuchhost.invalid/",
        1,
        "ikw: cannot reach RabbitMQ at nosuchhost.invalid:5671 (the name 'nosuchhost.invalid' "
        "does not resolve); check the host in AMQP_URL",
    ),
    ("http://guest:s3cret-pw@127.0.0.1:5672/", 2, "ikw: AMQP_URL: must be an amqp or amqps URL"),
    ("notaurl", 2, "ikw: AMQP_URL: must be an amqp or amqps URL with a host"),
]


@pytest.mark.parametrize(("url", "code", "line"), BROKER_URL_CASES)
@pytest.mark.parametrize("command", [["publish", "revoke", "--key", "k"], ["dlq", "list"]])
def test_a_broker_problem_is_one_line_saying_what_to_fix(
    command: list[str], url: str, code: int, line: str
) -> None:
    result = ikw(*command, amqp_url=url)
    assert result.stdout == ""
    if code == 2 and line.startswith("ikw: AMQP_URL"):  # as every configuration problem
        assert result.stderr.startswith("ikw: configuration error:\n")
        line = line.removeprefix("ikw: ")
        [said] = result.stderr.splitlines()[1:]
    else:
        [said] = result.stderr.splitlines()
    assert said.startswith(line), said
    assert result.returncode == code
    assert "s3cret-pw" not in said


def test_run_in_an_empty_environment_lists_every_problem_at_once() -> None:
    result = subprocess.run(
        [*IKW, "run"], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        "ikw: configuration error:",
        "SEAM_API_KEY: required (the Seam API key, or SEAM_API_KEY_FILE)",
        "TWILIO_ACCOUNT_SID / SMTP_HOST: no delivery channel is configured; set the TWILIO_* "
        "variables for SMS or SMTP_HOST and EMAIL_FROM for email",
    ]


def test_publish_without_the_topology_is_one_line() -> None:
    namespace = f"ikw_test_absent_{uuid.uuid4().hex[:6]}"
    result = ikw("publish", "revoke", "--key", "guest-1", namespace=namespace)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"ikw: exchange {namespace} does not exist; run `ikw topology` first "
        "(or check IKW_NAMESPACE)\n"
    )


def test_a_usage_error_exits_2() -> None:
    result = ikw("topology", "--yes")
    assert (result.returncode, result.stderr) == (2, "ikw: --yes goes with --delete only\n")
    assert ikw("publish", "grant", "--key", "k", "--phone", "12").returncode == 2
    assert ikw("no-such-command").returncode == 2


async def test_topology_delete_says_what_it_would_destroy_and_needs_a_terminal(
    amqp: Connection, names: Names
) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    await channel.default_exchange.publish(aio_pika.Message(b"{}"), names.dead)
    for level in (3, 9):  # an expiry timer on its way down
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), names.delay(level))
    await channel.close()

    result = await aikw("topology", "--delete", namespace=names.namespace)

    assert result.returncode == 1
    assert result.stdout.startswith(
        f"delete namespace {names.namespace}: {len(names.all_queues())} queues and their "
        "exchanges, holding 3 ready messages:\n"
    )
    assert f"        1  dead letters in {names.dead}\n" in result.stdout
    assert "        2  pending expiry timers and retries in" in result.stdout
    assert "never deleted from Seam" in result.stdout
    assert f"The revokes remembered in {names.fence} are forgotten" in result.stdout
    assert result.stderr == (
        f"ikw topology: refusing to delete namespace {names.namespace} without confirmation: "
        "stdin is not a terminal; pass --yes to confirm. Nothing was changed.\n"
    )
    assert await missing_queues(amqp, names) == []

    result = await aikw("topology", "--delete", "--yes", namespace=names.namespace)
    assert (result.returncode, result.stdout) == (
        0,
        f"deleted the topology of namespace {names.namespace} "
        f"({len(names.all_queues())} queues, with 3 messages)\n",
    )
    assert await missing_queues(amqp, names) == names.all_queues()


async def test_topology_declares_each_producer_s_outcome_queue(
    amqp: Connection, names: Names
) -> None:
    producers = ("booking", "rival")
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    try:
        result = await aikw(
            "topology", "--producer", "booking", "--producer", "rival", namespace=names.namespace
        )
        assert result.returncode == 0, result.stderr
        queue = names.outcome_queue("booking")
        assert f"binding          {names.outcomes} --[booking.#]--> {queue}" in result.stdout
        outcomes = await channel.get_exchange(names.outcomes)
        for producer in producers:
            message = aio_pika.Message(producer.encode())
            await outcomes.publish(message, f"{producer}.access.delivered", mandatory=True)
        for producer in producers:
            declared = await channel.get_queue(names.outcome_queue(producer))
            got = await declared.get(timeout=5)
            assert got.body == producer.encode()
            assert await declared.get(fail=False) is None  # not the other's
    finally:
        for producer in producers:
            await channel.queue_delete(names.outcome_queue(producer))

    result = await aikw("topology", "--check", "--producer", "other", namespace=names.namespace)
    assert result.returncode == 1
    assert f"missing: queue {names.outcome_queue('other')}" in result.stdout
    result = await aikw("topology", "--producer", "a.b", namespace=names.namespace)
    assert result.returncode == 2
    assert "a producer is its broker user: 1 to 64 letters, digits, '_' or '-', got 'a.b'" in (
        result.stderr
    )


async def test_topology_check_of_a_namespace_never_declared_is_one_line(
    amqp: Connection, names: Names
) -> None:
    absent = f"ikw_test_absent_{uuid.uuid4().hex[:6]}"
    result = await aikw("topology", "--check", namespace=absent)
    assert (result.returncode, result.stderr) == (1, "")
    assert result.stdout == f"namespace {absent} is not declared: run `ikw topology`\n"

    channel = await amqp.channel()
    await channel.queue_delete(names.dead)  # partly missing: each missing part is named
    result = await aikw("topology", "--check", namespace=names.namespace)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [f"missing: queue {names.dead}", "1 missing"]


def test_schema_check_says_up_to_date_missing_or_stale(tmp_path: Path) -> None:
    count = len(contract.render())
    fine = ikw("schema", "--check")
    assert (fine.returncode, fine.stdout) == (0, f"schemas/ is up to date: {count} files\n")

    nowhere = ikw("schema", "--check", "--out", str(tmp_path / "none"))
    assert (nowhere.returncode, nowhere.stdout) == (
        1,
        f"{tmp_path / 'none'}/ is missing: run `ikw schema --out {tmp_path / 'none'}`\n",
    )

    assert ikw("schema", "--out", str(tmp_path)).returncode == 0
    (tmp_path / "access.granted.v1.json").unlink()
    (tmp_path / "asyncapi.json").write_text("{}")
    some = ikw("schema", "--check", "--out", str(tmp_path))
    assert some.returncode == 1
    assert some.stdout.splitlines() == [
        f"missing: {tmp_path / 'access.granted.v1.json'}",
        f"stale: {tmp_path / 'asyncapi.json'}",
        f"2 of {count} files to write: run `ikw schema --out {tmp_path}`",
    ]


async def test_a_reader_that_stops_early_ends_quietly(amqp: Connection, names: Names) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    headers: aio_pika.abc.HeadersType = {
        "x-ikw-reason": "malformed_json",
        "x-ikw-source-queue": names.grants,
        "x-ikw-error": "x" * 150,
    }
    for n in range(600):  # ~ 120 KB of listing: more than a pipe holds
        message = aio_pika.Message(b"{", headers=headers, message_id=f"bad-{n}")
        await channel.default_exchange.publish(message, names.dead)
    await channel.close()

    process = await asyncio.create_subprocess_exec(
        *IKW,
        "dlq",
        "list",
        "--limit",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env(names.namespace),
    )
    assert process.stdout and process.stderr
    first = await asyncio.wait_for(process.stdout.readline(), 30)
    process.stdout.feed_eof()
    transport = process._transport  # type: ignore[attr-defined]
    transport.get_pipe_transport(1).close()  # `| head -1`: the reader is gone
    err = await asyncio.wait_for(process.stderr.read(), 30)
    code = await asyncio.wait_for(process.wait(), 30)

    assert first == f"600 dead letters in {names.dead}\n".encode()
    assert (code, err) == (0, b"")


async def test_demo_stopped_by_sigterm_deletes_its_namespace(amqp: Connection) -> None:
    process = await asyncio.create_subprocess_exec(
        *IKW,
        "demo",
        "--key-lifetime",
        "600",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env(),
    )
    assert process.stdout
    namespace = None
    lines: list[str] = []
    async with asyncio.timeout(60):
        while namespace is None:
            line = (await process.stdout.readline()).decode()
            assert line, f"the demo ended first: {lines}"
            lines.append(line)
            if found := re.match(r"worker up on namespace (\S+),", line):
                namespace = found[1]
    names = Names(namespace)
    assert await missing_queues(amqp, names) == []

    process.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(process.communicate(), 60)

    assert process.returncode == 143, err
    assert err.decode().splitlines() == [
        f"ikw demo: stopped; its worker, stand-ins and namespace {namespace} are gone"
    ]
    assert await missing_queues(amqp, names) == names.all_queues()


async def test_a_connection_cut_logs_no_error_from_the_amqp_libraries(
    log_lines: list[str],
) -> None:
    proxy = Proxy("127.0.0.1", 5672)
    await proxy.start()
    url = AMQP_URL.replace(":5672", f":{proxy.port}") + "?reconnect_interval=0.2"
    connection = await connect(url, "ikw test")
    reconnected = asyncio.Event()

    async def on_reconnect(*_: object) -> None:
        reconnected.set()

    async def on_message(_: aio_pika.abc.AbstractIncomingMessage) -> None:
        pass

    connection.reconnect_callbacks.add(on_reconnect)
    channels = [await connection.channel(), await connection.channel(publisher_confirms=True)]
    queue = await channels[0].declare_queue(exclusive=True)
    await queue.consume(on_message)
    try:
        for _ in range(2):
            reconnected.clear()
            proxy.cut()
            await asyncio.wait_for(reconnected.wait(), 20)
            await wait_for(lambda: all(not c.is_closed for c in channels), 10, "the channels")
    finally:
        await connection.close()
        await proxy.stop()

    library = [json.loads(line) for line in log_lines if '"logger": "ai' in line]
    assert [entry for entry in library if entry["level"] == "warning"], log_lines
    assert [entry for entry in library if entry["level"] == "error"] == []


def test_other_library_errors_keep_their_level() -> None:
    logger = logging.getLogger("aio_pika.tools")
    quiet_reconnects()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign,assignment]
    logger.addHandler(handler)
    try:
        logger.error("Callback %r error: %s: %s", "<my_callback>", "KeyError", "boom")
        logger.error("Callback %r error: %s: %s", "<RobustChannel._on_close>", "KeyError", "x")
        logger.error("Callback %r error: %s: %s", "<RobustChannel._on_close>", "RuntimeError", "")
    finally:
        logger.removeHandler(handler)
    assert [r.levelname for r in records] == ["ERROR", "ERROR", "WARNING"]


def test_a_busy_health_port_stops_the_start_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*IKW, "run"],
            env=env(f"ikw_test_{uuid.uuid4().hex[:10]}")
            | {
                "IKW_HTTP_PORT": str(port),
                "SEAM_API_KEY": "k",
                "SMTP_HOST": "127.0.0.1",
                "EMAIL_FROM": "keys@example.com",
            },
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"ikw: cannot serve health and metrics on port {port} (address already in use); "
        "free it or set IKW_HTTP_PORT"
    )
    assert "lost the connection" not in result.stderr and "Traceback" not in result.stderr
