"""The operator's templates, time zones and locales, end to end: the worker, the real broker and
the stand-ins over real sockets; `ikw run`, `ikw templates check` and `preview` as processes."""

import asyncio
import os
import subprocess
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.builders import grant
from tests.helpers import IKW, Connection, Publish, StartWorker, dead_letters
from worker import config
from worker.broker.topology import Names
from worker.channels.templates import SHIPPED
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox
from worker.service import Service, StartError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "templates"
EXPIRES = datetime(2026, 11, 28, 23, 30, tzinfo=UTC)
BROKEN = "fr/sms.txt: 'guset_name' is undefined"


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def ikw(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IKW, *args],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")} | env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def parts(mail: EmailMessage) -> tuple[str, str, str]:
    text, html = mail.get_body(("plain",)), mail.get_body(("html",))
    assert text is not None and html is not None
    lines = (part.get_content().replace("\r\n", "\n") for part in (text, html))
    return (str(mail["Subject"]), *lines)


def expiring_at(sandbox: Sandbox, moment: datetime) -> None:
    """Keys the Seam stand-in generates from now on expire at ``moment`` (to the second)."""
    sandbox.seam.key_lifetime = (moment - datetime.now(UTC)).total_seconds()


CUSTOM = {
    "en/sms.txt": "{{ property_name }}: {% if guest_name %}{{ guest_name }}, {% endif %}"
    "door key {{ link }} until {{ valid_until }} ({{ time_zone }})\n",
    "en/email_subject.txt": "{{ property_name }} | your door key\n",
    "en/email.txt": "Dear {{ guest_name or 'guest' }},\n\n{{ link }}\n\n"
    "Valid until {{ valid_until }}.\n",
    "en/email.html": '<p lang="{{ locale }}">Dear {{ guest_name or "guest" }}, '
    '<a href="{{ link }}">{{ property_name }}</a> until {{ valid_until }}.</p>\n',
}


async def test_a_custom_template_directory_changes_what_guests_receive(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, tmp_path: Path
) -> None:
    directory = write(tmp_path, CUSTOM)
    expiring_at(sandbox, EXPIRES)
    await start_worker(
        IKW_TEMPLATES_DIR=str(directory),
        IKW_TIME_ZONE="America/New_York",
        IKW_PROPERTY_NAME="Hotel Bellevue",
    )
    await publish(grant(channels=("sms",)))
    await publish(grant(channels=("email",), email="grace@example.com", name="Grace Hopper"))

    await wait_for(lambda: sandbox.twilio.outbox and sandbox.smtp.messages, 20, "SMS and email")
    [sms] = sandbox.twilio.outbox
    [link] = [
        k["instant_key_url"] for k in sandbox.seam.issued if k["instant_key_url"] in sms["body"]
    ]
    assert sms["body"] == (
        f"Hotel Bellevue: Ada Lovelace, door key {link} until Nov 28, 2026, 6:30 PM EST "
        "(America/New_York)"
    )
    subject, text, html = parts(sandbox.smtp.messages[0])
    assert subject == "Hotel Bellevue | your door key"
    assert text.startswith("Dear Grace Hopper,\n\nhttps://ik.seam.co/")
    assert "Valid until Nov 28, 2026, 6:30 PM EST." in text
    assert html.startswith('<p lang="en">Dear Grace Hopper, <a href="https://ik.seam.co/')


async def test_paris_time_in_french_and_canadian_french(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    expiring_at(sandbox, EXPIRES)
    await start_worker()  # IKW_TIME_ZONE unset: UTC, unless the event says
    french = grant(channels=("sms",), locale="fr")
    french["delivery"]["time_zone"] = "Europe/Paris"
    await publish(french)
    await wait_for(lambda: len(sandbox.twilio.outbox) == 1, 20, "the French SMS")
    canadian = grant(channels=("email",), locale="fr-CA")
    canadian["delivery"]["time_zone"] = "Europe/Paris"
    await publish(canadian)
    await wait_for(lambda: sandbox.smtp.messages, 20, "the Canadian French email")
    await publish(grant(channels=("sms",), phone="+14155550101", locale="fr"))
    await wait_for(lambda: len(sandbox.twilio.outbox) == 2, 20, "the SMS in UTC")

    paris, utc = (sent["body"] for sent in sandbox.twilio.outbox)
    assert paris.startswith("Bonjour Ada Lovelace, voici votre clé : https://ik.seam.co/")
    assert paris.endswith(" Valable jusqu'au 29 nov. 2026, 00:30 UTC+01:00.")
    assert utc.endswith(" Valable jusqu'au 28 nov. 2026, 23:30 TU.")
    subject, text, html = parts(sandbox.smtp.messages[0])
    # fr-CA: the fr words, the date as Babel writes fr_CA
    assert subject == "Votre clé numérique"
    assert text.startswith("Bonjour Ada Lovelace,\n")
    assert "Elle est valable jusqu'au 29 nov. 2026, 00 h 30 UTC+01:00." in text
    assert '<html lang="fr-CA">' in html and "29 nov. 2026, 00 h 30 UTC+01:00" in html


async def test_html_injection_in_any_variable_is_escaped_in_the_html_part(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    sandbox.seam.url_base = "https://ik.seam.co/k?a=1&b=\"x\"&c='y'><img src=z>"
    hostile = '<script>alert("x")</script> & "Bellevue"'
    await start_worker()
    event = grant(channels=("email",))
    event["delivery"]["property_name"] = hostile
    await publish(event)

    await wait_for(lambda: sandbox.smtp.messages, 20, "the email")
    subject, text, html = parts(sandbox.smtp.messages[0])
    [key] = sandbox.seam.issued
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &#34;Bellevue&#34;" in html
    escaped = (
        key["instant_key_url"]
        .replace("&", "&amp;")
        .replace('"', "&#34;")
        .replace("'", "&#39;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
    )
    assert f'<a href="{escaped}">' in html
    # The plain text and the subject are not HTML: they carry the text as written.
    assert key["instant_key_url"] in text.splitlines()
    assert subject == f"Your digital key for {hostile}"


async def test_a_bad_time_zone_in_the_event_is_dead_lettered_invalid(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, amqp: Connection, names: Names
) -> None:
    await start_worker()
    event = grant(channels=("sms",))
    event["delivery"]["time_zone"] = "Europe/Pariss"
    await publish(event)

    [dead] = await dead_letters(amqp, names, 1)
    assert dead.headers["x-ikw-reason"] == "invalid_event"
    assert "delivery.time_zone" in str(dead.headers["x-ikw-error"])
    assert sandbox.seam.issued == [] and sandbox.twilio.outbox == []


def test_a_broken_template_refuses_the_configuration_and_the_service(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    broken = write(tmp_path, {"fr/sms.txt": "Bonjour {{ guset_name }} {{ link }}"})

    with pytest.raises(config.ConfigError) as raised:
        config.load(worker_env | {"IKW_TEMPLATES_DIR": str(broken)})
    assert str(raised.value) == f"IKW_TEMPLATES_DIR: {BROKEN}"

    settings = replace(config.load(worker_env), templates_dir=broken)
    with pytest.raises(StartError) as refused:
        Service(settings)
    assert str(refused.value) == f"IKW_TEMPLATES_DIR: {BROKEN}"


@pytest.mark.parametrize(
    ("files", "line"),
    [
        ({"fr/sms.txt": "Bonjour {{ guset_name }} {{ link }}"}, f"IKW_TEMPLATES_DIR: {BROKEN}"),
        (
            {"de/email.html": "<p>{{ link }</p>"},
            "IKW_TEMPLATES_DIR: de/email.html: line 1: unexpected '}'",
        ),
    ],
)
async def test_ikw_run_with_a_broken_template_exits_2_naming_the_file(
    worker_env: dict[str, str], tmp_path: Path, files: dict[str, str], line: str
) -> None:
    broken = write(tmp_path, files)
    done = await asyncio.to_thread(ikw, "run", **worker_env, IKW_TEMPLATES_DIR=str(broken))

    assert done.returncode == 2
    assert done.stderr.splitlines() == ["ikw: configuration error:", line]
    assert "Traceback" not in done.stderr


def test_ikw_templates_check_passes_on_the_shipped_set_and_the_example() -> None:
    shipped = ikw("templates", "check", str(SHIPPED))
    assert shipped.returncode == 0, shipped.stderr
    assert "en/sms.txt            shipped  1 segment, GSM-7," in shipped.stdout
    assert "es/sms.txt            shipped  1 segment, GSM-7," in shipped.stdout
    assert shipped.stdout.splitlines()[-1] == (
        "templates ok: 4 locales (de, en, es, fr), 0 of 16 files from the shipped set"
    )
    assert shipped.stderr == ""  # every shipped SMS: one GSM-7 segment

    hotel = ikw("templates", "check", IKW_PROPERTY_NAME="Hôtel Bellevue")
    assert hotel.returncode == 0, hotel.stderr
    assert "fr/sms.txt            shipped  3 segments, UCS-2," in hotel.stdout
    warned = hotel.stderr.splitlines()
    assert len(warned) == 4  # one per locale: each names the property
    assert warned[3].startswith(
        "warning: fr/sms.txt: 3 segments, UCS-2 ('ô' U+00F4 from IKW_PROPERTY_NAME), "
    )

    example = ikw("templates", "check", str(EXAMPLE))
    assert example.returncode == 0, example.stderr
    assert "en/sms.txt            custom   1 segment, GSM-7," in example.stdout
    assert "en/email.txt          shipped" in example.stdout
    assert "2 of 16 files from" in example.stdout

    # without DIR: IKW_TEMPLATES_DIR
    from_env = ikw("templates", "check", IKW_TEMPLATES_DIR=str(EXAMPLE))
    assert from_env.returncode == 0 and "2 of 16 files from" in from_env.stdout


def test_ikw_templates_check_fails_naming_each_broken_file(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "fr/sms.txt": "Bonjour {{ guset_name }} {{ link }}",
            "it/sms.txt": "Ciao {{ link }}",
        },
    )
    done = ikw("templates", "check", str(tmp_path))

    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert BROKEN in lines
    assert any(line.startswith("it/email_subject.txt: missing") for line in lines)
    assert lines[-1] == f"ikw: templates in {tmp_path}: 4 problems"
    assert done.stdout == ""

    missing = ikw("templates", "check", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr == f"ikw: {tmp_path / 'nope'} is not a directory\n"


def test_ikw_templates_preview_prints_what_the_guest_gets() -> None:
    email = ikw(
        "templates", "preview", "--locale", "fr", "--channel", "email",
        "--time-zone", "Europe/Paris", "--property-name", "Hôtel <Bellevue>",
        "--expires-at", "2026-11-28T23:30Z",
    )  # fmt: skip
    assert email.returncode == 0, email.stderr
    lines = email.stdout.splitlines()
    assert lines[:3] == [
        "Subject: Votre clé numérique pour Hôtel <Bellevue>",
        "----- text/plain -----",
        "Bonjour Ada Lovelace,",
    ]
    assert "Voici votre clé numérique pour Hôtel <Bellevue>. Ouvrez ce lien" in email.stdout
    assert "Elle est valable jusqu'au 29 nov. 2026, 00:30 UTC+01:00." in lines
    html = email.stdout.split("----- text/html -----\n", 1)[1]
    assert html.startswith('<!DOCTYPE html>\n<html lang="fr">')
    assert "pour Hôtel &lt;Bellevue&gt;." in html

    sms = ikw(
        "templates", "preview", "--channel", "sms", "--name", "",
        "--expires-at", "2026-11-28T23:30Z",
        IKW_TEMPLATES_DIR=str(EXAMPLE), IKW_TIME_ZONE="America/New_York",
        IKW_PROPERTY_NAME="Hotel Bellevue",
    )  # fmt: skip
    assert sms.returncode == 0, sms.stderr
    assert sms.stdout == (
        "Your key to Hotel Bellevue: https://ik.seam.co/k7Hq2sVb9TzXw4RmPn8dLa "
        "(until Nov 28, 2026, 6:30 PM EST). Reply HELP for help.\n"
    )
    assert sms.stderr == "(1 segment, GSM-7, 125 characters)\n"

    bad = ikw("templates", "preview", IKW_TIME_ZONE="Mars/Olympus")
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[1].startswith("IKW_TIME_ZONE: 'Mars/Olympus': not a time zone")
