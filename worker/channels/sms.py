"""SMS delivery through Twilio's Messages API (the ``twilio`` package on its aiohttp client)."""

import logging
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from opentelemetry.trace import Tracer
from twilio.base.exceptions import TwilioException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from worker import tracing
from worker.channels.templates import Templates, shipped
from worker.errors import (
    ChannelRefused,
    CredentialsRefused,
    Transient,
    WorkerError,
    retry_after_seconds,
)
from worker.ports import KeyMessage

# The last response's Retry-After, per task: twilio's exceptions do not keep response headers.
_retry_after: ContextVar[str | None] = ContextVar("twilio_retry_after", default=None)
_status: ContextVar[int | None] = ContextVar("twilio_status", default=None)  # for the span


class _HttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]
    """twilio's aiohttp client with a timeout on every request (it has none by default), the
    Authorization header instead of aiohttp's deprecated ``auth=``, no request logging, and the
    Retry-After header kept, and a connection pool of ``connections`` (twilio's own session has
    aiohttp's default of 100, which would queue sends beyond it). Built without ``max_retries``:
    its retries can send an SMS twice."""

    def __init__(self, *, timeout: float, connections: int) -> None:
        super().__init__(pool_connections=False, timeout=timeout)
        # Typed as twilio's base leaves it: its request() passes twilio's loose params through.
        self.session: Any = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections))

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        headers = dict(headers or {})
        if auth is not None:
            headers["Authorization"] = aiohttp.encode_basic_auth(*auth)
        async with self.session.request(
            method.upper(),
            url,
            params=params,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout or self.timeout),
            allow_redirects=allow_redirects,
        ) as response:
            text = await response.text()
        _retry_after.set(response.headers.get("Retry-After"))
        _status.set(response.status)
        return Response(response.status, text, response.headers)


class SmsChannel:
    """Sends the key's link by SMS from ``from_`` or through a Messaging Service."""

    name = "sms"

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        from_: str | None = None,
        messaging_service_sid: str | None = None,
        api_url: str = "https://api.twilio.com",
        timeout: float = 10.0,
        connections: int = 100,
        templates: Templates | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        if not from_ and not messaging_service_sid:
            raise ValueError("SmsChannel needs from_ or messaging_service_sid")
        self._account_sid = account_sid
        self._auth_token = auth_token
        self._from = from_ or None
        self._messaging_service_sid = messaging_service_sid or None
        self._api_url = api_url.rstrip("/")
        self._timeout = timeout
        self._connections = connections
        self._templates = templates or shipped()
        self._tracer = tracer or tracing.tracer()
        self._span_attributes: dict[str, str | int] = {
            "http.request.method": "POST",
            "server.address": urlsplit(self._api_url).hostname or "",
            "ikw.channel": self.name,
        }
        self._http: _HttpClient | None = None
        self._client: Any = None
        # twilio's loggers can print URLs, numbers and Twilio's messages, which quote them.
        for logger_name in ("twilio", "twilio.http_client", "twilio.async_http_client"):
            logger = logging.getLogger(logger_name)
            logger.setLevel(max(logger.level, logging.WARNING))

    def reaches(self, message: KeyMessage) -> bool:
        return bool(message.phone_number)

    async def send(self, message: KeyMessage) -> str:
        if not message.phone_number:
            raise ChannelRefused("the guest has no phone number", code="no_phone_number")
        _retry_after.set(None)
        _status.set(None)
        # A CLIENT span: the host and the status, never the number or the body.
        with tracing.client_span(self._tracer, "twilio send", self._span_attributes) as span:
            try:
                sent = await self._twilio().messages.create_async(
                    to=message.phone_number,
                    from_=self._from,
                    messaging_service_sid=self._messaging_service_sid,
                    body=self._templates.sms(message),
                )
            except TwilioException as exc:
                if code := getattr(exc, "code", None):
                    span.set_attribute("twilio.error_code", str(code))
                raise _translate(exc) from None
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise Transient(f"twilio unreachable ({type(exc).__name__})") from None
            finally:
                if (status := _status.get()) is not None:
                    span.set_attribute("http.response.status_code", status)
        return str(sent.sid)

    async def check(self) -> None:
        try:
            await self._twilio().api.v2010.accounts(self._account_sid).fetch_async()
        except TwilioException as exc:
            error = _translate(exc)
            if isinstance(error, CredentialsRefused):
                raise error from None
            raise Transient(f"twilio check failed ({_describe(exc)})") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Transient(f"twilio unreachable ({type(exc).__name__})") from None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
            self._client = None

    def _twilio(self) -> Any:
        # Built on first use: aiohttp sessions need a running event loop.
        if self._client is None:
            self._http = _HttpClient(timeout=self._timeout, connections=self._connections)
            client = Client(self._account_sid, self._auth_token, http_client=self._http)
            client.api.base_url = self._api_url
            # api_url alone picks the host: ignore TWILIO_EDGE/TWILIO_REGION in the environment.
            client.edge = client.region = None
            self._client = client
        return self._client


_REFUSED_CODES = {21211, 21408, 21610, 21612, 21614}


def _translate(exc: TwilioException) -> WorkerError:
    """Twilio's error as a worker error; only codes, never Twilio's text (it quotes numbers)."""
    status = getattr(exc, "status", 0) or 0
    code = getattr(exc, "code", None)
    if code == 20003 or status == 401:
        return CredentialsRefused(
            f"twilio refused the credentials ({_describe(exc)})", service="twilio"
        )
    if code in _REFUSED_CODES or (400 <= status < 500 and status != 429 and code != 20429):
        return ChannelRefused(f"twilio refused the message (code {code})", code=str(code))
    return Transient(
        f"twilio could not take the message ({_describe(exc)})",
        retry_after=retry_after_seconds(_retry_after.get()),
    )


def _describe(exc: TwilioException) -> str:
    return f"HTTP {getattr(exc, 'status', '?')}, code {getattr(exc, 'code', '?')}"
