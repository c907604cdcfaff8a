"""A failed run names its real cause: the stage that failed first and why, never a warning of
another stage, on one readable line; what tar only warns about costs no night.

The unit tests run the real tar and real pipes; the others a backup against the real MariaDB
and Swift, faults injected by tests/swift_proxy.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import backup_in_process

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
    assert len(line) < 1000 and "\n" not in line
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
            "--no-prune", env=dict(os.environ, OS_STORAGE_URL=swift_proxy.account_url))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 32, result.stderr[-3000:]
    assert "filesystem.tar.zst" in last and "HTTP 401" in last, last
    assert "socket" not in last and "403" not in last
