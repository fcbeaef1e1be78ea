"""The SMS channel's wiring: its settings (Twilio's), its factory, its template file. The sender
is worker/channels/sms.py, imported only when a worker builds the channel."""

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from worker.channels.wiring import Needs, Wiring
from worker.variables import insecure, loopback, optional, required, setting, url

if TYPE_CHECKING:
    from worker.channels.sms import SmsChannel


WHY = "for SMS (any TWILIO_* variable turns SMS on)"


@dataclass(frozen=True)
class SmsSettings:
    account_sid: str = setting(
        "TWILIO_ACCOUNT_SID",
        "",
        "Twilio account; any TWILIO_* turns SMS on",
        required(WHY),
        switch=True,
    )
    auth_token: str = setting(
        "TWILIO_AUTH_TOKEN", "", "Twilio auth token", required(WHY), secret=True, switch=True
    )
    from_: str | None = setting(
        "TWILIO_FROM",
        None,
        "SMS sender number or id (or TWILIO_MESSAGING_SERVICE_SID)",
        optional,
        switch=True,
    )
    messaging_service_sid: str | None = setting(
        "TWILIO_MESSAGING_SERVICE_SID",
        None,
        "SMS sender service (or TWILIO_FROM)",
        optional,
        switch=True,
    )
    api_url: str = setting(
        "TWILIO_API_URL",
        "https://api.twilio.com",
        "Twilio API (default https://api.twilio.com)",
        url("http", "https"),
    )

    def problems(self, allow_insecure: bool) -> list[str]:
        found = []
        if not (self.from_ or self.messaging_service_sid):
            found.append(f"TWILIO_FROM or TWILIO_MESSAGING_SERVICE_SID: one is required {WHY}")
        if self.from_ and not re.fullmatch(r"\+[1-9][0-9]{6,14}|[A-Za-z0-9 ]{1,11}", self.from_):
            found.append("TWILIO_FROM: must be an E.164 number or an alphanumeric sender id")
        api = urlsplit(self.api_url)
        if not allow_insecure and api.scheme == "http" and not loopback(api.hostname):
            found.append(insecure("TWILIO_API_URL"))
        return found


def build(s: SmsSettings, needs: Needs) -> "SmsChannel":
    from worker.channels.sms import SmsChannel

    return SmsChannel(
        s.account_sid,
        s.auth_token,
        from_=s.from_,
        messaging_service_sid=s.messaging_service_sid,
        api_url=s.api_url,
        connections=needs.connections,
        templates=needs.templates,
        tracer=needs.tracer,
    )


WIRING = Wiring("sms", SmsSettings, build, templates=("sms.txt",))
