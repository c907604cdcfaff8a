"""Verify and restore, run as root, make their scratch directories (the throwaway MariaDB's,
the replayed logs', the default target) only in a ``--staging-dir`` no other user can change:
a link another local user planted there, or that user's own directory, is refused with exit
65 and one line before anything is made in it; a dangling planted link too, never a
traceback. The default /var/tmp (root's, sticky) still works: every other verify test uses it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import test_restore_confinement as confinement
from test_restore import cli
from test_restore_confinement import last_line, plain_archive, plant_level
from test_verify import plant_backup

from undercloud_backup.db import scratch
from undercloud_backup.files import confine
from undercloud_backup.restore import binlog as replay

intruder = confinement.intruder  # another local user of the test's own, removed afterwards
BANNER = (b"-- MariaDB dump 10.19  Distrib 10.11.19-MariaDB, for debian-linux-gnu (x86_64)\n"
          b"--\n-- Host: localhost    Database: \n")


@pytest.fixture
def shared(intruder, request) -> dict[str, Path]:
    """A shared sticky directory (as /var/tmp) in which the intruder planted ``link`` (to its
    own directory ``theirs``) and ``dangling`` (to a name that does not exist)."""
    top = Path(tempfile.mkdtemp(prefix="ucb-staging-", dir="/var/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(top))
    top.chmod(0o755)
    tmp = top / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    theirs = top / "theirs"
    theirs.mkdir()
    theirs.chmod(0o777)
    uid = int(subprocess.run(["id", "-u", intruder], capture_output=True, text=True,
                             check=True).stdout)
    os.chown(theirs, uid, -1)
    as_intruder = ["runuser", "-u", intruder, "--", "ln", "-s"]
    subprocess.run([*as_intruder, str(theirs), str(tmp / "link")], check=True)
    subprocess.run([*as_intruder, str(tmp / "nowhere"), str(tmp / "dangling")], check=True)
    return {"tmp": tmp, "theirs": theirs, "link": tmp / "link", "dangling": tmp / "dangling",
            "nowhere": tmp / "nowhere"}


# verify and restore run as processes (test_restore's cli): a refusal is the CLI's contract, its
# status, one line and no traceback on the console, which only the process's own stderr shows
def refused(done: subprocess.CompletedProcess, staging: Path) -> None:
    assert done.returncode == 65, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert last_line(done).startswith(f"undercloud-{done.args[2].split('.')[1]}: error: "
                                      f"Refusing staging directory {staging}: "), last_line(done)


def verify(container: str, backup_id: str, staging: Path) -> subprocess.CompletedProcess:
    return cli("verify", "--container", container, "--backup-id", backup_id,
               "--no-signature-check", "--staging-dir", str(staging))


def restore(container: str, backup_id: str, staging: Path,
            target: Path) -> subprocess.CompletedProcess:
    return cli("restore", "--container", container, "--backup-id", backup_id,
               "--no-signature-check", "--target", str(target), "--staging-dir", str(staging))


@pytest.mark.parametrize("planted", ["link", "theirs", "dangling"])
def test_verify_refuses_a_staging_directory_another_user_can_change(
        planted, container, os_env, shared):
    backup_id = plant_backup(container, BANNER + b"CREATE DATABASE IF NOT EXISTS planted;\n")
    done = verify(container, backup_id, shared[planted])
    refused(done, shared[planted])
    assert list(shared["theirs"].iterdir()) == [] and not shared["nowhere"].exists()


@pytest.mark.parametrize("planted", ["link", "theirs", "dangling"])
def test_restore_refuses_a_staging_directory_another_user_can_change(
        planted, container, os_env, shared, tmp_path):
    plant_level(container, "genuine-0", plain_archive(
        ("etc/hostname", tarfile.REGTYPE, "", 0o644, "restored\n")), [])
    target = tmp_path / "target"
    done = restore(container, "genuine-0", shared[planted], target)
    refused(done, shared[planted])
    assert list(shared["theirs"].iterdir()) == [] and not shared["nowhere"].exists()
    assert not target.exists()


@pytest.mark.parametrize("made", [
    lambda staging: scratch._prepare(str(staging), None),
    lambda staging: replay._replay_directory(str(staging))],
    ids=["scratch server", "replayed logs"])
def test_the_library_refuses_it_too(made: Callable[[Path], str], shared):
    """Whoever calls them: the scratch server's and the replay's directories."""
    for planted in ("link", "theirs", "dangling"):
        with pytest.raises(confine.TargetUnsafe):
            made(shared[planted])
    assert list(shared["theirs"].iterdir()) == [] and not shared["nowhere"].exists()


def test_a_staging_directory_the_scratch_servers_user_cannot_enter_is_one_clear_line(
        container, os_env, tmp_path):
    """Root's own 0700 directory is safe, but mariadbd runs as mysql, which cannot enter
    it: said as such (42), before anything is made in it."""
    closed = Path(tempfile.mkdtemp(prefix="ucb-closed-", dir="/var/tmp"))
    try:
        closed.chmod(0o700)
        backup_id = plant_backup(container, BANNER + b"CREATE DATABASE IF NOT EXISTS p;\n")
        done = verify(container, backup_id, closed)
        assert list(closed.iterdir()) == []
    finally:
        shutil.rmtree(closed)
    assert done.returncode == scratch.ScratchDatabaseFailed.exit_code == 42, done.stderr
    assert "its user mysql cannot enter the staging directory" in done.stdout + done.stderr
