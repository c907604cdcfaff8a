"""Children started by the executor die with the process that started them, and are started
without Python code running between fork and exec (a ``preexec_fn`` can deadlock a child
forked while other threads hold locks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO

pytestmark = pytest.mark.unit

CHILD = textwrap.dedent("""
    import sys, threading, time
    from undercloud_backup.core.execute import Command, Pipeline

    busy = threading.Thread(target=lambda: time.sleep(600), daemon=True)
    busy.start()  # a second thread, as Prefect's are, while the child is started
    pipe = Pipeline([Command(argv=("sleep", "600"), name="sleep")], timeout=None,
                    stdout=subprocess.DEVNULL)
    pipe.__enter__()
    print(pipe.processes[0].pid, flush=True)
    time.sleep(600)
""").replace("import sys,", "import subprocess, sys,")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _command(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().split(b"\0")[0]


def test_a_child_dies_with_its_killed_parent():
    parent = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        with open(f"/proc/{child}/status") as status:  # a child of the process killed below
            assert any(line.split() == ["PPid:", str(parent.pid)] for line in status)
        deadline = time.monotonic() + 5  # setpriv sets the signal, then execs the command
        while _command(child) != b"sleep" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _command(child) == b"sleep"
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)


def test_the_executor_hands_popen_no_preexec_fn(monkeypatch):
    """Popen's own fork path (C code only until exec) is what is safe with threads."""
    from undercloud_backup.core import execute

    seen: list[dict] = []
    real = subprocess.Popen

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    execute.run(execute.Command(argv=("true",), name="true"), timeout=10)
    assert seen and all(kwargs.get("preexec_fn") is None for kwargs in seen)
