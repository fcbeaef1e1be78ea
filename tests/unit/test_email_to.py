"""The email To header names the guest's one address whatever the display name."""

import email.policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses

import pytest

from worker.channels.email import recipient

GUEST = "guest@example.com"
FOLDED_ATTACK = (
    "Ada Lovelace and so on and so forth and so on and so forth and so forth: "
    "attacker@evil.example, x"
)


def read_back(to: Address, policy: email.policy.Policy) -> tuple[list[str], list[str]]:
    message = EmailMessage()
    message["To"] = to
    raw = message.as_bytes(policy=policy)
    parsed = BytesParser(policy=email.policy.default).parsebytes(raw)
    header = raw.decode().partition(":")[2].replace("\r\n", "")
    return [a.addr_spec for a in parsed["To"].addresses], [a for _, a in getaddresses([header])]


def test_the_folded_header_attack_is_real() -> None:
    """Without the check, Python folds the long name unquoted into a second recipient."""
    strict, lenient = read_back(Address(FOLDED_ATTACK, addr_spec=GUEST), email.policy.SMTP)
    assert "attacker@evil.example" in strict and "attacker@evil.example" in lenient


@pytest.mark.parametrize(
    "name",
    [
        FOLDED_ATTACK,
        "x" * 70 + ": attacker@evil.example, y",
        "Lovelace, Ada",
        "a, b <attacker@evil.example>, c",
        "Ada: ",
        'Ada "Countess" Lovelace' + " of Lovelace" * 10 + ": a@evil.example,",
        '"; attacker@evil.example; "',
        "Zoë Ñúñez " * 12 + ": attacker@evil.example, x",
        "山田 太郎 " * 20,
        "a" * 300,
        "Ada\r\nBcc: attacker@evil.example",
    ],
)
@pytest.mark.parametrize("policy", [email.policy.SMTP, email.policy.SMTPUTF8])
def test_to_reads_as_the_guest_only(name: str, policy: email.policy.Policy) -> None:
    try:
        to = recipient(name, GUEST)
    except ValueError:
        pytest.fail("a display name must never make the address unusable")
    assert read_back(to, policy) == ([GUEST], [GUEST])


@pytest.mark.parametrize("name", ["Ada Lovelace", "Zoë Ñúñez", "山田 太郎", "Jean-Luc O'Brien"])
def test_a_plain_name_is_kept(name: str) -> None:
    assert recipient(name, GUEST) == Address(name, addr_spec=GUEST)
    assert recipient(None, GUEST) == Address(addr_spec=GUEST)
