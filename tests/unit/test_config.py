"""Settings: every problem named by its variable, secrets from *_FILE, channels on by presence."""

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from worker.config import ConfigError, broker_settings, load

BASE = {"SEAM_API_KEY": "seam_key", "SMTP_HOST": "mail.example.com", "EMAIL_FROM": "k@example.com"}


def problems(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load(env)
    return str(caught.value)


@pytest.mark.parametrize(
    "name,value",
    [
        ("IKW_PREFETCH", "many"),
        ("IKW_PREFETCH", "0"),
        ("IKW_MAX_ATTEMPTS", "-3"),
        ("IKW_MIN_KEY_LIFETIME", "soon"),
        ("IKW_MAX_RETRY_AGE", "1 week"),
        ("IKW_MAX_CLOCK_SKEW", "a bit"),
        ("IKW_HTTP_PORT", "70000"),
        ("IKW_NAMESPACE", "has spaces"),
        ("SMTP_TLS", "ssl"),
        ("SMTP_PORT", "smtp"),
        ("SEAM_ENDPOINT", "connect.getseam.com"),
        ("AMQP_URL", "http://localhost"),
        ("EMAIL_FROM", "nobody"),
    ],
)
def test_a_bad_value_is_named_with_its_variable(name: str, value: str) -> None:
    text = problems(BASE | {name: value})
    assert text.startswith(f"{name}:")
    assert len(text.splitlines()) == 1


def test_every_problem_is_listed_once_per_line() -> None:
    text = problems({"IKW_PREFETCH": "x", "TWILIO_ACCOUNT_SID": "AC1"})
    assert text.splitlines() == [
        "IKW_PREFETCH: must be a whole number from 1 to 10000, got 'x'",
        "SEAM_API_KEY: required (the Seam API key, or SEAM_API_KEY_FILE)",
        "TWILIO_AUTH_TOKEN: required for SMS (any TWILIO_* variable turns SMS on)",
        "TWILIO_FROM or TWILIO_MESSAGING_SERVICE_SID: one is required for SMS "
        "(any TWILIO_* variable turns SMS on)",
    ]


def test_no_channel_at_all_is_refused() -> None:
    text = problems({"SEAM_API_KEY": "k"})
    assert "no delivery channel is configured" in text


NO_CHANNEL = (
    "TWILIO_ACCOUNT_SID / SMTP_HOST: no delivery channel is configured; set the TWILIO_* "
    "variables for SMS or SMTP_HOST and EMAIL_FROM for email"
)


def test_an_empty_environment_is_told_everything_it_lacks_at_once() -> None:
    assert problems({}).splitlines() == [
        "SEAM_API_KEY: required (the Seam API key, or SEAM_API_KEY_FILE)",
        NO_CHANNEL,
    ]
    # Beside a problem across settings too, not one round later.
    assert problems({"IKW_MESSAGE_DEADLINE": "0"}).splitlines()[-2:] == [
        "IKW_MESSAGE_DEADLINE: must be at least 1s",
        NO_CHANNEL,
    ]


def test_a_secret_file_that_cannot_be_read_is_the_only_line_about_that_secret(
    tmp_path: Path,
) -> None:
    absent = tmp_path / "absent"
    assert problems(BASE | {"SEAM_API_KEY_FILE": str(absent)}).splitlines() == [
        f"SEAM_API_KEY_FILE: cannot read {absent}: No such file or directory"
    ]
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert problems(BASE | {"SEAM_API_KEY_FILE": str(empty)}).splitlines() == [
        f"SEAM_API_KEY_FILE: {empty} is empty"
    ]


@pytest.mark.parametrize(
    "value,said",
    [
        ("notaurl", "got 'notaurl'"),
        ("localhost:5672", "got 'localhost:5672'"),
        ("http://guest:s3cret@localhost/", "got 'http://…'"),  # the password is never shown
    ],
)
def test_an_amqp_url_that_is_not_one_says_so_in_plain_words(value: str, said: str) -> None:
    [line] = problems(BASE | {"AMQP_URL": value}).splitlines()
    assert line.startswith("AMQP_URL: must be an amqp or amqps URL with a host")
    assert line.endswith(said)
    assert problems(BASE | {"SEAM_ENDPOINT": "ftp://seam"}).startswith(
        "SEAM_ENDPOINT: must be an http or https URL with a host"
    )


def test_secrets_are_read_from_files_and_never_shown(tmp_path: Path) -> None:
    secret = tmp_path / "seam"
    secret.write_text("seam_from_file\n")
    settings = load({"SEAM_API_KEY_FILE": str(secret), "SMTP_HOST": "h", "EMAIL_FROM": "k@e.com"})
    assert settings.seam_api_key == "seam_from_file"
    assert "seam_from_file" not in repr(settings)
    missing = problems(BASE | {"SMTP_PASSWORD_FILE": str(tmp_path / "absent")})
    assert missing.startswith("SMTP_PASSWORD_FILE: cannot read")


def test_channels_turn_on_when_their_settings_are_present() -> None:
    settings = load(
        BASE
        | {
            "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
            "TWILIO_AUTH_TOKEN": "t",
            "TWILIO_MESSAGING_SERVICE_SID": "MG" + "0" * 32,
            "IKW_MIN_KEY_LIFETIME": "2h",
        }
    )
    assert settings.channels["sms"].messaging_service_sid
    assert settings.channels["email"].port == 587  # starttls default
    assert settings.min_key_lifetime == timedelta(hours=2)


def test_ikw_run_stops_with_one_plain_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run"],
        env={"PATH": "/usr/bin:/bin", "IKW_PREFETCH": "lots", **BASE},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "ikw: configuration error:\nIKW_PREFETCH: must be a whole number from 1 to 10000, "
        "got 'lots'\n"
    )


def test_trusted_publishers_are_broker_users_optionally_limited_to_a_key_prefix() -> None:
    settings = load(BASE | {"IKW_TRUSTED_PUBLISHERS": "booking, hotel:hotel-a-,hotel:hotel-b-"})
    assert settings.trusted_publishers == {"booking": None, "hotel": ("hotel-a-", "hotel-b-")}
    assert settings.broker_user == "guest"  # the user of AMQP_URL, trusted for everything


@pytest.mark.parametrize(
    "value,said",
    [
        ("booking:", "IKW_TRUSTED_PUBLISHERS: use comma-separated broker users"),
        ("booking,booking:x-", "'booking' is listed both with and without a prefix"),
        # The first word of its outcomes' routing keys: `hotel.a` would hear `hotel`'s.
        ("hotel.a:hotel-a-", "a name being 1 to 64 letters, digits, '_' or '-', got 'hotel.a"),
        ("b" * 65, "a name being 1 to 64 letters"),
    ],
)
def test_a_bad_trusted_publishers_entry_is_named(value: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(BASE | {"IKW_TRUSTED_PUBLISHERS": value})
    assert said in str(caught.value)


def test_revokes_are_remembered_at_least_as_long_as_grants_are_retried() -> None:
    with pytest.raises(ConfigError) as caught:
        load(BASE | {"IKW_REVOKE_RETENTION": "1h", "IKW_MAX_RETRY_AGE": "2h"})
    assert "IKW_REVOKE_RETENTION: must be at least IKW_MAX_RETRY_AGE" in str(caught.value)


# Transport: plaintext or unverified to a host that is not loopback is refused at start.

SMS = {
    "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
    "TWILIO_AUTH_TOKEN": "t",
    "TWILIO_FROM": "+15005550006",
}
SMTP_LOGIN = {"SMTP_USERNAME": "mailer", "SMTP_PASSWORD": "hunter2"}


def test_the_clock_skew_is_a_duration_of_five_minutes_by_default() -> None:
    assert load(BASE).max_clock_skew == timedelta(minutes=5)
    assert load(BASE | {"IKW_MAX_CLOCK_SKEW": "30s"}).max_clock_skew == timedelta(seconds=30)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SEAM_ENDPOINT": "http://seam.example.com"}, "SEAM_ENDPOINT"),
        (SMS | {"TWILIO_API_URL": "http://api.twilio.example"}, "TWILIO_API_URL"),
        ({"AMQP_URL": "amqp://u:p@rabbit.example.com/"}, "AMQP_URL"),
        ({"AMQP_URL": "amqps://u:p@rabbit.example.com/?no_verify_ssl=1"}, "AMQP_URL"),
        ({"AMQP_URL": "amqps://u:p@rabbit.example.com/?no_verify_ssl=false"}, "AMQP_URL"),
        ({"AMQP_URL": "amqps://u:p@10.0.0.5/?no_verify_ssl=0&no_verify_ssl=1"}, "AMQP_URL"),
        (SMTP_LOGIN | {"SMTP_TLS": "none"}, "SMTP_PASSWORD"),
    ],
)
def test_insecure_transport_is_refused(env: dict[str, str], variable: str) -> None:
    text = problems(BASE | env)
    assert text.startswith(f"{variable}:")
    assert "IKW_ALLOW_INSECURE=1" in text
    assert len(text.splitlines()) == 1
    assert "hunter2" not in text and "u:p" not in text


@pytest.mark.parametrize(
    "env",
    [
        {"SEAM_ENDPOINT": "http://seam.example.com"},
        SMS | {"TWILIO_API_URL": "http://api.twilio.example"},
        {"AMQP_URL": "amqp://u:p@rabbit.example.com/"},
        {"AMQP_URL": "amqps://u:p@rabbit.example.com/?no_verify_ssl=1"},
        SMTP_LOGIN | {"SMTP_TLS": "none"},
    ],
)
@pytest.mark.parametrize("allow", ["1", "true", "YES"])
def test_insecure_transport_is_accepted_when_allowed(env: dict[str, str], allow: str) -> None:
    load(BASE | env | {"IKW_ALLOW_INSECURE": allow})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "[::1]", "localhost", "LocalHost."])
def test_loopback_hosts_may_be_plain(host: str) -> None:
    settings = load(
        BASE
        | SMS
        | SMTP_LOGIN
        | {
            "SEAM_ENDPOINT": f"http://{host}:8701",
            "TWILIO_API_URL": f"http://{host}:8702",
            "AMQP_URL": f"amqp://guest:guest@{host}:5672/",
            "SMTP_HOST": host.strip("[]"),
            "SMTP_TLS": "none",
        }
    )
    assert settings.seam_endpoint.startswith("http://")
    load(BASE | {"AMQP_URL": f"amqps://g:g@{host}/?no_verify_ssl=1"})


def test_every_insecure_setting_has_its_own_line() -> None:
    text = problems(
        BASE
        | SMS
        | SMTP_LOGIN
        | {
            "AMQP_URL": "amqp://u:p@rabbit.example.com/",
            "SEAM_ENDPOINT": "http://seam.example.com",
            "TWILIO_API_URL": "http://api.twilio.example",
            "SMTP_TLS": "none",
            "IKW_ALLOW_INSECURE": "0",
        }
    )
    assert [line.split(":")[0] for line in text.splitlines()] == [
        "AMQP_URL",
        "SEAM_ENDPOINT",
        "TWILIO_API_URL",
        "SMTP_PASSWORD",
    ]


@pytest.mark.parametrize(
    "env",
    [
        {"SMTP_TLS": "none"},  # no password to leak
        SMTP_LOGIN | {"SMTP_TLS": "starttls"},
        SMTP_LOGIN | {"SMTP_TLS": "tls"},
        {"AMQP_URL": "amqps://u:p@rabbit.example.com/?cafile=/etc/ca.pem&no_verify_ssl=0"},
        {"SEAM_ENDPOINT": "https://seam.example.com"},
    ],
)
def test_secure_transport_passes(env: dict[str, str]) -> None:
    load(BASE | env)


def test_allow_insecure_must_be_a_yes_or_no() -> None:
    assert problems(BASE | {"IKW_ALLOW_INSECURE": "maybe"}) == (
        "IKW_ALLOW_INSECURE: must be true or false (or 1, 0, yes, no), got 'maybe'"
    )


def test_broker_commands_refuse_plaintext_amqp_too() -> None:
    with pytest.raises(ConfigError) as caught:
        broker_settings({"AMQP_URL": "amqp://u:p@rabbit.example.com/"})
    assert str(caught.value).startswith("AMQP_URL: plaintext amqp://")
    allowed = {"AMQP_URL": "amqp://u:p@rabbit.example.com/", "IKW_ALLOW_INSECURE": "1"}
    assert broker_settings(allowed).amqp_url.startswith("amqp://")
    assert broker_settings({"AMQP_URL": "amqp://g:g@127.0.0.1:5672/"}).namespace


def test_smtp_ca_file_must_be_readable(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = load(BASE | {"SMTP_CA_FILE": str(ca)})
    assert settings.channels["email"].ca_file == str(ca)
    missing = problems(BASE | {"SMTP_CA_FILE": str(tmp_path / "absent.pem")})
    assert missing.startswith("SMTP_CA_FILE: cannot read")
    assert problems(BASE | {"SMTP_CA_FILE": str(tmp_path)}).startswith("SMTP_CA_FILE: cannot read")
