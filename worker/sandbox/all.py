"""All three stand-ins together, their outbox, and the environment that points a worker at them."""

import asyncio
import json
import signal
from collections.abc import Sequence

import aiormq
from aio_pika.abc import AbstractIncomingMessage
from aiohttp import web

from worker.broker.connect import connect
from worker.commands.sandbox import Failure
from worker.queues import Names
from worker.sandbox.outbox import Json, Outbox, describe
from worker.sandbox.seam import SeamSandbox
from worker.sandbox.smtp import EMAIL_FROM, SmtpSandbox
from worker.sandbox.twilio import SMS_FROM, TwilioSandbox

__all__ = ["EMAIL_FROM", "SMS_FROM", "Sandbox", "serve_forever"]


class Sandbox:
    """Seam, Twilio and SMTP stand-ins; ``outbox`` collects every SMS and email they accept and
    serves them as a page and as JSON."""

    def __init__(self, *, key_lifetime: float = 48 * 3600) -> None:
        self.seam = SeamSandbox(key_lifetime=key_lifetime)
        self.twilio = TwilioSandbox()
        self.smtp = SmtpSandbox()
        self.outbox = Outbox()
        self.twilio.listeners.append(self.outbox.add_sms)
        self.smtp.listeners.append(self.outbox.add_email)
        self.outbox.app.router.add_post("/fail", self._fail)

    def fail(self, failure: Failure) -> None:
        """The next ``failure.count`` calls to the service (to its target) fail so."""
        code, count, target = failure.code, failure.times, failure.target
        if failure.service == "seam":
            self.seam.fail_next(code, count=count, path=target)
        elif failure.service == "twilio":
            status = {20003: 401, 20429: 429, 20500: 500, 20503: 503}.get(code, 400)
            self.twilio.fail_next(code, status, count=count, to=target)
        else:
            self.smtp.refuse_next(code, count=count)

    async def _fail(self, request: web.Request) -> web.Response:
        """``POST /fail?seam=503:3`` (or the same as the body): failures from now on."""
        specs = [f"{name}={value}" for name, value in request.query.items()]
        specs += (await request.text()).split()
        try:
            failures = [Failure.parse(spec) for spec in specs]
        except ValueError as exc:
            return web.Response(status=400, text=f"{exc}\n")
        for failure in failures:
            self.fail(failure)
        return web.Response(text="".join(f"{_said(failure)}\n" for failure in failures))

    async def start(
        self,
        host: str = "127.0.0.1",
        seam_port: int = 0,
        twilio_port: int = 0,
        smtp_port: int = 0,
        outbox_port: int = 0,
    ) -> None:
        try:
            await self.seam.start(host, seam_port)
            await self.twilio.start(host, twilio_port)
            await self.smtp.start(host, smtp_port)
            await self.outbox.start(host, outbox_port)
        except BaseException:
            await self.stop()  # what did start (a port in use stops the rest)
            raise

    async def stop(self) -> None:
        await self.seam.stop()
        await self.twilio.stop()
        await self.smtp.stop()
        await self.outbox.stop()

    def env(self) -> dict[str, str]:
        """Settings for a worker that uses these stand-ins."""
        seam = {"SEAM_ENDPOINT": self.seam.url, "SEAM_API_KEY": self.seam.api_key}
        return seam | self.twilio.env() | self.smtp.env()  # each channel's stand-in: its own


async def follow_outcomes(outbox: Outbox, amqp_url: str, names: Names) -> None:
    """List a namespace's scheduled deliveries on the outbox page, from the worker's outcome
    events (every producer's: this is a sandbox), once ``ikw topology`` has declared it; until
    cancelled."""
    connection = await connect(amqp_url, "ikw sandbox")

    async def hear(message: AbstractIncomingMessage) -> None:
        outbox.hear(json.loads(message.body))

    try:
        told = False
        while True:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(exclusive=True)
                await queue.bind(names.outcomes, "#")
                break
            except aiormq.exceptions.ChannelNotFoundEntity:
                if not told:
                    print(
                        f"# waiting for {names.outcomes}: run `ikw topology` (or a worker)",
                        flush=True,
                    )
                    told = True
                await asyncio.sleep(2)  # a person is starting the worker: look now and then
        await queue.consume(hear, no_ack=True)
        print(f"# following {names.outcomes}: scheduled deliveries are listed too", flush=True)
        await asyncio.Event().wait()
    finally:
        await connection.close()


async def serve_forever(
    host: str,
    seam_port: int,
    twilio_port: int,
    smtp_port: int,
    key_lifetime: float,
    outbox_port: int = 0,
    failures: Sequence[Failure] = (),
    outcomes: tuple[str, Names] | None = None,
) -> None:
    """``ikw sandbox``: serve until SIGTERM or SIGINT, printing every SMS and email in full as
    it arrives (print, not logging: the links are meant to be seen here, and only here)."""
    sandbox = Sandbox(key_lifetime=key_lifetime)

    def show(entry: Json) -> None:
        print(describe(entry, sandbox.outbox.page_url), flush=True)

    sandbox.outbox.listeners.append(show)
    await sandbox.start(host, seam_port, twilio_port, smtp_port, outbox_port)
    for failure in failures:
        sandbox.fail(failure)
    smtp = f"{sandbox.smtp.host}:{sandbox.smtp.port}"
    print(f"# Seam {sandbox.seam.url}, Twilio {sandbox.twilio.url}, SMTP {smtp}")
    print("# Seam, Twilio and SMTP stand-ins are up. Point a worker at them with:")
    for name, value in sandbox.env().items():
        print(f"export {name}={value}")
    print(f"# Outbox (every SMS and email, newest first): {sandbox.outbox.page_url}")
    print(f"#   as JSON: {sandbox.outbox.url}/outbox.json")
    print(f"# Failures on demand: curl -d seam=503:3 {sandbox.outbox.url}/fail")
    for failure in failures:
        print(f"#   {_said(failure)}")
    print(
        f"#   SMS also at GET {sandbox.twilio.url}/2010-04-01/Accounts/"
        f"{sandbox.twilio.account_sid}/Messages.json (Basic auth, as Twilio)"
    )
    print(
        "# This is a sandbox: each SMS and email it accepts is printed below in full, door-key "
        "links, phone numbers and addresses included. Give it no real guest's data."
    )
    print("# Ctrl-C (or SIGTERM) stops them.", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    follow = [follow_outcomes(sandbox.outbox, *outcomes)] if outcomes else []
    following = [asyncio.create_task(one) for one in follow]
    try:
        await stop.wait()
    finally:
        await sandbox.stop()
        for task in following:
            task.cancel()
        await asyncio.gather(*following, return_exceptions=True)


def _said(failure: Failure) -> str:
    to = f" to {failure.target}" if failure.target else ""
    calls = "call" if failure.times == 1 else f"{failure.times} calls"
    fail = "fails" if failure.times == 1 else "fail"
    return f"{failure.service}: the next {calls}{to} {fail} with {failure.code}"
