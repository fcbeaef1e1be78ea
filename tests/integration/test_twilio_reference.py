"""The Twilio stand-in and the SMS channel checked against
reference/twilio-messages-openapi.json (over loopback: the stand-in is an aiohttp app)."""

import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import pytest

from tests import reference as reference_file
from tests.helpers import Json
from worker.channels.sms import SmsChannel
from worker.ports import KeyMessage
from worker.sandbox.twilio import TwilioSandbox

MESSAGES = "/2010-04-01/Accounts/{AccountSid}/Messages.json"
SERVICE = "MG" + "ab" * 16

TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "object": dict,
    "array": list,
}


@pytest.fixture(scope="module")
def reference() -> Json:
    return reference_file.load("twilio-messages-openapi.json")


def _operation(reference: Json) -> Json:
    operation: Json = reference["paths"][MESSAGES]["post"]
    return operation


def _request_schema(reference: Json) -> Json:
    content: Json = _operation(reference)["requestBody"]["content"]
    schema: Json = content["application/x-www-form-urlencoded"]["schema"]
    return schema


def _check_value(name: str, value: Any, schema: Json, reference: Json) -> None:
    schema = reference_file.resolve(schema, reference)
    if value is None:
        assert schema.get("nullable"), f"{name} is null but not nullable"
        return
    typed = isinstance(value, TYPES[schema["type"]])
    assert typed, f"{name}: {value!r} is not {schema['type']}"
    if "pattern" in schema:
        assert re.match(schema["pattern"], value), f"{name}: {value!r} !~ {schema['pattern']}"
    if "enum" in schema:
        assert value in schema["enum"], f"{name}: {value!r} not in {schema['enum']}"
    if schema.get("format") == "date-time-rfc-2822":
        assert parsedate_to_datetime(value).utcoffset() is not None, f"{name}: {value!r}"


def test_stand_in_serves_the_reference_operation(reference: Json) -> None:
    assert "post" in reference["paths"][MESSAGES]
    assert _request_schema(reference)["required"] == ["To"]
    served = {
        (route.method, re.sub(r"\{account_sid\}", "{AccountSid}", route.resource.canonical))
        for route in TwilioSandbox().app.router.routes()
        if route.resource is not None
    }
    assert ("POST", MESSAGES) in served


@pytest.mark.parametrize(
    "sender", [{"From": "+15005550006"}, {"MessagingServiceSid": SERVICE}], ids=["from", "service"]
)
async def test_created_message_has_every_reference_property(
    reference: Json, twilio: TwilioSandbox, sender: dict[str, str]
) -> None:
    form = {"To": "+14155550100", "Body": "Your key: https://ik.example.com/k/1", **sender}
    auth = aiohttp.encode_basic_auth(twilio.account_sid, twilio.auth_token)
    url = twilio.url + MESSAGES.replace("{AccountSid}", twilio.account_sid)
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=form, headers={"Authorization": auth}) as response,
    ):
        body = await response.json()
        status = response.status

    assert status == 201
    assert str(status) in _operation(reference)["responses"]
    schema = reference["components"]["schemas"]["api.v2010.account.message"]
    assert set(body) == set(schema["properties"])
    for name, value in body.items():
        _check_value(name, value, schema["properties"][name], reference)
    assert (body["to"], body["body"], body["status"]) == (form["To"], form["Body"], "queued")


async def test_error_body_has_twilio_shape(twilio: TwilioSandbox) -> None:
    auth = aiohttp.encode_basic_auth(twilio.account_sid, twilio.auth_token)
    url = twilio.url + MESSAGES.replace("{AccountSid}", twilio.account_sid)
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data={"To": "12345"}, headers={"Authorization": auth}) as response,
    ):
        body = await response.json()
        status = response.status

    assert status == 400
    assert body == {
        "code": 21211,
        "message": body["message"],
        "more_info": "https://www.twilio.com/docs/errors/21211",
        "status": 400,
    }


@pytest.mark.parametrize(
    ("from_", "service"), [("+15005550006", None), (None, SERVICE)], ids=["from", "service"]
)
async def test_channel_sends_only_reference_fields(
    reference: Json, twilio: TwilioSandbox, from_: str | None, service: str | None
) -> None:
    channel = SmsChannel(
        twilio.account_sid,
        twilio.auth_token,
        from_=from_,
        messaging_service_sid=service,
        api_url=twilio.url,
    )
    message = KeyMessage(
        full_name="Ada Lovelace",
        phone_number="+14155550100",
        email_address=None,
        locale="en",
        expires_at=datetime(2026, 11, 26, 14, 0, tzinfo=UTC),
        url="https://ik.example.com/k/1",
    )
    try:
        await channel.send(message)
    finally:
        await channel.close()

    [sent] = twilio.outbox
    schema = _request_schema(reference)
    assert set(sent["fields"]) <= set(schema["properties"])
    assert set(schema["required"]) <= set(sent["fields"])
    # x-twilio "conditional": at least one field of each group
    for group in _operation(reference)["x-twilio"]["conditional"]:
        wire = {"".join(part.title() for part in name.split("_")) for name in group}
        assert wire & set(sent["fields"]), f"none of {sorted(wire)} sent"
