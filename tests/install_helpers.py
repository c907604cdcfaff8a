"""A whole installation for tests: `deployments/install.sh` with every step, a local Prefect
server running as its own user, no systemd (start-stop-daemon), on a free port; everything it
created stopped, removed and put back afterwards.

One such installation (SHARED, the `full_system` fixture of conftest.py) serves every module
that needs an installed system but not a fresh one (test_security, test_deploy, test_ui): it is
made when the first test that needs it starts, and removed as soon as the next test to run does
not need it (conftest.py runs those tests one after the other). What a module changes in it
(the privileged policy, a deployment's defaults), that module's fixtures put back.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from conftest import free_port
from deploy_helpers import (
    API_USER,
    INSTALL,
    MANAGED,
    REPO,
    VENV,
    WORKER,
    Api,
    accounts_removed,
    descendants,
    ensure_nosudo_user,
    grant_traverse,
    install_env,
    machine_lock,
    put_back,
    remove_tree,
    revoke_traverse,
    scratch_dir,
)

from undercloud_backup.db import privileged
from undercloud_backup.trust import crypto

ETC = Path("/etc/undercloud-backup")
RUN_DIR = Path("/run/undercloud-backup")
LOG_DIR = Path("/var/log/undercloud-backup")
FULL_STEPS = ("user", "privileged", "config", "services", "prefect")


class FullInstall:
    """What `install.sh` (all steps, a local server, no systemd) left running."""

    def __init__(self, state: Path, port: int, **install_extra: str) -> None:
        self.state = state
        self.port = port
        self.url = f"http://127.0.0.1:{port}/api"
        self.env = install_env(state, UCB_LOCAL_SERVER="1", UCB_PORT=str(port),
                               UCB_API_USER=API_USER, PREFECT_API_URL=self.url, **install_extra)
        self.install_seconds = 0.0
        self.step_seconds: dict[str, float] = {}  # "services", "prefect": the last run of each
        self.first_step_seconds: dict[str, float] = {}  # each step as the installation ran it
        self.output = ""
        self.config_output = ""  # what `privileged config` printed: the break-glass identity
        self.identity: Path | None = None  # a root-only copy of it, for the tests to decrypt
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

    def kill_worker(self) -> None:
        """SIGKILL the worker daemon and everything it started (flow run, sudo, tar) at once:
        a power cut, as far as they can tell."""
        import signal

        worker = self.pid("worker")
        for pid in (worker, *descendants(worker)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{worker}") and _state(worker) != "Z":
            assert time.monotonic() < deadline, f"worker {worker} still alive"
            time.sleep(0.05)

    def restart(self) -> None:
        """Stop the server and the worker (`install.sh stop`), start both again (`install.sh
        services`); back when the API answers."""
        for steps in (("stop",), ("services",)):
            done = self.run(*steps)
            assert done.returncode == 0, done.stdout + done.stderr
        self.api().wait_healthy(None, LOG_DIR / "server.log")

    def run(self, *steps: str, trace: Path | None = None, **extra: str,
            ) -> subprocess.CompletedProcess:
        """install.sh STEPS as root; with ``trace``, every execve (argv) of it and of its
        children is logged there (strace; not for steps that leave daemons behind)."""
        argv = ["bash", str(INSTALL), *steps]
        if trace is not None:
            self.traces.append(trace)
            argv = ["strace", "-f", "--seccomp-bpf", "-e", "trace=execve", "-s", "65535",
                    "-o", str(trace), *argv]
        started = time.monotonic()
        done = subprocess.run(argv, env={**self.env, **extra}, capture_output=True, text=True,
                              timeout=300)
        self.step_seconds[" ".join(steps)] = time.monotonic() - started
        return done


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


@contextmanager
def full_install(worker_env: dict[str, str] | None = None, trace: bool = False,
                 server_env: dict[str, str] | None = None,
                 install_extra: dict[str, str] | None = None) -> Iterator[FullInstall]:
    """`install.sh user`, then (the test users may now read the checkout) `privileged config
    services prefect` with a local server of its own user on a free port; `worker_env` and
    `server_env` lines are added to worker.env and server.env before the services start
    (`install_extra`: more of install.sh's environment). Everything is stopped, removed and
    put back afterwards; the install's output and duration are kept on the result.
    ``trace``: every step but `services` runs under strace (FullInstall.traces)."""
    managed = [*MANAGED, str(ETC / "server.env"), str(ETC / "worker.env"),
               crypto.INSTALLED_RECIPIENTS, crypto.INSTALLED_BREAK_GLASS,
               crypto.INSTALLED_NO_ENCRYPTION]
    saved = {p: Path(p).read_bytes() if os.path.lexists(p) else None for p in managed}
    new_dirs = [d for d in (privileged.LIBEXEC, str(ETC), str(RUN_DIR), str(LOG_DIR))
                if not os.path.lexists(d)]
    install = FullInstall(scratch_dir("ucb-state-"), free_port(), **(install_extra or {}))
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
            install.config_output = done.stdout
            if os.path.exists(crypto.INSTALLED_BREAK_GLASS):  # the default: no recipients given
                install.identity = traces / "break-glass.agekey"
                install.identity.write_bytes(Path(crypto.INSTALLED_BREAK_GLASS).read_bytes())
                install.identity.chmod(0o600)
            for name, lines in (("worker.env", worker_env), ("server.env", server_env)):
                if lines:  # the last line of a name wins (the launcher reads them in order)
                    with open(ETC / name, "a") as env_file:
                        env_file.writelines(f"{k}={v}\n" for k, v in lines.items())
            done = install.run("services")
            assert done.returncode == 0, done.stdout + done.stderr
            install.output = done.stdout + done.stderr
            done = install.run("prefect", trace=traced("prefect"))
            install.output += done.stdout + done.stderr
            assert done.returncode == 0, install.output
            install.install_seconds = time.monotonic() - started
            install.first_step_seconds = dict(install.step_seconds)
            yield install
        finally:
            install.run("stop")
            for user, paths in granted.items():
                revoke_traverse(user, paths)
            for name in ("server.log", "worker.log"):
                (LOG_DIR / name).unlink(missing_ok=True)
            remove_tree(install.state)
            remove_tree(traces)


# Test-only speed-ups of the shared installation, each explained (the shipped values are the
# templates' and prefect.yaml's):
# - the worker polls for runs every second instead of 5, and syncs with the server every 5 s
#   instead of 30: started beside a server that is not up yet, it takes no run before its
#   first sync, which cost the first run up to half a minute;
# - a run waiting for the deployment's slot retries every 2 s instead of 30;
# - proactive automations are evaluated every second instead of every 5;
# - a run without a heartbeat for 35 s is crashed (90 shipped; heartbeats stay at 30 s, as in
#   prefect.yaml; no healthy run in the tests lasts 30 s).
SHARED_WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "1",
                     "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"}
SHARED_SERVER_ENV = {"PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
                     "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT1S"}
ZOMBIE_AFTER_S = "35"


class SharedInstall:
    """The one full installation the modules that need one share (see the module's doc).

    Every step runs as for test_security (traced); the worker gets the test bed's Swift
    (OS_*) in worker.env, as an operator would put it there. Holds the machine lock while
    it exists; ``close`` removes everything (users, groups, files, daemons) again."""

    def __init__(self) -> None:
        self._stack: ExitStack | None = None
        self.install: FullInstall | None = None

    def get(self, os_env: dict[str, str]) -> FullInstall:
        if self.install is None:
            stack = ExitStack()
            try:
                stack.enter_context(machine_lock())
                install = stack.enter_context(full_install(
                    worker_env={**os_env, **SHARED_WORKER_ENV}, server_env=SHARED_SERVER_ENV,
                    install_extra={"UCB_ZOMBIE_AFTER": ZOMBIE_AFTER_S}, trace=True))
                ensure_nosudo_user()  # removed with the install's accounts
            except BaseException:
                stack.close()
                raise
            self._stack, self.install = stack, install
        return self.install

    def close(self) -> None:
        stack, self._stack, self.install = self._stack, None, None
        if stack is not None:
            stack.close()


SHARED = SharedInstall()
