"""Servers the benchmark starts for itself: a Prefect server and a scratch MariaDB server."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from shell import free_port, kill_session, log, run, spawn, wait_ready

SCRATCH_SESSIONS: set[int] = set()  # our scratch mariadbd: its CPU counts as "mariadb"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def prefect_server(home: Path, python: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """A Prefect server for the "running server" variants: (API URL, its session id)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    with open(home / "server.log", "ab") as logf:
        proc = spawn([str(python.parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                      "--port", str(port), "--analytics-off"],
                     logf, env=dict(env, PREFECT_HOME=str(home)))
    try:
        waited = wait_ready(proc, lambda: _answers(f"{url}/health"), "prefect server",
                            home / "server.log", timeout=180)
        log(f"prefect server up on {url} in {waited:.1f} s")
        yield url, proc.pid
    finally:
        kill_session(proc)


@contextlib.contextmanager
def scratch_mariadb(workdir: Path) -> Iterator[Path]:
    """A throwaway MariaDB server (socket only) for the restores: the real one stays intact."""
    # The socket and pid file live in the datadir: mariadbd runs as mysql and cannot write
    # to the root-owned workdir.
    datadir = workdir / "scratch-db"
    sock = datadir / "mysqld.sock"
    shutil.rmtree(datadir, ignore_errors=True)
    datadir.mkdir(parents=True)
    shutil.chown(datadir, "mysql", "mysql")
    run(["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=mysql",
         "--auth-root-authentication-method=socket", "--skip-test-db"])
    logfile = workdir / "scratch-db.log"
    ping = ["mariadb-admin", f"--socket={sock}", "ping"]
    with open(logfile, "ab") as logf:
        # Compiled-in defaults match Debian's (128 MiB buffer pool): the restores are comparable.
        proc = spawn(["mariadbd", "--no-defaults", f"--datadir={datadir}", f"--socket={sock}",
                      "--skip-networking", "--user=mysql", f"--pid-file={datadir / 'mysqld.pid'}",
                      "--skip-log-bin", "--max-allowed-packet=1G"], logf)
    try:
        wait_ready(proc, lambda: run(ping, check=False).returncode == 0, "scratch mariadbd",
                   logfile, timeout=60)
        SCRATCH_SESSIONS.add(proc.pid)
        yield sock
    finally:
        SCRATCH_SESSIONS.discard(proc.pid)
        run(["mariadb-admin", f"--socket={sock}", "shutdown"], check=False)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            kill_session(proc)
        shutil.rmtree(datadir, ignore_errors=True)


def reset_scratch(sock: Path) -> None:
    """Drop every non-system database of the scratch server, so each restore starts empty."""
    out = run(["mariadb", f"--socket={sock}", "-N", "-e", "SHOW DATABASES"]).stdout.decode()
    system = {"information_schema", "performance_schema", "sys", "mysql"}
    drops = "".join(f"DROP DATABASE `{d}`;" for d in out.split() if d not in system)
    # The reference loads the `mysql` tables of an --all-databases dump, which leaves the
    # privilege cache stale until a flush; the next restore's GRANTs would then fail.
    run(["mariadb", f"--socket={sock}", "-e", drops + "FLUSH PRIVILEGES;"])
