"""A whole installation for tests: `deployments/install.sh` with every step, a local Prefect
server running as its own user, no systemd (start-stop-daemon), on a free port; everything it
created stopped, removed and put back afterwards. Shared by test_security and the UI tests."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deploy_helpers import (
    API_USER,
    INSTALL,
    MANAGED,
    REPO,
    VENV,
    WORKER,
    Api,
    accounts_removed,
    grant_traverse,
    install_env,
    put_back,
    remove_tree,
    revoke_traverse,
    scratch_dir,
)

from undercloud_backup import privileged

ETC = Path("/etc/undercloud-backup")
RUN_DIR = Path("/run/undercloud-backup")
LOG_DIR = Path("/var/log/undercloud-backup")
FULL_STEPS = ("user", "privileged", "config", "services", "prefect")


class FullInstall:
    """What `install.sh` (all steps, a local server, no systemd) left running."""

    def __init__(self, state: Path, port: int) -> None:
        self.state = state
        self.port = port
        self.url = f"http://127.0.0.1:{port}/api"
        self.env = install_env(state, UCB_LOCAL_SERVER="1", UCB_PORT=str(port),
                               UCB_API_USER=API_USER, PREFECT_API_URL=self.url)
        self.install_seconds = 0.0
        self.output = ""
        self.traces: list[Path] = []  # strace logs of every exec of the traced steps

    @property
    def auth(self) -> str:
        """The API password install.sh generated (read from worker.env, as root)."""
        for line in (ETC / "worker.env").read_text().splitlines():
            if line.startswith("PREFECT_API_AUTH_STRING="):
                return line.split("=", 1)[1]
        raise AssertionError("no PREFECT_API_AUTH_STRING in worker.env")

    def api(self) -> Api:
        return Api(self.url, self.auth)

    def pid(self, name: str) -> int:
        return int((RUN_DIR / f"{name}.pid").read_text())

    def run(self, *steps: str, trace: Path | None = None, **extra: str,
            ) -> subprocess.CompletedProcess:
        """install.sh STEPS as root; with ``trace``, every execve (argv) of it and of its
        children is logged there (strace; not for steps that leave daemons behind)."""
        argv = ["bash", str(INSTALL), *steps]
        if trace is not None:
            self.traces.append(trace)
            argv = ["strace", "-f", "--seccomp-bpf", "-e", "trace=execve", "-s", "65535",
                    "-o", str(trace), *argv]
        return subprocess.run(argv, env={**self.env, **extra}, capture_output=True, text=True,
                              timeout=300)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def full_install(worker_env: dict[str, str] | None = None, trace: bool = False,
                 ) -> Iterator[FullInstall]:
    """`install.sh user`, then (the test users may now read the checkout) `privileged config
    services prefect` with a local server of its own user on a free port; `worker_env` lines
    are added to worker.env before the services start. Everything is stopped, removed and put
    back afterwards; the install's output and duration are kept on the result. ``trace``:
    every step but `services` runs under strace (FullInstall.traces)."""
    managed = [*MANAGED, str(ETC / "server.env"), str(ETC / "worker.env")]
    saved = {p: Path(p).read_bytes() if os.path.lexists(p) else None for p in managed}
    new_dirs = [d for d in (privileged.LIBEXEC, str(ETC), str(RUN_DIR), str(LOG_DIR))
                if not os.path.lexists(d)]
    install = FullInstall(scratch_dir("ucb-state-"), free_port())
    traces = scratch_dir("ucb-traces-", 0o700)

    def traced(name: str) -> Path | None:
        return traces / name if trace else None
    granted: dict[str, list[Path]] = {}
    with accounts_removed(), put_back(saved, new_dirs):
        try:
            started = time.monotonic()
            done = install.run("user", trace=traced("user"))
            assert done.returncode == 0, done.stdout + done.stderr
            for user in (WORKER, API_USER):
                granted[user] = grant_traverse(user, [REPO, VENV])
            done = install.run("privileged", "config", trace=traced("privileged-config"))
            assert done.returncode == 0, done.stdout + done.stderr
            if worker_env:
                with open(ETC / "worker.env", "a") as env_file:
                    env_file.writelines(f"{k}={v}\n" for k, v in worker_env.items())
            done = install.run("services")
            assert done.returncode == 0, done.stdout + done.stderr
            install.output = done.stdout + done.stderr
            done = install.run("prefect", trace=traced("prefect"))
            install.output += done.stdout + done.stderr
            assert done.returncode == 0, install.output
            install.install_seconds = time.monotonic() - started
            yield install
        finally:
            install.run("stop")
            for user, paths in granted.items():
                revoke_traverse(user, paths)
            for name in ("server.log", "worker.log"):
                (LOG_DIR / name).unlink(missing_ok=True)
            remove_tree(install.state)
            remove_tree(traces)
