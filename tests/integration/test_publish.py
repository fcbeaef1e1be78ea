"""`ikw publish` as a process, through a worker and the stand-ins: what the guest reads."""

import asyncio
import subprocess
import uuid

from tests.helpers import AMQP_URL, IKW, StartWorker
from worker.broker.topology import Names
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox


def ikw_publish(namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IKW, "publish", *args],
        env={"PATH": "/usr/bin:/bin", "AMQP_URL": AMQP_URL, "IKW_NAMESPACE": namespace},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_the_time_zone_and_property_name_flags_reach_the_sms(
    sandbox: Sandbox, start_worker: StartWorker, names: Names
) -> None:
    await start_worker()
    done = await asyncio.to_thread(
        ikw_publish, names.namespace,
        "grant", "--key", "guest-flags", "--name", "Maria Garcia", "--phone", "+14155550123",
        "--channels", "sms", "--locale", "fr",
        "--time-zone", "Europe/Paris", "--property-name", "Harbor Hotel",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    await wait_for(lambda: sandbox.twilio.outbox, 20, "the SMS")
    [sms] = sandbox.twilio.outbox
    assert sms["body"].startswith("Bonjour Maria Garcia, voici votre clé pour Harbor Hotel : ")
    assert sms["body"].endswith(" UTC+01:00.") or sms["body"].endswith(" UTC+02:00.")


def test_a_grant_without_a_contact_is_refused_before_publishing() -> None:
    # No topology in this namespace: publishing would say the exchange does not exist.
    namespace = f"ikw_test_absent_{uuid.uuid4().hex[:6]}"
    done = ikw_publish(namespace, "grant", "--key", "guest-1", "--name", "Maria Garcia")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "ikw: no contact for channels sms,email: give --phone or --email\n"
