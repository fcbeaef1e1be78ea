"""The Seam client checked against reference/seam-openapi.json, without a network: what it
calls and sends must exist there, and it must read answers holding only the required properties."""

import json
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
import pytest
from multidict import CIMultiDict

from tests import reference as reference_file
from tests.helpers import Json
from worker.ports import InstantKey, Seam, UserIdentity
from worker.seam import SeamClient

ID = "3f2b8c1e-7d4a-4c9b-8e6f-1a2b3c4d5e6f"
SAMPLES = {
    "uuid": ID,
    "date-time": "2026-11-26T10:00:00.000Z",
    "uri": "https://ik.seam.co/sample",
    "email": "ada@example.com",
}


@pytest.fixture(scope="module")
def reference() -> Json:
    return reference_file.load("seam-openapi.json")


def _example(schema: Json, reference: Json) -> Any:
    """The leanest value the schema allows: required properties only, nullable ones null."""
    schema = reference_file.resolve(schema, reference)
    if "oneOf" in schema:
        return _example(schema["oneOf"][0], reference)
    if schema.get("nullable"):
        return None
    kind = schema.get("type")
    if kind == "object":
        required = schema.get("required", [])
        properties = schema.get("properties", {}).items()
        return {name: _example(s, reference) for name, s in properties if name in required}
    if kind == "array":
        return [_example(schema["items"], reference)]
    if kind == "boolean":
        return True
    if kind in ("integer", "number"):
        return 1
    return SAMPLES.get(schema.get("format", ""), "sample")


class _Answer:
    def __init__(self, body: Json) -> None:
        self.status = 200
        self.headers = CIMultiDict({"seam-request-id": ID})
        self._raw = json.dumps(body).encode()

    async def read(self) -> bytes:
        return self._raw

    async def __aenter__(self) -> "_Answer":
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Session:
    """Takes aiohttp.ClientSession's place: records each request, answers from the reference."""

    def __init__(self, reference: Json) -> None:
        self.reference = reference
        self.sent: list[tuple[str, str, Json, dict[str, str]]] = []

    def request(
        self, method: str, url: str, *, json: Json, headers: dict[str, str], **_: Any
    ) -> _Answer:
        path = urlsplit(url).path
        self.sent.append((method, path, json, headers))
        operation = self.reference["paths"].get(path, {}).get(method.lower())
        assert operation is not None, f"{method} {path} is not in the Seam reference"
        schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
        return _Answer(_example(schema, self.reference))


CALLS: dict[str, Callable[[SeamClient], Awaitable[object]]] = {
    "get_user_identity by id": lambda c: c.get_user_identity(user_identity_id=ID),
    "get_user_identity by key": lambda c: c.get_user_identity(user_identity_key="guest-991"),
    "create_user_identity": lambda c: c.create_user_identity(
        user_identity_key="guest-991",
        full_name="Ada Lovelace",
        email_address="ada@example.com",
        phone_number="+14155550100",
    ),
    "list_instant_keys": lambda c: c.list_instant_keys(ID),
    "get_instant_key": lambda c: c.get_instant_key(ID),
    "generate_instant_key": lambda c: c.generate_instant_key(
        ID, customization_profile_id=ID, max_use_count=1
    ),
    "delete_instant_key": lambda c: c.delete_instant_key(ID),
    "check": lambda c: c.check(),
}


def _fields_problems(body: Json, schema: Json) -> list[str]:
    """Fields the operation does not know, or required ones missing."""
    branches = schema.get("oneOf", [schema])
    for branch in branches:
        unknown = set(body) - set(branch.get("properties", {}))
        missing = set(branch.get("required", [])) - set(body)
        if not unknown and not missing:
            return []
    return [f"{sorted(body)} fits none of {[sorted(b.get('properties', {})) for b in branches]}"]


@pytest.mark.parametrize("name", CALLS)
async def test_client_calls_match_reference(reference: Json, name: str) -> None:
    session = _Session(reference)
    client = SeamClient(
        "https://connect.getseam.com",
        "seam_test_key",
        session=cast(aiohttp.ClientSession, session),
    )

    result = await CALLS[name](client)

    [(method, path, body, headers)] = session.sent
    operation = reference["paths"][path][method.lower()]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert _fields_problems(body, schema) == [], f"{method} {path}"
    assert headers["Authorization"] == "Bearer seam_test_key"
    assert headers["User-Agent"].startswith("instant-key-worker/")
    if isinstance(result, UserIdentity):
        assert result.user_identity_id == ID and result.email_address is None
    if isinstance(result, list):
        [result] = result
    if isinstance(result, InstantKey):
        assert result.instant_key_id == ID and result.expires_at.tzinfo is not None


def test_every_port_method_is_checked() -> None:
    methods = {name for name in vars(Seam) if not name.startswith("_")}

    assert {name.split()[0] for name in CALLS} == methods
