"""Restores that fit their target and say which failure it was.

A dump with a row longer than a stock MariaDB's max_allowed_packet (16M): the manifest records
what a server needs, verify says it, a restore with an account that cannot raise it refuses
before anything is dropped (exit 74), one that can raises it for the load and sets it back. A
target server killed mid-load (exit 78), a file system that fills up (exit 75, and exit 14
before anything is written when the manifest's sizes do not fit) and damage found while
restoring (exit 43) each name what was already written, loaded or replaced. Every server here
is a throwaway one on its own socket and port (:mod:`undercloud_backup.db.scratch`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
from conftest import _LogLines, backup_in_process

from flows import restore as restore_flow
from undercloud_backup import config
from undercloud_backup.core.manifest import Manifest
from undercloud_backup.db import packets
from undercloud_backup.db.packets import LongestLine
from undercloud_backup.db.scratch import ScratchServer, scratch_mariadb
from undercloud_backup.store import catalogue
from undercloud_backup.store.connection import SwiftStore

BIG_ROW = 9 << 20  # random bytes: an 18 MiB line of hex in the dump, over 16 MiB
STOCK = "--max-allowed-packet=16M"


def sql(server: ScratchServer, text: str) -> list[tuple]:
    with server.session.cursor() as cursor:
        cursor.execute(text)
        return list(cursor.fetchall())


def restore_in_process(*args: str, env: dict[str, str] | None = None
                       ) -> subprocess.CompletedProcess:
    """``python -m flows.restore`` called in this process: its printed lines and status."""
    out, err = io.StringIO(), io.StringIO()
    handler = _LogLines(err)  # the run's log lines, as the console shows them
    logging.getLogger().addHandler(handler)
    try:
        with mock.patch.dict(os.environ, env or {}), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            status = restore_flow.main(["--no-signature-check", *args])
    finally:
        logging.getLogger().removeHandler(handler)
    return subprocess.CompletedProcess(["flows.restore", *args], status, out.getvalue(),
                                       err.getvalue())


@pytest.fixture(scope="module")
def big_backup(os_env, tmp_path_factory):
    """A backup of a throwaway server holding a_first, b_big (one 9 MiB row) and c_last,
    in 1 MiB segments; its container, id and manifest."""
    base = tmp_path_factory.mktemp("source")
    container = f"ucbtest-target-{os.getpid()}"
    root = base / "uc"
    (root / "etc").mkdir(parents=True)
    (root / "etc/app.conf").write_text("[app]\n")
    with scratch_mariadb("/var/tmp", lifetime_s=600) as source:
        for name in ("a_first", "b_big", "c_last"):
            sql(source, f"CREATE DATABASE {name}")
            sql(source, f"CREATE TABLE {name}.t (id INT PRIMARY KEY, v LONGBLOB)")
        sql(source, "INSERT INTO a_first.t VALUES (1, 'first')")
        sql(source, "INSERT INTO c_last.t VALUES (1, 'last')")
        with source.session.cursor() as cursor:
            cursor.execute("INSERT INTO b_big.t VALUES (1, %s)", (os.urandom(BIG_ROW),))
        result = backup_in_process("--root", str(root), "--container", container,
                                   "--db-socket", source.socket, "--db-user", "root",
                                   "--segment-size", "1MiB", "--no-prune", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    with SwiftStore.connect(config.swift_settings_from_env()) as store:
        manifest = catalogue.get_manifest(store, container, summary["backup_id"])
    yield container, manifest
    from conftest import remove_container

    remove_container(container)


@pytest.fixture
def stock_target(tmp_path):
    """A throwaway server configured as a stock install is: max_allowed_packet 16M."""
    with scratch_mariadb("/var/tmp", lifetime_s=600, options=(STOCK,)) as server:
        yield server


def test_the_manifest_records_the_packet_the_dump_needs(big_backup):
    _, manifest = big_backup
    needed = manifest.mariadb.max_allowed_packet
    assert needed is not None and 2 * BIG_ROW < needed < 2 * BIG_ROW + (64 << 10), needed


def test_verify_says_what_a_restore_target_must_allow(big_backup, tmp_path):
    from flows.verify import verify_backup

    container, manifest = big_backup
    report = verify_backup(container=container, backup_id=manifest.backup_id,
                           check_signature=False)
    assert report.ok, report.problems
    assert report.database.max_allowed_packet == manifest.mariadb.max_allowed_packet
    assert any("needs max_allowed_packet of at least" in w and "stock one allows 16M" in w
               for w in report.warnings), report.warnings


def test_an_account_that_cannot_raise_the_packet_is_refused_before_anything_is_dropped(
        big_backup, stock_target, tmp_path):
    container, manifest = big_backup
    sql(stock_target, "CREATE DATABASE a_first")
    sql(stock_target, "CREATE TABLE a_first.kept (id INT)")
    sql(stock_target, "CREATE USER restorer@localhost IDENTIFIED BY 'pw-for-tests'")
    sql(stock_target, "GRANT SELECT, INSERT, CREATE, DROP, INDEX, ALTER, LOCK TABLES, "
                      "CREATE VIEW, SHOW VIEW, TRIGGER, EVENT, CREATE ROUTINE, ALTER ROUTINE, "
                      "REFERENCES ON *.* TO restorer@localhost")
    options = tmp_path / "restorer.cnf"
    options.write_text("[client]\nuser = restorer\npassword = pw-for-tests\n")
    options.chmod(0o600)
    result = restore_in_process(
        "--container", container, "--backup-id", manifest.backup_id, "--no-files",
        "--database", "a_first", "--database", "b_big", "--overwrite",
        "--db-defaults-file", str(options), "--db-socket", stock_target.socket)
    assert result.returncode == 74, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "max_allowed_packet 16M" in last and "SET GLOBAL max_allowed_packet" in last, last
    assert "Nothing was dropped or loaded" in last
    assert sql(stock_target, "SHOW TABLES FROM a_first") == [("kept",)]  # not dropped
    assert not sql(stock_target, "SHOW DATABASES LIKE 'b_big'")


def test_an_account_that_may_raises_the_packet_for_the_load_and_sets_it_back(
        big_backup, stock_target):
    container, manifest = big_backup
    result = restore_in_process(
        "--container", container, "--backup-id", manifest.backup_id, "--no-files",
        "--database", "b_big", "--db-socket", stock_target.socket, "--db-user", "root")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sql(stock_target, "SELECT LENGTH(v) FROM b_big.t") == [(BIG_ROW,)]
    assert sql(stock_target, "SELECT @@global.max_allowed_packet") == [(16 << 20,)]
    assert "raising max_allowed_packet" in result.stderr
    assert "dry run" not in result.stderr.lower()  # a real restore's log


def _kill(server: ScratchServer) -> None:
    pid = int((Path(server.directory) / "mysqld.pid").read_text())
    os.kill(pid, signal.SIGKILL)


def test_a_target_server_killed_mid_load_says_what_was_loaded(big_backup, swift_proxy,
                                                              tmp_path):
    """The dump's fourth segment is held back: a_first is in, b_big on its way; the server
    is killed; the restore ends with exit 78 naming loaded, partly and not loaded."""
    container, manifest = big_backup
    swift_proxy.stall(seconds=4, times=1, method="GET", path=".sql.zst/00000003")
    with scratch_mariadb("/var/tmp", lifetime_s=600) as target:
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(result=restore_in_process(
            "--container", container, "--backup-id", manifest.backup_id, "--no-files",
            "--all-databases", "--db-socket", target.socket, "--db-user", "root",
            env={"OS_STORAGE_URL": swift_proxy.account_url})))
        thread.start()
        deadline = time.monotonic() + 60
        while swift_proxy.count(fault="stall") == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sql(target, "SELECT v FROM a_first.t") == [(b"first",)]
        _kill(target)
        thread.join(120)
    result = outcome["result"]
    assert result.returncode == 78, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "went away while loading" in last, last
    assert "loaded: a_first; partly loaded: b_big; not loaded: c_last" in last, last


def test_damage_found_while_restoring_is_exit_43_and_says_what_was_loaded(
        big_backup, swift_proxy):
    """A segment replaced after the restore's first check of every object (HEAD): found when
    it is read, before any of its bytes reach the server."""
    container, manifest = big_backup
    dump = next(o for o in manifest.objects if o.content == "mariadb-dump")
    segment = dump.segments[5]
    swift_proxy.stall(seconds=3, times=1, method="GET", path=".sql.zst/00000003")
    with SwiftStore.connect(config.swift_settings_from_env()) as store, \
            scratch_mariadb("/var/tmp", lifetime_s=600) as target:
        original = store.get_bytes(dump.segment_container, segment.name, what="segment")
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(result=restore_in_process(
            "--container", container, "--backup-id", manifest.backup_id, "--no-files",
            "--all-databases", "--db-socket", target.socket, "--db-user", "root",
            env={"OS_STORAGE_URL": swift_proxy.account_url})))
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while swift_proxy.count(fault="stall") == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            store.put(dump.segment_container, segment.name, b"\0" * len(original))
            thread.join(120)
        finally:
            store.put(dump.segment_container, segment.name, original)
        assert sql(target, "SELECT COUNT(*) FROM b_big.t") == [(0,)]  # no damaged INSERT
    result = outcome["result"]
    assert result.returncode == 43, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "is missing or damaged: segment 00000005" in last, last
    assert "Nothing of the damaged part was used" in last and last.count("another backup") == 1
    assert "loaded: a_first; partly loaded: b_big; not loaded: c_last" in last, last


# ------------------------------------------------------------------------- file systems
@pytest.fixture
def small_fs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mount)],
                   check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def files_backup(os_env, tmp_path_factory):
    """A files-only backup of 4 random files of 1 MiB."""
    base = tmp_path_factory.mktemp("files")
    container = f"ucbtest-fs-{os.getpid()}"
    root = base / "uc"
    (root / "etc/data").mkdir(parents=True)
    for index in range(4):
        (root / f"etc/data/f{index}.bin").write_bytes(os.urandom(1 << 20))
    with scratch_mariadb("/var/tmp", lifetime_s=600) as source:
        result = backup_in_process("--root", str(root), "--container", container,
                                   "--db-socket", source.socket, "--db-user", "root",
                                   "--no-prune", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    yield container, json.loads(result.stdout)["backup_id"]
    from conftest import remove_container

    remove_container(container)


def test_a_target_without_room_is_refused_before_anything_is_written(files_backup,
                                                                     small_fs):
    container, backup_id = files_backup
    target = small_fs / "restored"
    result = restore_in_process("--container", container, "--backup-id", backup_id,
                                "--target", str(target))
    assert result.returncode == 14, result.stderr[-2000:]
    assert "Not enough space on the file system of" in result.stderr.splitlines()[-1]
    assert not target.exists()


def test_a_file_system_that_fills_up_says_how_much_was_written(files_backup, small_fs):
    """Only some paths (the size check cannot tell what they take): tar fills the 2 MiB."""
    container, backup_id = files_backup
    target = small_fs / "restored"
    result = restore_in_process("--container", container, "--backup-id", backup_id,
                                "--target", str(target), "--path", "/etc/data")
    assert result.returncode == 75, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "filled up while restoring" in last and "No space left on device" in last, last
    assert f"entries had been written under {target}" in last, last


def test_a_dry_run_ends_with_a_summary_line(files_backup, tmp_path):
    container, backup_id = files_backup
    result = restore_in_process("--container", container, "--backup-id", backup_id,
                                "--target", str(tmp_path / "new"), "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"dry run of backup {backup_id}: nothing was written;"), last
    assert "6 entries would be written" in last, last


@pytest.mark.unit
def test_the_longest_line_is_measured_across_chunks():
    meter = LongestLine()
    data = b"a\n" + b"x" * 5000 + b"\nbb\n" + b"y" * 300
    for start in range(0, len(data), 64):
        meter.feed(data[start:start + 64])
    meter.finish()
    assert meter.longest == 5000
    assert packets.needed(16_777_207) > 16 << 20  # measured: this line fails at 16M
    assert packets.setting(packets.needed(64 << 20)) == "65537K"


@pytest.mark.unit
def test_manifest_max_allowed_packet_survives_a_round_trip():
    text = json.dumps({"backup_id": "h-20260101T000000Z-abcdef", "mariadb": {
        "version": "10.11", "object": "o", "system_tables": [], "databases": {},
        "max_allowed_packet": 1 << 25}})
    manifest = Manifest.from_json(text)
    assert manifest.mariadb.max_allowed_packet == 1 << 25
    assert Manifest.from_json(manifest.to_json()).mariadb.max_allowed_packet == 1 << 25


# ------------------------------------------------------------------------- the documents
def doc_block(marker: str) -> str:
    text = (Path(__file__).resolve().parent.parent / "docs/restore.md").read_text()
    found = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```", text, re.S)
    assert found, marker
    return found.group(1)


@pytest.mark.unit
def test_every_mariadb_command_of_the_by_hand_sections_names_its_server():
    """Copied during a rehearsal, no command loads into the live server by default."""
    by_hand = (Path(__file__).resolve().parent.parent / "docs/by-hand.md").read_text()
    # (the point-in-time block is tests/test_binlog.py's, which runs it as written)
    by_hand = re.sub(r"<!-- by-hand-binlog -->\n```bash\n.*?```", "", by_hand, flags=re.S)
    commands = re.findall(r"(?:^|\| )(mariadb [^|\n]*)", by_hand, re.M)
    assert len(commands) == 6, commands
    for command in commands:
        assert '--socket="${DB_SOCKET:?}"' in command, command
    assert "ssh-keygen -Y verify" in by_hand[:by_hand.index("# 1. keys")]


def test_the_scratch_mariadb_recipe_starts_a_server_of_its_own():
    done = subprocess.run(["bash", "-c", doc_block("scratch-mariadb")
                           + 'echo "SOCKET=$DB_SOCKET PID=$(cat $R/mysqld.pid) DIR=$R"'],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r"SOCKET=(\S+) PID=(\d+) DIR=(\S+)", done.stdout)
    try:
        assert done.returncode == 0, done.stderr
        assert found and found.group(1) != "/run/mysqld/mysqld.sock"
        limit = subprocess.run(["mariadb", f"--socket={found.group(1)}", "-N", "-e",
                                "SELECT @@global.max_allowed_packet"], capture_output=True,
                               text=True, check=True).stdout.strip()
        live = subprocess.run(["mariadb", "-N", "-e", "SELECT @@global.max_allowed_packet"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert limit == live
    finally:
        if found:
            os.kill(int(found.group(2)), signal.SIGTERM)
            for _ in range(100):
                if not Path(f"/proc/{found.group(2)}").exists():
                    break
                time.sleep(0.1)
            subprocess.run(["rm", "-rf", found.group(3)], check=False)
