"""The README's tables name what the code has: every dead-letter reason, every setting, every
ikw command."""

import re
from pathlib import Path

import pytest

from worker.cli import main, parser
from worker.config import VARIABLES, variables
from worker.errors import REASONS

README = (Path(__file__).parents[2] / "README.md").read_text()


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_every_dead_letter_reason_is_explained(reason: str) -> None:
    assert f"`{reason}`" in README


@pytest.mark.parametrize("variable", [name for name, _ in VARIABLES])
def test_every_setting_is_in_the_configuration_table(variable: str) -> None:
    assert re.search(rf"^\| `{variable}`", README, re.M) or f"`{variable}`" in README


def test_every_command_is_in_the_readme() -> None:
    [action] = parser()._subparsers._group_actions  # type: ignore[union-attr]
    for name in action.choices or ():
        assert f"ikw {name}" in README, name


def test_the_configuration_table_is_the_declared_settings() -> None:
    """Its rows name exactly the variables declared with ``setting()``, each default shown as the
    README writes it when the declaration has one a reader would type."""
    table = README.split("## Configuration", 1)[1].split("\n\n| variable |", 1)[1]
    rows = [line for line in table.split("\n\n", 1)[0].splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}
    assert named == {v.name for v in variables()}
    for row in rows:
        first = re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])
        [variable] = [v for v in variables() if v.name == first[0]]
        if type(variable.default) in (str, int) and variable.default not in ("", 0):
            assert str(variable.default) in row.split("|")[2], row


def test_the_topology_section_names_what_topology_print_shows(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ikw topology --print` (no broker needed): every exchange and queue it shows is in the
    README's "RabbitMQ topology" (the delay levels as the range `.00` … `.27`)."""
    monkeypatch.delenv("IKW_NAMESPACE", raising=False)
    assert main(["topology", "--print", "--producer", "booking"]) == 0
    shown = {
        line.split()[1].replace(".outcomes.booking", ".outcomes.NAME")
        for line in capsys.readouterr().out.splitlines()
        if line.split()[0] in ("exchange", "queue")
    }
    section = README.split("### RabbitMQ topology", 1)[1].split("\n### ", 1)[0]
    named = set(re.findall(r"`(instant_keys[\w.]*)`", section))
    named |= {f"instant_keys.delay.{level:02}" for level in range(28)}
    assert shown - named == set()
