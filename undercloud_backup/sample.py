"""Transitional: the sample undercloud moved to ``tests/sample_undercloud.py`` (test and demo
data, not part of the installed package). Remove once nothing imports this name."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sample_undercloud import *  # noqa: E402,F403
from sample_undercloud import SAMPLE_DATABASES, SAMPLE_USER  # noqa: E402,F401
