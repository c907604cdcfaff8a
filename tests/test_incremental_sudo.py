"""Incremental backups through real sudo: levels taken by the unprivileged worker with the
installed ucb-archive, the parent snapshot handed over on stdin and the new one taken back,
and every way the worker could try to make root read or write a path of its choosing."""

from __future__ import annotations

import io
import json
import os
import pwd
import shutil
import stat
import tarfile
import time
import uuid
from pathlib import Path

import pytest
from deploy_helpers import REPO, WORKER, as_user
from test_sudo import ARCHIVE, PYTHON, load_wrapper, sudo
from test_sudo import installed as installed  # noqa: F401 - the module's install fixture

from undercloud_backup.db import privileged
from undercloud_backup.files import archive

SNAPSHOTS = Path(privileged.SNAPSHOT_DIR)


def ident() -> str:
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def snapshot_dir_removed_after():
    """The wrapper creates /var/lib/undercloud-backup/snapshots; remove what was not there."""
    created = [p for p in (SNAPSHOTS.parent, SNAPSHOTS) if not p.exists()]
    yield
    for path in reversed(created):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def root(installed, snapshot_dir_removed_after):  # noqa: F811 - the imported fixture
    return installed


@pytest.mark.unit
def test_wrapper_and_library_build_the_same_incremental_tar_command():
    plan = archive.PathPlan(root="/srv/uc", included=("/etc", "/home/stack"), absent=(),
                            excluded=("/home/stack/.cache",))
    snapshot = ident()
    wrapped = privileged.archive_command(plan, extra_excludes=("var/tmp",),
                                         snapshot_id=snapshot).argv
    module = load_wrapper("ucb-archive")
    request, parsed = module.split_snapshot(list(wrapped[3:]))
    root, excludes, paths = module.parse(request)
    assert parsed == snapshot and module.SNAPSHOT_DIR == privileged.SNAPSHOT_DIR
    path = os.path.join(module.SNAPSHOT_DIR, module.snapshot_name(990, snapshot))
    assert path == privileged.wrapper_snapshot_path(990, snapshot)
    assert module.tar_argv("tar", root, excludes, paths, path) == list(
        archive.tar_command(plan, extra_excludes=("var/tmp",), snapshot=path).argv)


LEVELS = """
import json, sys, tarfile, io
from undercloud_backup.files import archive
from undercloud_backup.backup import stages
from undercloud_backup.core.execute import Pipeline
from undercloud_backup.backup.request import BackupRequest

request = BackupRequest(backup_id="b", created_at="", hostname="h", root=sys.argv[1],
                        staging_dir="/var/tmp", privileged=True)
plan = archive.plan_paths(sys.argv[1])
parent = open(sys.argv[2], "rb").read() if len(sys.argv) > 2 else b""
with stages._snapshot(request, plan, parent) as snapshot:
    with Pipeline([snapshot.tar(())], stdin=snapshot.stdin, timeout=120) as pipe:
        data = pipe.stdout.read()
        pipe.wait()
    new = snapshot.take()
    snapshot.taken = True
names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
sys.stdout.write(json.dumps({"names": names, "snapshot": new.decode("latin-1"),
                             "ident": snapshot.ident}))
"""


def worker_level(root: Path, parent: Path | None = None) -> dict:
    argv = [PYTHON, "-c", LEVELS, str(root)] + ([str(parent)] if parent else [])
    result = as_user(WORKER, argv, env={"PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_worker_takes_a_full_and_a_level_through_sudo(root):
    level0 = worker_level(root)
    assert "root/.my.cnf" in level0["names"]  # root-only files, read by root
    assert level0["snapshot"].startswith("GNU tar-")
    # The directory root keeps the snapshot in: root's own, 0700, and empty after the take.
    st = SNAPSHOTS.lstat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode), stat.S_ISDIR(st.st_mode)) == (0, 0o700, True)
    assert not any(SNAPSHOTS.glob(f"*-{level0['ident']}.snar"))
    assert as_user(WORKER, ["ls", str(SNAPSHOTS)]).returncode != 0

    time.sleep(0.05)
    (root / "etc/keystone/keystone.conf").write_text("[DEFAULT]\nchanged = 1\n")
    parent = Path(f"/var/tmp/ucb-parent-{ident()}.snar")  # where the worker can read it
    parent.write_bytes(level0["snapshot"].encode("latin-1"))
    parent.chmod(0o644)
    try:
        level1 = worker_level(root, parent)
    finally:
        parent.unlink()
    files = [n for n in level1["names"] if not (root / n).is_dir()]
    assert files == ["etc/keystone/keystone.conf"]  # and the directories, for deletions
    assert level1["snapshot"] != level0["snapshot"]


def test_a_bad_or_foreign_snapshot_id_is_refused(root):
    # Not 32 hex digits: no path of the caller's choosing is ever built from it.
    for bad in ("../../../etc/shadow", "A" * 32, ident()[:31], ident() + "0"):
        result = sudo(ARCHIVE, str(root), f"--snapshot={bad}", "--", "/etc", input="")
        assert result.returncode == 64 and "is not 32 lowercase hex digits" in result.stderr
        taken = sudo(ARCHIVE, str(root), f"--take-snapshot={bad}")
        assert taken.returncode == 64 and taken.stdout == ""
    twice = sudo(ARCHIVE, str(root), f"--snapshot={ident()}", f"--snapshot={ident()}", "--",
                 "/etc", input="")
    assert twice.returncode == 64 and "unexpected argument" in twice.stderr
    # Another user's snapshot (here root's own) is not the worker's to take.
    other = ident()
    SNAPSHOTS.mkdir(mode=0o700, parents=True, exist_ok=True)
    (SNAPSHOTS / f"0-{other}.snar").write_bytes(b"GNU tar-1.34-2\nroot's")
    try:
        taken = sudo(ARCHIVE, str(root), f"--take-snapshot={other}", text=False)
        assert taken.returncode == 66 and taken.stdout == b""
        assert (SNAPSHOTS / f"0-{other}.snar").exists()
    finally:
        (SNAPSHOTS / f"0-{other}.snar").unlink()
    # A root that is not allowed is refused for the take as for the archive.
    refused = sudo(ARCHIVE, "/var/tmp", f"--take-snapshot={ident()}")
    assert refused.returncode == 77 and "is not allowed" in refused.stderr


def test_the_worker_cannot_make_root_write_or_read_a_path_it_controls(root):
    uid = pwd.getpwnam(WORKER).pw_uid
    # An ID in use is never overwritten (O_EXCL), so no run can clobber another's.
    used = ident()
    first = sudo(ARCHIVE, str(root), f"--snapshot={used}", "--", "/etc", text=False,
                 input=b"")
    assert first.returncode == 0
    again = sudo(ARCHIVE, str(root), f"--snapshot={used}", "--", "/etc", text=False,
                 input=b"")
    assert again.returncode == 64 and b"exists already" in again.stderr
    # What is not a tar snapshot never reaches tar (and leaves no file behind).
    junk = ident()
    result = sudo(ARCHIVE, str(root), f"--snapshot={junk}", "--", "/etc", input="not a snar\n")
    assert result.returncode == 64 and "is not a GNU tar snapshot" in result.stderr
    assert not (SNAPSHOTS / f"{uid}-{junk}.snar").exists()
    taken = sudo(ARCHIVE, str(root), f"--take-snapshot={used}", text=False)
    assert taken.returncode == 0 and taken.stdout.startswith(b"GNU tar-")
    # A left-over of the worker's older than a day is removed by its next call.
    stale = SNAPSHOTS / f"{uid}-{ident()}.snar"
    stale.write_bytes(b"")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    assert sudo(ARCHIVE, str(root), f"--snapshot={ident()}", "--", "/etc", text=False,
                input=b"").returncode == 0
    assert not stale.exists()
    for leftover in SNAPSHOTS.glob(f"{uid}-*.snar"):
        leftover.unlink()
    # The snapshot directory replaced by one of the worker's, or by a symlink to it: refused.
    own = Path(f"/var/tmp/ucb-worker-snapshots-{ident()[:8]}")
    own.mkdir()
    os.chown(own, uid, -1)
    saved = SNAPSHOTS.with_name("snapshots.saved")
    SNAPSHOTS.rename(saved)
    try:
        SNAPSHOTS.symlink_to(own)
        linked = sudo(ARCHIVE, str(root), f"--snapshot={ident()}", "--", "/etc", input="")
        assert linked.returncode == 77 and "must be a real directory of root's" in \
            linked.stderr
        SNAPSHOTS.unlink()
        SNAPSHOTS.mkdir(mode=0o700)
        os.chown(SNAPSHOTS, uid, -1)
        owned = sudo(ARCHIVE, str(root), f"--snapshot={ident()}", "--", "/etc", input="")
        assert owned.returncode == 77 and "must be a directory owned by root" in owned.stderr
        assert list(own.iterdir()) == [] and list(SNAPSHOTS.iterdir()) == []
    finally:
        if SNAPSHOTS.is_symlink():
            SNAPSHOTS.unlink()
        shutil.rmtree(SNAPSHOTS, ignore_errors=True)
        saved.rename(SNAPSHOTS)
        shutil.rmtree(own, ignore_errors=True)


def test_level_archives_are_plain_tar(root):
    """What the wrapper writes in incremental mode is read by plain tarfile (a sanity check
    that --listed-incremental adds nothing but GNU dumpdir members)."""
    result = sudo(ARCHIVE, str(root), f"--snapshot={ident()}", "--", "/home/stack", text=False,
                  input=b"")
    assert result.returncode == 0, result.stderr
    names = tarfile.open(fileobj=io.BytesIO(result.stdout)).getnames()
    assert "home/stack/stackrc" in names
    uid = pwd.getpwnam(WORKER).pw_uid
    for leftover in SNAPSHOTS.glob(f"{uid}-*.snar"):
        leftover.unlink()
