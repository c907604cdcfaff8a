"""Incremental filesystem archives (GNU tar --listed-incremental levels) end to end,
against the real MariaDB and Swift behind Keystone: a full, then levels holding only what
changed; restores of the chain by the tool and by hand with plain tar; every doubt about a
chain (missing or damaged parent, altered snapshot, a clock that went backwards, another host)
a full with a warning; retention that keeps what a kept backup depends on."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import sample_undercloud as sample
from conftest import (
    backup_cli,
    backup_in_process,
    cli_in_process,
    describe_tree,
    remove_container,
    swift_store,
)

from undercloud_backup.core.errors import ChainTargetNotEmpty
from undercloud_backup.core.manifest import FS_OBJECT, SNAPSHOT_OBJECT
from undercloud_backup.files import chain
from undercloud_backup.restore import files as restore
from undercloud_backup.store import catalogue, retention

TIMES: dict[str, float] = {}


def run(root: Path, container: str, db_cnf: str, staging: Path, *args: str) -> dict:
    """A backup with the CLI's flags, called in this process (the CLI's process, its exit
    status and last line, are what test_list_shows_kind_and_parent and the --full-every check
    run it for)."""
    started = time.monotonic()
    result = backup_in_process("--root", str(root), "--container", container,
                               "--db-defaults-file", db_cnf, "--staging-dir", str(staging),
                               "--json", *args)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    summary["stderr"] = result.stderr
    summary["seconds"] = time.monotonic() - started
    return summary


def manifest(container: str, backup_id: str):
    return catalogue.get_manifest(swift_store(), container, backup_id)


def archive_size(summary: dict) -> int:
    return next(o["size"] for o in summary["objects"] if o["name"].endswith(FS_OBJECT))


def members(container: str, backup_id: str) -> list[str]:
    body = swift_store().get_bytes(container, f"{backup_id}/{FS_OBJECT}")
    return subprocess.run("zstd -dc | tar -t", shell=True, input=body, capture_output=True,
                          check=True).stdout.decode().splitlines()


def change_one_percent(root: Path, step: int) -> None:
    """Some files modified, some added, some deleted; a mode and an owner changed."""
    stack = root / "home/stack"
    if step == 1:
        with open(root / "etc/keystone/keystone.conf", "a") as conf:
            conf.write("[cache]\nenabled = true\n")
        (root / "etc/keystone/new-policy.yaml").write_text("admin: role:admin\n")
        (root / "etc/hosts").unlink()
        (stack / "stackrc").chmod(0o600)
        os.chown(stack / "templates/file 2.yaml", 1001, 1001)
        (stack / "new dir/inner").mkdir(parents=True)
        (stack / "new dir/inner/ü.txt").write_text("added in level 1\n")
    else:
        (stack / "templates/file 4.yaml").unlink()
        (root / "etc/keystone/new-policy.yaml").write_text("admin: role:admin or role:x\n")
        (stack / "empty dir/inner").rmdir()
        (root / "etc/pki/tls/certs/added.pem").write_text("-----BEGIN CERTIFICATE-----\n")


@pytest.fixture(scope="module")
def staging(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("staging")


@pytest.fixture(scope="module")
def chain3(os_env, db_cnf, tmp_path_factory, staging):
    """A full and two incrementals of a sample tree, with the tree as each one saw it."""
    root = sample.make_files(tmp_path_factory.mktemp("incr") / "undercloud",
                             sample.SampleSize(images_mib=(3,)))
    container = f"ucbtest-{uuid.uuid4().hex[:10]}"
    trees, summaries = [], []
    try:
        for step in range(3):
            if step:
                time.sleep(0.05)
                change_one_percent(root, step)
            trees.append(describe_tree(root))
            summaries.append(run(root, container, db_cnf, staging))
        yield {"root": root, "container": container, "trees": trees, "summaries": summaries}
        print("\nincremental measurements:", json.dumps(TIMES))  # pytest -s shows them
    finally:
        remove_container(container)


def test_nightly_after_a_full_is_an_incremental_of_what_changed(chain3):
    container = chain3["container"]
    full, first, second = chain3["summaries"]
    ids = [s["backup_id"] for s in chain3["summaries"]]
    assert (full["kind"], full["parent"]) == ("full", None)
    assert (first["kind"], first["parent"]) == ("incremental", ids[0])
    assert (second["kind"], second["parent"]) == ("incremental", ids[1])
    assert "taking an incremental backup of the files: level 2" in second["stderr"]
    # A full is format 2 (older tools restore it), an incremental 3 (they refuse it).
    m0, m2 = manifest(container, ids[0]), manifest(container, ids[2])
    assert (m0.format, m0.kind, m0.level, m0.chain) == ("undercloud-backup/2", "full", 0, [])
    assert "no complete backup of host" in m0.full_reason
    assert (m2.format, m2.kind, m2.level, m2.chain, m2.parent) == (
        "undercloud-backup/3", "incremental", 2, ids[:2], ids[1])
    snapshot = m2.object(SNAPSHOT_OBJECT)
    assert m2.snapshot["object"] == snapshot.name == f"{ids[2]}/{SNAPSHOT_OBJECT}"
    assert (m2.snapshot["size"], m2.snapshot["sha256"]) == (snapshot.size, snapshot.sha256)
    assert chain.check_links(swift_store(), container, m2) == []
    # The level holds what changed (and every directory, for the deletions), nothing else.
    level1 = members(container, ids[1])
    assert "etc/keystone/keystone.conf" in level1 and "etc/keystone/new-policy.yaml" in level1
    assert "home/stack/new dir/inner/ü.txt" in level1
    assert "var/lib/glance/images/image-0.qcow2" not in level1
    assert "etc/keystone/fernet-keys/0" not in level1
    assert archive_size(first) < archive_size(full) / 20
    TIMES.update(full_s=full["seconds"], incremental_s=first["seconds"],
                 full_bytes=archive_size(full), incremental_bytes=archive_size(first),
                 incremental2_bytes=archive_size(second))


def test_list_shows_kind_and_parent(chain3):
    container = chain3["container"]
    ids = [s["backup_id"] for s in chain3["summaries"]]
    listed = backup_cli("--list", "--container", container)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[1:] for line in lines] == [
        [ids[0], "full", "database", "dump"],
        [ids[1], "incremental", "parent", ids[0], "database", "dump"],
        [ids[2], "incremental", "parent", ids[1], "database", "dump"]]
    as_json = json.loads(backup_cli("--list", "--json", "--container", container).stdout)
    assert [(b["backup_id"], b["kind"], b["parent"]) for b in as_json["backups"]] == [
        (ids[0], "full", None), (ids[1], "incremental", ids[0]),
        (ids[2], "incremental", ids[1])]


def test_the_tool_restores_the_chain_deletions_modes_and_owners_included(chain3, tmp_path):
    container, trees = chain3["container"], chain3["trees"]
    ids = [s["backup_id"] for s in chain3["summaries"]]
    target = tmp_path / "target"
    dry = cli_in_process("restore", "--container", container, "--backup-id", ids[2],
                         "--target", str(target), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[0] == (f"chain    {ids[0]} > {ids[1]} > {ids[2]} (full "
                                          "first, each level in order)")
    assert f"create   {target}/home/stack/new dir/inner/ü.txt" in dry.stdout
    assert not target.exists()
    started = time.monotonic()
    done = cli_in_process("restore", "--container", container, "--backup-id", ids[2],
                          "--target", str(target), "--json")
    assert done.returncode == 0, done.stderr
    files = json.loads(done.stdout)["files"]
    TIMES["chain_restore_s"] = time.monotonic() - started
    TIMES["chain_restore_tar_s"] = files["seconds"]
    assert files["chain"] == ids and files["deleted"] >= 3
    restored = describe_tree(target)
    assert restored == trees[2]  # bytes, modes, owners, xattrs, links; deletions applied
    assert not (target / "etc/hosts").exists() and not (target / "home/stack/empty dir/inner"
                                                           ).exists()
    st = (target / "home/stack/templates/file 2.yaml").lstat()
    assert (st.st_uid, st.st_gid) == (1001, 1001)
    assert stat.S_IMODE((target / "home/stack/stackrc").lstat().st_mode) == 0o600


def test_restore_of_an_incremental_by_path_and_into_an_occupied_target(chain3, tmp_path):
    import logging

    container, trees = chain3["container"], chain3["trees"]
    ids = [s["backup_id"] for s in chain3["summaries"]]
    store = swift_store()
    m1 = manifest(container, ids[1])
    target = tmp_path / "only-keystone"
    result = restore.restore_files(store, container, m1, restore.RestoreRequest(
        backup_id=ids[1], target=str(target), paths=("/etc/keystone",),
        staging_dir=str(tmp_path)), logging.getLogger("test"))
    assert result.chain == ids[:2]
    keystone = {p: v for p, v in trees[1].items() if p.startswith("etc/keystone/")}
    assert {p: v for p, v in describe_tree(target).items() if p.startswith("etc/keystone/")} \
        == keystone
    # Over files that exist: the chain deletes what the backup did not hold, so not unasked.
    with pytest.raises(ChainTargetNotEmpty):
        restore.restore_files(store, container, m1, restore.RestoreRequest(
            backup_id=ids[1], target=str(target), staging_dir=str(tmp_path)),
            logging.getLogger("test"))


def test_plain_gnu_tar_restores_the_chain_by_hand(chain3, tmp_path):
    """The documented procedure: each level, full first, `tar -x --listed-incremental=/dev/null`."""
    container, trees = chain3["container"], chain3["trees"]
    ids = [s["backup_id"] for s in chain3["summaries"]]
    target = tmp_path / "by-hand"
    target.mkdir()
    for backup_id in ids[:2]:  # restore the middle of the chain: level 1
        archive = tmp_path / f"{backup_id}.tar.zst"
        archive.write_bytes(swift_store().get_bytes(container, f"{backup_id}/{FS_OBJECT}"))
        subprocess.run(f"zstd -dc '{archive}' | tar -x --listed-incremental=/dev/null --xattrs "
                       f"--xattrs-include='*' --acls --numeric-owner -C '{target}'", shell=True,
                       check=True)
    assert describe_tree(target) == trees[1]
    assert not (target / "etc/hosts").exists()


def test_retention_keeps_every_backup_a_kept_incremental_needs(chain3):
    container = chain3["container"]
    ids = [s["backup_id"] for s in chain3["summaries"]]
    policy = retention.RetentionPolicy(keep_last=1, keep_daily=0, keep_weekly=0)
    result = retention.prune(swift_store(), container, policy, dt.datetime.now(dt.UTC),
                             dry_run=False)
    assert result.deleted == []
    reasons = {b.backup_id: b.reasons for b in result.kept}
    assert reasons == {ids[2]: ["last", "newest"], ids[1]: [f"parent of {ids[2]}"],
                       ids[0]: [f"parent of {ids[2]}"]}
    dry = cli_in_process("prune", "--container", container, "--keep-last", "1",
                         "--keep-daily", "0", "--keep-weekly", "0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"keep         {ids[0]}  (parent of {ids[2]})" in dry.stdout.splitlines()


def test_full_flag_forces_a_level_0_and_full_every_bounds_the_chain(chain3, db_cnf, staging):
    root, container = chain3["root"], chain3["container"]
    ids = [s["backup_id"] for s in chain3["summaries"]]
    aged = run(root, container, db_cnf, staging, "--dry-run", "--full-every", "1s")
    assert (aged["kind"], aged["parent"]) == ("full", None)
    assert f"the last full of this host, {ids[0]}" in aged["stderr"]
    assert "is older than full_every (1s)" in aged["stderr"]
    never = run(root, container, db_cnf, staging, "--dry-run", "--full-every", "0")
    assert never["kind"] == "full" and "full_every is 0" in never["stderr"]
    bad = backup_cli("--root", str(root), "--container", container, "--full-every", "weekly")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "undercloud-backup: error: Invalid configuration: --full-every weekly: value error")
    forced = run(root, container, db_cnf, staging, "--full")
    assert (forced["kind"], forced["parent"]) == ("full", None)
    assert manifest(container, forced["backup_id"]).full_reason.startswith("requested")
    assert "taking a FULL backup" not in forced["stderr"]  # asked for: no warning


def test_verify_chain_check_names_a_parent_whose_archive_is_gone(chain3):
    container = chain3["container"]
    ids = [s["backup_id"] for s in chain3["summaries"]]
    store = swift_store()
    store.delete(container, f"{ids[0]}/{FS_OBJECT}")
    problems = chain.check_links(store, container, manifest(container, ids[2]))
    assert problems == [f"archive {ids[0]}/{FS_OBJECT} of {ids[0]} is missing"]
    store.delete(container, catalogue.manifest_name(ids[1]))
    problems = chain.check_links(store, container, manifest(container, ids[2]))
    assert f"ancestor {ids[1]} of {ids[2]} has no manifest (deleted or incomplete)" in problems
    with pytest.raises(Exception) as refused:
        restore.chain_of(store, container, manifest(container, ids[2]))
    assert refused.value.exit_code == 60


def _rewrite(container: str, backup_id: str, **changes) -> bytes:
    """Change fields of a manifest in Swift; return its old body."""
    store = swift_store()
    name = catalogue.manifest_name(backup_id)
    body = store.get_bytes(container, name)
    data = {**json.loads(body), **changes}
    catalogue.put_manifest_body(store, container, backup_id, json.dumps(data).encode())
    return body


def test_a_doubtful_chain_forces_a_full_with_a_warning(os_env, db_cnf, tmp_path, container):
    root = sample.make_files(tmp_path / "undercloud", sample.SampleSize(images_mib=(1,)))
    staging = tmp_path / "staging"
    staging.mkdir()
    store = swift_store()
    full = run(root, container, db_cnf, staging)
    (root / "etc/hosts").write_text("changed\n")
    first = run(root, container, db_cnf, staging)
    assert first["parent"] == full["backup_id"]

    # A parent whose chain lost an archive (damaged)
    store.delete(container, f"{full['backup_id']}/{FS_OBJECT}")
    damaged = run(root, container, db_cnf, staging)
    assert (damaged["kind"], damaged["parent"]) == ("full", None)
    warning = [ln for ln in damaged["stderr"].splitlines() if "taking a FULL backup" in ln]
    assert len(warning) == 1 and f"the chain of parent {first['backup_id']} is broken" \
        in warning[0] and "is missing" in warning[0]
    assert "is broken" in manifest(container, damaged["backup_id"]).full_reason

    # A snapshot altered in Swift (same size, other bytes)
    name = f"{damaged['backup_id']}/{SNAPSHOT_OBJECT}"
    body = bytearray(store.get_bytes(container, name))
    body[-5] ^= 0xFF
    store.put(container, name, bytes(body))
    tampered = run(root, container, db_cnf, staging)
    assert tampered["kind"] == "full"
    assert "does not match the sha256 its manifest records" in tampered["stderr"]

    # A parent dated after our clock: the clock went backwards
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat(timespec="seconds")
    original = _rewrite(container, tampered["backup_id"], created_at=future)
    clock = run(root, container, db_cnf, staging)
    assert clock["kind"] == "full" and "the clock went backwards" in clock["stderr"]

    # Another host's backup in the same container is never a parent, however new
    catalogue.put_manifest_body(store, container, tampered["backup_id"], original)
    _rewrite(container, clock["backup_id"], hostname="other-host")
    shared = run(root, container, db_cnf, staging)
    assert (shared["kind"], shared["parent"]) == ("incremental", tampered["backup_id"])

    # Signing installed since: a signed level on unsigned links would be refused at restore (53)
    key = tmp_path / "signing-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    signed = run(root, container, db_cnf, staging, "--signing-key", str(key))
    assert signed["kind"] == "full" and "its chain has unsigned links" in signed["stderr"]
    assert f"({tampered['backup_id']}, {shared['backup_id']}: made before" in signed["stderr"]
    level = run(root, container, db_cnf, staging, "--signing-key", str(key))
    assert (level["kind"], level["parent"]) == ("incremental", signed["backup_id"])
    # The key changed (rotated, or a reinstalled node): the new key's allowed signers would
    # refuse the old key's links (54)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "new")],
                   check=True)
    rotated = run(root, container, db_cnf, staging, "--signing-key", str(tmp_path / "new"))
    assert rotated["kind"] == "full", rotated["stderr"]
    assert f"but {signed['backup_id']}, {level['backup_id']} of its chain with another key" \
        in rotated["stderr"]


def test_an_encrypted_chain_uses_the_nodes_own_copy_of_the_snapshot(os_env, db_cnf, tmp_path,
                                                                    container, monkeypatch):
    keydir = tmp_path / "keys"
    keydir.mkdir(mode=0o700)
    subprocess.run(["age-keygen", "-o", str(keydir / "op")], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(keydir / "op")], check=True,
                               capture_output=True, text=True).stdout
    (keydir / "recipients").write_text(recipient)
    cache = tmp_path / "cache"
    env = dict(os.environ, UCB_SNAPSHOT_CACHE=str(cache))
    root = sample.make_files(tmp_path / "undercloud", sample.SampleSize(images_mib=(1,)))

    def encrypted(*args: str) -> dict:
        result = backup_in_process("--root", str(root), "--container", container,
                                   "--db-defaults-file", db_cnf, "--recipients-file",
                                   str(keydir / "recipients"), "--json", *args, env=env)
        assert result.returncode == 0, result.stderr
        return {**json.loads(result.stdout), "stderr": result.stderr}

    full = encrypted()
    m0 = manifest(container, full["backup_id"])
    assert m0.snapshot["object"].endswith(f"{SNAPSHOT_OBJECT}.age")
    copy = cache / container / f"{full['backup_id']}.snar"
    assert copy.is_file() and stat.S_IMODE(copy.parent.stat().st_mode) == 0o700
    (root / "etc/hosts").write_text("changed\n")
    first = encrypted()
    assert (first["kind"], first["parent"]) == ("incremental", full["backup_id"])
    # Without the copy (another node, or lost), or with one that does not match: a full.
    monkeypatch.setenv("UCB_SNAPSHOT_CACHE", str(cache))
    plan = restore_plan(root)
    (cache / container / f"{first['backup_id']}.snar").write_bytes(b"GNU tar-1.34-2\nx")
    level, _ = chain.decide(swift_store(), container, hostname=m0.hostname, plan=plan,
                            full=False, full_every_s=7 * 86400, now=dt.datetime.now(dt.UTC))
    assert level.forced and "does not match its manifest's sha256" in level.full_reason
    (cache / container / f"{first['backup_id']}.snar").unlink()
    level, _ = chain.decide(swift_store(), container, hostname=m0.hostname, plan=plan,
                            full=False, full_every_s=7 * 86400, now=dt.datetime.now(dt.UTC))
    assert level.forced and "has no local copy of its snapshot" in level.full_reason


def restore_plan(root: Path):
    from undercloud_backup.files import archive

    return archive.plan_paths(str(root))

