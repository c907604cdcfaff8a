"""The binary log shipped by the unprivileged worker (``--privileged``): through real sudo, the
shipped sudoers file and the installed ``ucb-mariadb binlog`` actions, against a scratch MariaDB
with the log on (the wrapper pointed at its socket by the policy's ``socket =`` line, as the
dump's tests point it), restored by root; and what the worker cannot make root read with them.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from binlog_server import BinlogServer, running, sample_database
from conftest import remove_container, swift_store
from deploy_helpers import (
    REPO,
    VENV,
    WORKER,
    as_user,
    grant_traverse,
    machine_lock,
    privileged_install,
    remove_tree,
    revoke_traverse,
    scratch_dir,
)
from test_binlog import restore
from test_sudo import MARIADB, PYTHON, load_wrapper, sudo

from undercloud_backup.db import binlog, privileged
from undercloud_backup.db import dump as dbdump
from undercloud_backup.store import catalogue

DB = "ucb_binlog_sudo"
SUDO_NO = "sudo: a password is required"


@pytest.fixture(scope="module")
def source(services):
    """The server backed up: binary log on; root by its unix socket, as on an undercloud."""
    yield from running(BinlogServer(server_id=11), backup_user=False)


@pytest.fixture(scope="module")
def target(services):
    yield from running(BinlogServer(log_bin=False), backup_user=False)


@pytest.fixture(scope="module")
def installed(source):
    """install.sh's sudoers file, wrappers and policy, the policy's socket the source's."""
    with machine_lock():
        state = scratch_dir("ucb-worker-state-")
        home = scratch_dir("ucb-worker-home-")
        try:
            with privileged_install(state, [], socket=source.socket):
                uid = pwd.getpwnam(WORKER).pw_uid
                for path in (home, home / "staging", home / "prefect"):
                    path.mkdir(exist_ok=True)
                    os.chown(path, uid, -1)
                granted = grant_traverse(WORKER, [REPO, VENV])
                try:
                    yield home
                finally:
                    revoke_traverse(WORKER, granted)
        finally:
            remove_tree(home)
            remove_tree(state)


@pytest.fixture
def database(source, target):
    yield from sample_database(DB, source, target)


@pytest.fixture
def worker_container(os_env):
    name = f"ucbtest-{uuid.uuid4().hex[:10]}"
    yield name
    remove_container(name)


def worker_backup(home: Path, container: str, *args: str) -> dict:
    """``python -m flows.backup --privileged --db-only`` as the worker user."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("OS_", "PREFECT_API_URL"))}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(home / "prefect"))
    started = time.monotonic()
    result = as_user(WORKER, [PYTHON, "-m", "flows.backup", "--privileged", "--db-only",
                              "--staging-dir", str(home / "staging"), "--task-retries", "0",
                              "--no-prune", "--container", container, "--json", *args],
                     env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    summary["stderr"], summary["seconds"] = result.stderr, time.monotonic() - started
    return summary


def root_temp_dirs() -> set[str]:
    """The wrapper's own directories for a log being read (not the scratch servers')."""
    return {p for p in os.listdir("/var/tmp")
            if p.startswith("ucb-binlog-") and not p.startswith("ucb-binlog-server-")}


# ------------------------------------------------------------------------- the files shipped
@pytest.mark.unit
def test_the_wrapper_parses_what_the_library_sends_and_dumps_as_the_library_would():
    mariadb = load_wrapper("ucb-mariadb")
    wrapped = binlog.with_master_data(privileged.dump_command(("nova", "keystone"))).argv
    assert wrapped[:4] == ("sudo", "-n", MARIADB, "dump")
    options, databases = mariadb.options_from(list(wrapped[4:]), ("--lock-wait",
                                                                  "--master-data"))
    assert options["master_data"] is True and databases == ["nova", "keystone"]
    # the same dump as the direct connection's with the coordinates, as root over the socket
    direct = binlog.with_master_data(dbdump.dump_command(("nova", "keystone"), options_fd=9))
    got = [a for a in mariadb.dump_argv("mariadb-dump", databases, master_data=True)
           if not a.startswith("--socket=")]  # the policy's, where one is installed
    assert got[3:] == [a for a in direct.argv[1:] if not a.startswith("--defaults-extra")]
    assert mariadb.MASTER_DATA == binlog.MASTER_DATA
    read = privileged.binlog_read_command("binlog.000007").argv
    assert read == ("sudo", "-n", MARIADB, "binlog", "read", "binlog.000007")
    assert mariadb.LOG_NAME_RE.fullmatch("binlog.000007")


# ------------------------------------------------------------------------ what it is for
def test_the_worker_ships_the_binary_log_through_sudo_and_root_restores_it(
        source, target, installed, database, worker_container):
    before = root_temp_dirs()
    full = worker_backup(installed, worker_container)
    assert full["database_kind"] == "dump", full["stderr"][-2000:]
    dumped = catalogue.get_manifest(swift_store(), worker_container, full["backup_id"]).mariadb
    assert dumped.end["file"].startswith("binlog.") and dumped.end["gtid"].startswith("0-11-")
    assert dumped.end["position"] < 1024, dumped.end  # the dump opened a fresh log file

    source.sql(f"INSERT INTO {database}.t SELECT seq, 'new' FROM {database}.seq_1001_to_1500; "
               f"DELETE FROM {database}.t WHERE id <= 100; "
               f"UPDATE {database}.t SET v = 'changed' WHERE id <= 200;")
    first = worker_backup(installed, worker_container)
    assert first["database_kind"] == "binlog", first["stderr"][-2000:]
    shipped = catalogue.get_manifest(swift_store(), worker_container,
                                     first["backup_id"]).mariadb
    assert shipped.parent == full["backup_id"] and shipped.start == dumped.end
    assert shipped.binlogs and {t.table: t.rows for t in shipped.databases[database]} == {
        "t": 1400}
    assert "instead of a dump" in first["stderr"]

    source.sql(f"INSERT INTO {database}.t SELECT seq, 'night 2' FROM "
               f"{database}.seq_1501_to_1600; USE {database}; CREATE TABLE later (id INT "
               f"PRIMARY KEY); INSERT INTO {database}.later VALUES (1), (2), (3);")
    second = worker_backup(installed, worker_container)
    assert second["database_kind"] == "binlog"
    nightly = catalogue.get_manifest(swift_store(), worker_container,
                                     second["backup_id"]).mariadb
    assert nightly.parent == first["backup_id"] and nightly.start == shipped.end
    shipped_bytes = sum(o["size"] for o in second["objects"])
    full_bytes = sum(o["size"] for o in full["objects"])
    print(f"full {full_bytes} B in {full['seconds']:.1f} s; nightlies "
          f"{sum(o['size'] for o in first['objects'])} B in {first['seconds']:.1f} s, "
          f"{shipped_bytes} B in {second['seconds']:.1f} s")

    done = restore(target, worker_container, "--backup-id", second["backup_id"], "--database",
                   database, "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert target.counts(f"{database}.t", f"{database}.later") == {
        f"{database}.t": 1500, f"{database}.later": 3}
    assert target.sql(f"SELECT COUNT(*) FROM {database}.t WHERE v = 'changed'").strip() == "100"
    assert root_temp_dirs() == before  # root's copies of the logs are gone


# ------------------------------------------------------------------------ hostile worker
def wrapper(*args: str, text: bool = True) -> subprocess.CompletedProcess:
    return sudo(MARIADB, "binlog", *args, text=text)


def test_the_worker_cannot_make_root_read_a_file_outside_the_servers_binlog_list(
        source, installed):
    status = wrapper("status")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["log_bin"] is True  # what install.sh asks for binlog-ship
    assert wrapper("flush").returncode == 0
    files = json.loads(wrapper("status").stdout)["files"]
    assert len(files) >= 2
    closed, current = files[0], files[-1]
    marker = f"/etc/ucb-escalated-{uuid.uuid4().hex[:8]}"
    # (argv after `ucb-mariadb binlog`, exit status, message)
    attempts = [
        (["read", "../../etc/shadow"], 64, "is not a binary-log file name"),
        (["read", "/etc/shadow"], 64, "is not a binary-log file name"),
        (["read", f"{closed}/../../../../etc/shadow"], 64, "is not a binary-log file name"),
        (["read", f"../data/{closed}"], 64, "is not a binary-log file name"),
        (["read", "shadow.1"], 77, "is not one of the server's binary logs"),
        (["read", re.sub(r"[0-9]+$", "999999", closed)], 77,
         "is not one of the server's binary logs"),
        (["read", current], 77, "is the binary log the server still writes"),
        (["read", f"--result-file={marker}", closed], 64, "usage:"),
        (["read", f"-r{marker}"], 64, "is not a binary-log file name"),
        (["read", closed, "--to-last-log"], 64, "usage:"),
        (["gtid", f"{closed}', 4) UNION SELECT 1 -- ", "4"], 64, "is not a binary-log file"),
        (["gtid", closed, "4) UNION SELECT LOAD_FILE('/etc/shadow"], 64, "usage:"),
        (["end", "mysql'; SELECT LOAD_FILE('/etc/shadow'); --"], 64,
         "is not an acceptable database name"),
        (["end", "--defaults-file=/var/tmp/evil.cnf", "mysql"], 64,
         "is not an acceptable option here"),
        (["flush", "--execute=PURGE BINARY LOGS"], 64, "usage:"),
        (["status", "--socket=/var/tmp/evil.sock"], 64, "usage:"),
    ]
    for argv, code, message in attempts:
        result = wrapper(*argv)
        assert (result.returncode, message in result.stderr, result.stdout) == (
            code, True, ""), (argv, result.stderr)
    for argv in (["dump", "--master-data=1"], ["dump", "--master-data", "--master-data"]):
        result = sudo(MARIADB, *argv)
        assert result.returncode == 64 and result.stdout == "", result.stderr
    # The caller's environment never reaches the clients (another server's socket)
    moved = sudo("MYSQL_UNIX_PORT=/var/tmp/evil.sock", MARIADB, "binlog", "status")
    assert moved.returncode == 1 and "not allowed to set" in moved.stderr
    assert not os.path.lexists(marker)
    assert json.loads(wrapper("status").stdout)["files"][:len(files)] == files  # none purged

    # A symlink of the worker's named like the log, where the worker calls from: root never
    # opens the name, it reads the log over the protocol, byte for byte as the server has it.
    datadir = source.top / "data"
    assert as_user(WORKER, ["ls", str(datadir)]).returncode != 0  # the worker can't see it
    own = scratch_dir("ucb-worker-links-")
    try:
        os.chown(own, pwd.getpwnam(WORKER).pw_uid, -1)
        assert as_user(WORKER, ["ln", "-s", "/etc/shadow", str(own / closed)]).returncode == 0
        read = as_user(WORKER, ["sh", "-c", f'cd "$1" && exec sudo -n {MARIADB} binlog read '
                                f'"$2"', "sh", str(own), closed], text=False)
        assert read.returncode == 0, read.stderr
        assert read.stdout == (datadir / closed).read_bytes()
        assert read.stdout.startswith(b"\xfebin") and b"root:" not in read.stdout
    finally:
        remove_tree(own)
