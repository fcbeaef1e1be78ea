"""The Seam client against the Seam stand-in over real sockets, and the stand-in against the
vendor's reference."""

import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests import reference as reference_file
from worker.errors import CredentialsRefused, NotFound, SeamRejected, Transient
from worker.http import Served
from worker.sandbox.seam import SeamSandbox
from worker.seam import SeamClient

REQUEST_ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
GUEST = {
    "user_identity_key": "guest-991",
    "full_name": "Ada Lovelace",
    "email_address": "ada@example.com",
    "phone_number": "+14155550100",
}


@pytest.fixture
async def sandbox() -> AsyncIterator[SeamSandbox]:
    stand_in = SeamSandbox()
    await stand_in.start()
    yield stand_in
    await stand_in.stop()


@pytest.fixture
async def seam(sandbox: SeamSandbox) -> AsyncIterator[SeamClient]:
    client = SeamClient(sandbox.url, sandbox.api_key, timeout=5)
    yield client
    await client.close()


@pytest.fixture
async def http(sandbox: SeamSandbox) -> AsyncIterator[aiohttp.ClientSession]:
    """A raw session that authenticates like the worker, to poke the stand-in directly."""
    headers = {"Authorization": f"Bearer {sandbox.api_key}"}
    async with aiohttp.ClientSession(sandbox.url, headers=headers) as session:
        yield session


async def test_create_then_get_by_id_and_by_key(sandbox: SeamSandbox, seam: SeamClient) -> None:
    created = await seam.create_user_identity(**GUEST)

    assert uuid.UUID(created.user_identity_id).version == 4
    assert (created.user_identity_key, created.full_name) == ("guest-991", "Ada Lovelace")
    assert (created.email_address, created.phone_number) == ("ada@example.com", "+14155550100")
    assert await seam.get_user_identity(user_identity_id=created.user_identity_id) == created
    assert await seam.get_user_identity(user_identity_key="guest-991") == created
    assert sandbox.requests == [
        ("POST", "/user_identities/create", GUEST),
        ("POST", "/user_identities/get", {"user_identity_id": created.user_identity_id}),
        ("POST", "/user_identities/get", {"user_identity_key": "guest-991"}),
    ]


async def test_create_sends_only_the_fields_it_has(sandbox: SeamSandbox, seam: SeamClient) -> None:
    created = await seam.create_user_identity(
        user_identity_key="guest-1", full_name=None, email_address=None, phone_number=None
    )

    assert created.full_name is None and created.email_address is None
    assert sandbox.requests[-1][2] == {"user_identity_key": "guest-1"}


async def test_get_unknown_identity_is_none(seam: SeamClient) -> None:
    assert await seam.get_user_identity(user_identity_id=str(uuid.uuid4())) is None
    assert await seam.get_user_identity(user_identity_key="nobody") is None


async def test_generate_list_and_delete(sandbox: SeamSandbox, seam: SeamClient) -> None:
    guest = await seam.create_user_identity(**GUEST)
    other = await seam.create_user_identity(
        user_identity_key="guest-2", full_name=None, email_address=None, phone_number=None
    )
    profile_id = str(uuid.uuid4())

    key = await seam.generate_instant_key(
        guest.user_identity_id, customization_profile_id=profile_id, max_use_count=3
    )
    await seam.generate_instant_key(other.user_identity_id)

    assert key.user_identity_id == guest.user_identity_id
    assert key.instant_key_url.startswith("https://ik.seam.co/")
    assert key.instant_key_url not in repr(key)
    assert key.created_at.tzinfo is not None
    assert abs(key.created_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert key.expires_at - key.created_at == timedelta(hours=48)
    assert sandbox.keys[key.instant_key_id]["customization_profile_id"] == profile_id
    assert sandbox.key_options[key.instant_key_id]["max_use_count"] == 3
    assert await seam.list_instant_keys(guest.user_identity_id) == [key]

    await seam.delete_instant_key(key.instant_key_id)
    await seam.delete_instant_key(key.instant_key_id)  # already gone: still done

    assert await seam.list_instant_keys(guest.user_identity_id) == []
    assert len(await seam.list_instant_keys(other.user_identity_id)) == 1
    assert [p for m, p, _ in sandbox.requests].count("/instant_keys/delete") == 2


async def test_generate_for_unknown_identity_is_not_found(seam: SeamClient) -> None:
    with pytest.raises(NotFound, match=r"answered 404 \(user_identity_not_found\)"):
        await seam.generate_instant_key(str(uuid.uuid4()))


@pytest.mark.parametrize(
    ("field", "error_type"),
    [
        ("user_identity_key", "user_identity_key_already_exists"),
        ("email_address", "user_identity_email_address_already_exists"),
        ("phone_number", "user_identity_phone_number_already_exists"),
    ],
)
async def test_duplicate_identity_is_rejected(
    seam: SeamClient, field: str, error_type: str
) -> None:
    await seam.create_user_identity(**GUEST)
    fresh = {"user_identity_key": "guest-2", "email_address": None, "phone_number": None}
    duplicate = {**GUEST, **fresh, field: GUEST[field]}

    with pytest.raises(SeamRejected) as caught:
        await seam.create_user_identity(**duplicate)

    assert caught.value.error_type == error_type
    assert "ada@example.com" not in str(caught.value)
    assert "+14155550100" not in str(caught.value)


async def test_invalid_input_is_rejected(seam: SeamClient) -> None:
    with pytest.raises(SeamRejected, match=r"/user_identities/get answered 400") as caught:
        await seam.get_user_identity(user_identity_id="not-a-uuid")

    assert caught.value.error_type == "invalid_input"
    assert caught.value.reason == "seam_rejected"


async def test_wrong_or_rotated_key_is_refused(sandbox: SeamSandbox, seam: SeamClient) -> None:
    wrong = SeamClient(sandbox.url, "seam_wrong_key")
    try:
        with pytest.raises(CredentialsRefused) as caught:
            await wrong.check()
    finally:
        await wrong.close()
    assert caught.value.service == "seam"
    assert "seam_wrong_key" not in str(caught.value)

    await seam.check()
    sandbox.api_key = "seam_rotated_key"
    with pytest.raises(CredentialsRefused, match=r"/instant_keys/list answered 401"):
        await seam.list_instant_keys(str(uuid.uuid4()))


async def test_503_is_transient_with_request_id(sandbox: SeamSandbox, seam: SeamClient) -> None:
    guest = await seam.create_user_identity(**GUEST)
    sandbox.fail_next(503, path="/instant_keys/list")
    await seam.check()  # another path: not failed

    with pytest.raises(Transient) as caught:
        await seam.list_instant_keys(guest.user_identity_id)

    pattern = (
        rf"seam /instant_keys/list answered 503 \(service_unavailable\), request id {REQUEST_ID}"
    )
    assert re.fullmatch(pattern, str(caught.value))
    assert caught.value.retry_after is None
    assert await seam.list_instant_keys(guest.user_identity_id) == []


async def test_429_carries_retry_after(sandbox: SeamSandbox, seam: SeamClient) -> None:
    sandbox.fail_next(429, retry_after=7, count=2)

    for _ in range(2):
        with pytest.raises(Transient, match=r"answered 429 \(rate_limited\)") as caught:
            await seam.check()
        assert caught.value.retry_after == 7.0
    await seam.check()


async def test_slow_answer_times_out(sandbox: SeamSandbox) -> None:
    sandbox.latency = 0.5
    impatient = SeamClient(sandbox.url, sandbox.api_key, timeout=0.1)
    try:
        with pytest.raises(Transient, match=r"seam /user_identities/list timed out after 0.1 s"):
            await impatient.check()
    finally:
        await impatient.close()


async def test_unreachable_endpoint_is_transient(sandbox: SeamSandbox, seam: SeamClient) -> None:
    await sandbox.stop()

    with pytest.raises(Transient, match=r"seam /user_identities/list failed: ClientConnectorError"):
        await seam.check()


async def test_fail_rate_fails_about_that_share(sandbox: SeamSandbox, seam: SeamClient) -> None:
    sandbox.fail_rate = 0.5
    failures = 0
    for _ in range(100):
        try:
            await seam.check()
        except Transient:
            failures += 1

    assert 20 <= failures <= 80  # six standard deviations either side of 50
    sandbox.fail_rate = 0.0
    await seam.check()


@pytest.mark.parametrize(
    ("status", "headers", "body", "expected"),
    [
        (502, {"Content-Type": "text/html"}, "<html>Bad gateway</html>", Transient),
        (200, {}, "not json", Transient),
        (200, {}, '{"ok": true}', Transient),
        (200, {}, '{"ok": true, "instant_keys": [{"instant_key_id": 1}]}', Transient),
        (503, {"Retry-After": "in a while"}, "{}", Transient),
        (418, {}, '{"error": {"type": "I am a teapot!"}}', SeamRejected),
        (403, {}, '{"error": {"type": "forbidden"}}', CredentialsRefused),
    ],
)
async def test_answers_the_stand_in_never_gives(
    status: int, headers: dict[str, str], body: str, expected: type[Exception]
) -> None:
    seen: list[web.Request] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request)
        return web.Response(status=status, headers=headers, text=body)

    app = web.Application()
    app.router.add_post("/instant_keys/list", answer)
    server = Served(app)
    client = SeamClient(await server.start(), "seam_secret_key")
    try:
        with pytest.raises(expected) as caught:
            await client.list_instant_keys(str(uuid.uuid4()))
    finally:
        await client.close()
        await server.stop()

    assert "seam_secret_key" not in str(caught.value)
    assert "teapot" not in str(caught.value)
    assert "request id none" in str(caught.value)
    assert seen[0].headers["Authorization"] == "Bearer seam_secret_key"
    assert seen[0].headers["User-Agent"].startswith("instant-key-worker/")


@pytest.mark.parametrize(
    ("header", "quoted"),
    [
        ("req_01H:abc-DEF.9", "req_01H:abc-DEF.9"),
        ("see https://evil.example/k", "invalid"),
        ("a" * 65, "invalid"),
        ("id\u202eevil", "invalid"),
        ("", "invalid"),
    ],
)
async def test_request_id_is_quoted_only_when_well_formed(header: str, quoted: str) -> None:
    async def answer(request: web.Request) -> web.Response:
        response = web.Response(status=503, text="{}")
        response.headers["seam-request-id"] = header
        return response

    app = web.Application()
    app.router.add_post("/instant_keys/list", answer)
    server = Served(app)
    client = SeamClient(await server.start(), "seam_secret_key")
    try:
        with pytest.raises(Transient) as caught:
            await client.list_instant_keys(str(uuid.uuid4()))
    finally:
        await client.close()
        await server.stop()

    assert str(caught.value).endswith(f"request id {quoted}")
    assert "evil" not in str(caught.value)


async def test_retry_after_as_http_date() -> None:
    later = datetime.now(UTC) + timedelta(seconds=120)

    async def answer(request: web.Request) -> web.Response:
        headers = {"Retry-After": format_datetime(later, usegmt=True)}
        return web.json_response({"error": {"type": "rate_limited"}}, status=429, headers=headers)

    app = web.Application()
    app.router.add_post("/user_identities/list", answer)
    server = Served(app)
    client = SeamClient(await server.start(), "seam_secret_key")
    try:
        with pytest.raises(Transient) as caught:
            await client.check()
    finally:
        await client.close()
        await server.stop()

    assert caught.value.retry_after is not None
    assert 100 < caught.value.retry_after <= 120


# The stand-in itself, over raw HTTP.


async def test_read_and_delete_accept_query_strings(http: aiohttp.ClientSession) -> None:
    async with http.post("/user_identities/create", json={"user_identity_key": "k1"}) as answer:
        identity_id = (await answer.json())["user_identity"]["user_identity_id"]
    body = {"user_identity_id": identity_id}
    async with http.post("/user_identities/generate_instant_key", json=body) as answer:
        key_id = (await answer.json())["instant_key"]["instant_key_id"]

    async with http.get("/user_identities/get", params={"user_identity_key": "k1"}) as answer:
        assert (await answer.json())["user_identity"]["user_identity_id"] == identity_id
    async with http.get("/instant_keys/list", params={"user_identity_id": identity_id}) as answer:
        assert [k["instant_key_id"] for k in (await answer.json())["instant_keys"]] == [key_id]
    async with http.delete("/instant_keys/delete", params={"instant_key_id": key_id}) as answer:
        assert (answer.status, await answer.json()) == (200, {"ok": True})
    async with http.get("/instant_keys/get", params={"instant_key_id": key_id}) as answer:
        assert answer.status == 404
        assert (await answer.json())["error"]["type"] == "instant_key_not_found"


async def test_create_is_post_only(http: aiohttp.ClientSession) -> None:
    async with http.get("/user_identities/create", params={"user_identity_key": "k"}) as answer:
        assert answer.status == 405
        assert answer.headers["Allow"] == "POST"
        assert (await answer.json())["error"]["type"] == "method_not_allowed"
        assert re.fullmatch(REQUEST_ID, answer.headers["seam-request-id"])


@pytest.mark.parametrize("authorization", [None, "Bearer seam_wrong", "seam_sandbox_key"])
async def test_bad_authorization_is_401(sandbox: SeamSandbox, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(sandbox.url + "/instant_keys/list", json={}, headers=headers) as answer,
    ):
        body = await answer.json()
        assert answer.status == 401
        assert re.fullmatch(REQUEST_ID, answer.headers["seam-request-id"])
    assert body["error"]["type"] == "unauthorized"
    assert isinstance(body["error"]["message"], str)
    assert "ok" not in body


async def test_deleting_identity_deletes_its_keys(
    sandbox: SeamSandbox, seam: SeamClient, http: aiohttp.ClientSession
) -> None:
    guest = await seam.create_user_identity(**GUEST)
    await seam.generate_instant_key(guest.user_identity_id)
    body = {"user_identity_id": guest.user_identity_id}

    async with http.post("/user_identities/delete", json=body) as answer:
        assert answer.status == 200

    assert sandbox.identities == {} and sandbox.keys == {}
    assert await seam.get_user_identity(user_identity_id=guest.user_identity_id) is None


async def test_live_keys_leaves_out_expired_ones(sandbox: SeamSandbox, seam: SeamClient) -> None:
    guest = await seam.create_user_identity(**GUEST)
    sandbox.key_lifetime = 0
    expired = await seam.generate_instant_key(guest.user_identity_id)
    sandbox.key_lifetime = 2
    live = await seam.generate_instant_key(guest.user_identity_id)

    assert expired.expires_at <= datetime.now(UTC) < live.expires_at
    assert [k["instant_key_id"] for k in sandbox.live_keys(guest.user_identity_id)] == [
        live.instant_key_id
    ]
    assert len(await seam.list_instant_keys(guest.user_identity_id)) == 2


async def test_list_identities_pages(http: aiohttp.ClientSession) -> None:
    for n in range(3):
        async with http.post("/user_identities/create", json={"user_identity_key": f"k{n}"}):
            pass

    async with http.post("/user_identities/list", json={"limit": 2}) as answer:
        first = await answer.json()
    cursor = first["pagination"]["next_page_cursor"]
    async with http.get("/user_identities/list", params={"page_cursor": cursor}) as answer:
        second = await answer.json()

    assert first["pagination"]["has_next_page"] is True
    keys = [i["user_identity_key"] for i in first["user_identities"] + second["user_identities"]]
    assert keys == ["k0", "k1", "k2"]
    assert second["pagination"] == {
        "has_next_page": False,
        "next_page_cursor": None,
        "next_page_url": None,
    }


# The stand-in against reference/seam-openapi.json.


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return reference_file.load("seam-openapi.json")


def _problems(value: Any, schema: dict[str, Any], reference: dict[str, Any], at: str) -> list[str]:
    """Where ``value`` breaks ``schema``: missing required or unknown properties, wrong types."""
    if "$ref" in schema:
        schema = reference["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    if "oneOf" in schema:
        branches = [_problems(value, s, reference, at) for s in schema["oneOf"]]
        return [] if [] in branches else branches[0]
    if value is None:
        return [] if schema.get("nullable") else [f"{at} is null"]
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int}
    if kind in types and not isinstance(value, types[kind]):
        return [f"{at} is not {kind}"]
    if kind == "string" and schema.get("format") == "uuid" and not re.fullmatch(REQUEST_ID, value):
        return [f"{at} is not a uuid"]
    if kind == "string" and schema.get("format") == "date-time":
        if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", value):
            return [f"{at} is not a Seam timestamp: {value}"]
    if kind == "array":
        return [
            p for i, v in enumerate(value) for p in _problems(v, schema["items"], reference, at)
        ]
    if kind != "object":
        return []
    properties = schema.get("properties", {})
    found = [f"{at}.{name} is missing" for name in schema.get("required", []) if name not in value]
    found += [f"{at}.{name} is not in the reference" for name in value if name not in properties]
    for name, item in value.items():
        if name in properties:
            found += _problems(item, properties[name], reference, f"{at}.{name}")
    return found


async def test_success_bodies_match_reference(
    reference: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    async def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with http.post(path, json=body) as answer:
            assert answer.status == 200, await answer.text()
            data: dict[str, Any] = await answer.json()
        schema = reference["paths"][path]["post"]["responses"]["200"]["content"]
        assert _problems(data, schema["application/json"]["schema"], reference, path) == []
        return data

    created = await call("/user_identities/create", GUEST)
    identity_id = created["user_identity"]["user_identity_id"]
    await call("/user_identities/create", {})
    await call("/user_identities/get", {"user_identity_id": identity_id})
    await call("/user_identities/list", {})
    profile = {"customization_profile_id": str(uuid.uuid4()), "max_use_count": 2}
    generated = await call(
        "/user_identities/generate_instant_key", {"user_identity_id": identity_id, **profile}
    )
    key_id = generated["instant_key"]["instant_key_id"]
    await call("/instant_keys/get", {"instant_key_id": key_id})
    await call("/instant_keys/list", {"user_identity_id": identity_id})
    await call("/instant_keys/delete", {"instant_key_id": key_id})
    await call("/user_identities/delete", {"user_identity_id": identity_id})


async def test_methods_match_reference(
    reference: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    for path, operations in reference["paths"].items():
        if path == "/access_grants/create":  # the worker does not use it
            continue
        for method in ("GET", "POST", "DELETE", "PUT"):
            async with http.request(method, path) as answer:
                allowed = method.lower() in operations
                assert (answer.status != 405) == allowed, f"{method} {path}: {answer.status}"
