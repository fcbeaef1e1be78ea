"""The SMS channel against the Twilio stand-in over real sockets."""

import asyncio
import logging
import traceback
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from tests.builders import grant
from tests.helpers import Publish, StartWorker
from worker.channels.sms import SmsChannel
from worker.channels.templates import MAX_SMS_SEGMENTS, sms_segments
from worker.errors import ChannelRefused, CredentialsRefused, Transient
from worker.ports import KeyMessage
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox
from worker.sandbox.twilio import TwilioSandbox

SENDER = "+15005550006"
SERVICE = "MG" + "ab" * 16
PHONE = "+14155550100"
URL = "https://ik.example.com/instant-keys/ik_7Hq2sVb9?token=s3cr3t-Z9"
MESSAGE = KeyMessage(
    full_name="Ada Lovelace",
    phone_number=PHONE,
    email_address="ada@example.com",
    locale="en",
    expires_at=datetime(2026, 11, 26, 14, 0, tzinfo=UTC),
    url=URL,
)


@pytest.fixture
async def sms(twilio: TwilioSandbox) -> AsyncIterator[SmsChannel]:
    channel = SmsChannel(twilio.account_sid, twilio.auth_token, from_=SENDER, api_url=twilio.url)
    yield channel
    await channel.close()


def assert_no_secrets(exc: BaseException, *also: str) -> None:
    """Nothing a log shows of the error, chained causes included, holds the link, the guest's
    number or Twilio's own text (which quotes the number)."""
    shown = []
    error: BaseException | None = exc
    while error is not None:
        shown += [*traceback.format_exception_only(error), repr(error), repr(vars(error))]
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    for secret in (URL, PHONE, *also):
        assert secret not in "".join(shown)


async def test_guest_gets_the_link_and_their_name(twilio: TwilioSandbox, sms: SmsChannel) -> None:
    sid = await sms.send(MESSAGE)

    [sent] = twilio.outbox
    assert sent["sid"] == sid
    assert (sent["to"], sent["from"], sent["messaging_service_sid"]) == (PHONE, SENDER, None)
    assert URL in sent["body"].split()
    assert sent["body"].startswith("Hi Ada Lovelace,")
    assert "Nov 26, 2026, 2:00 PM UTC" in sent["body"]


async def test_messaging_service_instead_of_a_sender(twilio: TwilioSandbox) -> None:
    channel = SmsChannel(
        twilio.account_sid, twilio.auth_token, messaging_service_sid=SERVICE, api_url=twilio.url
    )
    try:
        await channel.send(MESSAGE)
    finally:
        await channel.close()

    [sent] = twilio.outbox
    assert (sent["from"], sent["messaging_service_sid"]) == (None, SERVICE)
    assert "From" not in sent["fields"]


def test_a_sender_or_a_service_is_required() -> None:
    with pytest.raises(ValueError, match="from_ or messaging_service_sid"):
        SmsChannel("AC" + "0" * 32, "token")


def test_reaches_only_guests_with_a_phone_number() -> None:
    channel = SmsChannel("AC" + "0" * 32, "token", from_=SENDER)
    assert channel.reaches(MESSAGE)
    assert not channel.reaches(replace(MESSAGE, phone_number=None))


@pytest.mark.parametrize(
    ("number", "code"),
    [
        ("+15005550001", "21211"),  # invalid
        ("+15005550002", "21612"),  # cannot route
        ("+15005550003", "21408"),  # no permission for the region
        ("+15005550004", "21610"),  # opted out
        ("+15005550009", "21614"),  # not a mobile number
    ],
)
async def test_refused_numbers_fall_through_to_the_next_channel(
    twilio: TwilioSandbox, sms: SmsChannel, number: str, code: str
) -> None:
    with pytest.raises(ChannelRefused) as raised:
        await sms.send(replace(MESSAGE, phone_number=number))

    assert raised.value.code == code
    assert str(raised.value) == f"twilio refused the message (code {code})"
    assert_no_secrets(raised.value, number)
    assert twilio.outbox == []


@pytest.mark.parametrize(
    ("sender", "code"),
    [
        ("+15005550001", "21212"),  # invalid
        ("+15005550007", "21606"),  # not the account's, or not SMS-capable
        ("+15005550008", "21611"),  # its queue is full
    ],
)
async def test_twilio_s_magic_senders_are_refused_as_twilio_documents(
    twilio: TwilioSandbox, sender: str, code: str
) -> None:
    channel = SmsChannel(twilio.account_sid, twilio.auth_token, from_=sender, api_url=twilio.url)
    try:
        with pytest.raises(ChannelRefused) as raised:
            await channel.send(MESSAGE)
    finally:
        await channel.close()
    assert str(raised.value) == f"twilio refused the message (code {code})"
    assert twilio.outbox == []


async def test_malformed_number_is_refused(sms: SmsChannel) -> None:
    with pytest.raises(ChannelRefused) as raised:
        await sms.send(replace(MESSAGE, phone_number="0044 20 7946 0000"))
    assert raised.value.code == "21211"
    assert_no_secrets(raised.value, "0044 20 7946 0000", "is not a valid phone number")


async def test_an_opted_out_guest_is_refused_for_that_number_only(
    twilio: TwilioSandbox, sms: SmsChannel
) -> None:
    twilio.fail_next(21610, to=PHONE)

    with pytest.raises(ChannelRefused) as raised:
        await sms.send(MESSAGE)
    await sms.send(MESSAGE)

    assert raised.value.code == "21610"
    assert_no_secrets(raised.value, "unsubscribed recipient")
    assert [sent["to"] for sent in twilio.outbox] == [PHONE]


async def test_rate_limit_is_transient_and_keeps_retry_after(
    twilio: TwilioSandbox, sms: SmsChannel
) -> None:
    twilio.fail_next(20429, 429, retry_after=7)

    with pytest.raises(Transient) as raised:
        await sms.send(MESSAGE)

    assert raised.value.retry_after == 7.0
    assert_no_secrets(raised.value)


async def test_outage_is_transient_and_sent_once(twilio: TwilioSandbox, sms: SmsChannel) -> None:
    twilio.fail_next(20503, 503)

    with pytest.raises(Transient) as raised:
        await sms.send(MESSAGE)

    assert raised.value.retry_after is None
    # The twilio client must not retry on its own: a retried POST can text the guest twice.
    assert twilio.received == 1
    await sms.send(MESSAGE)
    assert len(twilio.outbox) == 1


async def test_wrong_token_is_a_credentials_problem(twilio: TwilioSandbox) -> None:
    channel = SmsChannel(twilio.account_sid, "not-the-token", from_=SENDER, api_url=twilio.url)
    try:
        with pytest.raises(CredentialsRefused) as on_send:
            await channel.send(MESSAGE)
        with pytest.raises(CredentialsRefused) as on_check:
            await channel.check()
    finally:
        await channel.close()

    assert on_send.value.service == on_check.value.service == "twilio"
    assert_no_secrets(on_send.value, "not-the-token")
    assert twilio.outbox == []


async def test_check_passes_until_the_token_is_rotated(
    twilio: TwilioSandbox, sms: SmsChannel
) -> None:
    await sms.check()

    twilio.auth_token = "rotated"

    with pytest.raises(CredentialsRefused):
        await sms.check()


async def test_slow_twilio_is_transient(twilio: TwilioSandbox) -> None:
    channel = SmsChannel(
        twilio.account_sid, twilio.auth_token, from_=SENDER, api_url=twilio.url, timeout=0.2
    )
    twilio.latency = 0.5
    try:
        with pytest.raises(Transient) as raised:
            await channel.send(MESSAGE)
    finally:
        await channel.close()
    assert_no_secrets(raised.value)


async def test_unreachable_twilio_is_transient() -> None:
    gone = TwilioSandbox()
    url = await gone.start()
    await gone.stop()
    channel = SmsChannel(gone.account_sid, gone.auth_token, from_=SENDER, api_url=url)
    try:
        with pytest.raises(Transient) as on_send:
            await channel.send(MESSAGE)
        with pytest.raises(Transient):
            await channel.check()
    finally:
        await channel.close()
    assert_no_secrets(on_send.value)


async def test_logs_hold_neither_link_nor_number(
    twilio: TwilioSandbox, sms: SmsChannel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    twilio.fail_next(21211)

    with pytest.raises(ChannelRefused):
        await sms.send(MESSAGE)
    await sms.send(MESSAGE)

    assert URL not in caplog.text
    assert PHONE not in caplog.text


async def test_soak_failure_rate_makes_every_send_transient(
    twilio: TwilioSandbox, sms: SmsChannel
) -> None:
    twilio.fail_rate = 1.0

    with pytest.raises(Transient):
        await sms.send(MESSAGE)

    twilio.fail_rate = 0.0
    await sms.send(MESSAGE)
    assert len(twilio.outbox) == 1


async def test_concurrent_sends_share_one_channel(twilio: TwilioSandbox, sms: SmsChannel) -> None:
    slow = "+14155550199"
    twilio.fail_next(20429, 429, to=slow, retry_after=30)
    guests = [f"+1415555{n:04d}" for n in range(20)] + [slow]

    results = await asyncio.gather(
        *(sms.send(replace(MESSAGE, phone_number=p, url=f"{URL}-{p}")) for p in guests),
        return_exceptions=True,
    )

    limited = results.pop()
    assert isinstance(limited, Transient) and limited.retry_after == 30
    assert all(isinstance(sid, str) for sid in results)
    delivered = {sent["to"]: sent["body"] for sent in twilio.outbox}
    assert sorted(delivered) == sorted(guests[:-1])
    assert all(f"{URL}-{phone}" in body.split() for phone, body in delivered.items())


PHISHING = "Ada. Your key has EXPIRED - get a new one at https://evil.example/k"
HIDDEN = "\u202eAda\u200b Love\x1b\x07\x00lace\u2066\ufeff"


def invisible(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c)[0] == "C"]


async def test_a_name_that_is_a_message_is_not_sent(twilio: TwilioSandbox, sms: SmsChannel) -> None:
    await sms.send(replace(MESSAGE, full_name=PHISHING))

    [sent] = twilio.outbox
    assert sent["body"].startswith("Hello, here is your key: ")
    assert "evil.example" not in sent["body"] and "EXPIRED" not in sent["body"]
    assert URL in sent["body"].split()


async def test_control_and_format_characters_never_reach_the_phone(
    twilio: TwilioSandbox, sms: SmsChannel
) -> None:
    await sms.send(replace(MESSAGE, full_name=HIDDEN))

    [sent] = twilio.outbox
    assert sent["body"].startswith("Hi Ada Lovelace, ")
    assert invisible(sent["body"]) == []


async def test_a_long_name_keeps_the_sms_within_its_segments(
    twilio: TwilioSandbox, sms: SmsChannel
) -> None:
    long_url = URL + "&pad=" + "x" * 60
    await sms.send(replace(MESSAGE, full_name="山" * 64, url=long_url))

    [sent] = twilio.outbox
    assert sent["body"].startswith("Hello, here is your key: ")
    assert sms_segments(sent["body"]) <= MAX_SMS_SEGMENTS


async def test_the_worker_greets_without_a_phishing_name(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    await start_worker()
    await publish(grant(name=PHISHING, channels=("sms",)))

    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS")
    [sent] = sandbox.twilio.outbox
    assert sent["body"].startswith("Hello, here is your key: ")
    assert "evil.example" not in sent["body"]


async def test_the_connection_pool_is_sized_as_asked(twilio: TwilioSandbox) -> None:
    """twilio's own session allows aiohttp's default of 100 connections: the worker sizes it
    from IKW_PREFETCH, as it does Seam's."""
    channel = SmsChannel(
        twilio.account_sid, twilio.auth_token, from_=SENDER, api_url=twilio.url, connections=7
    )
    try:
        await channel.check()
        assert channel._http is not None
        assert channel._http.session.connector.limit == 7
    finally:
        await channel.close()
