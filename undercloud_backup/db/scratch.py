"""A throwaway MariaDB server: its own datadir, unix socket and loopback port, removed afterwards.

Verification loads a backup's dump into one of these to prove the dump restores. The server is
initialised with ``mariadb-install-db`` (about a second), started with settings that favour a
bulk load over durability, and reached as the OS user through ``unix_socket`` authentication,
so no password exists anywhere. Events are off, so nothing in the dump runs on its own between
the load and the comparison.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pymysql

from undercloud_backup.core.errors import BackupError
from undercloud_backup.core.execute import Command, Pipeline, run
from undercloud_backup.db.dumpstream import sandboxed
from undercloud_backup.files import confine

START_TIMEOUT_S = 60.0
# The pool a throwaway server starts with; a load of more data asks for more (``options``,
# :func:`undercloud_backup.db.bufferpool.scratch_pool_size`).
BUFFER_POOL = 256 << 20
INSTALL_TIMEOUT_S = 120.0


class ScratchDatabaseFailed(BackupError):
    """The throwaway MariaDB used for the test restore did not work: {reason}"""

    exit_code = 42


def _tool(*names: str) -> str:
    for name in names:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
        if path:
            return path
    raise ScratchDatabaseFailed(reason=f"none of {', '.join(names)} is installed "
                                       "(install mariadb-server)")


def _server_user() -> str | None:
    """Who the server runs as: ``mysql`` when we are root (mariadbd refuses plain root)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("mysql")
    except KeyError:
        return "root"
    return "mysql"


def os_user() -> str:
    """unix_socket authentication maps the connecting OS user to the MariaDB user."""
    return pwd.getpwuid(os.geteuid()).pw_name


def install_command(datadir: str, user: str | None) -> Command:
    """Initialise ``datadir``, with the server's own ``tmp`` beside it: a bootstrapping
    server deletes every ``#sql*`` file of its tmpdir as it starts, so with the default /tmp
    it would take the temporary tables of any other MariaDB using /tmp at that moment (two
    scratch servers made at once failed with "Unknown table 'mysql.tmp_proxies_priv'")."""
    tmpdir = os.path.join(os.path.dirname(datadir), "tmp")
    argv = [_tool("mariadb-install-db", "mysql_install_db"), "--no-defaults",
            f"--datadir={datadir}", "--auth-root-authentication-method=socket",
            "--skip-test-db", "--skip-name-resolve", f"--tmpdir={tmpdir}"]
    if user:
        argv.append(f"--user={user}")
    else:  # not root: the second unix_socket account is us
        argv.append(f"--auth-root-socket-user={os_user()}")
    return Command(argv=tuple(argv), name="mariadb-install-db")


def server_command(directory: str, port: int, user: str | None,
                   options: Sequence[str] = ()) -> Command:
    """mariadbd on loopback only, tuned for one bulk load of data that may be thrown away;
    ``options`` last (they win), e.g. a target's ``--max-allowed-packet=16M``."""
    top = Path(directory)
    argv = [
        _tool("mariadbd", "mysqld"), "--no-defaults",
        f"--datadir={top / 'data'}", f"--socket={top / 'mysqld.sock'}",
        f"--port={port}", "--bind-address=127.0.0.1", f"--pid-file={top / 'mysqld.pid'}",
        f"--log-error={top / 'error.log'}", f"--tmpdir={top / 'tmp'}",
        f"--secure-file-priv={top / 'files'}", "--skip-name-resolve",
        "--event-scheduler=OFF", "--skip-log-bin", "--max-allowed-packet=1G",
        f"--innodb-buffer-pool-size={BUFFER_POOL}", "--innodb-flush-log-at-trx-commit=0",
        "--innodb-doublewrite=0", "--wait-timeout=86400",
    ]
    if user:
        argv.append(f"--user={user}")
    argv += options
    return Command(argv=tuple(argv), name="mariadbd (scratch)")


@dataclass
class ScratchServer:
    """A running throwaway server and an administrative session opened before any load.

    The session stays valid whatever the loaded dump does to accounts (a dump may change
    root's authentication), so it is the one to query after a load.
    """

    directory: str
    socket: str
    port: int
    session: pymysql.connections.Connection

    def client_command(self, *extra: str) -> Command:
        """``mariadb --sandbox`` connected to this server only: no option file is read, and
        no ``\\!``/``system`` line of what it loads runs (a dump may have been planted)."""
        return Command(argv=sandboxed((_tool("mariadb", "mysql"), "--no-defaults",
                                       f"--socket={self.socket}", f"--user={os_user()}",
                                       "--batch", "--max-allowed-packet=1G", *extra)),
                       name="mariadb (scratch)")

    @property
    def where(self) -> str:
        return f"scratch MariaDB at {self.socket}"

    def error_log_tail(self, lines: int = 5) -> str:
        return _tail(Path(self.directory) / "error.log", lines)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "no error log"
    useful = [line for line in text if "[ERROR]" in line] or text
    return " | ".join(useful[-lines:]) or "empty error log"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _prepare(base_dir: str, user: str | None) -> str:
    """The server's own new directory in ``base_dir``, made exclusively under a random name.
    ``base_dir`` is reached only through names no other user can change (a link planted as
    ``--staging-dir``, or another user's directory, is refused: exit 65), so nobody can
    rename or replace what is made in it while root uses it."""
    base = confine.secure_staging(base_dir, create=True)
    if user and user != "root" and not _enterable(base, user):
        raise ScratchDatabaseFailed(
            reason=f"its user {user} cannot enter the staging directory {base_dir} (every "
                   "directory on the way must let it search): give a --staging-dir it can "
                   "reach, such as /var/tmp")
    directory = tempfile.mkdtemp(prefix="undercloud-verify-db-", dir=base)
    for sub in ("tmp", "files"):
        os.mkdir(os.path.join(directory, sub), 0o700)
    if user and user != "root":
        account = pwd.getpwnam(user)
        for path in (directory, *(os.path.join(directory, s) for s in ("tmp", "files"))):
            os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)
    return directory


def _enterable(directory: str, user: str) -> bool:
    """``user`` can search ``directory`` and every directory above it (the kernel's answer,
    ACLs included: ``test -x`` run as that user)."""
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
                           "--init-groups", "--", "test", "-x", directory],
                          stdin=subprocess.DEVNULL, capture_output=True).returncode == 0


def _wait_ready(pipe: Pipeline, sock: str, deadline: float) -> pymysql.connections.Connection:
    last = "it did not create its socket"
    while time.monotonic() < deadline:
        if pipe.processes[0].poll() is not None:
            raise ScratchDatabaseFailed(reason=f"mariadbd exited with status "
                                               f"{pipe.processes[0].returncode}")
        if os.path.exists(sock):
            try:
                return pymysql.connect(unix_socket=sock, user=os_user(), connect_timeout=5,
                                       charset="utf8mb4", autocommit=True)
            except pymysql.err.MySQLError as error:
                last = str(error)
        time.sleep(0.1)
    raise ScratchDatabaseFailed(reason=f"not ready after {START_TIMEOUT_S:.0f} s ({last})")


@contextmanager
def scratch_mariadb(base_dir: str, *, lifetime_s: float,
                    options: Sequence[str] = ()) -> Iterator[ScratchServer]:
    """Initialise and start a throwaway server under ``base_dir``; stop and delete it after.

    ``lifetime_s`` bounds how long the server may live: it is killed with its process group
    after that, whatever happens to the caller. ``options``: more mariadbd options.
    """
    user = _server_user()
    directory = _prepare(base_dir, user)
    try:
        try:
            run(install_command(os.path.join(directory, "data"), user),
                timeout=INSTALL_TIMEOUT_S)
        except BackupError as error:
            raise ScratchDatabaseFailed(reason=str(error)) from None
        sock = os.path.join(directory, "mysqld.sock")
        for attempt in range(3):  # a free port can be taken between probe and bind
            port = _free_port()
            with Pipeline([server_command(directory, port, user, options)],
                          timeout=lifetime_s,
                          stdout=subprocess.DEVNULL) as pipe:
                try:
                    session = _wait_ready(pipe, sock, time.monotonic() + START_TIMEOUT_S)
                except ScratchDatabaseFailed as error:
                    pipe.kill()
                    log = _tail(Path(directory) / "error.log", 5)
                    if "Address already in use" in log and attempt < 2:
                        continue
                    raise ScratchDatabaseFailed(reason=f"{error.fields['reason']}: {log}") \
                        from None
                try:
                    yield ScratchServer(directory=directory, socket=sock, port=port,
                                        session=session)
                finally:
                    session.close()
                    pipe.kill()  # SIGTERM: mariadbd shuts down cleanly within the grace
                return
    finally:
        shutil.rmtree(directory, ignore_errors=True)
