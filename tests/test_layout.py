"""The house rules a reader relies on: the library's layers (import-linter's contracts in
pyproject.toml), and no project import hidden in a function body without saying why."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.unit

PROJECT = ("undercloud_backup", "undercloud_backup_osc", "flows", "tasks", "blocks")


def _inner_imports(path: Path) -> list[tuple[int, str, bool]]:
    """Project imports inside function bodies: line, statement, whether a comment says why
    (on the line itself or the one above)."""
    lines = path.read_text().splitlines()
    found = []
    for function in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
            elif isinstance(node, ast.Import):
                module = node.names[0].name
            else:
                continue
            if module.split(".")[0] in PROJECT:
                here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                found.append((node.lineno, ast.unparse(node),
                              "#" in here or above.startswith("#")))
    return found


def test_no_project_import_inside_a_function_without_a_comment_saying_why():
    silent = [f"{path.relative_to(REPO)}:{line}: {statement}"
              for top in PROJECT for path in sorted((REPO / top).rglob("*.py"))
              for line, statement, explained in _inner_imports(path) if not explained]
    assert silent == []


def test_the_library_keeps_its_layers_and_has_no_import_cycle():
    tool = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert tool, "import-linter is a dev dependency (pyproject.toml)"
    done = subprocess.run([tool, "--no-logo", "--no-cache"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 kept, 0 broken" in done.stdout
