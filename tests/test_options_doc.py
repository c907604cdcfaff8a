"""docs/options.md is what the flows' parsers say: a flag added, renamed or re-described in the
code and not in the page (or the other way round) fails here, with the command that fixes it."""

from __future__ import annotations

import importlib

import pytest
from conftest import REPO

from flows import options

pytestmark = pytest.mark.unit


def test_the_options_page_is_the_parsers_own():
    assert (REPO / "docs/options.md").read_text() == options.page(), \
        "docs/options.md is stale: run `python -m flows.options --write`"


def test_every_flag_of_every_flow_is_in_its_table():
    page = options.page()
    for name in options.FLOWS:
        section = page.split(f"## `python -m flows.{name}`")[1].split("\n## ")[0]
        parser = importlib.import_module(f"flows.{name}")._parser()
        flags = {flag for action in parser._actions for flag in action.option_strings
                 if flag not in ("-h", "--help")}
        assert flags, name
        missing = [flag for flag in flags if f"| `{flag}" not in section]
        assert missing == [], (name, missing)


def test_the_readme_and_the_flow_pages_link_the_options_page():
    for doc in ("README.md", "docs/backup.md", "docs/restore.md"):
        assert "options.md)" in (REPO / doc).read_text(), doc
