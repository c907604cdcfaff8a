"""The partition of the test modules into the shards deployments/dev/test.sh runs side by side
(tests/shards.txt): every module in exactly one, and the two hazards that decide most places
kept apart, so that a new module cannot run beside what it would disturb unnoticed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parent
SHARDS = TESTS / "shards.txt"
# Installs into the machine's shared paths (/etc/undercloud-backup, sudoers, the wrappers,
# system users): shard A, whose /etc/undercloud-backup is the machine's.
INSTALLS = re.compile(r"\b(full_system|privileged_install|machine_lock|install_helpers)\b"
                      r"|import installed\b")
# Uses the shared MariaDB (its ucb_* databases, locks, the whole server's list): shard B,
# or D, whose namespace gives it a server of its own in the same place.
SHARED_SERVER = re.compile(r"\b(db_cnf|sample_databases)\b"
                           r"|^from conftest import [^\n]*\bmariadb\b", re.MULTILINE)


def assignment() -> list[tuple[str, str]]:
    lines = [line.split() for line in SHARDS.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert all(len(words) == 2 for words in lines), lines
    return [(shard, module) for shard, module in lines]


def test_every_test_module_is_in_exactly_one_shard():
    listed = [module for _, module in assignment()]
    modules = sorted(path.name for path in TESTS.glob("test_*.py"))
    assert sorted(set(listed)) == modules, "tests/shards.txt must name every tests/test_*.py"
    assert len(listed) == len(set(listed)), "a module is in tests/shards.txt twice"
    assert {shard for shard, _ in assignment()} == {"A", "B", "C", "D"}


def test_installers_and_users_of_the_shared_database_are_in_different_shards():
    for shard, module in assignment():
        if module == Path(__file__).name:  # names the patterns, uses none
            continue
        source = (TESTS / module).read_text()
        if INSTALLS.search(source):
            assert shard == "A", f"{module} installs: its place is shard A"
        if SHARED_SERVER.search(source):
            assert shard in ("B", "D"), \
                f"{module} uses the shared MariaDB: its place is shard B or D (a server of its own)"
