"""``python -m flows.verify`` against real backups in Swift, a real MariaDB and Prefect.

A verification must pass on a good backup, and fail naming what is wrong when a segment is
overwritten, an object is deleted, or the dump does not load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PREFECT_API_URL, REPO, backup_in_process, cli_in_process
from deploy_helpers import remove_tree, scratch_dir

from undercloud_backup import config
from undercloud_backup.core.manifest import Manifest, StoredObject
from undercloud_backup.db.scratch import ScratchServer, scratch_mariadb
from undercloud_backup.files import tarlist
from undercloud_backup.restore import verify
from undercloud_backup.store import catalogue, swift
from undercloud_backup.store.connection import SwiftStore

SCRATCH_PREFIX = "undercloud-verify-db-"


def cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m flows.<module>`` the way an operator does: kept for the CLI's contract
    (exit status, the report on stdout, the last line); the tests of what a verification finds
    call the flow in this process (cli_in_process), without a Python start with Prefect."""
    return subprocess.run([sys.executable, "-m", f"flows.{module}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def database_sql(name: str, rows: int = 300) -> str:
    """A small database with what a dump must carry: InnoDB and MyISAM tables, non-ASCII
    data, a view, a trigger and a routine."""
    return f"""
CREATE DATABASE {name};
USE {name};
CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(40), payload BLOB) ENGINE=InnoDB;
INSERT INTO items SELECT seq, CONCAT('item-', seq), RANDOM_BYTES(32) FROM seq_1_to_{rows};
CREATE TABLE counters (name VARCHAR(16) PRIMARY KEY, n INT) ENGINE=MyISAM;
INSERT INTO counters VALUES ('boots', 42), ('ünïcode', 7);
CREATE TABLE log (id INT AUTO_INCREMENT PRIMARY KEY, item INT) ENGINE=InnoDB;
CREATE TRIGGER items_log AFTER UPDATE ON items FOR EACH ROW INSERT INTO log (item) VALUES (NEW.id);
CREATE VIEW first_items AS SELECT id, name FROM items WHERE id < 10;
CREATE PROCEDURE count_items(OUT n INT) SELECT COUNT(*) INTO n FROM items;
UPDATE items SET name = CONCAT(name, '!') WHERE id <= 5;
"""


@pytest.fixture(scope="module")
def private_mariadb() -> Iterator[ScratchServer]:
    """A real MariaDB of these tests' own (root through its unix socket): what other tests
    do to the shared server (benchmark tables of gigabytes, sample databases dropped half
    way through a dump) cannot disturb a backup's manifest or its dump."""
    with scratch_mariadb("/var/tmp", lifetime_s=1800) as server:
        yield server


def run_sql(server: ScratchServer, sql: str) -> str:
    return subprocess.run(server.client_command("--skip-column-names").argv, input=sql,
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture
def test_database(private_mariadb):
    name = f"ucb_verify_{uuid.uuid4().hex[:8]}"
    run_sql(private_mariadb, database_sql(name))
    yield name
    run_sql(private_mariadb, f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture
def backup(sample_root, test_database, private_mariadb, container, os_env) -> dict:
    """A fresh backup of the sample tree and the databases, in 1 MiB segments (in this
    process: what is verified, not a test of the backup's CLI)."""
    result = backup_in_process("--root", str(sample_root), "--container", container,
                               "--db-socket", private_mariadb.socket, "--db-user", "root",
                               "--segment-size", "1MiB", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def archived_entries(root: Path) -> int:
    """What tar archives of the sample: the default paths and everything below them."""
    tops = [root / p for p in ("etc", "root", "home/stack", "srv/node", "var/lib/glance/images")]
    return sum(1 + sum(len(d) + len(f) for _, d, f in os.walk(top)) for top in tops)


def swift_store() -> SwiftStore:
    return SwiftStore.connect(config.swift_settings_from_env())


def get_manifest(container: str, backup_id: str) -> Manifest:
    return catalogue.get_manifest(swift_store(), container, backup_id)


def archive_of(manifest: Manifest) -> StoredObject:
    obj = manifest.object("filesystem.tar.zst")
    assert obj is not None
    return obj


def put_plain(store: SwiftStore, container: str, obj: StoredObject, body: bytes) -> None:
    """Store ``body`` as ``obj`` (a plain object) and make ``obj`` record it truthfully."""
    obj.sha256 = hashlib.sha256(body).hexdigest()
    obj.etag = store.put(container, obj.name, body,
                         headers={swift.SHA256_HEADER: obj.sha256})
    obj.size, obj.segments, obj.segment_container = len(body), [], None


def scratch_dirs(staging: Path) -> set[str]:
    return {p.name for p in staging.iterdir() if p.name.startswith(SCRATCH_PREFIX)}


def scratch_servers(staging: Path) -> set[str]:
    """Processes started in a scratch server's directory under ``staging``: this run's, not
    those of whatever else runs on the machine meanwhile."""
    found = subprocess.run(["pgrep", "-f", f"{staging}/{SCRATCH_PREFIX}"], capture_output=True,
                           text=True)
    return set(found.stdout.split())


@contextlib.contextmanager
def scratch_dirs_seen(staging: Path) -> Iterator[set[str]]:
    """The scratch servers' directories that appear under ``staging`` meanwhile (polled)."""
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            seen.update(scratch_dirs(staging))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield seen
    finally:
        done.set()
        watcher.join()


def latest_artifact(key: str) -> dict:
    with urllib.request.urlopen(f"{PREFECT_API_URL}/artifacts/{key}/latest") as response:
        return json.load(response)


@pytest.mark.slow
def test_a_good_backup_verifies_with_a_test_restore_of_every_table(backup, sample_root):
    staging = scratch_dir("ucb-verify-staging-")
    try:
        started = time.monotonic()
        with scratch_dirs_seen(staging) as seen:
            result = cli_in_process("verify", "--container", backup["container"], "--json",
                                    "--staging-dir", str(staging))
        elapsed = time.monotonic() - started
        left, servers = scratch_dirs(staging), scratch_servers(staging)
    finally:
        remove_tree(staging)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["problems"] == []
    assert report["backup_id"] == backup["backup_id"]  # the latest, by default

    objects = {Path(o["name"]).name: o for o in report["objects"]}
    archive = objects["filesystem.tar.zst"]
    assert archive["ok"] and archive["segments_read"] >= 3  # every segment read and checked
    assert archive["sha256"] == archive["expected_sha256"]
    assert objects["mariadb-all-databases.sql.zst"]["ok"]

    assert report["archive"]["paths_found"] == ["/etc", "/root", "/home/stack", "/srv/node",
                                                "/var/lib/glance/images"]
    assert report["archive"]["entries"] == archived_entries(sample_root)
    assert "etc/keystone/fernet-keys" in report["archive"]["essentials_found"]

    database = report["database"]
    assert database["loaded"] is True
    assert database["compared"] == database["matching"] >= 3  # every table, rows and checksum
    assert database["checksums"] is True
    assert database["differences"] == []

    # The throwaway server ran where it was told, and is gone, with its directory.
    assert len(seen) == 1, seen
    assert left == set() and servers == set()

    artifact = latest_artifact("backup-verification")
    assert backup["backup_id"] in artifact["data"] and "PASSED" in artifact["data"]
    print(f"\nverify of the sample undercloud: {elapsed:.1f} s (in process), "
          f"{report['seconds']} s in the flow, dump loaded in {database['load_seconds']} s")


@pytest.mark.slow
def test_without_table_checksums_row_counts_are_recorded_and_verified(
        sample_root, test_database, private_mariadb, container, os_env):
    result = backup_in_process("--root", str(sample_root), "--container", container,
                               "--db-only", "--db-socket", private_mariadb.socket,
                               "--db-user", "root", "--no-table-checksums", "--no-prune",
                               "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    manifest = get_manifest(container, summary["backup_id"])
    tables = manifest.mariadb.databases[test_database]
    # 5 updated items fired the trigger into log
    assert {t.table: t.rows for t in tables} == {"counters": 2, "items": 300, "log": 5}
    assert all(t.checksum is None for t in tables)

    report = json.loads(cli_in_process("verify", "--container", container, "--json").stdout)
    assert report["ok"] is True, report["problems"]
    assert report["database"]["compared"] == report["database"]["matching"] >= 3
    assert report["database"]["checksums"] is False  # and said so, not compared against None


def test_a_manifest_from_before_segment_sha256_still_verifies_by_swift_md5(backup):
    """Manifests written before per-segment SHA-256 carry Swift's MD5 (the ETag) only."""
    store = swift_store()
    manifest = get_manifest(backup["container"], backup["backup_id"])
    archive = archive_of(manifest)
    assert archive.segments and all(len(s.sha256) == 64 for s in archive.segments)
    data = manifest.to_dict()  # as an older version wrote it: no segment SHA-256
    for record in data["objects"]:
        for segment in record["segments"]:
            del segment["sha256"]
    catalogue.put_manifest_body(store, backup["container"], backup["backup_id"],
                                json.dumps(data).encode())
    result = cli_in_process("verify", "--container", backup["container"], "--skip-database",
                            "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True
    # ... and a damaged segment is still found, by its MD5
    segment = archive.segments[1]
    store.put(archive.segment_container, segment.name, os.urandom(segment.size))
    result = cli_in_process("verify", "--container", backup["container"], "--skip-database",
                            "--json")
    assert result.returncode == verify.VerificationFailed.exit_code
    problems = json.loads(result.stdout)["problems"]
    assert any(segment.name in p and "md5" in p for p in problems), problems


@pytest.mark.slow
def test_schema_objects_are_compared_with_what_the_backup_recorded(backup, test_database):
    """Rows alone would pass a dump without its triggers (an account without TRIGGER)."""
    store = swift_store()
    manifest = get_manifest(backup["container"], backup["backup_id"])
    assert manifest.mariadb.schema_objects[test_database] == {
        "views": 1, "triggers": 1, "routines": 1, "events": 0}
    # The manifest says one more trigger than the dump holds: verify must notice.
    manifest.mariadb.schema_objects[test_database]["triggers"] = 2
    catalogue.put_manifest(store, backup["container"], manifest)
    result = cli_in_process("verify", "--container", backup["container"], "--json")
    assert result.returncode == verify.VerificationFailed.exit_code, result.stderr
    problems = json.loads(result.stdout)["problems"]
    assert problems == [f"database {test_database}: 1 triggers after the load, the manifest "
                        "records 2"]


def _segment(backup: dict, index: int):
    archive = archive_of(get_manifest(backup["container"], backup["backup_id"]))
    segment = archive.segments[index]
    return archive.segment_container, segment.name, segment


@pytest.mark.slow
def test_an_overwritten_segment_fails_verification_naming_object_and_segment(backup):
    segment_container, name, segment = _segment(backup, 1)
    # Same size, different bytes, written with plain swiftclient.
    swift_store().put(segment_container, name, os.urandom(segment.size))

    # As a process: the exit status, the --json report of a failed verification on stdout and
    # the error last, as an operator gets them.
    result = cli("verify", "--container", backup["container"], "--backup-id",
                 backup["backup_id"], "--skip-database", "--json")
    assert result.returncode == verify.VerificationFailed.exit_code, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False
    first = report["problems"][0]
    assert "segment 00000001" in first and name in first and "sha256" in first
    archive = next(o for o in report["objects"] if o["name"].endswith("filesystem.tar.zst"))
    assert archive["ok"] is False and archive["segments_read"] == len(
        archive_of(get_manifest(backup["container"], backup["backup_id"])).segments)
    # all still checked
    dump = next(o for o in report["objects"] if o["name"].endswith(".sql.zst"))
    assert dump["ok"] is True  # the rest of the backup is still judged, and intact
    errors = result.stderr.strip().splitlines()
    assert errors[-1].startswith(f"undercloud-verify: error: Backup {backup['backup_id']} "
                                 "failed verification: ")
    assert "segment 00000001" in errors[-1]
    assert "FAILED" in latest_artifact("backup-verification")["data"]


@pytest.mark.slow
def test_a_deleted_object_fails_verification_naming_it(backup):
    name = f"{backup['backup_id']}/mariadb-all-databases.sql.zst"
    swift_store().delete(backup["container"], name)

    result = cli_in_process("verify", "--container", backup["container"], "--json")
    assert result.returncode == verify.VerificationFailed.exit_code, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert any(name in p and "missing" in p for p in report["problems"]), report["problems"]
    assert report["archive"]["problems"] == []  # the archive itself is fine


@pytest.mark.slow
def test_a_dump_that_does_not_load_fails_verification(backup, tmp_path):
    """A truncated dump whose manifest record is consistent: only loading it can tell."""
    store = swift_store()
    container, backup_id = backup["container"], backup["backup_id"]
    manifest = get_manifest(container, backup_id)
    record = manifest.object("mariadb-all-databases.sql.zst")
    dump = tmp_path / "dump.sql.zst"
    with open(dump, "wb") as out:
        out.write(b"".join(store.get(container, record.name)[1]))
    # Everything up to the first INSERT, and half of it: what a dump cut short looks like.
    head = bytearray()
    with subprocess.Popen(["zstd", "-dc", str(dump)], stdout=subprocess.PIPE) as unzstd:
        for line in unzstd.stdout:
            if line.startswith(b"INSERT "):
                head += line[: len(line) // 2]
                break
            head += line
        unzstd.kill()
    broken = subprocess.run(["zstd", "-q", "-c"], input=bytes(head), capture_output=True,
                            check=True).stdout
    # Stored as a plain object now, whether or not the dump had been segmented.
    put_plain(store, container, record, broken)
    catalogue.put_manifest(store, container, manifest)

    result = cli_in_process("verify", "--container", container, "--json")
    assert result.returncode == verify.VerificationFailed.exit_code, result.stderr
    report = json.loads(result.stdout)
    assert all(o["ok"] for o in report["objects"])  # intact as stored...
    assert report["database"]["loaded"] is False  # ...but it does not restore
    problem = report["problems"][0]
    assert problem.startswith("loading mariadb-all-databases.sql.zst into a scratch MariaDB "
                              "failed: mariadb")
    assert "ERROR" in problem


def test_member_names_are_unescaped_as_tar_prints_them():
    assert tarlist.unescape_member(rb"home/stack/\303\234berschrift \303\274/") == \
        "home/stack/Überschrift ü/"
    assert tarlist.unescape_member(rb"a\\b\nc") == "a\\b\nc"


# -------------------------------------- planted dumps: a verify must never run their commands
def planted_dumps(marker: Path) -> dict[str, bytes]:
    """Dumps that run shell commands if a client executes them: one that does not even look
    like a dump, one that wears mariadb-dump's older banner (no sandbox line of its own)."""
    shell = (f"\\! id > {marker}\nsystem touch {marker}.system\n"
             "CREATE DATABASE planted;\n").encode()
    return {"bare": shell,
            "disguised": b"-- MariaDB dump 10.19  Distrib 10.11.19-MariaDB, for debian-linux-gnu"
                         b" (x86_64)\n--\n-- Host: localhost    Database: \n" + shell}


def plant_backup(container: str, dump: bytes, users: bytes | None = None) -> str:
    """A complete-looking backup written straight into Swift with the store: a zstd dump
    (and users object) and a manifest that records them truthfully."""
    from undercloud_backup.core.manifest import (
        DB_OBJECT,
        USERS_OBJECT,
        DatabaseSection,
    )

    store = swift_store()
    store.ensure_container(container)
    backup_id = f"planted-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    objects = []
    for leaf, body in ((DB_OBJECT, dump), (USERS_OBJECT, users)):
        if body is None:
            continue
        packed = subprocess.run(["zstd", "-q", "-c"], input=body, capture_output=True,
                                check=True).stdout
        obj = StoredObject(name=f"{backup_id}/{leaf}", size=0, sha256="", compression="zstd",
                           content="mariadb-dump")
        put_plain(store, container, obj, packed)
        objects.append(obj)
    manifest = Manifest(backup_id=backup_id, created_at="2026-11-30T22:00:00+00:00",
                        mariadb=DatabaseSection(
                            version="10.11.19-MariaDB", object=objects[0].name,
                            system_tables=[], databases={"planted": []},
                            users_object=objects[1].name if users is not None else None),
                        objects=objects)
    catalogue.put_manifest(store, container, manifest)
    return backup_id


@pytest.mark.parametrize("kind", ["bare", "disguised"])
def test_verify_never_runs_shell_lines_of_a_planted_dump(kind, container, os_env, tmp_path):
    marker = tmp_path / "ran"
    backup_id = plant_backup(container, planted_dumps(marker)[kind])

    result = cli_in_process("verify", "--container", container, "--backup-id", backup_id)
    assert result.returncode == verify.VerificationFailed.exit_code, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"undercloud-verify: error: Backup {backup_id} failed verification")
    if kind == "bare":  # refused before a byte reached the client
        assert "does not begin the way mariadb-dump's output begins" in last
    else:  # it looked like a dump: the client's sandbox refused the shell line
        assert "sandbox" in last.lower(), last
    assert not marker.exists() and not Path(f"{marker}.system").exists()
