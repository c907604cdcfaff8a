"""The test bed: real MariaDB, Swift behind Keystone, and a real Prefect server.

``deployments/dev/services.sh start`` (idempotent) brings the services up; a Prefect server is
started once per session on a free loopback port with its own PREFECT_HOME. The environment
is set here, before anything imports prefect, so in-process flows and CLI subprocesses alike
talk to that server.

Tests marked ``unit`` need none of this: a session that selects only them (``pytest -m unit``)
starts no server and no service, and runs as any user.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from unittest import mock

import pytest
from deploy_helpers import read_env_file, stop
from swift_proxy import swift_proxy_fixture  # noqa: F401 - the fault proxy, for every test

REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "deployments/dev/services.sh"
STATE = Path(os.environ.get("UCB_DEV_STATE", "/var/lib/undercloud-backup-dev"))
PYTHON = sys.executable
SHARD = "UCB_SHARD"  # set to the session's name when test.sh runs several side by side


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PREFECT_HOME = tempfile.mkdtemp(prefix="ucb-test-prefect-")
_PREFECT_PORT = free_port()
PREFECT_API_URL = f"http://127.0.0.1:{_PREFECT_PORT}/api"
os.environ.update(
    PREFECT_HOME=_PREFECT_HOME,
    PREFECT_API_URL=PREFECT_API_URL,
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_SERVER_EPHEMERAL_ENABLED="false",
    PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.3",
    # Test-only: proactive automations (test_alerts' silence window) are evaluated every
    # second instead of every 5, so a short window ends when it should.
    PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY="PT1S",
)


@pytest.fixture(scope="session")
def services() -> dict[str, str]:
    """Start (or confirm) the loopback services; return the backup user's OS_* variables.

    One of several sessions run side by side (UCB_SHARD set, by deployments/dev/test.sh)
    does neither: test.sh did both once before starting them, and a session's drop would
    take the databases another one is using, its start check their shared smoke object."""
    if os.environ.get(SHARD):
        return read_env_file(STATE / "keystone.env")
    env = dict(os.environ, SKIP_APT=os.environ.get("SKIP_APT", "1"))
    subprocess.run(["bash", str(SERVICES), "start"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    # Databases our tests and benchmarks create (all named ucb_*) and an interrupted earlier
    # run may have left: every backup dumps the whole server, so they would be in each one.
    leftovers = mariadb("SELECT schema_name FROM information_schema.schemata "
                        "WHERE schema_name LIKE 'ucb\\_%'").split()
    mariadb("".join(f"DROP DATABASE `{name}`;" for name in leftovers))
    return read_env_file(STATE / "keystone.env")


_SERVER: list[subprocess.Popen] = []
# The session server's database starts as a copy of one an earlier session's server migrated
# (schema and block types, no run: copied as soon as it answered), as flows.server does for ad
# hoc runs: a new database is migrated at every start, 5 to 10 s on 2 cores. Root's alone.
_TEMPLATES = Path("/var/tmp/ucb-test-prefect-templates")
_FROM_TEMPLATE = [False]


def _session_template() -> Path | None:
    """The migrated database of this Prefect version, kept for the sessions to start from;
    None where this user cannot keep one of its own."""
    from importlib.metadata import version

    try:
        _TEMPLATES.mkdir(mode=0o700, exist_ok=True)
        st = _TEMPLATES.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None
    return _TEMPLATES / f"prefect-{version('prefect')}.db"


def _copy_session_template() -> None:
    template = _session_template()
    if template is not None and template.is_file():
        shutil.copyfile(template, Path(_PREFECT_HOME) / "prefect.db")
        _FROM_TEMPLATE[0] = True


def _keep_session_template() -> None:
    """Once the session's server answers, before any test: its database as a template."""
    import sqlite3

    template = _session_template()
    if template is None or _FROM_TEMPLATE[0]:
        return
    scratch = template.with_suffix(f".{os.getpid()}.tmp")
    try:
        with contextlib.closing(sqlite3.connect(
                f"file:{Path(_PREFECT_HOME) / 'prefect.db'}?mode=ro", uri=True)) as live, \
                contextlib.closing(sqlite3.connect(scratch)) as copy:
            live.backup(copy)  # a consistent snapshot of a database in use
        os.replace(scratch, template)
    except (OSError, sqlite3.Error):
        pass  # only the next session's start-up is slower
    finally:
        scratch.unlink(missing_ok=True)


def _start_prefect_server() -> subprocess.Popen:
    if not _SERVER:
        _copy_session_template()
        log = open(Path(_PREFECT_HOME) / "server.log", "wb")
        _SERVER.append(subprocess.Popen(
            [str(Path(PYTHON).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
             "--port", str(_PREFECT_PORT), "--analytics-off"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ)))
        log.close()
    return _SERVER[0]


def _stop_prefect_server() -> None:
    while _SERVER:
        stop(_SERVER.pop(), timeout=15)


UNIT = "unit"
# Whether the session's tests need the Prefect server: true until the collection shows that
# every selected test is marked unit.
_SERVER_NEEDED = [True]
# The server's log stays in PREFECT_HOME when it did not start, to be read.
_KEEP_PREFECT_HOME = [False]


def _selects_unit_tests_only(markexpr: str) -> bool:
    """Whether a -m expression can only select tests marked unit: "unit", or "unit and ..."
    with no "or". Anything else may select others (then the server is started early, and
    stopped again if the collection finds no test that needs it)."""
    words = markexpr.replace("(", " ( ").replace(")", " ) ").split()
    return (bool(words) and words[0] == UNIT and "or" not in words
            and (len(words) == 1 or words[1] == "and"))


def pytest_sessionstart(session: pytest.Session) -> None:
    """Start the session's Prefect server before collecting: its first start (migrations of a
    new database, about 10 s) overlaps with the collection and the services' start-up. Not
    for the unit tier, which needs no server."""
    option = session.config.option
    if not option.collectonly and not _selects_unit_tests_only(option.markexpr):
        _start_prefect_server()


def pytest_collection_finish(session: pytest.Session) -> None:
    """After deselection: a session of unit tests only needs no server; stop the one started
    in case it did (``pytest tests/test_units.py``, ``-k``)."""
    _SERVER_NEEDED[0] = any(item.get_closest_marker(UNIT) is None for item in session.items)
    if not _SERVER_NEEDED[0]:
        _stop_prefect_server()


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """A real Prefect server for the session (SQLite under a temporary PREFECT_HOME), started
    for the first test when any selected test is not marked unit; None in a session of unit
    tests only, which must not reach a server (PREFECT_API_URL points at a closed port)."""
    if not _SERVER_NEEDED[0]:
        yield None
        return
    server = _start_prefect_server()
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{PREFECT_API_URL}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            _KEEP_PREFECT_HOME[0] = True
            template = _session_template()
            if _FROM_TEMPLATE[0] and template is not None:  # not again from a bad copy
                template.unlink(missing_ok=True)
            raise RuntimeError(f"Prefect server did not start; see {_PREFECT_HOME}/server.log")
        time.sleep(0.2)
    _keep_session_template()
    yield PREFECT_API_URL
    _drain_prefect()
    _stop_prefect_server()


def _drain_prefect() -> None:
    """Send what this process's Prefect log and event workers still hold while the server is
    up: left for the interpreter's exit, with the server gone, they retry for more than a
    minute (the session ends that much later) before they give up."""
    from prefect._internal.concurrency.services import QueueService

    QueueService.drain_all(timeout=10)


FULL_SYSTEM = "full_system"


@pytest.fixture(scope="module")
def full_system(os_env):
    """The installed system that test_security, test_deploy and test_ui share (install_helpers:
    SHARED): made for the first test that needs it, removed after the last one of a run of
    such tests (pytest_runtest_teardown below)."""
    from install_helpers import SHARED

    return SHARED.get(os_env)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that need the installed system run one after the other (from where the first
    of them was), so it is installed once; the others keep their order."""
    users = [item for item in items if FULL_SYSTEM in getattr(item, "fixturenames", ())]
    if not users:
        return
    first = items.index(users[0])
    others = [item for item in items if FULL_SYSTEM not in getattr(item, "fixturenames", ())]
    items[:] = others[:first] + users + others[first:]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """After the last test of a run of tests that need the installed system (their module
    fixtures torn down first), remove it: no other test runs beside it."""
    try:
        return (yield)
    finally:
        if nextitem is None or FULL_SYSTEM not in getattr(nextitem, "fixturenames", ()):
            from install_helpers import SHARED

            SHARED.close()


def pytest_sessionfinish(session: pytest.Session) -> None:
    from install_helpers import SHARED

    SHARED.close()  # after an interrupted run too
    _stop_prefect_server()
    if not _KEEP_PREFECT_HOME[0]:
        shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def os_env(services) -> dict[str, str]:
    """The backup user's OS_* variables, also put into this process's environment."""
    for key in [k for k in os.environ if k.startswith("OS_")]:
        del os.environ[key]
    os.environ.update(services)
    return services


@pytest.fixture(scope="session")
def db_cnf(services) -> str:
    """A MariaDB option file for the password-authenticated `backup` user over TCP."""
    return str(STATE / "mariadb-backup.cnf")


def swift_store():
    """A store for the backup user, from the test bed's OS_* variables (no retries)."""
    from undercloud_backup import config
    from undercloud_backup.store.connection import SwiftStore

    return SwiftStore.connect(config.swift_settings_from_env(retries=0))


def remove_container(container: str) -> None:
    """Delete a test's container and its segments container, whatever is in them."""
    try:
        store = swift_store()
    except Exception:  # noqa: BLE001 - cleanup must not hide the test's own outcome
        return
    for name in (container, f"{container}_segments"):
        try:
            for obj in store.list(name):
                store.delete(name, obj["name"])
            store.delete_container(name)
        except Exception:  # noqa: BLE001 - the test may never have created it
            pass


@pytest.fixture
def container(os_env):
    """A fresh container name per test; its objects are deleted afterwards."""
    name = f"ucbtest-{uuid.uuid4().hex[:10]}"
    yield name
    remove_container(name)


def mariadb(sql: str) -> str:
    """Run SQL as root through the unix socket; return tab-separated output."""
    return sql_on(None, sql)


def sql_on(socket: str | None, sql: str) -> str:
    """SQL as root through ``socket`` (None: the machine's MariaDB); tab-separated output."""
    where = [f"--socket={socket}"] if socket else []
    result = subprocess.run(["mariadb", *where, "--batch", "--skip-column-names"], input=sql,
                            capture_output=True, text=True, check=True)
    return result.stdout


@pytest.fixture
def sample_databases(services):
    """The sample databases (InnoDB, MyISAM, view, routine, trigger, event, user)."""
    import sample_undercloud as sample

    mariadb(sample.database_sql())
    yield sample.SAMPLE_DATABASES
    user, host = sample.SAMPLE_USER
    mariadb("".join(f"DROP DATABASE IF EXISTS {d};" for d in sample.SAMPLE_DATABASES)
            + f"DROP USER IF EXISTS '{user}'@'{host}';")


@pytest.fixture
def sample_root(tmp_path) -> Path:
    """A small sample undercloud tree: every file kind a restore must bring back."""
    import sample_undercloud as sample

    return sample.make_files(tmp_path / "undercloud", sample.SampleSize(images_mib=(3,)))


def backup_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
               ) -> subprocess.CompletedProcess:
    """Run ``python -m flows.backup`` the way an operator does."""
    return subprocess.run([PYTHON, "-m", "flows.backup", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env or dict(os.environ))


class _LogLines(logging.Handler):
    """The run's log records as lines, level and logger first, as the console shows them,
    each followed by the traceback it carries (the console prints that too: a test that says
    "no traceback" must see it)."""

    def __init__(self, sink: io.StringIO) -> None:
        super().__init__(logging.INFO)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.write(f"{record.levelname} | {record.name} - {record.getMessage()}\n")
        if record.exc_info:
            self.sink.write(logging.Formatter().formatException(record.exc_info) + "\n")


def backup_in_process(*args: str, env: dict[str, str] | None = None,
                      ) -> subprocess.CompletedProcess:
    """``python -m flows.backup`` called in this process, for tests of what a backup does
    rather than of the CLI's process: the same parsing, flow run and printed lines (stdout as
    it prints it; stderr: the run's log lines, then its own), without the start and exit of a
    Python that imports Prefect (2 to 4 s a run). ``env`` replaces os.environ meanwhile."""
    return cli_in_process("backup", *args, env=env)


def cli_in_process(module: str, *args: str, env: dict[str, str] | None = None,
                   ) -> subprocess.CompletedProcess:
    """``python -m flows.<module>`` (backup, restore, verify, prune) called in this process,
    as backup_in_process does for the backup."""
    import importlib

    out, err = io.StringIO(), io.StringIO()
    handler = _LogLines(err)
    logging.getLogger().addHandler(handler)
    try:
        with mock.patch.dict(os.environ, env or {}, clear=env is not None), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = importlib.import_module(f"flows.{module}").main(list(args))
            except SystemExit as done:  # argparse
                status = done.code
    finally:
        logging.getLogger().removeHandler(handler)
    return subprocess.CompletedProcess([f"flows.{module}", *args], status, out.getvalue(),
                                       err.getvalue())


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str):
    """``path`` (created) with a tmpfs mounted on it (``-o options``), unmounted afterwards:
    a file system of a chosen size, or read-only, for staging and restore targets."""
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def describe_tree(top: Path) -> dict[str, tuple]:
    """Per path under ``top``: type, mode, owner, content (hard links by first name), xattrs."""
    entries: dict[str, tuple] = {}
    inodes: dict[tuple[int, int], str] = {}
    for directory, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            path = Path(directory, name)
            rel = str(path.relative_to(top))
            st = path.lstat()
            content: object = None
            if stat.S_ISREG(st.st_mode):
                first = inodes.setdefault((st.st_dev, st.st_ino), rel)
                content = (hashlib.sha256(path.read_bytes()).hexdigest(),
                           first if first != rel else None, int(st.st_mtime))
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {
                k: os.getxattr(path, k) for k in os.listxattr(path)}
            entries[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                            st.st_gid, content, xattrs)
    return entries
