"""The outbox page in a real headless browser (Debian's Chromium, over the DevTools protocol):
after a worker delivered a grant by SMS and one by email, the rendered page shows each link, in
the SMS and in the email's HTML part, rendered in its sandboxed frame; a mail's script runs not.

Without Chromium this skips, except under CI (``CI`` set), where it fails: `.ci/run` installs
it (`apt-get install -y chromium`)."""

import asyncio
import contextlib
import itertools
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from tests.builders import grant
from tests.helpers import Json
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox
from worker.service import Service

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",
    # A sandboxed frame gets a process of its own, out of DOM.getDocument's reach; kept in the
    # page's process its document is pierced too. The sandbox's rules (no script, an opaque
    # origin) hold either way.
    "--disable-features=IsolateSandboxedIframes",
]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    if found is None:
        why = "Chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must run the browser test: .ci/run installs it")
        pytest.skip(f"{why}; CI installs it and fails without it")
    return found


class Page:
    """One tab, driven with DevTools protocol commands over its websocket."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket = socket
        self.ids = itertools.count(1)
        self.events: list[Json] = []

    async def call(self, method: str, **params: Any) -> Json:
        number = next(self.ids)
        await self.socket.send_json({"id": number, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self.socket.receive_json(), 30)
            if message.get("id") == number:
                assert "error" not in message, f"{method}: {message['error']}"
                result: Json = message["result"]
                return result
            self.events.append(message)

    async def until_event(self, method: str, timeout: float = 30) -> Json:
        async def wait() -> Json:
            while True:
                for event in self.events:
                    if event.get("method") == method:
                        return event
                self.events.append(await self.socket.receive_json())

        return await asyncio.wait_for(wait(), timeout)


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[Json]]]:
    """``open(url)``: load ``url`` in headless Chromium; the document, frames pierced."""
    binary = chromium()
    process = await asyncio.create_subprocess_exec(
        binary,
        *FLAGS,
        f"--user-data-dir={tmp_path / 'chromium'}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    stderr = process.stderr

    async def devtools_port() -> int:
        while line := await stderr.readline():
            found = re.search(rb"DevTools listening on ws://[^:]+:(\d+)/", line)
            if found:
                return int(found.group(1))
        raise AssertionError("Chromium exited before it listened for DevTools")

    drain: asyncio.Task[None] | None = None
    session = aiohttp.ClientSession()
    try:
        port = await asyncio.wait_for(devtools_port(), 60)

        async def discard() -> None:  # keep reading, so Chromium never blocks on a full pipe
            while await stderr.read(65536):
                pass

        drain = asyncio.create_task(discard())

        async def open_page(url: str) -> Json:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as answer:
                targets = await answer.json()
            [tab] = [t for t in targets if t["type"] == "page"]
            async with session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Page.enable")
                await page.call("Page.navigate", url=url)
                # The load event waits for the frames: each email's srcdoc is parsed by then.
                await page.until_event("Page.loadEventFired")
                found = await page.call("DOM.getDocument", depth=-1, pierce=True)
                document: Json = found["root"]
                return document

        yield open_page
    finally:
        await session.close()
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain


def attributes(node: Json) -> dict[str, str]:
    flat = node.get("attributes", [])
    return dict(zip(flat[::2], flat[1::2], strict=True))


def nodes(node: Json) -> list[Json]:
    """``node`` and everything under it, into frames' documents too."""
    found = [node]
    for child in node.get("children", []):
        found += nodes(child)
    if "contentDocument" in node:
        found += nodes(node["contentDocument"])
    return found


def text(node: Json) -> str:
    return "".join(n.get("nodeValue", "") for n in nodes(node) if n.get("nodeType") == 3)


def articles(document: Json, kind: str) -> list[Json]:
    return [
        n
        for n in nodes(document)
        if n.get("nodeName") == "ARTICLE" and attributes(n).get("class") == kind
    ]


def frame(article: Json) -> Json:
    [iframe] = [n for n in nodes(article) if n.get("nodeName") == "IFRAME"]
    return iframe


async def test_outbox_page_shows_each_delivered_link(
    sandbox: Sandbox,
    start_worker: Callable[..., Awaitable[Service]],
    publish: Callable[..., Awaitable[None]],
    browser: Callable[[str], Awaitable[Json]],
) -> None:
    await start_worker()
    await publish(grant(name="Ada Lovelace", phone="+14155550100", channels=("sms",)))
    await publish(grant(name="Grace Hopper", email="grace@example.com", channels=("email",)))
    await wait_for(
        lambda: sandbox.twilio.outbox and sandbox.smtp.messages, 30, "the SMS and the email"
    )
    links = [key["instant_key_url"] for key in sandbox.seam.keys.values()]
    [sms_link] = [link for link in links if link in sandbox.twilio.outbox[0]["body"]]
    [email_link] = [link for link in links if link != sms_link]

    document = await browser(sandbox.outbox.page_url)

    [sms] = articles(document, "sms")
    assert sms_link in text(sms)  # the SMS text, as the guest reads it
    assert "+14155550100" in text(sms)
    hrefs = [attributes(n).get("href") for n in nodes(sms) if n.get("nodeName") == "A"]
    assert sms_link in hrefs

    [email] = articles(document, "email")
    iframe = frame(email)
    assert attributes(iframe)["sandbox"] == ""  # no permission at all: no script, own origin
    rendered = iframe["contentDocument"]  # the email's HTML part, parsed and rendered
    assert email_link in [attributes(n).get("href") for n in nodes(rendered)]
    assert "Grace" in text(rendered)
    assert email_link in text(email)  # text part and the links list, outside the frame
    assert sms_link not in text(email) and email_link not in text(sms)


async def test_a_mails_html_cannot_script_the_outbox(
    sandbox: Sandbox, browser: Callable[[str], Awaitable[Json]]
) -> None:
    mail = EmailMessage()
    mail["From"] = "keys@example.com"
    mail["To"] = "guest@example.com"
    mail["Subject"] = '<img src=x onerror="document.title=1">subject'
    mail.set_content("text part")
    mail.add_alternative(
        '<p id="marker">untouched</p><script>document.getElementById("marker").textContent'
        '="scripted"; parent.document.title="owned"</script>',
        "html",
    )
    await aiosmtplib.send(mail, hostname=sandbox.smtp.host, port=sandbox.smtp.port)
    await wait_for(lambda: sandbox.outbox.entries, 10, "the outbox entry")

    document = await browser(sandbox.outbox.page_url)

    [email] = articles(document, "email")
    rendered = frame(email)["contentDocument"]
    [marker] = [n for n in nodes(rendered) if attributes(n).get("id") == "marker"]
    assert text(marker) == "untouched"
    [title] = [n for n in nodes(document) if n.get("nodeName") == "TITLE"]
    assert text(title) == "ikw sandbox outbox"
    assert not [n for n in nodes(email) if n.get("nodeName") == "IMG"]
    assert '<img src=x onerror="document.title=1">subject' in text(email)
