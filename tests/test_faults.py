"""Bad input and faults, against the real services.

Each case: a one-line error naming what failed and what to do, a non-zero exit status, no
manifest, the earlier backup untouched and still the latest complete one, nothing left in the
staging directory, and no password in the output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pymysql
import pytest
from conftest import PYTHON, REPO, backup_cli, backup_in_process, mariadb

from undercloud_backup import config
from undercloud_backup.core.errors import NotFound
from undercloud_backup.store import catalogue
from undercloud_backup.store.connection import SwiftStore

DB_PASSWORD = "backuppass"  # the dev test bed's `backup` user (deployments/dev/services.sh)


class Earlier:
    def __init__(self, container: str, root: Path, summary: dict, manifest: bytes) -> None:
        self.container, self.root, self.summary, self.manifest = container, root, summary, manifest


def _store() -> SwiftStore:
    return SwiftStore.connect(config.swift_settings_from_env(retries=1))


def _objects(container: str) -> dict[str, str]:
    store = _store()
    found = {}
    for c in (container, f"{container}_segments"):
        try:
            listing = store.list(c)
        except NotFound:  # not created yet
            continue
        found.update({f"{c}/{o['name']}": o["hash"] for o in listing})
    return found


@pytest.fixture(scope="module")
def earlier(os_env, db_cnf, tmp_path_factory):
    """One good backup that every failing run must leave alone."""
    container = f"ucbfault-{uuid.uuid4().hex[:10]}"
    root = tmp_path_factory.mktemp("small-undercloud")
    (root / "etc").mkdir()
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (root / "home/stack").mkdir(parents=True)
    (root / "home/stack/stackrc").write_text("export OS_CLOUD=undercloud\n")
    # In this process: a backup to fail beside, not a test of the CLI's process.
    result = backup_in_process("--root", str(root), "--container", container,
                               "--db-defaults-file", db_cnf, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    manifest = _store().get_bytes(container, summary["manifest"])
    yield Earlier(container, root, summary, manifest)
    store = _store()
    for name in _objects(container):
        c, _, obj = name.partition("/")
        store.delete(c, obj)
    for c in (container, f"{container}_segments"):
        try:
            store.delete_container(c)
        except Exception:  # noqa: BLE001
            pass


@pytest.fixture
def staging(tmp_path) -> Path:
    path = tmp_path / "staging"
    path.mkdir()
    return path


def assert_failed_cleanly(result, earlier: Earlier, staging: Path, before: dict[str, str], *,
                          exit_code: int, says: str, allow_orphans: bool = False) -> None:
    assert result.returncode == exit_code, result.stderr
    assert result.stdout == ""
    error_lines = [ln for ln in result.stderr.splitlines() if "undercloud-backup: error" in ln]
    assert len(error_lines) == 1, result.stderr
    assert says in error_lines[0]
    assert DB_PASSWORD not in result.stderr
    listing = backup_in_process("--list", "--json", "--container", earlier.container)
    backups = json.loads(listing.stdout)["backups"]
    assert [b["backup_id"] for b in backups] == [earlier.summary["backup_id"]]
    assert _store().get_bytes(earlier.container, earlier.summary["manifest"]) == earlier.manifest
    after = _objects(earlier.container)
    for name, etag in before.items():
        assert after.get(name) == etag, f"{name} of the earlier backup changed"
    if not allow_orphans:
        assert set(after) == set(before), f"left behind: {set(after) - set(before)}"
    assert list(staging.iterdir()) == []


def forget(earlier: Earlier, backup_id: str) -> None:
    """Un-commit a backup a test made, so the earlier one stays the latest complete one."""
    _store().delete(earlier.container, catalogue.manifest_name(backup_id))


def run_backup(earlier: Earlier, staging: Path, *args: str, env: dict | None = None):
    return backup_cli("--root", str(earlier.root), "--container", earlier.container,
                      "--staging-dir", str(staging), "--task-retries", "0", "--swift-retries",
                      "1", *args, env=env)


def test_wrong_database_password(earlier, staging, tmp_path):
    before = _objects(earlier.container)
    cnf = tmp_path / "wrong.cnf"
    cnf.write_text("[client]\nhost=127.0.0.1\nuser=backup\npassword=Wrong-Pass-42\n")
    result = run_backup(earlier, staging, "--db-defaults-file", str(cnf))
    assert_failed_cleanly(result, earlier, staging, before, exit_code=20,
                          says="MariaDB at 127.0.0.1:3306 refused user 'backup'")
    assert "Wrong-Pass-42" not in result.stderr


def test_database_unreachable(earlier, staging, db_cnf):
    before = _objects(earlier.container)
    result = run_backup(earlier, staging, "--db-defaults-file", db_cnf, "--db-port", "9")
    assert_failed_cleanly(result, earlier, staging, before, exit_code=21,
                          says="MariaDB at 127.0.0.1:9 is unreachable")


def test_wrong_keystone_password(earlier, staging, db_cnf):
    before = _objects(earlier.container)
    env = dict(os.environ, OS_PASSWORD="Wrong-Keystone-77")
    result = run_backup(earlier, staging, "--db-defaults-file", db_cnf, env=env)
    assert_failed_cleanly(result, earlier, staging, before, exit_code=30,
                          says="Keystone at http://127.0.0.1:5000/v3 refused the credentials")
    assert "Wrong-Keystone-77" not in result.stderr


def test_keystone_unreachable(earlier, staging, db_cnf):
    before = _objects(earlier.container)
    env = dict(os.environ, OS_AUTH_URL="http://127.0.0.1:9/v3")
    result = run_backup(earlier, staging, "--db-defaults-file", db_cnf, env=env)
    assert_failed_cleanly(result, earlier, staging, before, exit_code=31,
                          says="Keystone at http://127.0.0.1:9/v3 is unreachable")


def test_swift_unreachable(earlier, staging, db_cnf):
    before = _objects(earlier.container)
    env = dict(os.environ, OS_STORAGE_URL="http://127.0.0.1:9/v1/AUTH_nowhere")
    result = run_backup(earlier, staging, "--db-defaults-file", db_cnf, env=env)
    assert_failed_cleanly(result, earlier, staging, before, exit_code=31,
                          says="Swift at http://127.0.0.1:9/v1/AUTH_nowhere is unreachable")


def test_added_path_that_does_not_exist(earlier, staging, db_cnf):
    before = _objects(earlier.container)
    result = run_backup(earlier, staging, "--db-defaults-file", db_cnf,
                        "--add-path", "/opt/typo")
    assert_failed_cleanly(result, earlier, staging, before, exit_code=3,
                          says="Path /opt/typo does not exist under root")


def test_not_enough_space_in_staging(earlier, tmp_path, db_cnf):
    small = tmp_path / "small-staging"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        before = _objects(earlier.container)
        result = run_backup(earlier, small, "--db-defaults-file", db_cnf,
                            "--segment-size", "64MiB")
        assert_failed_cleanly(result, earlier, small, before, exit_code=14,
                              says=f"Not enough space on {small}")
        assert "available 8.0 MiB" in result.stderr
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.fixture
def big_database(services):
    """A table big enough that its dump can be killed half way."""
    mariadb("DROP DATABASE IF EXISTS ucb_fault_big; CREATE DATABASE ucb_fault_big;"
            "USE ucb_fault_big; CREATE TABLE t (id INT PRIMARY KEY, b VARCHAR(1100));"
            # ~280 MB to stream: the KILL lands mid-table however busy the machine is (the
            # kernel's socket buffers hold only a few MB of it); compressible, so cheap to
            # upload.
            "INSERT INTO t SELECT seq, CONCAT(MD5(seq), REPEAT('x', 990))"
            " FROM seq_1_to_250000;")
    yield "ucb_fault_big"
    mariadb("DROP DATABASE IF EXISTS ucb_fault_big;")


# The dump's own streaming SELECT, or the row counts and checksums read beside it on a
# second connection: losing either fails the run (a lost connection stays retryable).
ANY_STATS = "(info LIKE 'CHECKSUM TABLE%' OR info LIKE 'SELECT COUNT(*)%')"
KILL_TARGETS = {
    "dump": ("db = 'ucb_fault_big' AND info LIKE 'SELECT /*!40001 SQL_NO_CACHE */%'", 22,
             "The database dump failed", "mariadb-dump failed"),
    "table-stats": ("info LIKE 'CHECKSUM TABLE `ucb_fault_big`%'", 21, "is unreachable",
                    "reading the row counts and checksums"),
}


def _backup_queries(cursor, where: str) -> list[int]:
    cursor.execute(f"SELECT id FROM information_schema.processlist WHERE user = 'backup' AND "
                   f"{where}")
    return [int(row[0]) for row in cursor.fetchall()]


@pytest.mark.parametrize("target", KILL_TARGETS)
def test_dump_killed_half_way_fails_the_run(earlier, staging, db_cnf, big_database, target):
    before = _objects(earlier.container)
    killed: list[int] = []
    where, exit_code, says, detail = KILL_TARGETS[target]

    def kill_the_dump() -> None:
        root = pymysql.connect(unix_socket="/run/mysqld/mysqld.sock", user="root")
        deadline = time.monotonic() + 120
        with root.cursor() as cursor:
            while time.monotonic() < deadline and not killed:
                # the dump is killed while the checksums beside it are still being read
                if target == "table-stats" or _backup_queries(cursor, ANY_STATS):
                    for thread_id in _backup_queries(cursor, where):
                        cursor.execute(f"KILL {thread_id}")
                        killed.append(thread_id)
                time.sleep(0.01)
        root.close()

    killer = threading.Thread(target=kill_the_dump)
    killer.start()
    result = run_backup(earlier, staging, "--db-defaults-file", db_cnf, "--db-only",
                        "--segment-size", "1MiB")
    killer.join()
    assert killed, f"the {target} query was never seen"
    assert_failed_cleanly(result, earlier, staging, before, exit_code=exit_code, says=says)
    assert detail in result.stderr
    # A failed dump stops the checksums it no longer needs, on the server too.
    root = pymysql.connect(unix_socket="/run/mysqld/mysqld.sock", user="root")
    try:
        with root.cursor() as cursor:
            deadline = time.monotonic() + 5  # a killed query ends at its next row
            while _backup_queries(cursor, ANY_STATS):
                assert time.monotonic() < deadline, "the checksums went on without the dump"
                time.sleep(0.1)
    finally:
        root.close()


# `python -m flows.backup` with a hook between the pre-check and the dump, so that a lock the
# check could not see meets the dump itself: the run's lock bound is argv[1] s, and once the
# check has passed a session of root's runs argv[2] (a LOCK TABLES) and keeps it; the time it
# did is written to argv[3].
LOCK_AFTER_CHECK = """
import runpy, sys, time
import pymysql
from tasks import backup as tasks
from undercloud_backup.db import database

bound, lock, mark = int(sys.argv[1]), sys.argv[2], sys.argv[3]
checked, held = tasks.check_database, []
tasks.database_access = lambda request, source: database.access(source.settings(), False,
                                                                lock_wait_s=bound)

def check_then_lock(*args, **kwargs):
    info = checked(*args, **kwargs)  # passed: nothing was locked
    holder = pymysql.connect(unix_socket="/run/mysqld/mysqld.sock", user="root")
    holder.cursor().execute(lock)
    held.append(holder)
    with open(mark, "w") as out:
        out.write(str(time.monotonic()))
    return info

tasks.check_database = check_then_lock
sys.argv = ["flows.backup", *sys.argv[4:]]
runpy.run_module("flows.backup", run_name="__main__", alter_sys=True)
"""


@pytest.fixture
def lock_database(services):
    mariadb("DROP DATABASE IF EXISTS ucb_fault_lock; CREATE DATABASE ucb_fault_lock;"
            "CREATE TABLE ucb_fault_lock.t (id INT PRIMARY KEY); INSERT INTO ucb_fault_lock.t"
            " VALUES (1);")
    yield "ucb_fault_lock"
    mariadb("DROP DATABASE IF EXISTS ucb_fault_lock;")


def test_a_lock_taken_after_the_check_fails_the_dump_within_the_bound(earlier, staging, db_cnf,
                                                                      lock_database, tmp_path):
    """The dump's own session waits no longer than the bound for a table locked after the
    pre-check passed (not the server's day): exit 26, one line naming the table, retryable."""
    before = _objects(earlier.container)
    mark = tmp_path / "locked-at"
    result = subprocess.run(
        [PYTHON, "-c", LOCK_AFTER_CHECK, "2", "LOCK TABLES ucb_fault_lock.t WRITE", str(mark),
         "--root", str(earlier.root), "--container", earlier.container, "--staging-dir",
         str(staging), "--task-retries", "0", "--swift-retries", "1", "--db-defaults-file",
         db_cnf, "--db-only"], cwd=REPO, capture_output=True, text=True, timeout=300)
    ended = time.monotonic()
    assert mark.exists(), result.stderr  # the lock was taken after the check passed
    assert_failed_cleanly(result, earlier, staging, before, exit_code=26,
                          says="Table `ucb_fault_lock`.`t` on MariaDB at 127.0.0.1:3306 is "
                               "locked by another session")
    assert "gave up after 2 s" in result.stderr.splitlines()[-1]
    assert ended - float(mark.read_text()) < 30  # the bound, not the server's day


def test_swift_stopped_during_upload(earlier, staging, db_cnf, tmp_path, swift_proxy):
    """Swift goes away after the first segment (the run's own way to it, a proxy of this
    test's: other tests keep theirs): one line naming it, exit 31, the earlier backup
    untouched."""
    before = _objects(earlier.container)
    root = tmp_path / "bigger"
    (root / "var/lib/glance/images").mkdir(parents=True)
    with open(root / "var/lib/glance/images/big.img", "wb") as out:
        for _ in range(48):
            out.write(os.urandom(1 << 20))
    stopped = threading.Event()

    def stop_swift_after_first_segment() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(n.startswith(f"{earlier.container}_segments/") and n not in before
                   for n in _objects(earlier.container)):  # asked of Swift, not the proxy
                swift_proxy.stop()
                stopped.set()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=stop_swift_after_first_segment)
    watcher.start()
    result = backup_cli("--root", str(root), "--container", earlier.container,
                        "--staging-dir", str(staging), "--task-retries", "0",
                        "--swift-retries", "1", "--db-defaults-file", db_cnf,
                        "--segment-size", "1MiB",
                        env=dict(os.environ, OS_STORAGE_URL=swift_proxy.account_url))
    watcher.join()
    assert stopped.is_set(), "the upload finished before Swift could be stopped"
    assert swift_proxy.count(method="PUT", path=f"{earlier.container}_segments/") >= 1
    # Segments sent before Swift went away cannot be deleted while it is away: they stay as
    # an incomplete backup (no manifest) for prune to collect.
    assert_failed_cleanly(result, earlier, staging, before, exit_code=31,
                          says=f"Swift at {swift_proxy.url}", allow_orphans=True)
    orphans = set(_objects(earlier.container)) - set(before)
    assert not any(name.endswith("/manifest.json") for name in orphans)


def test_passwords_never_reach_argv_logs_or_results(earlier, staging, db_cnf, os_env):
    """Watch every process's argv during a run, then read the run's logs and results."""
    secrets = [DB_PASSWORD, os_env["OS_PASSWORD"]]
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for proc in Path("/proc").iterdir():
                try:
                    argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                seen.extend(f"{proc.name}: {argv}" for s in secrets if s in argv)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run_backup(earlier, staging, "--db-defaults-file", db_cnf, "--json")
    finally:
        done.set()
        watcher.join()
    assert result.returncode == 0, result.stderr
    assert seen == []
    backup_id = json.loads(result.stdout)["backup_id"]
    forget(earlier, backup_id)
    assert not any(s in result.stderr for s in secrets)

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        # newest first: the session's server holds more runs than one page
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(
            like_="backup-")), sort=FlowRunSort.START_TIME_DESC, limit=50)
        run = next(r for r in runs
                   if r.parameters.get("swift", {}).get("container") == earlier.container
                   and r.state.is_completed() and r.start_time is not None
                   and backup_id.split("-")[-1] == r.id.hex[:6])
        logs = client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [run.id]}))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    text = "\n".join(log.message for log in logs)
    assert "manifest written" in text and artifacts     # the run's summary and progress
    assert not any(s in text for s in secrets)
    assert not any(s in json.dumps(run.parameters) for s in secrets)
    assert not any(s in str(a.data) for a in artifacts for s in secrets)
    storage = Path(os.environ["PREFECT_HOME"]) / "storage"
    stored = b"".join(p.read_bytes() for p in storage.rglob("*") if p.is_file())
    assert stored, "no persisted results were found"
    assert not any(s.encode() in stored for s in secrets)


def _as_nobody_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    home = tmp_path / "nobody-home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    env = {k: v for k, v in os.environ.items() if k.startswith(("OS_", "PREFECT_"))}
    env.update(PATH="/usr/bin:/bin", HOME=str(home), PREFECT_HOME=str(home / "prefect"))
    return env, home


@pytest.fixture
def open_tmp():
    """A scratch directory other users can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="ucb-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("allow", [False, True])
def test_unreadable_files_are_named_and_fail_unless_allowed(earlier, open_tmp, db_cnf, allow):
    """tar running as a user who cannot read a root-only file: never a silent gap."""
    tmp_path = open_tmp
    env, home = _as_nobody_env(tmp_path)
    cnf = home / "my.cnf"
    cnf.write_bytes(Path(db_cnf).read_bytes())
    os.chown(cnf, 65534, 65534)
    cnf.chmod(0o600)
    root = tmp_path / "uc"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (root / "etc/shadow").write_text("root:*:19000::::::\n")
    (root / "etc/shadow").chmod(0o600)
    staging = home / "staging"
    staging.mkdir()
    os.chown(staging, 65534, 65534)
    before = _objects(earlier.container)
    argv = ["/usr/sbin/runuser", "-u", "nobody", "--", sys.executable, "-m", "flows.backup",
            "--root", str(root), "--container", earlier.container, "--staging-dir",
            str(staging), "--db-defaults-file", str(cnf), "--task-retries", "0", "--json"]
    if allow:
        argv.append("--allow-unreadable")
    result = subprocess.run(argv, cwd=Path(__file__).parent.parent, env=env,
                            capture_output=True, text=True, timeout=300)
    if not allow:
        assert_failed_cleanly(result, earlier, staging, before, exit_code=24,
                              says="1 file(s) could not be read", allow_orphans=True)
        assert "etc/shadow (Permission denied)" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    manifest = catalogue.get_manifest(_store(), earlier.container, summary["backup_id"])
    assert manifest.paths.unreadable == ["etc/shadow (Permission denied)"]
    assert "tar: unreadable while archiving: etc/shadow" in result.stderr
    forget(earlier, summary["backup_id"])


def test_segment_size_too_small_for_swift_is_refused_up_front(earlier, staging, db_cnf,
                                                             tmp_path):
    """The real cluster's /info says 1000 segments per SLO: 2 MiB of images in 1 KiB
    segments cannot be stored, and that is said before any upload."""
    root = tmp_path / "uc"
    (root / "var/lib/glance/images").mkdir(parents=True)
    (root / "var/lib/glance/images/img").write_bytes(os.urandom(2 * 1024**2))
    before = _objects(earlier.container)
    result = backup_cli("--root", str(root), "--container", earlier.container,
                        "--staging-dir", str(staging), "--db-defaults-file", db_cnf,
                        "--segment-size", "1KiB", "--task-retries", "0")
    assert_failed_cleanly(result, earlier, staging, before, exit_code=2,
                          says="more than Swift's 1000 segments per object")


# ------------------------------------------------------------------------------------ signals
def _stalling_zstd(directory: Path, marker: int) -> dict[str, str]:
    """A `zstd` first in PATH that compresses, closes its output, then hangs: the run is
    mid-stream (segments uploaded, the pipe not finished) for as long as the test wants."""
    directory.mkdir()
    shim = directory / "zstd"
    shim.write_text(f"#!/bin/bash\n/usr/bin/zstd \"$@\"\nexec sleep {marker} >&-\n")
    shim.chmod(0o755)
    return {"PATH": f"{directory}:{os.environ['PATH']}"}


def _processes(pattern: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def _start_stalled_run(tmp_path: Path, container: str, db_cnf: str, env: dict[str, str]):
    root = tmp_path / "uc"
    (root / "etc").mkdir(parents=True)
    (root / "etc/random").write_bytes(os.urandom(3 * 1024**2))  # 3+ segments of 1 MiB
    command = [sys.executable, "-m", "flows.backup", "--root", str(root), "--container",
               container, "--db-defaults-file", db_cnf, "--segment-size", "1MiB", "--no-prune"]
    return subprocess.Popen(command, cwd=Path(__file__).parent.parent, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own group: the test's Ctrl-C


def _wait_for_segments(container: str, process, at_least: int = 3) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len([n for n in _objects(container) if "_segments/" in n]) >= at_least:
            return
        time.sleep(0.3)
    raise AssertionError(f"the run never got mid-stream: {process.poll()}")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT to the process group"])
def test_a_signal_stops_every_child_and_deletes_what_the_run_uploaded(tmp_path, container,
                                                                       db_cnf, how):
    marker = 600 + int(uuid.uuid4().int % 300)
    env = dict(os.environ, **_stalling_zstd(tmp_path / "bin", marker))
    process = _start_stalled_run(tmp_path, container, db_cnf, env)
    try:
        _wait_for_segments(container, process)
        assert _processes(f"sleep {marker}"), "the stalled pipe is not running"
        started = time.monotonic()
        if how == "SIGTERM":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGINT)  # what a Ctrl-C in its terminal sends
        _, stderr = process.communicate(timeout=60)
        stopped_after = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == (143 if how == "SIGTERM" else 130), stderr
    assert stopped_after < 15, f"took {stopped_after:.1f} s to stop"
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"undercloud-backup: interrupted by {how.split()[0]}: "), stderr
    assert "no manifest was written and nothing of backup" in last
    assert "Traceback" not in stderr
    assert _processes(f"sleep {marker}") == [], "a child outlived the run"
    assert [n for n in _objects(container)] == [], "the run left objects in Swift"


def test_a_killed_run_leaves_no_child_and_no_temporary_prefect_server(tmp_path, container,
                                                                      db_cnf):
    """SIGKILL: nothing can be cleaned up, but nothing may keep running either (children and
    the ad hoc run's own Prefect server die with it); what it uploaded has no manifest."""
    marker = 600 + int(uuid.uuid4().int % 300)
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(_stalling_zstd(tmp_path / "bin", marker), PREFECT_HOME=str(home),
               PREFECT_SERVER_EPHEMERAL_ENABLED="true")
    process = _start_stalled_run(tmp_path, container, db_cnf, env)
    try:
        _wait_for_segments(container, process)
        servers = [p for p in _processes("uvicorn") if _environ_has(p, f"PREFECT_HOME={home}")]
        assert servers, "no temporary Prefect server found"
        process.kill()
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    time.sleep(1)
    assert _processes(f"sleep {marker}") == [], "a child outlived the killed run"
    assert not [p for p in _processes("uvicorn") if _environ_has(p, f"PREFECT_HOME={home}")]
    listing = backup_in_process("--list", "--json", "--container", container)
    assert json.loads(listing.stdout)["backups"] == []  # incomplete: prune's to delete


def _environ_has(ps_line: str, entry: str) -> bool:
    try:
        return entry.encode() in Path(f"/proc/{ps_line.split()[0]}/environ").read_bytes()
    except OSError:
        return False


# --------------------------------------------------------------------------- staging bound
def test_staging_the_space_check_asks_for_is_enough(tmp_path, container, db_cnf):
    """The check counts what the uploader really spools (upload.SPOOLS_PER_STREAM segments per
    stream): a staging filesystem just that big completes a run of many segments, and one a
    little smaller is refused before anything is written."""
    import math
    import re

    root = tmp_path / "uc"
    (root / "etc").mkdir(parents=True)
    (root / "etc/random").write_bytes(os.urandom(24 * 1024**2))  # 6 segments of 4 MiB
    small = tmp_path / "staging"
    small.mkdir()
    args = ("--root", str(root), "--container", container, "--db-defaults-file", db_cnf,
            "--segment-size", "4MiB", "--no-prune", "--staging-dir", str(small))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(small)], check=True)
    try:
        planned = backup_cli(*args, "--dry-run")
        assert planned.returncode == 0, planned.stderr
        need_mib = float(re.search(rf"staging {small}: need ([\d.]+) MiB", planned.stderr)[1])
        subprocess.run(["mount", "-o", f"remount,size={math.ceil(need_mib) + 1}m", str(small)],
                       check=True)
        done = backup_cli(*args, "--json")
        assert done.returncode == 0, done.stderr
        files = json.loads(done.stdout)["objects"][-1]
        assert len(files["segments"]) >= 6
        subprocess.run(["mount", "-o", f"remount,size={math.floor(need_mib) - 2}m", str(small)],
                       check=True)
        refused = backup_cli(*args)
        assert refused.returncode == 14, refused.stderr
        assert f"Not enough space on {small}" in refused.stderr.strip().splitlines()[-1]
    finally:
        subprocess.run(["umount", str(small)], check=True)


# ---------------------------------------------------------------------- excluding everything
@pytest.mark.parametrize("pattern", ["/*", "/"])
def test_excluding_everything_is_an_error_not_an_empty_backup(earlier, staging, db_cnf,
                                                              pattern):
    before = _objects(earlier.container)
    result = run_backup(earlier, staging, "--db-defaults-file", db_cnf,
                        "--exclude-path", pattern)
    assert_failed_cleanly(result, earlier, staging, before, exit_code=2,
                          says=f"--exclude-path {pattern} leaves out every path to back up")
    assert result.stderr.strip().splitlines()[-1].startswith("undercloud-backup: error:")
