"""What the sandbox sent: the Twilio stand-in's message list and fetch, the outbox as JSON, and
`ikw sandbox` printing every SMS and email as it arrives."""

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import EmailMessage
from urllib.parse import parse_qs, urlsplit

import aiohttp
import aiosmtplib
import pytest

from tests import reference as reference_file
from tests.builders import grant
from tests.helpers import Json
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox
from worker.sandbox.twilio import TwilioSandbox
from worker.service import Service

PAGING = {
    "page",
    "page_size",
    "uri",
    "first_page_uri",
    "next_page_uri",
    "previous_page_uri",
    "start",
    "end",
}


def messages_path(twilio: TwilioSandbox, account_sid: str | None = None) -> str:
    return f"/2010-04-01/Accounts/{account_sid or twilio.account_sid}/Messages.json"


async def get(
    url: str, auth: tuple[str, str] | None, params: dict[str, str] | None = None
) -> tuple[int, Json, dict[str, str]]:
    headers = {"Authorization": aiohttp.encode_basic_auth(*auth)} if auth else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers, params=params) as response,
    ):
        return response.status, await response.json(), dict(response.headers)


async def send_sms(twilio: TwilioSandbox, to: str, body: str) -> Json:
    auth = {"Authorization": aiohttp.encode_basic_auth(twilio.account_sid, twilio.auth_token)}
    form = {"To": to, "From": "+15005550006", "Body": body}
    url = twilio.url + messages_path(twilio)
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=form, headers=auth) as response,
    ):
        assert response.status == 201
        created: Json = await response.json()
        return created


# --- the Twilio stand-in's list and fetch ---------------------------------------------------


async def test_message_list_has_twilio_shape_newest_first(twilio: TwilioSandbox) -> None:
    sent = [await send_sms(twilio, f"+1415555010{i}", f"message {i}") for i in range(3)]
    auth = (twilio.account_sid, twilio.auth_token)

    status, page, _ = await get(twilio.url + messages_path(twilio), auth)

    assert status == 200
    assert set(page) == PAGING | {"messages"}
    assert page["messages"] == sent[::-1]  # newest first, each as the 201 answered it
    schema = reference_file.load("twilio-messages-openapi.json")["components"]["schemas"]
    properties = set(schema["api.v2010.account.message"]["properties"])
    assert all(set(message) == properties for message in page["messages"])
    path = messages_path(twilio)
    assert page | {"messages": None} == {
        "messages": None,
        "page": 0,
        "page_size": 50,
        "start": 0,
        "end": 2,
        "uri": f"{path}?PageSize=50&Page=0",
        "first_page_uri": f"{path}?PageSize=50&Page=0",
        "next_page_uri": None,
        "previous_page_uri": None,
    }


async def test_message_list_pages_and_filters(twilio: TwilioSandbox) -> None:
    sent = [await send_sms(twilio, "+14155550100", f"message {i}") for i in range(3)]
    other = await send_sms(twilio, "+14155550199", "another guest")
    auth = (twilio.account_sid, twilio.auth_token)
    url = twilio.url + messages_path(twilio)

    status, first, _ = await get(url, auth, {"To": "+14155550100", "PageSize": "2"})
    assert status == 200
    assert [m["sid"] for m in first["messages"]] == [sent[2]["sid"], sent[1]["sid"]]
    assert (first["start"], first["end"], first["previous_page_uri"]) == (0, 1, None)
    following = urlsplit(first["next_page_uri"])
    assert following.path == messages_path(twilio)
    query = parse_qs(following.query)
    assert query["To"] == ["+14155550100"] and query["Page"] == ["1"] and "PageToken" in query

    status, second, _ = await get(twilio.url + first["next_page_uri"], auth)
    assert status == 200
    assert [m["sid"] for m in second["messages"]] == [sent[0]["sid"]]
    assert (second["page"], second["start"], second["end"]) == (1, 2, 2)
    assert second["next_page_uri"] is None
    assert parse_qs(urlsplit(second["previous_page_uri"]).query)["Page"] == ["0"]

    _, only, _ = await get(url, auth, {"To": "+14155550199"})
    assert only["messages"] == [other]

    status, refused, _ = await get(url, auth, {"PageSize": "1001"})
    assert (status, refused["status"], refused["code"]) == (400, 400, 20001)


async def test_fetch_one_message(twilio: TwilioSandbox) -> None:
    created = await send_sms(twilio, "+14155550100", "Your key: https://ik.example.com/k/1")
    auth = (twilio.account_sid, twilio.auth_token)
    base = twilio.url + f"/2010-04-01/Accounts/{twilio.account_sid}/Messages/"

    status, fetched, _ = await get(base + created["sid"] + ".json", auth)
    assert (status, fetched) == (200, created)
    assert twilio.url + created["uri"] == base + created["sid"] + ".json"

    missing = "SM" + "0" * 32
    status, error, _ = await get(base + missing + ".json", auth)
    assert status == 404
    assert error == {
        "code": 20404,
        "message": f"The requested resource {urlsplit(base).path}{missing}.json was not found",
        "more_info": "https://www.twilio.com/docs/errors/20404",
        "status": 404,
    }


@pytest.mark.parametrize(
    "auth",
    [None, ("AC" + "0123456789abcdef" * 2, "wrong-token"), ("", "")],
    ids=["none", "wrong-token", "empty"],
)
@pytest.mark.parametrize("what", ["list", "fetch"])
async def test_reading_messages_needs_the_credentials(
    twilio: TwilioSandbox, auth: tuple[str, str] | None, what: str
) -> None:
    created = await send_sms(twilio, "+14155550100", "secret link https://ik.example.com/k/1")
    url = twilio.url + messages_path(twilio)
    if what == "fetch":
        url = url.removesuffix(".json") + f"/{created['sid']}.json"

    status, body, headers = await get(url, auth)

    assert status == 401
    assert body == {
        "code": 20003,
        "message": "Authenticate",
        "more_info": "https://www.twilio.com/docs/errors/20003",
        "status": 401,
    }
    assert headers["WWW-Authenticate"].startswith("Basic")


async def test_one_accounts_credentials_cannot_list_another(twilio: TwilioSandbox) -> None:
    await send_sms(twilio, "+14155550100", "hello")
    other = "AC" + "f" * 32
    status, body, _ = await get(
        twilio.url + messages_path(twilio, other), (twilio.account_sid, twilio.auth_token)
    )
    assert (status, body["code"]) == (401, 20003)


# --- the outbox as JSON, after a worker delivered -------------------------------------------


async def deliver_both(
    sandbox: Sandbox,
    start_worker: Callable[..., Awaitable[Service]],
    publish: Callable[..., Awaitable[None]],
) -> tuple[str, str]:
    """One grant by SMS, one by email, through a worker; their links (SMS, email)."""
    await start_worker()
    await publish(grant(name="Ada Lovelace", phone="+14155550100", channels=("sms",)))
    await wait_for(lambda: sandbox.twilio.outbox, 30, "the SMS")
    await publish(grant(name="Grace Hopper", email="grace@example.com", channels=("email",)))
    await wait_for(lambda: sandbox.smtp.messages, 30, "the email")
    urls = [key["instant_key_url"] for key in sandbox.seam.keys.values()]
    [sms_link] = [url for url in urls if url in sandbox.twilio.outbox[0]["body"]]
    [email_link] = [url for url in urls if url != sms_link]
    return sms_link, email_link


async def test_outbox_json_lists_sms_and_email_newest_first(
    sandbox: Sandbox,
    start_worker: Callable[..., Awaitable[Service]],
    publish: Callable[..., Awaitable[None]],
) -> None:
    sms_link, email_link = await deliver_both(sandbox, start_worker, publish)

    status, outbox, headers = await get(sandbox.outbox.url + "/outbox.json", None)

    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert outbox["count"] == 2
    email, sms = outbox["messages"]  # newest first
    assert sms["kind"] == "sms" and sms["id"] == "sms-1"
    assert (sms["to"], sms["from"]) == ("+14155550100", "+15005550006")
    assert sms["sid"] == sandbox.twilio.outbox[0]["sid"]
    assert sms["body"] == sandbox.twilio.outbox[0]["body"]
    assert sms["links"] == [sms_link]
    assert email["kind"] == "email" and email["id"] == "email-2"
    assert email["envelope_from"] == "keys@example.com"
    assert email["envelope_to"] == ["grace@example.com"]
    assert "grace@example.com" in email["to"]
    assert email["subject"] == sandbox.smtp.messages[0]["Subject"]
    assert email_link in email["text"]
    assert email_link in email["html"] or email_link.replace("&", "&amp;") in email["html"]
    assert email["links"] == [email_link]
    assert sms["received_at"] <= email["received_at"]


async def test_outbox_page_escapes_and_sandboxes_the_mail(sandbox: Sandbox) -> None:
    """Sent straight to the SMTP stand-in: a subject and an HTML part that try to script."""
    mail = EmailMessage()
    mail["From"] = "keys@example.com"
    mail["To"] = "guest@example.com"
    mail["Subject"] = "<img src=x onerror=alert(1)>"
    mail.set_content("text part")
    mail.add_alternative('<p>hi</p><script>parent.document.title="owned"</script>', "html")
    await aiosmtplib.send(mail, hostname=sandbox.smtp.host, port=sandbox.smtp.port)
    await wait_for(lambda: sandbox.outbox.entries, 10, "the outbox entry")

    async with (
        aiohttp.ClientSession() as session,
        session.get(sandbox.outbox.page_url) as response,
    ):
        page = await response.text()
        policy = response.headers["Content-Security-Policy"]

    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<script>parent" not in page
    assert 'sandbox="" title="HTML part"' in page
    assert "&lt;script&gt;parent.document.title=&quot;owned&quot;&lt;/script&gt;" in page
    assert "script-src 'nonce-" in policy and "default-src 'none'" in policy


# --- `ikw sandbox` as a process -------------------------------------------------------------


class Output:
    """The lines a process wrote to stdout so far, read in the background."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self._task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode().rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@pytest.fixture
async def sandbox_process() -> AsyncIterator[tuple[asyncio.subprocess.Process, Output]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "sandbox",
        *("--seam-port", "0", "--twilio-port", "0", "--smtp-port", "0", "--outbox-port", "0"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # Buffered, as when piped anywhere: the sandbox must flush each message itself.
        env={name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"},
    )
    assert process.stdout is not None
    output = Output(process.stdout)
    try:
        yield process, output
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await output.close()


async def test_ikw_sandbox_prints_each_sms_and_email_in_full(
    sandbox_process: tuple[asyncio.subprocess.Process, Output],
    start_worker: Callable[..., Awaitable[Service]],
    publish: Callable[..., Awaitable[None]],
    log_lines: list[str],
) -> None:
    process, output = sandbox_process
    await wait_for(lambda: "# Ctrl-C" in output.text, 30, "the sandbox's banner")
    env = dict(
        line.removeprefix("export ").split("=", 1)
        for line in output.lines
        if line.startswith("export ")
    )
    banner = output.text
    assert "This is a sandbox" in banner and "printed below in full" in banner
    [outbox_line] = [line for line in output.lines if line.startswith("# Outbox")]
    outbox_url = outbox_line.rsplit(" ", 1)[1]
    assert outbox_url.startswith("http://127.0.0.1:") and outbox_url.endswith("/")

    await start_worker(**env)
    await publish(grant(name="Ada Lovelace", phone="+14155550100", channels=("sms",)))
    await wait_for(lambda: "--- SMS " in output.text, 30, "the SMS on stdout")
    await wait_for(lambda: output.lines[-1] == "---", 10, "the whole SMS on stdout")

    # What was printed is the message Twilio's API holds for it, in full.
    status, listed, _ = await get(
        env["TWILIO_API_URL"] + f"/2010-04-01/Accounts/{env['TWILIO_ACCOUNT_SID']}/Messages.json",
        (env["TWILIO_ACCOUNT_SID"], env["TWILIO_AUTH_TOKEN"]),
    )
    assert status == 200
    [sms] = listed["messages"]
    start = next(i for i, line in enumerate(output.lines) if line.startswith("--- SMS "))
    header = output.lines[start]
    assert header.startswith(f"--- SMS {sms['sid']} to +14155550100 from +15005550006, ")
    assert "\n".join(output.lines[start + 1 : -1]) == sms["body"]
    [link] = [word for word in sms["body"].split() if word.startswith("https://")]

    await publish(grant(name="Grace Hopper", email="grace@example.com", channels=("email",)))
    await wait_for(lambda: "--- email " in output.text, 30, "the email on stdout")
    await wait_for(lambda: output.lines[-1] == "---", 10, "the whole email on stdout")
    email = output.text.split("--- email ", 1)[1]
    assert email.startswith("to grace@example.com from keys@example.com, ")
    assert "\nSubject: " in email and "\nMessage-ID: " in email
    assert f"rendered at {outbox_url}#email-2" in email
    email_links = [w for w in email.split() if w.startswith("https://") and "ik.seam" in w]
    assert email_links and link not in email_links  # another guest, another key

    # The worker's own logs carry neither link nor phone number: only the sandbox prints them.
    assert not [line for line in log_lines if link in line or "+14155550100" in line]
    assert not [line for line in log_lines if email_links[0] in line]

    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 30) == 0


async def test_a_scheduled_delivery_is_listed_with_no_contact_and_escaped() -> None:
    sandbox = Sandbox()
    await sandbox.start()
    try:
        sandbox.outbox.hear({"type": "access.delivered", "instant_key_id": "k"})  # not listed
        sandbox.outbox.hear(
            {
                "type": "access.scheduled",
                "grant_id": "g-1",
                "user_identity": {"user_identity_key": "<b>guest-7</b>"},
                "reservation_key": "res-7",
                "revision": 2,
                "deliver_at": "2026-12-09T14:00:00Z",
                "starts_at": "2026-12-10T14:00:00Z",
                "ends_at": "2026-12-12T10:00:00Z",
            }
        )
        async with aiohttp.ClientSession() as session:
            async with session.get(sandbox.outbox.page_url) as response:
                page = await response.text()
    finally:
        await sandbox.stop()
    assert [entry["kind"] for entry in sandbox.outbox.entries] == ["scheduled"]
    assert "Scheduled: a key for &lt;b&gt;guest-7&lt;/b&gt;, sent at 2026-12-09T14:00:00Z" in page
    assert "res-7" in page and "<b>guest-7" not in page
