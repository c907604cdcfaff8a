"""What the docs point at exists: every test a claim names (the threat model's lines each name
theirs), every file or page a link or a path names."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

pytestmark = pytest.mark.unit

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _tests_defined() -> set[str]:
    return {name for path in (REPO / "tests").glob("*.py")
            for name in re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M)}


def test_every_test_the_docs_name_exists():
    defined = _tests_defined()
    named = {(doc.name, name) for doc in DOCS
             for name in re.findall(r"\b(test_\w+)", doc.read_text())
             if not (REPO / "tests" / f"{name}.py").exists()}  # a module, not a test
    assert sorted((doc, name) for doc, name in named if name not in defined) == []


def test_every_relative_link_and_named_file_of_the_docs_exists():
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(REPO)}: link {target}")
        for path in re.findall(r"`((?:tests|docs|deployments|flows|tasks|blocks|benchmarks|"
                               r"undercloud_backup)/[\w./-]+\.(?:py|md|sh|conf|yaml|png))",
                               text):
            if not (REPO / path).exists():
                missing.append(f"{doc.relative_to(REPO)}: {path}")
    assert missing == []


def _exit_statuses_in_code() -> dict[int, list[str]]:
    """Every exit status a :class:`BackupError` can carry, with the errors that carry it."""
    import importlib
    import pkgutil

    import undercloud_backup
    from undercloud_backup.core.errors import BackupError

    for module in pkgutil.walk_packages(undercloud_backup.__path__, "undercloud_backup."):
        importlib.import_module(module.name)
    for flow in ("backup", "restore", "verify", "prune"):
        importlib.import_module(f"flows.{flow}")
    importlib.import_module("undercloud_backup_osc.deployed")  # openstack undercloud backup
    found: dict[int, list[str]] = {}
    pending = [BackupError]
    while pending:
        for error in pending.pop().__subclasses__():
            found.setdefault(error.exit_code, []).append(error.__name__)
            pending.append(error)
    return found


def test_every_exit_status_the_code_can_return_is_documented():
    table = (REPO / "docs/exit-statuses.md").read_text()
    documented = {int(n) for row in re.findall(r"^\| ([\d /]+) \|", table, re.M)
                  for n in row.split("/")}
    missing = {code: names for code, names in _exit_statuses_in_code().items()
               if code not in documented}
    assert missing == {}


def _anchors(text: str) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces
    made hyphens (a repeated heading gets -1, -2...)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # a '# comment' is no heading
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        number, unique = 0, slug
        while unique in found:
            number += 1
            unique = f"{slug}-{number}"
        found.add(unique)
    return found


def test_every_anchor_a_link_names_is_a_heading_of_its_page():
    broken = []
    for doc in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", doc.read_text()):
            page = (doc.parent / target) if target else doc
            if "://" in target or page.suffix != ".md":
                continue
            if anchor not in _anchors(page.read_text()):
                broken.append(f"{doc.relative_to(REPO)}: {target}#{anchor}")
    assert broken == []
