"""``python -m flows.verify`` against real backups in Swift, a real MariaDB and Prefect.

A verification must pass on a good backup, and fail naming what is wrong when a segment is
overwritten, an object is deleted, or the dump does not load.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PREFECT_API_URL, REPO, backup_cli

from undercloud_backup import config, swift, verify
from undercloud_backup.scratchdb import ScratchServer, scratch_mariadb

SCRATCH_PREFIX = "undercloud-verify-db-"


def cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m flows.<module>`` the way an operator does."""
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
    """A fresh backup of the sample tree and the databases, in 1 MiB segments."""
    result = backup_cli("--root", str(sample_root), "--container", container,
                        "--db-socket", private_mariadb.socket, "--db-user", "root",
                        "--segment-size", "1MiB", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def archived_entries(root: Path) -> int:
    """What tar archives of the sample: the default paths and everything below them."""
    tops = [root / p for p in ("etc", "root", "home/stack", "srv/node", "var/lib/glance/images")]
    return sum(1 + sum(len(d) + len(f) for _, d, f in os.walk(top)) for top in tops)


def swift_conn():
    return swift.connect(config.swift_settings_from_env())


def scratch_dirs() -> set[str]:
    return {p.name for p in Path("/var/tmp").iterdir() if p.name.startswith(SCRATCH_PREFIX)}


def scratch_servers() -> set[str]:
    found = subprocess.run(["pgrep", "-f", SCRATCH_PREFIX], capture_output=True, text=True)
    return set(found.stdout.split())


def latest_artifact(key: str) -> dict:
    with urllib.request.urlopen(f"{PREFECT_API_URL}/artifacts/{key}/latest") as response:
        return json.load(response)


@pytest.mark.slow
def test_a_good_backup_verifies_with_a_test_restore_of_every_table(backup, sample_root):
    before, servers = scratch_dirs(), scratch_servers()
    started = time.monotonic()
    result = cli("verify", "--container", backup["container"], "--json")
    elapsed = time.monotonic() - started
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

    # The throwaway server is gone, with its directory.
    assert scratch_dirs() - before == set()
    assert scratch_servers() <= servers

    artifact = latest_artifact("backup-verification")
    assert backup["backup_id"] in artifact["data"] and "PASSED" in artifact["data"]
    print(f"\nverify of the sample undercloud: {elapsed:.1f} s (CLI), "
          f"{report['seconds']} s in the flow, dump loaded in {database['load_seconds']} s")


@pytest.mark.slow
def test_without_table_checksums_row_counts_are_recorded_and_verified(
        sample_root, test_database, private_mariadb, container, os_env):
    result = backup_cli("--root", str(sample_root), "--container", container, "--db-only",
                        "--db-socket", private_mariadb.socket, "--db-user", "root",
                        "--no-table-checksums", "--no-prune", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    manifest = swift.get_manifest(swift_conn(), container, summary["backup_id"])
    tables = manifest["mariadb"]["databases"][test_database]["tables"]
    # 5 updated items fired the trigger into log
    assert {t["table"]: t["rows"] for t in tables} == {"counters": 2, "items": 300, "log": 5}
    assert all(t["checksum"] is None for t in tables)

    report = json.loads(cli("verify", "--container", container, "--json").stdout)
    assert report["ok"] is True, report["problems"]
    assert report["database"]["compared"] == report["database"]["matching"] >= 3
    assert report["database"]["checksums"] is False  # and said so, not compared against None


def test_a_manifest_from_before_segment_sha256_still_verifies_by_swift_md5(backup):
    """Manifests written before per-segment SHA-256 carry Swift's MD5 (the ETag) only."""
    conn = swift_conn()
    manifest = swift.get_manifest(conn, backup["container"], backup["backup_id"])
    archive = verify.find_object(manifest, "filesystem.tar.zst")
    assert archive["segments"] and all(len(s["sha256"]) == 64 for s in archive["segments"])
    for record in manifest["objects"]:
        for segment in record["segments"]:
            del segment["sha256"]
    swift.put_manifest(conn, backup["container"], manifest)
    result = cli("verify", "--container", backup["container"], "--skip-database", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True
    # ... and a damaged segment is still found, by its MD5
    segment = archive["segments"][1]
    conn.put_object(archive["segment_container"], segment["name"], os.urandom(segment["size"]))
    result = cli("verify", "--container", backup["container"], "--skip-database", "--json")
    assert result.returncode == verify.VerificationFailed.exit_code
    problems = json.loads(result.stdout)["problems"]
    assert any(segment["name"] in p and "md5" in p for p in problems), problems


def _segment(backup: dict, index: int) -> tuple[str, str, dict]:
    conn = swift_conn()
    manifest = swift.get_manifest(conn, backup["container"], backup["backup_id"])
    archive = verify.find_object(manifest, "filesystem.tar.zst")
    segment = archive["segments"][index]
    return archive["segment_container"], segment["name"], segment


@pytest.mark.slow
def test_an_overwritten_segment_fails_verification_naming_object_and_segment(backup):
    segment_container, name, segment = _segment(backup, 1)
    # Same size, different bytes, written with plain swiftclient.
    swift_conn().put_object(segment_container, name, os.urandom(segment["size"]))

    result = cli("verify", "--container", backup["container"], "--backup-id",
                 backup["backup_id"], "--skip-database", "--json")
    assert result.returncode == verify.VerificationFailed.exit_code, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False
    first = report["problems"][0]
    assert "segment 00000001" in first and name in first and "sha256" in first
    archive = next(o for o in report["objects"] if o["name"].endswith("filesystem.tar.zst"))
    assert archive["ok"] is False and archive["segments_read"] == len(
        verify.find_object(swift.get_manifest(swift_conn(), backup["container"],
                                              backup["backup_id"]),
                           "filesystem.tar.zst")["segments"])  # all still checked
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
    swift_conn().delete_object(backup["container"], name)

    result = cli("verify", "--container", backup["container"], "--json")
    assert result.returncode == verify.VerificationFailed.exit_code, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert any(name in p and "missing" in p for p in report["problems"]), report["problems"]
    assert report["archive"]["problems"] == []  # the archive itself is fine


@pytest.mark.slow
def test_a_dump_that_does_not_load_fails_verification(backup, tmp_path):
    """A truncated dump whose manifest record is consistent: only loading it can tell."""
    conn = swift_conn()
    container, backup_id = backup["container"], backup["backup_id"]
    manifest = swift.get_manifest(conn, container, backup_id)
    record = verify.find_object(manifest, "mariadb-all-databases.sql.zst")
    dump = tmp_path / "dump.sql.zst"
    with open(dump, "wb") as out:
        out.write(b"".join(conn.get_object(container, record["name"],
                                           resp_chunk_size=1 << 20)[1]))
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
    sha256 = hashlib.sha256(broken).hexdigest()
    etag = conn.put_object(container, record["name"], broken,
                           headers={swift.SHA256_HEADER: sha256})
    # Stored as a plain object now, whether or not the dump had been segmented.
    record.update(size=len(broken), sha256=sha256, etag=etag, segments=[],
                  segment_container=None)
    conn.put_object(container, swift.manifest_name(backup_id), json.dumps(manifest))

    result = cli("verify", "--container", container, "--json")
    assert result.returncode == verify.VerificationFailed.exit_code, result.stderr
    report = json.loads(result.stdout)
    assert all(o["ok"] for o in report["objects"])  # intact as stored...
    assert report["database"]["loaded"] is False  # ...but it does not restore
    problem = report["problems"][0]
    assert problem.startswith("loading the dump into a scratch MariaDB failed: mariadb")
    assert "ERROR" in problem


def test_member_names_are_unescaped_as_tar_prints_them():
    assert verify.unescape_member(rb"home/stack/\303\234berschrift \303\274/") == \
        "home/stack/Überschrift ü/"
    assert verify.unescape_member(rb"a\\b\nc") == "a\\b\nc"
