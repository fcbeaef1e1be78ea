"""Seam API stand-in: user identities and instant keys in memory, behind the vendor's paths, auth,
envelopes and error bodies, with failures and latency on demand."""

import asyncio
import json
import random
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from worker.http import Served
from worker.sandbox import changed

Json = dict[str, Any]
Route = Callable[[Json], Awaitable[Json]]

WORKSPACE_ID = "5d3f9a8e-2b1c-4e7f-9a6d-0c8b7e6f5a41"

READ = frozenset({"GET", "POST"})
DELETE = frozenset({"DELETE", "POST"})
WRITE = frozenset({"POST"})

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_E164 = re.compile(r"^\+[1-9]\d{1,14}$")
_ERROR_TYPES = {
    400: "invalid_input",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    429: "rate_limited",
    500: "internal_server_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


def timestamp(moment: datetime) -> str:
    """Seam's format: ISO 8601 in UTC with milliseconds and ``Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SeamError(Exception):
    """Answered as ``{"error": {"type", "message"}}`` with ``status``."""

    def __init__(
        self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.headers = headers or {}


@dataclass
class _Failure:
    status: int
    error_type: str
    count: int
    path: str | None
    retry_after: float | None


class SeamSandbox(Served):
    """The Seam endpoints the worker uses, served on a real socket by ``start``."""

    def __init__(
        self,
        api_key: str = "seam_sandbox_key",
        *,
        key_lifetime: float = 48 * 3600,
        url_base: str = "https://ik.seam.co/",
    ) -> None:
        self.api_key = api_key
        self.key_lifetime = key_lifetime
        self.url_base = url_base
        self.identities: dict[str, Json] = {}
        self.keys: dict[str, Json] = {}
        # Indexes, as Seam's own lookups are: (field, value) -> identity id for the unique
        # fields, identity id -> its key ids. Tests that add a key directly use ``add_key``.
        self._unique: dict[tuple[str, str], str] = {}
        self._keys_of: dict[str, dict[str, None]] = {}
        # Every key ever generated, deleted ones included: "one key minted" is len(issued) == 1.
        self.issued: list[Json] = []
        # What generate_instant_key was given beyond the identity; the key object does not show it.
        self.key_options: dict[str, Json] = {}
        self.requests: list[tuple[str, str, Json]] = []
        self.fail_rate = 0.0
        self.fail_status = 503
        self.latency = 0.0
        self._failures: list[_Failure] = []
        self._routes: dict[str, tuple[frozenset[str], Route]] = {
            "/user_identities/create": (WRITE, self._create_identity),
            "/user_identities/get": (READ, self._get_identity),
            "/user_identities/list": (READ, self._list_identities),
            "/user_identities/delete": (DELETE, self._delete_identity),
            "/user_identities/generate_instant_key": (WRITE, self._generate_key),
            "/instant_keys/get": (READ, self._get_key),
            "/instant_keys/list": (READ, self._list_keys),
            "/instant_keys/delete": (DELETE, self._delete_key),
        }
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        app.on_response_prepare.append(_add_request_id)
        super().__init__(app)

    def fail_next(
        self,
        status: int,
        error_type: str | None = None,
        *,
        count: int = 1,
        path: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Answer the next ``count`` calls (to ``path`` only, when given) with ``status``.

        ``error_type`` defaults to Seam's usual type for the status.
        """
        kind = error_type or _ERROR_TYPES.get(status, "unknown_error")
        self._failures.append(_Failure(status, kind, count, path, retry_after))

    def live_keys(self, user_identity_id: str) -> list[Json]:
        """The identity's keys that have not expired yet."""
        now = datetime.now(UTC)
        return [
            key
            for key in self._keys_of_identity(user_identity_id)
            if datetime.fromisoformat(key["expires_at"]) > now
        ]

    def add_key(self, key: Json) -> None:
        """Hold ``key`` as if Seam had issued it."""
        self.keys[key["instant_key_id"]] = key
        self._keys_of.setdefault(key["user_identity_id"], {})[key["instant_key_id"]] = None
        self.issued.append(key)

    def _keys_of_identity(self, user_identity_id: str) -> list[Json]:
        return [self.keys[k] for k in self._keys_of.get(user_identity_id, ())]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        params = await _params(request)
        self.requests.append((request.method, request.path, params or {}))
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            self._inject_failure(request.path)
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                raise SeamError(401, "unauthorized", "Unauthorized")
            if request.path not in self._routes:
                raise SeamError(404, "endpoint_not_found", "No such endpoint")
            methods, route = self._routes[request.path]
            if request.method not in methods:
                allow = {"Allow": ", ".join(sorted(methods))}
                raise SeamError(405, "method_not_allowed", "Method not allowed", allow)
            if params is None:
                raise _invalid("The body must be a JSON object")
            return web.json_response({**await route(params), "ok": True})
        except SeamError as error:
            body = {"error": {"type": error.error_type, "message": str(error)}}
            return web.json_response(body, status=error.status, headers=error.headers)

    def _inject_failure(self, path: str) -> None:
        for failure in self._failures:
            if failure.path in (None, path):
                failure.count -= 1
                if failure.count <= 0:
                    self._failures.remove(failure)
                headers = {}
                if failure.retry_after is not None:
                    headers["Retry-After"] = f"{failure.retry_after:g}"
                raise SeamError(failure.status, failure.error_type, "Injected failure", headers)
        if self.fail_rate and random.random() < self.fail_rate:
            kind = _ERROR_TYPES.get(self.fail_status, "unknown_error")
            raise SeamError(self.fail_status, kind, "Injected failure")

    def _find_identity(self, params: Json) -> Json:
        identity_id = _uuid(params, "user_identity_id")
        key = _text(params, "user_identity_key")
        if identity_id is not None:
            found = self.identities.get(identity_id)
        elif key is not None:
            found = self.identities.get(self._unique.get(("user_identity_key", key), ""))
        else:
            raise _invalid("user_identity_id or user_identity_key is required")
        if found is None:
            raise SeamError(404, "user_identity_not_found", "User identity not found")
        return found

    def _find_key(self, params: Json) -> Json:
        key_id = _uuid(params, "instant_key_id")
        url = _text(params, "instant_key_url")
        if key_id is not None:
            found = self.keys.get(key_id)
        elif url is not None:
            found = next((k for k in self.keys.values() if k["instant_key_url"] == url), None)
        else:
            raise _invalid("instant_key_id or instant_key_url is required")
        if found is None:
            raise SeamError(404, "instant_key_not_found", "Instant key not found")
        return found

    async def _create_identity(self, params: Json) -> Json:
        unique = {
            "user_identity_key": _text(params, "user_identity_key"),
            "email_address": _text(params, "email_address", _EMAIL),
            "phone_number": _text(params, "phone_number", _E164),
        }
        full_name = _text(params, "full_name")
        for name, value in unique.items():
            if value is not None and (name, value) in self._unique:
                kind = f"user_identity_{name.removeprefix('user_identity_')}_already_exists"
                raise SeamError(400, kind, f"A user identity with this {name} already exists")
        identity_id = str(uuid.uuid4())
        display_name = next((v for v in (full_name, *unique.values()) if v), "Unnamed user")
        identity: Json = {
            "user_identity_id": identity_id,
            **unique,
            "display_name": display_name,
            "full_name": full_name,
            "merged_user_identity_ids": [],
            "merged_user_identity_keys": [],
            "created_at": timestamp(datetime.now(UTC)),
            "workspace_id": WORKSPACE_ID,
            "errors": [],
            "warnings": [],
            "acs_user_ids": [],
        }
        self.identities[identity_id] = identity
        for name, value in unique.items():
            if value is not None:
                self._unique[name, value] = identity_id
        return {"user_identity": identity}

    async def _get_identity(self, params: Json) -> Json:
        return {"user_identity": self._find_identity(params)}

    async def _list_identities(self, params: Json) -> Json:
        limit = _integer(params, "limit", 500, minimum=1)
        start = _integer(params, "page_cursor", 0, minimum=0)
        wanted = params.get("user_identity_ids")
        if isinstance(wanted, str):
            wanted = [wanted]
        found = [
            i for i in self.identities.values() if wanted is None or i["user_identity_id"] in wanted
        ]
        more = start + limit < len(found)
        return {
            "user_identities": found[start : start + limit],
            "pagination": {
                "has_next_page": more,
                "next_page_cursor": str(start + limit) if more else None,
                "next_page_url": None,
            },
        }

    async def _delete_identity(self, params: Json) -> Json:
        _uuid(params, "user_identity_id", required=True)
        identity = self._find_identity(params)
        identity_id = identity["user_identity_id"]
        del self.identities[identity_id]
        for name in ("user_identity_key", "email_address", "phone_number"):
            self._unique.pop((name, identity[name]), None)
        for key_id in list(self._keys_of.pop(identity_id, ())):
            self._forget_key(key_id)
        return {}

    async def _generate_key(self, params: Json) -> Json:
        identity_id = _uuid(params, "user_identity_id", required=True)
        if identity_id not in self.identities:
            raise SeamError(404, "user_identity_not_found", "User identity not found")
        profile_id = _uuid(params, "customization_profile_id")
        max_use_count = params.get("max_use_count", 1)
        if isinstance(max_use_count, bool) or not isinstance(max_use_count, int | float):
            raise _invalid("max_use_count must be a number")
        if max_use_count < 1:
            raise _invalid("max_use_count must be at least 1")
        created = datetime.now(UTC)
        key_id = str(uuid.uuid4())
        key = {
            "instant_key_id": key_id,
            "workspace_id": WORKSPACE_ID,
            "created_at": timestamp(created),
            "instant_key_url": self.url_base + secrets.token_urlsafe(16),
            "client_session_id": str(uuid.uuid4()),
            "user_identity_id": identity_id,
            "expires_at": timestamp(created + timedelta(seconds=self.key_lifetime)),
        }
        if profile_id is not None:
            key["customization_profile_id"] = profile_id
        self.add_key(key)
        self.key_options[key_id] = {
            "customization_profile_id": profile_id,
            "max_use_count": max_use_count,
        }
        return {"instant_key": key}

    async def _get_key(self, params: Json) -> Json:
        return {"instant_key": self._find_key(params)}

    async def _list_keys(self, params: Json) -> Json:
        identity_id = _uuid(params, "user_identity_id")
        keys = (
            list(self.keys.values()) if identity_id is None else self._keys_of_identity(identity_id)
        )
        return {"instant_keys": keys}

    async def _delete_key(self, params: Json) -> Json:
        _uuid(params, "instant_key_id", required=True)
        self._forget_key(self._find_key(params)["instant_key_id"])
        return {}

    def _forget_key(self, key_id: str) -> None:
        key = self.keys.pop(key_id)
        self._keys_of.get(key["user_identity_id"], {}).pop(key_id, None)
        self.key_options.pop(key_id, None)


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["seam-request-id"] = str(uuid.uuid4())
    changed()


async def _params(request: web.Request) -> Json | None:
    """The query string (GET, DELETE) or JSON body (POST); None when the body is not an object."""
    if request.method != "POST":
        query = request.query
        return {k: vs[0] if len(vs := query.getall(k)) == 1 else vs for k in query}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _invalid(message: str) -> SeamError:
    return SeamError(400, "invalid_input", message)


def _uuid(params: Json, name: str, *, required: bool = False) -> str | None:
    value = params.get(name)
    if value is None:
        if required:
            raise _invalid(f"{name} is required")
        return None
    if not isinstance(value, str) or not _UUID.match(value):
        raise _invalid(f"{name} must be a uuid")
    return value


def _text(params: Json, name: str, pattern: re.Pattern[str] | None = None) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or (pattern and not pattern.match(value)):
        raise _invalid(f"{name} is not valid")
    return value


def _integer(params: Json, name: str, default: int, *, minimum: int) -> int:
    value = params.get(name)
    if value is None:
        return default
    # Query strings carry numbers as text.
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _invalid(f"{name} must be an integer of at least {minimum}")
    return value
