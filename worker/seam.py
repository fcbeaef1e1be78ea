"""Seam API client on a plain aiohttp session: the calls the worker makes, answers mapped onto
worker.errors. Messages never carry the API key, an instant key URL, an email or a phone number."""

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from opentelemetry import trace
from opentelemetry.trace import Tracer

from worker import tracing
from worker.errors import (
    CredentialsRefused,
    NotFound,
    SeamRejected,
    Transient,
    WorkerError,
    retry_after_seconds,
)
from worker.ports import InstantKey, UserIdentity

USER_AGENT = "instant-key-worker/0.1"

Json = dict[str, Any]
T = TypeVar("T")

_ERROR_TYPE = re.compile(r"^[a-z0-9_]{1,64}$")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class SeamClient:
    """The ``Seam`` port over HTTP; every call is a POST with a JSON body."""

    def __init__(
        self,
        endpoint: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        connections: int = 100,
        session: aiohttp.ClientSession | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._tracer = tracer or tracing.tracer()
        where = urlsplit(self._endpoint)
        self._span_attributes: dict[str, str | int] = {
            "http.request.method": "POST",
            "server.address": where.hostname or "",
            "server.port": where.port or (443 if where.scheme == "https" else 80),
        }
        self._base_path = where.path
        self._attributes: dict[str, dict[str, str | int]] = {}  # by path, built once
        self._connections = connections
        self._headers = {"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._owns_session = session is None

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def get_user_identity(
        self, *, user_identity_id: str | None = None, user_identity_key: str | None = None
    ) -> UserIdentity | None:
        """By id when given, else by key; None when Seam answers 404."""
        if user_identity_id is not None:
            body = {"user_identity_id": user_identity_id}
        elif user_identity_key is not None:
            body = {"user_identity_key": user_identity_key}
        else:
            raise ValueError("user_identity_id or user_identity_key is required")
        try:
            return await self._call("/user_identities/get", body, _identity_of)
        except NotFound:
            return None

    async def create_user_identity(
        self,
        *,
        user_identity_key: str | None,
        full_name: str | None,
        email_address: str | None,
        phone_number: str | None,
    ) -> UserIdentity:
        body = _present(
            user_identity_key=user_identity_key,
            full_name=full_name,
            email_address=email_address,
            phone_number=phone_number,
        )
        return await self._call("/user_identities/create", body, _identity_of)

    async def list_instant_keys(self, user_identity_id: str) -> list[InstantKey]:
        body = {"user_identity_id": user_identity_id}
        return await self._call(
            "/instant_keys/list", body, lambda data: [_key(k) for k in data["instant_keys"]]
        )

    async def get_instant_key(self, instant_key_id: str) -> InstantKey | None:
        """The key, or None when Seam answers 404."""
        try:
            return await self._call(
                "/instant_keys/get",
                {"instant_key_id": instant_key_id},
                lambda data: _key(data["instant_key"]),
            )
        except NotFound:
            return None

    async def generate_instant_key(
        self,
        user_identity_id: str,
        *,
        customization_profile_id: str | None = None,
        max_use_count: int | None = None,
    ) -> InstantKey:
        body = _present(
            user_identity_id=user_identity_id,
            customization_profile_id=customization_profile_id,
            max_use_count=max_use_count,
        )
        return await self._call(
            "/user_identities/generate_instant_key", body, lambda data: _key(data["instant_key"])
        )

    async def delete_instant_key(self, instant_key_id: str) -> None:
        """Delete; a key that is already gone (404) counts as done."""
        try:
            await self._call("/instant_keys/delete", {"instant_key_id": instant_key_id}, _nothing)
        except NotFound:
            pass

    async def check(self) -> None:
        """Cheap authenticated call; raises CredentialsRefused when the API key is refused."""
        await self._call("/user_identities/list", {"limit": 1}, _nothing)

    async def _call(self, path: str, body: Json, parse: Callable[[Json], T]) -> T:
        """One CLIENT span per call: method, path (never the body), host, status code."""
        attributes = self._attributes.get(path)
        if attributes is None:
            attributes = self._span_attributes | {"url.path": self._base_path + path}
            self._attributes[path] = attributes
        with tracing.client_span(self._tracer, f"POST {path}", attributes):
            return await self._request(path, body, parse)

    async def _request(self, path: str, body: Json, parse: Callable[[Json], T]) -> T:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._connections)
            self._session = aiohttp.ClientSession(connector=connector)
        try:
            async with self._session.request(
                "POST",
                self._endpoint + path,
                json=body,
                headers=self._headers,
                timeout=self._timeout,
                # The API key goes to the configured endpoint only.
                allow_redirects=False,
            ) as response:
                raw = await response.read()
            trace.get_current_span().set_attribute("http.response.status_code", response.status)
        except TimeoutError as exc:
            raise Transient(f"seam {path} timed out after {self._timeout.total:g} s") from exc
        except aiohttp.ClientError as exc:
            detail = " ".join(str(exc).split())
            raise Transient(f"seam {path} failed: {type(exc).__name__} {detail}") from exc
        request_id = _request_id(response.headers.get("seam-request-id"))
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if response.status != 200:
            retry_after = response.headers.get("Retry-After")
            raise _failure(path, response.status, data, request_id, retry_after)
        try:
            if data["ok"] is True:
                return parse(data)
        except (KeyError, TypeError, ValueError):
            pass
        message = f"seam {path} answered 200 with an unexpected body, request id {request_id}"
        raise Transient(message)


def _request_id(header: str | None) -> str:
    """The ``seam-request-id`` as errors and dead-letter headers quote it: only a well-formed id
    (it comes from the network, so it could carry anything), else ``invalid``."""
    if header is None:
        return "none"
    return header if _REQUEST_ID.fullmatch(header) else "invalid"


def _failure(
    path: str, status: int, data: object, request_id: str, retry_after: str | None
) -> WorkerError:
    error = data.get("error") if isinstance(data, dict) else None
    error_type = error.get("type") if isinstance(error, dict) else None
    if not isinstance(error_type, str) or not _ERROR_TYPE.match(error_type):
        error_type = "unknown"  # Seam's message is left out: it may quote an email or phone.
    message = f"seam {path} answered {status} ({error_type}), request id {request_id}"
    if status in (401, 403):
        return CredentialsRefused(message, service="seam")
    if status == 404:
        return NotFound(message)
    if status in (408, 429) or status >= 500:
        return Transient(message, retry_after=retry_after_seconds(retry_after))
    if 400 <= status < 500:
        return SeamRejected(message, error_type=error_type)
    return Transient(message)


def _present(**fields: object) -> Json:
    return {name: value for name, value in fields.items() if value is not None}


def _nothing(data: Json) -> None:
    return None


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _moment(value: object) -> datetime:
    moment = datetime.fromisoformat(_text(value))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _identity_of(data: Json) -> UserIdentity:
    identity = data["user_identity"]
    return UserIdentity(
        user_identity_id=_text(identity["user_identity_id"]),
        user_identity_key=_optional_text(identity.get("user_identity_key")),
        full_name=_optional_text(identity.get("full_name")),
        email_address=_optional_text(identity.get("email_address")),
        phone_number=_optional_text(identity.get("phone_number")),
    )


def _key(key: Json) -> InstantKey:
    return InstantKey(
        instant_key_id=_text(key["instant_key_id"]),
        user_identity_id=_text(key["user_identity_id"]),
        created_at=_moment(key["created_at"]),
        expires_at=_moment(key["expires_at"]),
        instant_key_url=_text(key["instant_key_url"]),
    )
