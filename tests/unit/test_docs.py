"""The README's tables name what the code has: every dead-letter reason, every setting, every
ikw command."""

import re
from pathlib import Path

import pytest

from worker.cli import parser
from worker.config import VARIABLES
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
