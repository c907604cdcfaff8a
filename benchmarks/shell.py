"""The benchmark's plumbing: logging, commands, sessions, the environment the variants get."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("UCB_DEV_STATE", "/var/lib/undercloud-backup-dev"))
MiB = 1024**2
BASH_OWN = {"PWD", "OLDPWD", "SHLVL", "_"}  # set by bash itself, not by an env file


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cmd: str | list[str], *, env: dict[str, str] | None = None, check: bool = True,
        input_: bytes | None = None, quiet: bool = True,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command (a string goes to ``bash -o pipefail``); RuntimeError with its stderr tail."""
    argv = ["bash", "-o", "pipefail", "-c", cmd] if isinstance(cmd, str) else cmd
    done = subprocess.run(argv, env=env, cwd=cwd, check=False, input=input_,
                          stdout=subprocess.PIPE if quiet else None,
                          stderr=subprocess.PIPE if quiet else None)
    if check and done.returncode != 0:
        tail = (done.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{shlex.join(argv)[:120]} failed ({done.returncode}): "
                           + " | ".join(tail))
    return done


def spawn(argv: list[str], logf: IO[bytes], *, env: dict[str, str] | None = None,
          cwd: str | None = None, stdout: int | IO[bytes] | None = None) -> subprocess.Popen:
    """Start ``argv`` in a session of its own (so its whole tree can be found and stopped)."""
    return subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=logf if stdout is None else stdout,
                            stderr=subprocess.STDOUT if stdout is None else logf,
                            start_new_session=True)


def kill_session(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a session we started, by its id; SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_ready(proc: subprocess.Popen, ready: Callable[[], bool], what: str, logfile: Path,
               timeout: float) -> float:
    """Poll ``ready`` every 0.5 s until it holds; seconds waited. RuntimeError if ``proc``
    exits or ``timeout`` passes first."""
    started = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited; see {logfile}")
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{what} did not answer in {timeout:.0f} s; see {logfile}")
        time.sleep(0.5)
    return time.monotonic() - started


def read_env_file(path: Path) -> dict[str, str]:
    """The variables an env file sets (services.sh writes keystone.env), as bash sources it.

    OSError with the reason if bash cannot; its stderr is dropped, it may quote a secret.
    """
    if not os.access(path, os.R_OK):
        raise OSError(f"{path} is not readable")
    done = run(["bash", "-c", 'set -ae; . "$1" >/dev/null; exec env -0', "_", str(path)],
               env={}, check=False)
    if done.returncode != 0:
        raise OSError(f"bash could not source {path} (exit {done.returncode})")
    pairs = (item.decode().partition("=") for item in done.stdout.split(b"\0") if item)
    return {k: v for k, _, v in pairs if k not in BASH_OWN}


def base_env(os_env: dict[str, str]) -> dict[str, str]:
    """The caller's environment without Prefect or OpenStack settings, plus the backup user's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OS_", "ST_"))}
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env.update(os_env)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the servers we started are stopped on the way out."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
