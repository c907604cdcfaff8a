"""A failed run names its real cause: the stage that failed first and why, never a warning of
another stage, on one readable line; what tar only warns about costs no night.

The unit tests run the real tar and real pipes; the others a backup against the real MariaDB
and Swift, faults injected by tests/swift_proxy.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import backup_in_process, mounted_tmpfs

from undercloud_backup.backup.stages import judge_tar
from undercloud_backup.core.errors import ArchiveFailed, PathNotFound
from undercloud_backup.core.execute import Command, Pipeline
from undercloud_backup.files import archive


def _tar_over(root: Path, *members: str) -> tuple[int | None, archive.TarReport]:
    """The real tar over ``members`` of ``root``, as the backup runs it; its status and report."""
    plan = archive.PathPlan(root=str(root), included=members, absent=(), excluded=())
    report = archive.TarReport()
    with Pipeline([archive.tar_command(plan)], timeout=60, stdout=subprocess.DEVNULL,
                  on_stderr={0: report.add}) as pipe:
        results = pipe.wait()
    return results[0].status, report


@pytest.mark.unit
def test_a_socket_tar_warns_about_does_not_fail_a_run_tar_ends_with_status_2(tmp_path):
    """tar exits 2 for a path that vanished before it was read; the socket it only warned
    about must not become the run's error ("The filesystem archive failed (tar: tar:
    etc/app.sock: socket ignored)", exit 23, before)."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/hosts").write_text("127.0.0.1 localhost\n")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "etc/app.sock"))
        status, report = _tar_over(tmp_path, "etc", "gone-before-tar-read-it")
    assert status == 2
    assert report.other == ["tar: etc/app.sock: socket ignored"]
    assert report.vanished == ["gone-before-tar-read-it"]
    for allow_unreadable in (True, False):
        judge_tar(status, report, allow_unreadable)  # no error: the archive is whole


@pytest.mark.unit
def test_tar_s_own_failure_is_named_with_one_tar_prefix():
    report = archive.TarReport()
    for line in ("tar: etc/app.sock: socket ignored", "tar: -: Cannot write: Broken pipe",
                 "tar: Error is not recoverable: exiting now"):
        report.add(line)
    with pytest.raises(ArchiveFailed) as failed:
        judge_tar(2, report, allow_unreadable=True)
    message = str(failed.value)
    assert "tar: -: Cannot write: Broken pipe" in message
    assert "tar: tar:" not in message and "socket" not in message


@pytest.mark.unit
def test_a_pipe_names_the_stage_that_failed_not_the_one_that_lost_its_reader():
    """``producer | consumer``: the consumer refuses and exits; the producer then dies of
    SIGPIPE. The line names the consumer and what it said."""
    refuse = Command(argv=("sh", "-c", "echo 'age: error: no recipients' >&2; exit 1"),
                     name="age")
    with Pipeline([Command(argv=("yes",), name="yes"), refuse], timeout=30,
                  stdout=subprocess.DEVNULL) as pipe:
        with pytest.raises(Exception) as failed:
            pipe.wait()
    assert str(failed.value) == "age failed (exit status 1): age: error: no recipients"


@pytest.mark.unit
def test_an_error_about_a_path_longer_than_path_max_stays_one_readable_line():
    path = "/" + "/".join(["d" * 250] * 50)  # 12,550 characters, beyond PATH_MAX
    line = str(PathNotFound(path=path, root="/"))
    assert len(line) < 2200 and "\n" not in line  # twice the path: each at most 1,000
    assert "12,550 characters" in line  # says how long it was
    assert line.startswith("Path /ddd") and "--add-path /ddd" in line


@pytest.mark.unit
def test_tar_complaints_about_thousands_of_files_name_a_few_and_count_the_rest():
    report = archive.TarReport()
    for n in range(5000):
        report.add(f"tar: srv/node/{'x' * 2000}{n}: Cannot mknod: Operation not permitted")
    with pytest.raises(ArchiveFailed) as failed:
        judge_tar(2, report, allow_unreadable=False)
    line = str(failed.value)
    assert len(line) < 1000 and line.count("srv/node/") == 3
    assert "and 4,997 more" in line


def _socket_tree(root: Path) -> socket.socket:
    (root / "etc").mkdir(parents=True)
    (root / "etc/big").write_bytes(os.urandom(3 << 20))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "etc/app.sock"))
    return sock


def test_the_stream_that_failed_first_is_the_one_named(os_env, db_cnf, tmp_path, container,
                                                       swift_proxy):
    """Swift refuses the archive's upload (401) at once; the dump's stream fails seconds later
    (403 on its check). The line names the archive's 401, not the dump's later failure and not
    tar's warning about a socket."""
    swift_proxy.fail(401, times=None, method="PUT", path="filesystem.tar.zst")
    swift_proxy.stall(seconds=3, times=1, method="PUT", path="mariadb-all-databases")
    swift_proxy.fail(403, times=None, method="HEAD", path="mariadb-all-databases")
    with _socket_tree(tmp_path / "root"):
        result = backup_in_process(
            "--root", str(tmp_path / "root"), "--container", container,
            "--db-defaults-file", db_cnf, "--segment-size", "1MiB", "--task-retries", "0",
            # a 401 is ridden out as a short auth outage within the budget: 1 s of it here,
            # so the archive has failed well before the dump's 403
            "--swift-retry-budget", "1",
            "--no-prune", env=dict(os.environ, OS_STORAGE_URL=swift_proxy.account_url))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 30, result.stderr[-3000:]  # credentials refused past the budget
    assert "filesystem.tar.zst" in last and "HTTP 401" in last, last
    assert "socket" not in last and "403" not in last


def _engine_run(parameters: dict) -> tuple[object, list]:
    """A flow run made on the server and run by ``python -m prefect.engine``, as a worker runs
    a deployment's; its final state and its logs."""
    import sys
    import time

    from conftest import REPO
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.backup import undercloud_backup

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(undercloud_backup, parameters=parameters)
        engine = subprocess.run(
            [sys.executable, "-m", "prefect.engine", str(run.id)], cwd=REPO,
            env=dict(os.environ, PREFECT__FLOW_ENTRYPOINT="flows/backup.py:undercloud_backup"),
            capture_output=True, text=True, timeout=120)
        assert "Finished in state Failed" in engine.stderr, engine.stderr[-2000:]
        state = client.read_flow_run(run.id).state
        deadline = time.monotonic() + 10
        while True:  # its last lines reach the server a moment after its state
            logs = client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            if any("Finished in state" in log.message for log in logs) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.3)
    return state, logs


def test_a_failed_run_s_cause_is_its_error_line_and_its_state_message(os_env, db_cnf,
                                                                        tmp_path):
    """In the UI, filtered by level, a failed run shows why: the cause at ERROR (before:
    INFO, and the only ERROR line Prefect's "Engine execution exited with unexpected
    exception"), and the state's message is that line."""
    (tmp_path / "etc").mkdir()
    state, logs = _engine_run({"what": {"root": str(tmp_path), "add_paths": ["/not/there"]},
                               "database": {"db_defaults_file": db_cnf}})
    cause = (f"Path /not/there does not exist under root {tmp_path}: fix or drop add_paths "
             "/not/there.")
    assert state.type.value == "FAILED" and state.message == cause
    errors = [log.message for log in logs if log.level >= 40]
    assert errors == [cause], errors


@pytest.mark.unit
def test_a_locked_table_fails_the_run_within_one_bound_not_once_per_retry():
    """Each session waits LOCK_WAIT_S (60 s) for a locked table; the stage's retries (two by
    default, after 10 and 20 s) made that 228 s. The wait is the retry: the stage is not tried
    again after it, nor after the server's own lock_wait_timeout (1205) ended the wait."""
    from prefect.states import Failed

    from tasks.backup import transient
    from undercloud_backup.db.preflight import DatabaseLocked, DumpLockTimeout

    waited = DatabaseLocked(table="`nova`.`instances`", where="localhost", holder="id 7",
                            waited=60)
    assert waited.exit_code == 26
    assert transient(None, None, Failed(data=waited)) is False
    by_server = DumpLockTimeout(table="`nova`.`instances`", where="localhost", waited=60,
                                holder="mariadb-dump said: Lock wait timeout exceeded (1205)")
    assert transient(None, None, Failed(data=by_server)) is False


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory on a read-only file system (a tmpfs mounted ro), unmounted afterwards."""
    with mounted_tmpfs(tmp_path / "ro-staging", "ro,size=512m,mode=0755") as path:
        yield path


def test_a_read_only_staging_directory_has_its_own_line_and_status(
        os_env, db_cnf, tmp_path, container, read_only_dir):
    """Before: exit 1, "OSError: [Errno 30] Read-only file system", after the dump had
    begun. Now: exit 15 before anything is written, naming the directory and why."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/hosts").write_text("127.0.0.1 localhost\n")
    result = backup_in_process("--root", str(tmp_path), "--container", container,
                               "--db-defaults-file", db_cnf, "--staging-dir",
                               str(read_only_dir), "--no-prune")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 15, result.stderr[-3000:]
    assert last == (f"undercloud-backup: error: The staging directory {read_only_dir} cannot "
                    "be written (Read-only file system): segments are spooled there on their "
                    "way to Swift; make it writable by the user the backup runs as, or choose "
                    "another --staging-dir.")
    assert "Traceback" not in result.stderr and "dumping" not in result.stderr


def test_a_container_deleted_mid_run_has_its_own_line_and_status(os_env, db_cnf, tmp_path,
                                                                 container, swift_proxy):
    """The segments container is deleted (for real, in Swift) while the archive's first
    segment is on its way; Swift answers that PUT with 404. Before: a bare "HTTP 404 Not
    Found" (exit 32). Now: exit 35, saying the container was deleted and what to do."""
    import threading
    import time

    from conftest import swift_store

    segments = f"{container}_segments"
    swift_proxy.stall(seconds=3, times=1, method="PUT", path=f"{segments}/")

    def delete_once_the_upload_waits() -> None:
        deadline = time.monotonic() + 60
        while swift_proxy.count(method="PUT", path=f"{segments}/") == 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        swift_store().delete_container(segments)

    deleter = threading.Thread(target=delete_once_the_upload_waits, daemon=True)
    deleter.start()
    with _socket_tree(tmp_path / "root"):
        result = backup_in_process(
            "--root", str(tmp_path / "root"), "--container", container,
            "--db-defaults-file", db_cnf, "--segment-size", "1MiB", "--task-retries", "0",
            "--no-prune", env=dict(os.environ, OS_STORAGE_URL=swift_proxy.account_url))
    deleter.join(5)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 35, result.stderr[-3000:]
    assert last.startswith(f"undercloud-backup: error: Swift container {segments} was "
                           "deleted while the backup ran (HTTP 404 to PUT segment"), last
    assert "run the backup again" in last


def test_a_table_dropped_while_its_rows_are_counted_is_recorded_as_vanished(services):
    """The row-count reader lists the tables, then counts each; one dropped in between (held
    here with LOCK TABLES ... WRITE, then dropped by its holder while the reader waits) made
    the run fail with ProgrammingError 1146. Now it is recorded as vanished."""
    import threading
    import time
    import uuid

    import pymysql

    from undercloud_backup.backup.stages import table_records
    from undercloud_backup.db import connection

    schema = f"ucb_vanish_{uuid.uuid4().hex[:8]}"
    holder = pymysql.connect(unix_socket="/run/mysqld/mysqld.sock", user="root",
                             autocommit=True)
    try:
        with holder.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {schema}")
            cursor.execute(f"CREATE TABLE {schema}.a (id INT) ENGINE=InnoDB")
            cursor.execute(f"INSERT INTO {schema}.a VALUES (1), (2)")
            cursor.execute(f"CREATE TABLE {schema}.b (id INT) ENGINE=InnoDB")
            cursor.execute(f"LOCK TABLES {schema}.b WRITE")
        found: list = []
        reader = pymysql.connect(unix_socket="/run/mysqld/mysqld.sock", user="root")
        counting = threading.Thread(target=lambda: found.append(
            connection.table_stats(reader, (schema,), checksums=True)))
        counting.start()
        with holder.cursor() as cursor:
            waiting_for_lock(cursor, schema, time.monotonic() + 30)  # the reader, for b's
            cursor.execute(f"DROP TABLE {schema}.b")
            cursor.execute("UNLOCK TABLES")
        counting.join(30)
        reader.close()
        assert found, "the reader failed (see the thread's exception above)"
        tables, vanished = table_records([schema], found[0])
        assert [(t.table, t.rows) for t in tables[schema]] == [("a", 2)]
        assert vanished == [f"{schema}.b"]
    finally:
        with holder.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {schema}")
        holder.close()


def waiting_for_lock(cursor, schema: str, deadline: float, user: str | None = None) -> None:
    """Until a session (of ``user``'s) waits for a table lock in ``schema``."""
    who = f"user = '{user}' AND " if user else ""
    while time.monotonic() < deadline:
        cursor.execute(f"SELECT COUNT(*) FROM information_schema.processlist WHERE {who}"
                       "state LIKE 'Waiting for table metadata lock' AND info LIKE "
                       f"'%{schema}%'")
        if cursor.fetchone()[0]:
            return
        time.sleep(0.05)
    raise AssertionError(f"no session waited for a table lock in {schema}")


def broken_view_left_out_by_name(schema: str, container: str, mariadb: Callable[[str], str],
                                 backup: Callable[..., subprocess.CompletedProcess]) -> None:
    """The broken view's scenario, for a direct and a privileged run alike: ``backup(*args)``
    runs a database-only backup to ``container`` of the server ``mariadb(sql)`` talks to;
    ``schema`` is made here (the caller drops it)."""
    import json

    from conftest import swift_store

    mariadb(f"CREATE DATABASE {schema}; CREATE TABLE {schema}.t (id INT); "
            f"INSERT INTO {schema}.t VALUES (1); CREATE TABLE {schema}.kept (id INT); "
            f"CREATE VIEW {schema}.v AS SELECT id FROM {schema}.t; DROP TABLE {schema}.t;")
    failed = backup()
    assert failed.returncode == 22, failed.stderr[-2000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert f"`{schema}`.`v`" in last or f"{schema}.v" in last, last
    typo = backup("--exclude-table", f"{schema}.nope")
    assert typo.returncode == 2, typo.stderr[-2000:]
    assert typo.stderr.strip().splitlines()[-1].endswith(
        f"--exclude-table {schema}.nope: no such table or view on the server")
    result = backup("--exclude-table", f"{schema}.v", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"left out of the database dump (exclude_tables): {schema}.v (view)" in \
        result.stderr
    manifest = json.loads(swift_store().get_bytes(container,
                                                  json.loads(result.stdout)["manifest"]))
    assert manifest["mariadb"]["excluded_tables"] == [f"{schema}.v"]
    assert manifest["mariadb"]["schema_objects"][schema]["views"] == 0
    assert [t["table"] for t in manifest["mariadb"]["databases"][schema]["tables"]] == \
        ["kept"]


def test_a_broken_view_can_be_left_out_by_name_and_the_run_says_so(os_env, db_cnf, container):
    """A view whose table was dropped fails the dump (mariadb-dump: the view references
    invalid tables); --exclude-table DB.VIEW leaves it out, the log says so and the manifest
    records it. A name the server does not know is refused before anything is written."""
    import uuid

    from conftest import mariadb

    schema = f"ucb_broken_{uuid.uuid4().hex[:8]}"
    common = ("--container", container, "--db-defaults-file", db_cnf, "--db-only",
              "--no-prune", "--task-retries", "0")
    try:
        broken_view_left_out_by_name(schema, container, mariadb,
                                     lambda *args: backup_in_process(*common, *args))
    finally:
        mariadb(f"DROP DATABASE IF EXISTS {schema}")
