"""What the sudo and deployment tests share: users, the installed privileged files, running
commands as another user, and sample undercloud trees that only root can fully read.

The tests install the project's sudoers file and wrappers for real (through
deployments/install.sh) and put back whatever was there before, users and groups included (a
leftover member of the group undercloud-backup keeps every sudo right of the worker). They take
a lock so that two test sessions on one machine do not install and remove them under each other.

Scratch directories live under /var/lib, root's alone: the installer and ucb-archive refuse
directories other users can write (/var/tmp), sticky or not.
"""

from __future__ import annotations

import base64
import fcntl
import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from undercloud_backup.db import privileged
from undercloud_backup.trust import signing

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "deployments/install.sh"
VENV = Path(sys.prefix)
GROUP = "undercloud-backup"
WORKER = "ucb-worker"  # in the group that the sudoers file grants
NOSUDO = "ucb-nosudo"  # an unprivileged user without the rule
API_USER = "ucb-api"  # the local Prefect server's own user (full installs)
SCRATCH = Path("/var/lib")  # root-owned 0755 all the way up
LOCK = Path("/run/lock/undercloud-backup-tests.lock")
MANAGED = (privileged.SUDOERS_FILE, privileged.ARCHIVE_WRAPPER, privileged.MARIADB_WRAPPER,
           privileged.CONFIG_FILE, signing.INSTALLED_SIGNING_KEY,
           signing.INSTALLED_ALLOWED_SIGNERS)


_LOCK_DEPTH = [0]


@contextmanager
def machine_lock() -> Iterator[None]:
    """One test session at a time may own the machine-wide privileged files. Re-entrant within
    the session (the shared installation holds it while its modules' fixtures take it again)."""
    if _LOCK_DEPTH[0]:
        _LOCK_DEPTH[0] += 1
        try:
            yield
        finally:
            _LOCK_DEPTH[0] -= 1
        return
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _LOCK_DEPTH[0] = 1
        try:
            yield
        finally:
            _LOCK_DEPTH[0] = 0
            fcntl.flock(lock, fcntl.LOCK_UN)


def user_argv(user: str, argv: list[str]) -> list[str]:
    """``argv`` run as ``user`` with its groups; setpriv execs in place (no extra parent)."""
    entry = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups",
            "--", *argv]


def as_user(user: str, argv: list[str], *, env: dict[str, str] | None = None,
            timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Run as ``user`` in a minimal environment (plus ``env``) from /; capture text output."""
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
            "HOME": pwd.getpwnam(user).pw_dir}
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(user_argv(user, argv), env={**base, **(env or {})}, cwd="/",
                          timeout=timeout, **kwargs)


def user_exists(user: str) -> bool:
    return _exists(user)


def group_exists(group: str) -> bool:
    try:
        grp.getgrnam(group)
    except KeyError:
        return False
    return True


@contextmanager
def accounts_removed(users: tuple[str, ...] = (WORKER, NOSUDO, API_USER),
                     groups: tuple[str, ...] = (GROUP, NOSUDO, API_USER)) -> Iterator[None]:
    """Users and groups of these names that the block creates are removed when it ends (their
    processes killed first: userdel refuses a user with running processes)."""
    users_before = {u for u in users if _exists(u)}
    groups_before = {g for g in groups if group_exists(g)}
    try:
        yield
    finally:
        for user in users:
            if user not in users_before and _exists(user):
                kill_user_processes(pwd.getpwnam(user).pw_uid)
                deadline = time.monotonic() + 10
                while subprocess.run(["userdel", user], capture_output=True).returncode == 8:
                    assert time.monotonic() < deadline, f"{user} still has processes"
                    time.sleep(0.2)
        for group in groups:
            if group not in groups_before and group_exists(group):
                subprocess.run(["groupdel", group], check=False, capture_output=True)


def kill_user_processes(uid: int) -> None:
    """SIGKILL, by pid, what a user this test session created still runs."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    os.kill(int(entry), signal.SIGKILL)


def ensure_nosudo_user(name: str = NOSUDO) -> None:
    """An unprivileged local user without the sudo rule (a module run beside others names
    one of its own: another module's teardown removes the shared one)."""
    if not _exists(name):
        subprocess.run(["useradd", "--system", "--user-group", "--home-dir", "/nonexistent",
                        "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True)


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def install_env(state: Path, **extra: str) -> dict[str, str]:
    """install.sh's environment for the test worker user and this checkout's venv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "UCB_"))}
    env.update(UCB_USER=WORKER, UCB_STATE=str(state), UCB_APP=str(REPO), UCB_VENV=str(VENV),
               UCB_LOCAL_SERVER="0")
    env.update(extra)
    return env


@contextmanager
def privileged_install(state: Path, roots: list[Path], socket: str | None = None,
                       ) -> Iterator[None]:
    """``install.sh user privileged`` for the worker user, the sample roots allowed (and the
    dump pointed at ``socket``); everything put back as it was afterwards."""
    saved: dict[str, bytes | None] = {}
    for path in MANAGED:
        saved[path] = Path(path).read_bytes() if os.path.lexists(path) else None
    new_dirs = [d for d in (privileged.LIBEXEC, os.path.dirname(privileged.CONFIG_FILE))
                if not os.path.lexists(d)]
    with accounts_removed(), put_back(saved, new_dirs):
        done = subprocess.run(["bash", str(INSTALL), "user", "privileged"],
                              env=install_env(state), capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        ensure_nosudo_user()
        # The shipped policy with the sample roots in place of `/`: the real /etc, /root, ...
        # stay out of reach, so reading them is an escalation the tests can try.
        policy = "".join(line for line in (REPO / "deployments/privileged.conf").read_text()
                         .splitlines(keepends=True) if not line.startswith("root ="))
        policy += "".join(f"root = {root}\n" for root in roots)
        if socket:
            policy += f"socket = {socket}\n"
        Path(privileged.CONFIG_FILE).write_text(policy)
        yield


@contextmanager
def put_back(saved: dict[str, bytes | None], new_dirs: list[str]) -> Iterator[None]:
    try:
        yield
    finally:
        for path, content in saved.items():
            if content is None:
                Path(path).unlink(missing_ok=True)
            else:
                Path(path).write_bytes(content)
        for directory in new_dirs:
            with suppress(OSError):
                os.rmdir(directory)


_GRANTED_UIDS: dict[str, int] = {}


def grant_traverse(user: str, paths: list[Path]) -> list[Path]:
    """Let ``user`` reach ``paths`` (a checkout or venv in a private directory, as in CI).

    Adds a search-only ACL entry on each ancestor the user cannot enter; returns them so the
    caller can remove the entries again with :func:`revoke_traverse`.
    """
    granted: list[Path] = []
    _GRANTED_UIDS[user] = pwd.getpwnam(user).pw_uid
    for path in paths:
        for ancestor in reversed(path.resolve().parents):
            if as_user(user, ["test", "-x", str(ancestor)]).returncode != 0:
                subprocess.run(["setfacl", "-m", f"u:{user}:x", str(ancestor)], check=True)
                granted.append(ancestor)
        result = as_user(user, ["test", "-r", str(path)])
        assert result.returncode == 0, f"{user} cannot read {path}: make it world-readable"
    return granted


def revoke_traverse(user: str, granted: list[Path]) -> None:
    """Removes the entries again, by uid (the user may be gone already)."""
    uid = _GRANTED_UIDS.get(user)
    for path in granted:
        subprocess.run(["setfacl", "-x", f"u:{uid if uid is not None else user}", str(path)],
                       check=False)


def sample_root(images_mib: tuple[int, ...] = (3,)) -> Path:
    """A sample undercloud that root owns, under /var/lib where the worker can reach its top.

    pytest's tmp_path is private to root, but the worker plans the backup (it must see that
    the paths exist) before root reads them through the wrapper.
    """
    import sample_undercloud as sample

    top = Path(tempfile.mkdtemp(prefix="ucb-sample-", dir=SCRATCH))
    top.chmod(0o755)
    return sample.make_files(top, sample.SampleSize(images_mib=images_mib))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def group_id(name: str = GROUP) -> int:
    return grp.getgrnam(name).gr_gid


def scratch_dir(prefix: str, mode: int = 0o755) -> Path:
    """A fresh root-owned directory under /var/lib (pytest's tmp_path is out of the worker's
    reach, and /var/tmp is writable by every user)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=SCRATCH))
    path.chmod(mode)
    return path


@contextmanager
def scratch_mariadb() -> Iterator[str]:
    """A private MariaDB on a unix socket only (root by unix_socket auth); yields the socket.

    End-to-end backups dump every database of the server they point at; this keeps them
    independent of whatever else lives in the shared development server.
    """
    top = scratch_dir("ucb-mariadb-", 0o700)
    socket = str(top / "mysqld.sock")
    # a tmpdir of its own: a starting server deletes every #sql* file of its tmpdir
    (top / "tmp").mkdir(mode=0o700)
    subprocess.run(["mariadb-install-db", "--no-defaults", "--user=root",
                    f"--datadir={top / 'data'}", "--auth-root-authentication-method=socket",
                    "--skip-test-db", f"--tmpdir={top / 'tmp'}"], check=True,
                   capture_output=True)
    server = subprocess.Popen(
        ["mariadbd", "--no-defaults", "--user=root", f"--datadir={top / 'data'}",
         f"--tmpdir={top / 'tmp'}",
         f"--socket={socket}", "--skip-networking", f"--pid-file={top / 'mysqld.pid'}",
         "--innodb-buffer-pool-size=32M", f"--log-error={top / 'error.log'}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["mariadb-admin", f"--socket={socket}", "ping"],
                             capture_output=True).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, \
                f"scratch MariaDB did not start; see {top / 'error.log'}"
            time.sleep(0.2)
        yield socket
    finally:
        stop(server, timeout=30)
        remove_tree(top)


def read_env_file(path: Path) -> dict[str, str]:
    """The variables an ``export A=b C=d`` env file sets."""
    import shlex

    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export "):
            for word in shlex.split(line[len("export "):]):
                key, _, value = word.partition("=")
                values[key] = value
    return values


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat_file:
                fields = stat_file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started: a power cut, as far as they can tell."""
    victims = [process.pid, *descendants(process.pid)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=10)


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL for it and anything it left behind."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    kill_tree(process)


class Api:
    """The Prefect REST API, called as the UI calls it (JSON over HTTP, basic auth)."""

    def __init__(self, url: str, auth: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.auth = auth

    def __call__(self, method: str, path: str, body: object = None) -> object:
        request = urllib.request.Request(
            self.url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"})
        if self.auth:
            token = base64.b64encode(self.auth.encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        # 503 is what the server answers when SQLite is busy ("database is locked"); Prefect's
        # own client and the UI retry it, and so does this one.
        for attempt in range(8):
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    data = response.read()
                break
            except urllib.error.HTTPError as error:
                if error.code not in (429, 502, 503) or attempt == 7:
                    raise
                time.sleep(0.5 * (attempt + 1))
        return json.loads(data) if data else None

    def healthy(self) -> bool:
        try:
            return self("GET", "/health") is True
        except OSError:
            return False

    def wait_healthy(self, process: subprocess.Popen | None, log: Path,
                     timeout: float = 120) -> None:
        """Until the API answers (``process``: the server, if this session started it)."""
        deadline = time.monotonic() + timeout
        while not self.healthy():
            assert process is None or process.poll() is None, f"Prefect server exited; see {log}"
            assert time.monotonic() < deadline, f"Prefect server not healthy; see {log}"
            time.sleep(0.3)

    def flow_run(self, run_id: str) -> dict:
        return self("GET", f"/flow_runs/{run_id}")  # type: ignore[return-value]

    def wait_final(self, run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(run_id)
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            assert time.monotonic() < deadline, \
                f"flow run {run_id} still {run['state']['name']} after {timeout} s"
            time.sleep(0.5)

