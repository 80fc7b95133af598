"""The README stays true: its options table is the one generated from Settings, and its
test command is the one .ci/run runs."""

from __future__ import annotations

from tests.conftest import ROOT
from tools.options_table import options_table, replace_in

README = (ROOT / "README.md").read_text()


def test_options_table_is_current() -> None:
    assert replace_in(README) == README, (
        "README options table is stale: python tools/options_table.py --write"
    )
    assert options_table() in README


def test_ci_runs_the_readme_test_command() -> None:
    command = 'python -m pytest -m "not slow and not gpu"'
    assert command in README
    assert command in (ROOT / ".ci" / "run").read_text()
