"""The commands a newcomer runs first: `ikw demo`, and what it says without a broker."""

import re
import subprocess
import sys

from tests.integration.conftest import AMQP_URL


def ikw(*args: str, amqp_url: str = AMQP_URL) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env={"PATH": "/usr/bin:/bin", "AMQP_URL": amqp_url},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_shows_the_sms_the_email_and_the_deletion() -> None:
    result = ikw("demo", "--key-lifetime", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    sms = re.search(r"--- SMS to \+1\*+00 .*?---\n(.*)\n", out)
    assert sms and re.search(r"https://ik\.seam\.co/\S+", sms[1]), out
    assert re.search(r"--- email to g\*\*\*@example\.com, subject: .+ ---", out), out
    assert out.count("deleted from Seam: instant key") == 2
    assert out.rstrip().endswith("demo done: 2 grants delivered, 2 keys deleted at expiry")


def test_without_rabbitmq_the_demo_says_so_in_one_line() -> None:
    result = ikw("demo", amqp_url="amqp://guest:guest@127.0.0.1:1/")
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("ikw: cannot reach RabbitMQ at 127.0.0.1:1")
    assert "rabbitmq-server -detached" in line
