"""All three stand-ins together, their outbox, and the environment that points a worker at them."""

import asyncio
import signal

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


async def serve_forever(
    host: str,
    seam_port: int,
    twilio_port: int,
    smtp_port: int,
    key_lifetime: float,
    outbox_port: int = 0,
) -> None:
    """``ikw sandbox``: serve until SIGTERM or SIGINT, printing every SMS and email in full as
    it arrives (print, not logging: the links are meant to be seen here, and only here)."""
    sandbox = Sandbox(key_lifetime=key_lifetime)

    def show(entry: Json) -> None:
        print(describe(entry, sandbox.outbox.page_url), flush=True)

    sandbox.outbox.listeners.append(show)
    await sandbox.start(host, seam_port, twilio_port, smtp_port, outbox_port)
    print("# Seam, Twilio and SMTP stand-ins are up. Point a worker at them with:")
    for name, value in sandbox.env().items():
        print(f"export {name}={value}")
    print(f"# Outbox (every SMS and email, newest first): {sandbox.outbox.page_url}")
    print(f"#   as JSON: {sandbox.outbox.url}/outbox.json")
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
    try:
        await stop.wait()
    finally:
        await sandbox.stop()
