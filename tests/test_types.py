"""The library type-checks: mypy, configured in pyproject.toml's [tool.mypy], finds nothing."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


def test_the_library_is_mypy_clean():
    mypy = Path(sys.executable).parent / "mypy"
    assert mypy.exists(), f"{mypy} is missing: rebuild the venv (deployments/dev/venv.sh)"
    # files and settings from [tool.mypy]; its incremental cache (.mypy_cache) makes reruns fast
    run = subprocess.run([str(mypy), "--python-executable", sys.executable],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"mypy found type errors:\n{run.stdout}{run.stderr}"
