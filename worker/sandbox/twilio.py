"""Twilio Messages API stand-in: the paths, Basic auth, form fields, 201 body and error bodies of
the real service (reference/twilio-messages-openapi.json), with failures on demand."""

import asyncio
import base64
import binascii
import hmac
import math
import random
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from worker.http import Served
from worker.sandbox import changed

SMS_FROM = "+15005550006"  # Twilio's magic "valid sender" test number
DEFAULT_ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
DEFAULT_AUTH_TOKEN = "sandbox-auth-token"
API_VERSION = "2010-04-01"
PAGE_SIZE = 50  # Twilio's default page size for lists; at most 1000
MAX_PAGE_SIZE = 1000

_E164 = re.compile(r"^\+[1-9]\d{1,14}$")
_ALPHANUMERIC_SENDER = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")
_MESSAGING_SERVICE_SID = re.compile(r"^MG[0-9a-fA-F]{32}$")

# Twilio's magic test numbers (for test credentials; https://www.twilio.com/docs/iam/test-credentials)
# and the errors they produce. SMS_FROM is the "From" that passes; any "To" not listed is valid.
MAGIC_FROM = {
    "+15005550001": 21212,  # invalid
    "+15005550007": 21606,  # not owned by the account, or not SMS-capable
    "+15005550008": 21611,  # its queue of messages is full
}
MAGIC_TO = {
    "+15005550001": 21211,
    "+15005550002": 21612,
    "+15005550003": 21408,
    "+15005550004": 21610,
    "+15005550009": 21614,
}

# Twilio's messages, which (like the real ones) may quote the numbers involved.
_MESSAGES = {
    20003: "Authenticate",
    20001: "Page must be 0 or more and PageSize a whole number from 1 to 1000",
    20404: "The requested resource {path} was not found",
    20429: "Too Many Requests",
    20500: "An internal server error has occurred",
    20503: "Service Unavailable",
    21211: "The 'To' number {to} is not a valid phone number.",
    21212: "The 'From' number {from_} is not a valid phone number or alphanumeric sender ID.",
    21408: "Permission to send an SMS has not been enabled for the region indicated by the "
    "'To' number: {to}.",
    21602: "Message body is required.",
    21603: "A 'From' or 'MessagingServiceSid' parameter is required to send a message.",
    21604: "A 'To' phone number is required.",
    21606: "The From phone number {from_} is not a valid, SMS-capable inbound phone number or "
    "short code for your account.",
    21610: "Attempt to send to unsubscribed recipient {to}.",
    21611: "This 'From' number {from_} has exceeded the maximum number of queued messages.",
    21612: "The 'To' phone number: {to}, is not currently reachable via SMS.",
    21614: "'To' number {to} is not a valid mobile number.",
    21617: "The concatenated message body exceeds the 1600 character limit.",
    21701: "The Messaging Service Sid {messaging_service_sid} is invalid.",
}


@dataclass
class _Failure:
    code: int
    status: int
    count: int
    to: str | None
    retry_after: float | None


class TwilioSandbox(Served):
    """``POST /2010-04-01/Accounts/{sid}/Messages.json`` (send), ``GET`` of the same path (the
    list, newest first, paged like Twilio's), ``GET .../Messages/{MessageSid}.json`` (one
    message) and ``GET .../Accounts/{sid}.json``.

    ``outbox`` holds the accepted messages as the tests read them; ``sent`` the message
    resources the API serves, by sid; ``received`` counts every message request, refused ones
    included. ``listeners`` are called with each accepted ``outbox`` entry. ``fail_next``,
    ``fail_rate`` and ``latency`` make it misbehave (``fail_*`` only the sending).
    """

    def __init__(
        self, account_sid: str = DEFAULT_ACCOUNT_SID, auth_token: str = DEFAULT_AUTH_TOKEN
    ) -> None:
        app = web.Application()
        app.on_response_prepare.append(_answered)
        base = f"/{API_VERSION}/Accounts/{{account_sid}}"
        app.router.add_post(base + "/Messages.json", self._create_message)
        app.router.add_get(base + "/Messages.json", self._list_messages)
        app.router.add_get(base + "/Messages/{message_sid}.json", self._fetch_message)
        app.router.add_get(base + ".json", self._fetch_account)
        super().__init__(app)
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.outbox: list[dict[str, Any]] = []
        self.sent: dict[str, dict[str, Any]] = {}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.received = 0
        self.latency = 0.0
        self.fail_rate = 0.0
        self.fail_code = 20429
        self.fail_status = 429
        self._failures: list[_Failure] = []

    def env(self) -> dict[str, str]:
        """The SMS channel's settings for a worker that uses this stand-in."""
        return {
            "TWILIO_API_URL": self.url,
            "TWILIO_ACCOUNT_SID": self.account_sid,
            "TWILIO_AUTH_TOKEN": self.auth_token,
            "TWILIO_FROM": SMS_FROM,
        }

    def fail_next(
        self,
        code: int,
        status: int = 400,
        *,
        count: int = 1,
        to: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Answer the next ``count`` message requests (only those to ``to`` when given) with
        the Twilio error ``code`` and HTTP ``status``, plus ``Retry-After`` when given."""
        self._failures.append(_Failure(code, status, count, to, retry_after))

    async def _fetch_account(self, request: web.Request) -> web.Response:
        await self._delay()
        refused = self._refuse_auth(request)
        if refused is not None:
            return refused
        now = format_datetime(datetime.now(UTC))
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}"
        return web.json_response(
            {
                "sid": self.account_sid,
                "owner_account_sid": self.account_sid,
                "friendly_name": "Sandbox account",
                "status": "active",
                "type": "Full",
                "date_created": now,
                "date_updated": now,
                "uri": uri + ".json",
                "subresource_uris": {"messages": uri + "/Messages.json"},
            }
        )

    async def _create_message(self, request: web.Request) -> web.Response:
        form = await request.post()
        # After reading the form, so a client that times out does not break the read.
        await self._delay()
        self.received += 1
        refused = self._refuse_auth(request)
        if refused is not None:
            return refused
        fields = {key: str(value) for key, value in form.items()}
        to = fields.get("To", "")
        from_ = fields.get("From", "")
        service = fields.get("MessagingServiceSid", "")
        body = fields.get("Body", "")
        context = {"to": to, "from_": from_, "messaging_service_sid": service}

        failure = self._take_failure(to)
        if failure is not None:
            return _error(failure.code, failure.status, context, failure.retry_after)
        if self.fail_rate and random.random() < self.fail_rate:
            return _error(self.fail_code, self.fail_status, context)

        code = _validate(to, from_, service, body, fields)
        if code is not None:
            return _error(code, 400, context)

        sid = "SM" + secrets.token_hex(16)
        resource = self._message(sid, to, from_, service, body)
        self.sent[sid] = resource
        entry = {
            "to": to,
            "from": from_ or None,
            "messaging_service_sid": service or None,
            "body": body,
            "sid": sid,
            "fields": sorted(form.keys()),
        }
        self.outbox.append(entry)
        for listener in self.listeners:
            listener(entry)
        return web.json_response(resource, status=201)

    async def _list_messages(self, request: web.Request) -> web.Response:
        """Twilio's list: newest first, ``To`` and ``From`` filters, ``PageSize`` (1 to 1000,
        default 50) and ``Page`` (from 0; the ``PageToken`` of ``next_page_uri`` is accepted
        and, here, not needed)."""
        await self._delay()
        refused = self._refuse_auth(request)
        if refused is not None:
            return refused
        query = request.query
        try:
            size = int(query.get("PageSize", PAGE_SIZE))
            page = int(query.get("Page", 0))
        except ValueError:
            return _error(20001, 400, {})
        if not 1 <= size <= MAX_PAGE_SIZE or page < 0:
            return _error(20001, 400, {})
        found = [
            message
            for message in reversed(self.sent.values())
            if query.get("To") in (None, message["to"])
            and query.get("From") in (None, message["from"])
        ]
        start = page * size
        messages = found[start : start + size]
        path = request.path
        filters = [(name, query[name]) for name in ("To", "From") if name in query]

        def page_uri(number: int, token: str | None = None) -> str:
            params = [*filters, ("PageSize", str(size)), ("Page", str(number))]
            if token is not None:
                params.append(("PageToken", token))
            return f"{path}?{urlencode(params)}"

        more = start + size < len(found)
        return web.json_response(
            {
                "messages": messages,
                "page": page,
                "page_size": size,
                "start": start,
                "end": start + len(messages) - 1 if messages else start,
                "uri": page_uri(page),
                "first_page_uri": page_uri(0),
                "next_page_uri": page_uri(page + 1, "PA" + messages[-1]["sid"]) if more else None,
                "previous_page_uri": page_uri(page - 1) if page > 0 else None,
            }
        )

    async def _fetch_message(self, request: web.Request) -> web.Response:
        await self._delay()
        refused = self._refuse_auth(request)
        if refused is not None:
            return refused
        message = self.sent.get(request.match_info["message_sid"])
        if message is None:
            return _error(20404, 404, {"path": request.path})
        return web.json_response(message)

    def _message(self, sid: str, to: str, from_: str, service: str, body: str) -> dict[str, Any]:
        now = format_datetime(datetime.now(UTC))
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{sid}"
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": from_ or None,
            "messaging_service_sid": service or None,
            # With a Messaging Service and no From, no sender is chosen yet: Twilio says 0.
            "num_media": "0",
            "num_segments": str(_segments(body)) if from_ else "0",
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued",
            "subresource_uris": {"media": uri + "/Media.json"},
            "to": to,
            "uri": uri + ".json",
        }

    def _refuse_auth(self, request: web.Request) -> web.Response | None:
        login, password = _basic_auth(request.headers.get("Authorization", ""))
        good = (
            hmac.compare_digest(login.encode(), self.account_sid.encode())
            and hmac.compare_digest(password.encode(), self.auth_token.encode())
            # Credentials of one account cannot reach another account's resources.
            and request.match_info["account_sid"] == self.account_sid
        )
        if good:
            return None
        response = _error(20003, 401, {})
        response.headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
        return response

    def _take_failure(self, to: str) -> _Failure | None:
        for failure in self._failures:
            if failure.to is None or failure.to == to:
                failure.count -= 1
                if failure.count <= 0:
                    self._failures.remove(failure)
                return failure
        return None

    async def _delay(self) -> None:
        if self.latency > 0:
            await asyncio.sleep(self.latency)


def _basic_auth(header: str) -> tuple[str, str]:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        decoded = base64.b64decode(encoded, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    login, _, password = decoded.partition(":")
    return login, password


def _validate(to: str, from_: str, service: str, body: str, fields: dict[str, str]) -> int | None:
    if not to:
        return 21604
    if not _E164.match(to):
        return 21211
    if not from_ and not service:
        return 21603
    if from_ and not (_E164.match(from_) or _ALPHANUMERIC_SENDER.match(from_)):
        return 21212
    if service and not _MESSAGING_SERVICE_SID.match(service):
        return 21701
    if not body and "MediaUrl" not in fields and "ContentSid" not in fields:
        return 21602
    if len(body) > 1600:
        return 21617
    return MAGIC_FROM.get(from_) or MAGIC_TO.get(to)


def _error(
    code: int, status: int, context: dict[str, str], retry_after: float | None = None
) -> web.Response:
    template = _MESSAGES.get(code) or _reason(status)
    try:
        message = template.format(**context)
    except KeyError:
        message = template
    response = web.json_response(
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status=status,
    )
    if retry_after is not None:
        response.headers["Retry-After"] = f"{retry_after:g}"
    return response


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _segments(body: str) -> int:
    single, multi = (160, 153) if body.isascii() else (70, 67)
    return 1 if len(body) <= single else math.ceil(len(body) / multi)


async def _answered(request: web.Request, response: web.StreamResponse) -> None:
    changed()
