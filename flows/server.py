"""The temporary Prefect server of an ad hoc run, when no PREFECT_API_URL names a real one.

Prefect would start one itself, in our process group: a Ctrl-C then kills it mid-run, and a
SIGKILL of the run leaves it running (190 MB). Started here instead, through
:mod:`undercloud_backup.core.execute`, it has a process group of its own (the terminal's Ctrl-C
reaches only us), dies with us whatever kills us (``PR_SET_PDEATHSIG``), and is stopped quietly
before the run's last line is printed.

The run's API serves its artifacts (TempURLs that download the backup without credentials) and
logs, so nobody but this process may reach it or its data:

- it takes a random password made for this run, known only to this process (in its settings, not
  in ``os.environ``: no child of ours inherits it) and to the server (in its environment, which
  only the same user reads; never on an argv, in a log or in an error);
- it listens on a socket this process bound and listens on before the server starts (``--fd``),
  so no local user can take the port between our choice and its bind and collect the password;
- its database, its PREFECT_HOME and the run's persisted task results live in a new directory
  of mode 0700 (created exclusively under an unpredictable name) that is removed at the end. A
  run killed by SIGKILL leaves it behind, still private; the next ad hoc run removes it.

A fresh database would be migrated at every start (5 to 10 s more on 2 cores): the first start
keeps a copy of its database as it is once migrated (schema and block types, no run's data),
which later starts copy instead of migrating.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path

from undercloud_backup.core.errors import redact
from undercloud_backup.core.execute import Command, Pipeline

STARTUP_TIMEOUT_S = 90.0  # the first start migrates a new database: 16 s seen, more on CI
PRIVATE_PREFIX = "ucb-prefect-server-"  # then <our pid>-<random>: whose leftover it is
TEMPLATE_PREFIX = "ucb-prefect-template-"  # then <prefect version>.db
# Prefect's settings that would point the server at another database than the run's own.
_DATABASE_SETTINGS = tuple(f"PREFECT_{scope}_DATABASE_{name}" for scope in ("SERVER", "API")
                           for name in ("CONNECTION_URL", "DRIVER", "HOST", "PORT", "USER",
                                        "NAME", "PASSWORD"))


def _listening_socket() -> socket.socket:
    """A loopback socket, bound and listening before the server exists: no local user can
    take its port first and pose as our server (and so collect its password)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # uvicorn sees a socket from --fd as a unix one and so never sets this; accepted
        # connections inherit it (without it, small requests wait on delayed ACKs)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def server_command(fd: int) -> Command:
    """uvicorn serving Prefect's API only, as Prefect's own ephemeral server does, on the
    listening socket ``fd`` it inherits."""
    import prefect

    return Command(argv=(sys.executable, "-m", "uvicorn", "--app-dir",
                         str(prefect.__module_path__.parent), "--factory",
                         "prefect.server.api.server:create_app", "--fd", str(fd),
                         "--log-level", "error", "--lifespan", "on"),
                   name="temporary Prefect server")


def _only_we_can_change(path: Path) -> bool:
    """Whether no other user can replace ``path`` or anything on the way to it (each component
    owned by root or us, and writable by nobody else unless sticky, like /tmp)."""
    uid = os.geteuid()
    for component in (path, *path.parents):
        st = os.lstat(component)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, uid):
            return False
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return False
    return True


def _private_base(home: Path) -> Path:
    """Where the run's private directory goes: the run's PREFECT_HOME (root's own by default,
    and where a leftover is found again), or else the system's temporary directory."""
    with suppress(OSError):
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        base = Path(os.path.realpath(home))
        if _only_we_can_change(base):
            return base
    base = Path(os.path.realpath(tempfile.gettempdir()))
    if not _only_we_can_change(base):
        raise RuntimeError(f"no private place for the temporary Prefect server's data: "
                           f"{home} and {base} can be changed by other users; set "
                           "PREFECT_API_URL to a running server")
    return base


def _remove_leftovers(base: Path) -> None:
    """Remove the private directories of ad hoc runs that were killed (SIGKILL) mid-run."""
    uid = os.geteuid()
    for entry in base.glob(f"{PRIVATE_PREFIX}*-*"):
        pid = entry.name[len(PRIVATE_PREFIX):].split("-", 1)[0]
        with suppress(OSError, ValueError):
            st = entry.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or _alive(int(pid)):
                continue
            shutil.rmtree(entry)  # never follows a link out of it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _template(base: Path) -> Path:
    import prefect

    return base / f"{TEMPLATE_PREFIX}{prefect.__version__}.db"


def _copy_template(template: Path, database: Path) -> bool:
    """Start the run's database as a copy of the migrated, never used one, if there is one."""
    try:
        source = open(os.open(template, os.O_RDONLY | os.O_NOFOLLOW), "rb")
    except OSError:
        return False
    with source:
        st = os.fstat(source.fileno())
        # ours alone (in /tmp, another user could have put a database of theirs there)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return False
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        with open(os.open(database, flags, 0o600), "wb") as copy:
            shutil.copyfileobj(source, copy)
    return True


def _keep_template(database: Path, template: Path) -> None:
    """Keep a copy of a just migrated database (nothing of any run in it yet) for the next
    starts; other Prefect versions' copies go."""
    fd, name = tempfile.mkstemp(dir=template.parent, prefix=f".{TEMPLATE_PREFIX}")
    os.close(fd)
    scratch = Path(name)
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as live, \
                closing(sqlite3.connect(scratch)) as copy:
            live.backup(copy)  # a consistent snapshot of a database in use (WAL)
        os.replace(scratch, template)
    finally:
        scratch.unlink(missing_ok=True)
    for other in template.parent.glob(f"{TEMPLATE_PREFIX}*.db"):
        if other != template:
            other.unlink(missing_ok=True)


def _wait_healthy(url: str, server: Pipeline, timeout: float, password: str) -> None:
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
    tail = redact(server.results[0].stderr_tail(), [password])
    raise RuntimeError(f"the temporary Prefect server did not start within {timeout:.0f} s "
                       f"({tail}); set PREFECT_API_URL to a running server")


@contextmanager
def temporary_server() -> Iterator[str | None]:
    """Within the block Prefect talks to a server: the configured one, or one of ours."""
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        get_current_settings,
        temporary_settings,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield PREFECT_API_URL.value()
        return
    base = _private_base(Path(PREFECT_HOME.value()))
    _remove_leftovers(base)
    private = Path(tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-", dir=base))
    try:
        database = private / "prefect.db"
        template = _template(base)
        from_template = _copy_template(template, database)
        password = secrets.token_urlsafe(32)
        auth = f"undercloud-backup:{password}"
        env = {**os.environ,
               **get_current_settings().to_environment_variables(exclude_unset=True),
               "PREFECT_HOME": str(private),
               "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{database}",
               "PREFECT_SERVER_API_AUTH_STRING": auth,
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        for name in _DATABASE_SETTINGS:
            if name != "PREFECT_SERVER_DATABASE_CONNECTION_URL":
                env.pop(name, None)
        listener = _listening_socket()
        with listener:
            url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
            server = Pipeline([server_command(listener.fileno())], timeout=None,
                              secrets=[password], pass_fds=[listener.fileno()],
                              stdout=subprocess.DEVNULL, env=env, survive_interrupt=True)
            with server:
                listener.close()  # the server's now; ours would keep the port after it died
                try:
                    try:
                        _wait_healthy(url, server, STARTUP_TIMEOUT_S, password)
                    except RuntimeError:
                        if from_template:  # a bad copy must not stop every later run
                            template.unlink(missing_ok=True)
                        raise
                    if not from_template:
                        with suppress(OSError, sqlite3.Error):  # only the next start's speed
                            _keep_template(database, template)
                    with temporary_settings(updates={
                            PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: auth,
                            PREFECT_RESULTS_LOCAL_STORAGE_PATH: private / "results"}):
                        yield url
                finally:
                    server.kill()
    finally:
        shutil.rmtree(private, ignore_errors=True)
