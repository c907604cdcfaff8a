"""A backup chain cannot make root write, change or delete anything outside the restore's
target, whatever its archives hold and in whatever order; and root restores into directories
nobody else can name or plant in advance.

Forged levels are written straight into Swift, as a Swift credential holder (or the worker,
which can also sign) could. Every victim directory is made here under the test's tmp path.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, backup_in_process, cli_in_process, swift_store
from test_verify import put_plain

from undercloud_backup.core.manifest import (
    FS_OBJECT,
    FULL,
    INCREMENTAL,
    SNAPSHOT_OBJECT,
    Manifest,
    PathsSection,
    StoredObject,
)
from undercloud_backup.files import confine, tarlist
from undercloud_backup.files.tarlist import Entry
from undercloud_backup.restore import files as restore
from undercloud_backup.restore import verify
from undercloud_backup.store import catalogue

HOST = "forged-host"


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m flows.<module>`` called in this process: what root's restore does with a
    forged chain is the flow's doing, not the CLI process's (whose contract test_restore keeps)."""
    return cli_in_process(module, *args)


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------- archives
def gnu_level(source: Path, snapshot: Path, *members: str) -> bytes:
    """A GNU tar --listed-incremental level of ``members`` of ``source``, as a backup makes."""
    return subprocess.run(["tar", "-C", str(source), f"--listed-incremental={snapshot}",
                           "--numeric-owner", "-cf", "-", *members], capture_output=True,
                          check=True).stdout


def plain_archive(*members: tuple[str, bytes, str, int, str]) -> bytes:
    """(name, type, link, mode, data) members, without any directory entry (so no level
    of a forged chain carries a listing that would delete anything)."""
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, link, mode, data in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = kind, link, mode
            if kind in (tarfile.BLKTYPE, tarfile.CHRTYPE):
                info.devmajor, info.devminor = 8, 0
            info.size = len(data.encode()) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data.encode()) if kind == tarfile.REGTYPE else None)
    return body.getvalue()


def zstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True,
                          check=True).stdout


def plant_level(container: str, backup_id: str, archive: bytes, chain: list[str], *,
                included: tuple[str, ...] = ("/etc",), hostname: str = HOST,
                minute: int = 0, created_at: str = "") -> None:
    """A complete-looking level (archive, snapshot, manifest) written into Swift."""
    store = swift_store()
    store.ensure_container(container)
    obj = StoredObject(name=f"{backup_id}/{FS_OBJECT}", size=0, sha256="",
                       compression="zstd", content="tar")
    put_plain(store, container, obj, zstd(archive))
    snap = StoredObject(name=f"{backup_id}/{SNAPSHOT_OBJECT}", size=0, sha256="",
                        compression="zstd", content="tar-snapshot")
    put_plain(store, container, snap, zstd(b"GNU tar-1.34-2\n"))
    catalogue.put_manifest(store, container, Manifest(
        backup_id=backup_id, created_at=created_at or f"2026-12-01T10:{minute:02d}:00+00:00",
        hostname=hostname, paths=PathsSection(root="/", included=list(included)),
        objects=[obj, snap], kind=INCREMENTAL if chain else FULL, level=len(chain),
        chain=list(chain), parent=chain[-1] if chain else None,
        snapshot={"object": snap.name, "size": snap.size, "sha256": snap.sha256}))


@pytest.fixture
def victim(tmp_path) -> Path:
    """A directory outside every target: what the forged chains aim at."""
    place = tmp_path / "victim"
    (place / "sub").mkdir(parents=True)
    (place / "sub/canary2").write_text("keep me\n")
    (place / "secret").write_text("only root\n")
    return place


def assert_untouched(place: Path) -> None:
    assert sorted(p.name for p in place.iterdir()) == ["secret", "sub"]
    assert [p.name for p in (place / "sub").iterdir()] == ["canary2"]
    assert (place / "sub/canary2").read_text() == "keep me\n"
    assert (place / "secret").stat().st_nlink == 1


def forged_chain(container: str, tmp_path: Path, victim: Path) -> list[str]:
    """Level 0: etc/link -> victim. Level 1, with no entry for etc/link itself: a setuid
    etc/link/pwned and etc/link/sub/ whose (GNU incremental) listing is empty."""
    level0, level1 = tmp_path / "level0", tmp_path / "level1"
    (level0 / "etc").mkdir(parents=True)
    (level0 / "etc/link").symlink_to(victim)
    (level1 / "etc/link/sub").mkdir(parents=True)
    (level1 / "etc/link/pwned").write_text("#!/bin/sh\nid\n")
    (level1 / "etc/link/pwned").chmod(0o4755)
    first = gnu_level(level0, tmp_path / "0.snar", "etc")
    second = gnu_level(level1, tmp_path / "1.snar", "etc/link/pwned", "etc/link/sub")
    assert "etc/link/" not in tarlist_names(second)
    ids = ["forged-0", "forged-1"]
    plant_level(container, ids[0], first, [])
    plant_level(container, ids[1], second, ids[:1], minute=1)
    return ids


def tarlist_names(archive: bytes) -> list[str]:
    return subprocess.run(["tar", "-t"], input=archive, capture_output=True,
                          check=True).stdout.decode().splitlines()


def restore_cli(container: str, backup_id: str, *args: str) -> subprocess.CompletedProcess:
    return cli("restore", "--container", container, "--backup-id", backup_id,
               "--no-signature-check", *args)


# --------------------------------------------------------------------------- by the tool
def test_a_forged_level_cannot_write_or_delete_through_an_earlier_levels_symlink(
        container, os_env, tmp_path, victim):
    ids = forged_chain(container, tmp_path, victim)
    target = tmp_path / "target"
    result = restore_cli(container, ids[1], "--target", str(target))
    assert_untouched(victim)  # no setuid file appeared, canary2 was not deleted
    assert result.returncode == confine.OutsideRefused.exit_code == 63, result.stderr
    assert last_line(result).startswith(
        f"undercloud-restore: error: The archive {ids[1]}/{FS_OBJECT} tried to write outside "
        f"{target}: tar: etc/link/")
    assert "Read-only file system" in last_line(result)
    assert (target / "etc/link").is_symlink()  # level 0 restored, inside


def test_the_listings_refuse_it_before_anything_is_written_when_they_are_read(
        container, os_env, tmp_path, victim):
    """A dry run (or a --path restore) reads every level's listing: it names the way out."""
    ids = forged_chain(container, tmp_path, victim)
    target = tmp_path / "target"
    result = restore_cli(container, ids[1], "--target", str(target), "--path", "/etc")
    assert result.returncode == tarlist.ChainLeadsOut.exit_code == 64, result.stderr
    assert "level 1 writes etc/link/pwned through the symlink etc/link level 0 made" in \
        last_line(result)
    assert not target.exists() and "Nothing was written" in last_line(result)
    assert_untouched(victim)


def test_a_forged_level_over_a_genuine_full_cannot_write_through_its_genuine_link(
        container, os_env, db_cnf, tmp_path, victim):
    root = tmp_path / "undercloud"
    (root / "etc/swift").mkdir(parents=True)
    (root / "etc/swift/swift.conf").write_text("[swift-hash]\n")
    (root / "etc/swift/backups").symlink_to(victim)  # as etc/swift/backups -> /var/backups/..
    made = backup_in_process("--root", str(root), "--container", container, "--db-defaults-file",
                      db_cnf, "--staging-dir", str(tmp_path), "--no-encryption", "test",
                      "--json")
    assert made.returncode == 0, made.stderr
    full = json.loads(made.stdout)
    genuine = catalogue.get_manifest(swift_store(), container, full["backup_id"])
    forged = f"{full['backup_id']}-x"
    plant_level(container, forged, plain_archive(
        ("etc/swift/backups/planted", tarfile.REGTYPE, "", 0o644, "root's now\n")),
        [genuine.backup_id], included=tuple(genuine.paths.included),
        hostname=genuine.hostname, created_at="2099-01-01T00:00:00+00:00")
    target = tmp_path / "target"
    result = restore_cli(container, forged, "--target", str(target))
    assert_untouched(victim)
    assert result.returncode == confine.OutsideRefused.exit_code, result.stderr
    assert "etc/swift/backups/planted" in last_line(result)
    assert (target / "etc/swift/backups").is_symlink()

    checked = cli("verify", "--container", container, "--backup-id", forged,
                  "--skip-database", "--no-signature-check", "--json")
    assert checked.returncode == verify.VerificationFailed.exit_code, checked.stderr
    assert any("level 1 writes etc/swift/backups/planted through the symlink "
               "etc/swift/backups level 0 made" in p
               for p in json.loads(checked.stdout)["problems"])


@pytest.mark.parametrize("way_out", ["hard link", "device node", "proc link"])
def test_a_hard_link_a_device_node_or_a_proc_link_does_not_lead_out(
        way_out, container, os_env, tmp_path, victim):
    if way_out == "device node":  # a single full: /dev/sda-like, readable by all
        archive = plain_archive(("etc/disk", tarfile.BLKTYPE, "", 0o666, ""))
        plant_level(container, "forged-0", archive, [])
        backup_id = "forged-0"
    else:
        leads = victim if way_out == "hard link" else Path("/proc/1/root") / \
            str(victim).lstrip("/")
        plant_level(container, "forged-0", plain_archive(
            ("etc/link", tarfile.SYMTYPE, str(leads), 0o777, "")), [])
        second = ("etc/hl", tarfile.LNKTYPE, "etc/link/secret", 0o644, "") \
            if way_out == "hard link" else ("etc/link/pwned", tarfile.REGTYPE, "", 0o4755, "x")
        plant_level(container, "forged-1", plain_archive(second), ["forged-0"], minute=1)
        backup_id = "forged-1"
    target = tmp_path / "target"
    result = restore_cli(container, backup_id, "--target", str(target))
    assert_untouched(victim)
    assert not (target / "etc/disk").exists() and not (target / "etc/hl").exists()
    # /proc is covered in the confinement: /proc/1/root leads nowhere, rather than out
    status, sign = {
        "hard link": (confine.OutsideRefused, "Invalid cross-device link"),
        "device node": (confine.OutsideRefused, "Cannot mknod: Operation not permitted"),
        "proc link": (restore.RestoreFailed, "etc/link/pwned: Cannot open: No such file")}[
        way_out]
    assert result.returncode == status.exit_code, result.stderr
    assert sign in last_line(result)


def test_confinement_that_cannot_be_set_up_fails_closed(tmp_path, monkeypatch):
    """No namespace, no extraction: one line, its own exit status, nothing written."""
    target = tmp_path / "t"
    target.mkdir()
    monkeypatch.setattr(confine, "HELPER", str(tmp_path / "missing-helper.py"))
    with pytest.raises(confine.ConfinementUnavailable) as refused:
        confine.probe(str(target))
    assert refused.value.exit_code == 62
    assert str(refused.value).startswith(f"Cannot confine the extraction to {target}: ")
    assert list(target.iterdir()) == []


# ----------------------------------------------------------------------- into / (listings)
def test_into_slash_a_chain_through_its_own_symlink_is_refused_before_anything_is_written(
        container, os_env, tmp_path, victim):
    """``--target /`` cannot be confined: every level's listing is read first. The members
    lie under this test's tmp path, and carry no directory listing, so even a regression
    could only write there."""
    base = str(tmp_path / "slash").lstrip("/")
    plant_level(container, "forged-0", plain_archive(
        (f"{base}/etc/link", tarfile.SYMTYPE, str(victim), 0o777, "")), [],
        included=(f"/{base}",))
    plant_level(container, "forged-1", plain_archive(
        (f"{base}/etc/link/pwned", tarfile.REGTYPE, "", 0o4755, "x")), ["forged-0"],
        included=(f"/{base}",), minute=1)
    result = restore_cli(container, "forged-1", "--target", "/", "--allow-root-target",
                         "--overwrite")
    assert result.returncode == tarlist.ChainLeadsOut.exit_code, result.stderr
    assert last_line(result).startswith("undercloud-restore: error: Refusing to restore "
                                        "forged-1 into /: its archives would lead out of it")
    assert not (tmp_path / "slash").exists()
    assert_untouched(victim)


def test_the_listing_check_is_one_pure_function_of_the_levels():
    link, file_, dir_ = "l", "-", "d"
    chain = [[Entry("etc/", dir_), Entry("etc/link", link, "/var/lib/victim")],
             [Entry("etc/link/pwned", file_), Entry("etc/link/sub/", dir_),
              Entry("etc/hl", "h", "etc/link/secret"), Entry("etc/ok", file_)]]
    assert tarlist.leading_out(chain) == [
        "level 1 writes etc/link/pwned through the symlink etc/link level 0 made",
        "level 1 writes etc/link/sub through the symlink etc/link level 0 made",
        "level 1 hard-links etc/hl to etc/link/secret through the symlink etc/link level 0 "
        "made"]
    # the same members in one archive: tar's own protection holds there
    assert tarlist.leading_out([chain[0] + chain[1]]) == []
    # a directory entry at the link itself is followed (--keep-directory-symlink)
    assert tarlist.leading_out([chain[0], [Entry("etc/link/", dir_)]]) != []
    # a later level that replaces the link with a file, then writes beside it: fine
    assert tarlist.leading_out([chain[0], [Entry("etc/link", file_)],
                                [Entry("etc/other", file_)]]) == []
    assert tarlist.leading_out([[Entry("dev/sda", "b", device="8,0"),
                                 Entry("wh", "c", device="0,0")]]) == [
        "level 0 holds a device node dev/sda (8,0)"]
    line = (b'lrwxrwxrwx  0/0  0 2026-12-01 10:00 "etc/a \\" -> b" -> "/x y"\n')
    assert tarlist.parse_line(line) == Entry('etc/a " -> b', "l", "/x y")
    with pytest.raises(tarlist.ListingUnreadable):
        tarlist.parse_line(b"-rw-r--r-- 0/0 0 2026-12-01 10:00 unquoted\n")


# ------------------------------------------------------------------------------ by hand
def by_hand_block() -> str:
    """The bash block of docs/by-hand.md marked ``by-hand-incremental``, as written there."""
    text = (REPO / "docs/by-hand.md").read_text()
    found = re.search(r"<!-- by-hand-incremental -->\n```bash\n(.*?)```", text, re.S)
    assert found, "docs/by-hand.md lost its by-hand incremental block"
    return found.group(1)


@pytest.mark.parametrize("forgery", ["symlink", "hard link", "device node"])
def test_the_documented_by_hand_commands_are_confined_too(forgery, container, os_env,
                                                         tmp_path, victim):
    if forgery == "symlink":
        ids = forged_chain(container, tmp_path, victim)
    elif forgery == "hard link":
        plant_level(container, "forged-0", plain_archive(
            ("etc/link", tarfile.SYMTYPE, str(victim), 0o777, "")), [])
        plant_level(container, "forged-1", plain_archive(
            ("etc/hl", tarfile.LNKTYPE, "etc/link/secret", 0o644, "")), ["forged-0"],
            minute=1)
        ids = ["forged-0", "forged-1"]
    else:
        plant_level(container, "forged-0", plain_archive(
            ("etc/disk", tarfile.BLKTYPE, "", 0o666, "")), [])
        ids = ["forged-0"]
    workdir, target = tmp_path / "by-hand", tmp_path / "restored"
    workdir.mkdir()
    target.mkdir(mode=0o700)
    done = subprocess.run(["bash", "-c", by_hand_block()], cwd=workdir, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, **os_env, "CONTAINER": container, "ID": ids[-1],
                               "TARGET": str(target)})
    assert done.returncode != 0, done.stdout + done.stderr
    assert_untouched(victim)
    assert not (target / "etc/disk").exists() and not (target / "etc/hl").exists()
    errors = {"symlink": "Read-only file system", "hard link": "Invalid cross-device link",
              "device node": "Cannot mknod: Operation not permitted"}
    assert errors[forgery] in done.stderr


# -------------------------------------------------------------- no predictable path (part 3)
@pytest.fixture
def intruder():
    """A throwaway unprivileged user of our own, removed afterwards."""
    name = f"ucbplant{os.getpid() % 100000}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", name],
                   check=True)
    try:
        yield name
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False)
        subprocess.run(["userdel", name], check=True)


def test_a_racing_local_user_never_gets_root_to_write_through_a_planted_name(
        container, os_env, intruder, request):
    """The old default target was <staging>/undercloud-restore-<id>, known from root's argv.
    An unprivileged user plants that name and, watching the staging directory in a tight
    loop, every name it has seen root use there, as symlinks into its own directory, again
    and again: so a name that a later run would use again (anything but a random one) meets
    a planted link. The operator removes the first run's target before the second run."""
    # pytest's tmp path is root's alone: this one the intruder can reach
    reachable = Path(tempfile.mkdtemp(prefix="ucb-race-", dir="/var/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(reachable))
    reachable.chmod(0o755)
    staging = reachable / "staging"
    staging.mkdir()
    staging.chmod(0o1777)  # a shared directory, as /var/tmp
    trap = reachable / "trap"
    trap.mkdir()
    os.chown(trap, int(subprocess.run(["id", "-u", intruder], capture_output=True,
                                      text=True).stdout), 0)
    plant_level(container, "genuine-0", plain_archive(
        ("etc/hostname", tarfile.REGTYPE, "", 0o644, "restored\n")), [])
    predictable = "undercloud-restore-genuine-0"
    as_intruder = ["runuser", "-u", intruder, "--"]
    subprocess.run([*as_intruder, "ln", "-s", str(trap), str(staging / "restore-target")],
                   check=True)
    watch = ("import os, sys\n"
             "staging, trap, seen = sys.argv[1], sys.argv[2], {sys.argv[3]}\n"
             "while True:\n"
             "    for name in os.listdir(staging):\n"
             "        if name.startswith('undercloud-') and name not in seen:\n"
             "            seen.add(name)\n"
             "            print(name, flush=True)\n"
             "    for name in seen:\n"
             "        try:\n"
             "            os.symlink(trap, os.path.join(staging, name))\n"
             "        except OSError:\n"
             "            pass\n")
    planter = subprocess.Popen([*as_intruder, "/usr/bin/python3", "-I", "-c", watch,
                                str(staging), str(trap), predictable], start_new_session=True,
                               stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 5
        while not (staging / predictable).is_symlink():  # the race is on
            assert time.monotonic() < deadline, "the planter did not start"
            time.sleep(0.05)
        first = restore_cli(container, "genuine-0", "--staging-dir", str(staging), "--json")
        assert first.returncode == 0, first.stderr
        used = Path(json.loads(first.stdout)["files"]["target"])
        shutil.rmtree(used)  # its name is free again: the planter plants it
        deadline = time.monotonic() + 5
        while not used.is_symlink():
            assert time.monotonic() < deadline, f"the planter did not see {used.name}"
            time.sleep(0.05)
        result = restore_cli(container, "genuine-0", "--staging-dir", str(staging), "--json")
        named = restore_cli(container, "genuine-0", "--target",
                            str(staging / "restore-target"))
    finally:
        os.killpg(planter.pid, 9)
        seen = planter.communicate()[0].split()
    assert used.name in seen  # it saw root's names as they appeared
    assert list(trap.iterdir()) == []  # root wrote nothing through a planted name
    assert result.returncode == 0, result.stderr
    target = Path(json.loads(result.stdout)["files"]["target"])
    assert target != used and target.parent == staging
    assert target.name.startswith(predictable + "-")
    assert not target.is_symlink() and stat.S_IMODE(target.stat().st_mode) == 0o700
    assert (target / "etc/hostname").read_text() == "restored\n"
    # a named target that another user holds as a link is refused, not followed
    assert named.returncode == confine.TargetUnsafe.exit_code == 65, named.stderr
    assert "can be replaced by another user" in last_line(named)


def test_an_existing_target_must_be_roots_and_closed_to_others(tmp_path):
    shared = tmp_path / "open"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(confine.TargetUnsafe, match="writable by other users"):
        confine.secure_directory(str(shared))
    owned = tmp_path / "theirs"
    owned.mkdir()
    os.chown(owned, 65534, 65534)
    with pytest.raises(confine.TargetUnsafe, match="belongs to uid 65534"):
        confine.secure_directory(str(owned))
    made = confine.secure_directory(str(tmp_path / "a/b"), create=True, mode=0o755)
    assert made == str(tmp_path / "a/b") and stat.S_IMODE(os.stat(made).st_mode) == 0o755
    assert confine.secure_directory("/") == "/"


