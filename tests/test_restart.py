"""Without systemd, the README's "restart the worker" step has an equivalent:
``deployments/install.sh restart worker`` (before: only `install.sh stop` and `services`, which
stop and start the server too, and no word of it in the README)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from install_helpers import ETC, LOG_DIR

RESTART_S = 60


def _environ(pid: int) -> dict[str, str]:
    """The worker's environment, once its launcher has exec'd the worker with worker.env's."""
    deadline = time.monotonic() + 20
    while True:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        found = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
        if "PREFECT_API_AUTH_STRING" in found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _restart_worker(install) -> int:
    before = install.pid("worker")
    done = install.run("restart", "worker")
    assert done.returncode == 0, done.stdout + done.stderr
    after = install.pid("worker")
    assert after != before and not Path(f"/proc/{before}").exists()
    return after


def test_restart_worker_without_systemd_takes_a_changed_worker_env(full_system):
    """The operator's step 2: a line added to worker.env, then `install.sh restart worker`:
    a new worker process has it; the server was left running."""
    install = full_system
    server = install.pid("server")
    worker_env = ETC / "worker.env"
    kept = worker_env.read_bytes()
    mark = uuid.uuid4().hex
    started = time.monotonic()
    try:
        worker_env.write_bytes(kept + f"UCB_TEST_RESTART_MARK={mark}\n".encode())
        pid = _restart_worker(install)
        log = LOG_DIR / "worker.log"
        assert _environ(pid).get("UCB_TEST_RESTART_MARK") == mark, \
            log.read_text(errors="replace")[-3000:]
        assert install.pid("server") == server and Path(f"/proc/{server}").exists()
        deadline = time.monotonic() + RESTART_S
        while "started" not in log.read_text(errors="replace")[-2000:]:
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.5)
    finally:
        worker_env.write_bytes(kept)
        pid = _restart_worker(install)
    assert "UCB_TEST_RESTART_MARK" not in _environ(pid)
    assert time.monotonic() - started < 2 * RESTART_S
    refused = install.run("restart", "scheduler")
    assert refused.returncode == 1 and "unknown service 'scheduler'" in refused.stderr
