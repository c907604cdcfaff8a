"""A scratch MariaDB with the binary log on, on its own port and socket (the machine's shared
server runs without one), for the tests of shipping and replaying the log.

It can be stopped and started again on the same data (a restart between two nightlies), or
wiped and installed anew (a reinstalled server). Everything lives under one directory that
:meth:`BinlogServer.remove` deletes; the test fixture calls it whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import free_port

from undercloud_backup.db import scratch

BACKUP_GRANTS = ("SELECT, SHOW VIEW, TRIGGER, LOCK TABLES, EVENT, RELOAD, PROCESS, "
                 "SHOW DATABASES, BINLOG MONITOR, REPLICATION SLAVE")
USER = "ucbbinlog"


class BinlogServer:
    def __init__(self, server_id: int = 9, binlog_format: str = "ROW",
                 log_bin: bool = True) -> None:
        self.log_bin = log_bin
        self.top = Path(tempfile.mkdtemp(prefix="ucb-binlog-server-", dir="/var/tmp"))
        self.top.chmod(0o755)
        self.server_id, self.binlog_format = server_id, binlog_format
        self.port = free_port()
        self.socket = str(self.top / "mysqld.sock")
        self.password = secrets.token_hex(12)
        self.process: subprocess.Popen | None = None
        self.cnf = self.top / "backup.cnf"

    # ------------------------------------------------------------------ lifecycle
    def _own(self, *paths: Path) -> None:
        account = pwd.getpwnam("mysql")
        for path in paths:
            os.chown(path, account.pw_uid, account.pw_gid)

    def install(self) -> None:
        self._own(self.top)  # the server writes its socket, pid file and error log here
        for sub in ("data", "tmp", "files"):
            shutil.rmtree(self.top / sub, ignore_errors=True)
            (self.top / sub).mkdir(mode=0o700)
            self._own(self.top / sub)
        subprocess.run(scratch.install_command(str(self.top / "data"), "mysql").argv,
                       check=True, capture_output=True, timeout=120)

    def start(self, *extra: str) -> None:
        argv = list(scratch.server_command(str(self.top), self.port, "mysql").argv)
        if self.log_bin:
            argv = [a for a in argv if a != "--skip-log-bin"]
            argv += [f"--log-bin={self.top / 'data' / 'binlog'}",
                     f"--binlog-format={self.binlog_format}", f"--server-id={self.server_id}"]
        argv += extra
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mariadbd exited: {self.error_log()}")
            probe = subprocess.run(["mariadb", "--no-defaults", f"--socket={self.socket}",
                                    "-e", "SELECT 1"], capture_output=True)
            if probe.returncode == 0:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"mariadbd did not start: {self.error_log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.top, ignore_errors=True)

    def error_log(self) -> str:
        try:
            return (self.top / "error.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "no error log"

    # ------------------------------------------------------------------ use
    def sql(self, text: str) -> str:
        """Run SQL as root over the socket; tab-separated output, no column names."""
        run = subprocess.run(["mariadb", "--no-defaults", f"--socket={self.socket}", "--batch",
                              "--skip-column-names"], input=text, capture_output=True,
                             text=True, timeout=120)
        if run.returncode != 0:
            raise RuntimeError(run.stderr)
        return run.stdout

    def create_backup_user(self, grants: str = BACKUP_GRANTS) -> str:
        self.sql(f"CREATE OR REPLACE USER '{USER}'@'127.0.0.1' IDENTIFIED BY "
                 f"'{self.password}'; GRANT {grants} ON *.* TO '{USER}'@'127.0.0.1';")
        self.cnf.write_text(f"[client]\nhost=127.0.0.1\nport={self.port}\nuser={USER}\n"
                            f"password={self.password}\n")
        self.cnf.chmod(0o600)
        return str(self.cnf)

    def counts(self, *tables: str) -> dict[str, int]:
        return {t: int(self.sql(f"SELECT COUNT(*) FROM {t}").strip()) for t in tables}


def sample_database(prefix: str, source: BinlogServer, *others: BinlogServer):
    """A database of a test's own on ``source`` (1000 rows in ``t``), dropped on ``source``
    and ``others`` afterwards (restores put it there)."""
    name = f"{prefix}_{os.urandom(3).hex()}"
    source.sql(f"CREATE DATABASE {name}; CREATE TABLE {name}.t (id INT PRIMARY KEY, "
               f"v VARCHAR(32)) ENGINE=InnoDB; INSERT INTO {name}.t SELECT seq, "
               f"CONCAT('row-', seq) FROM {name}.seq_1_to_1000;")
    yield name
    for server in (source, *others):
        with contextlib.suppress(RuntimeError):
            server.sql(f"DROP DATABASE IF EXISTS {name}")


def running(server: BinlogServer, backup_user: bool = True):
    """``server`` installed and started (with the backup account unless ``backup_user`` is
    False: root alone, by its socket); removed afterwards."""
    try:
        server.install()
        server.start()
        if backup_user:
            server.create_backup_user()
        yield server
    finally:
        server.remove()
