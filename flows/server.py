"""The temporary Prefect server of an ad hoc run, when no PREFECT_API_URL names a real one.

Prefect would start one itself, in our process group: a Ctrl-C then kills it mid-run, and a
SIGKILL of the run leaves it running (190 MB). Started here instead, through
:mod:`undercloud_backup.execute`, it has a process group of its own (the terminal's Ctrl-C
reaches only us), dies with us whatever kills us (``PR_SET_PDEATHSIG``), and is stopped quietly
before the run's last line is printed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from undercloud_backup.execute import Command, Pipeline

STARTUP_TIMEOUT_S = 90.0  # the first start migrates a new database: 16 s seen, more on CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int) -> Command:
    """uvicorn serving Prefect's API only, as Prefect's own ephemeral server does."""
    import prefect

    return Command(argv=(sys.executable, "-m", "uvicorn", "--app-dir",
                         str(prefect.__module_path__.parent), "--factory",
                         "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                         "--port", str(port), "--log-level", "error", "--lifespan", "on"),
                   name="temporary Prefect server")


def _wait_healthy(url: str, server: Pipeline, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in server.processes):
            break
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the temporary Prefect server did not start within {timeout:.0f} s "
                       f"({server.results[0].stderr_tail()}); set PREFECT_API_URL to a "
                       "running server")


@contextmanager
def temporary_server() -> Iterator[str | None]:
    """Within the block Prefect talks to a server: the configured one, or one of ours."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        get_current_settings,
        temporary_settings,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield PREFECT_API_URL.value()
        return
    port = _free_port()
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    url = f"http://127.0.0.1:{port}/api"
    server = Pipeline([server_command(port)], timeout=None, stdout=subprocess.DEVNULL, env=env,
                      survive_interrupt=True)
    with server:
        try:
            _wait_healthy(url, server, STARTUP_TIMEOUT_S)
            with temporary_settings(updates={PREFECT_API_URL: url}):
                yield url
        finally:
            server.kill()
