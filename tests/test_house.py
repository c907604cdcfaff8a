"""House rules of the tree: a comment, docstring or document says why, never which issue or
work session something came from (a reader has neither; the commit log keeps the history)."""

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
# "issue" and a number ("issue 12", "Issue #13"), "session" and a number, "(#" and a number,
# or "#" with an item number such as 10.4
CITATION = re.compile(r"issue ?#?[0-9]+|session [0-9]+|\(#[0-9]+|#[0-9]+\.[0-9]", re.IGNORECASE)
# A log of measurements, each under the heading of the run that made it: there the runs' names
# are the point. And this file, whose examples are citations.
EXEMPT = {"benchmarks/RESULTS.md", "tests/test_house.py"}
SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".md", ".toml"}


def tracked_files() -> list[str]:
    # safe.directory: CI may run as root in a checkout someone else owns
    run = subprocess.run(["git", "-c", "safe.directory=*", "ls-files", "-z"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return [name for name in run.stdout.split("\0") if name]


def is_checked(name: str) -> bool:
    path = REPO / name
    if name in EXEMPT or not path.is_file():
        return False
    if path.suffix in SUFFIXES:
        return True
    with path.open("rb") as file:  # scripts without a suffix (.ci/run, deployments/libexec)
        return file.read(2) == b"#!"


def test_nothing_cites_an_issue_or_a_session():
    names = [name for name in tracked_files() if is_checked(name)]
    assert "README.md" in names and ".ci/run" in names  # the listing works
    found = [f"{name}:{number}: {line.strip()}"
             for name in names
             for number, line in enumerate(
                 (REPO / name).read_text(errors="replace").splitlines(), 1)
             if CITATION.search(line)]
    assert not found, ("say why instead of citing an issue or session:\n"
                       + "\n".join(found))


def test_the_rule_catches_the_forms_it_names():
    for cited in ("(issue 12)", "Issue #13:", "session 4", "planted dumps (#10.4)", "(#7)"):
        assert CITATION.search(cited), cited
    for fine in ("issued tokens", "a Prefect session", "#!/bin/sh", "# 10 seconds"):
        assert not CITATION.search(fine), fine
