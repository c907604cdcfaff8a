"""The MariaDB binary log end to end, against a scratch MariaDB with the log on and Swift behind
Keystone: a full dump records its snapshot's coordinates, a nightly ships the closed log files
instead of dumping, and a restore replays them to a nightly's end point or to any second
(``--until``); every doubt a forced full dump with its reason, every point no log reaches a
refusal before anything is written."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from binlog_server import BinlogServer, running, sample_database
from conftest import REPO, backup_cli, backup_in_process, cli_in_process, swift_store

from undercloud_backup.store import catalogue

DB = "ucb_binlog"


@pytest.fixture(scope="module")
def source(services):
    """The server backed up: binary log on, ROW format, server_id 9."""
    yield from running(BinlogServer(server_id=9))


@pytest.fixture(scope="module")
def target(services):
    """Where restores go: a server of its own, without a binary log."""
    yield from running(BinlogServer(log_bin=False))


@pytest.fixture
def database(source, target):
    """A database of this test's own on the source; dropped on both servers afterwards."""
    yield from sample_database(DB, source, target)


def backup(server: BinlogServer, container: str, *args: str) -> dict:
    started = time.monotonic()
    result = backup_in_process("--db-only", "--db-defaults-file", str(server.cnf),
                               "--container", container, "--no-prune", "--json", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    summary["stderr"] = result.stderr
    summary["seconds"] = time.monotonic() - started
    return summary


@contextlib.contextmanager
def changed(server: BinlogServer, change: str, undo: str):
    """The server with ``change`` made, undone afterwards whatever happens."""
    server.sql(change)
    try:
        yield
    finally:
        server.sql(undo)


def restore(target: BinlogServer, container: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m flows.restore`` called in this process, into ``target``."""
    return cli_in_process("restore", "--container", container, "--no-files",
                          "--db-socket", target.socket, "--db-user", "root",
                          "--no-signature-check", "--json", *args)


def manifest(container: str, backup_id: str):
    return catalogue.get_manifest(swift_store(), container, backup_id)


def utc_second(server: BinlogServer) -> str:
    """The server's UTC time, once a new second has begun (events before it are older)."""
    first = server.sql("SELECT UTC_TIMESTAMP()").strip()
    while (now := server.sql("SELECT UTC_TIMESTAMP()").strip()) == first:
        time.sleep(0.1)
    return now


def test_a_nightly_ships_the_log_and_restores_to_its_end_point(source, target, database,
                                                               container):
    full = backup(source, container)
    assert full["database_kind"] == "dump"
    dumped = manifest(container, full["backup_id"]).mariadb
    assert dumped.kind == "dump" and dumped.end["file"].startswith("binlog.")
    assert dumped.end["gtid"].startswith("0-9-")
    # the dump opens a fresh log file: the first nightly ships none of what came before it
    assert dumped.end["position"] < 1024, dumped.end

    source.sql(f"INSERT INTO {database}.t SELECT seq, 'new' FROM {database}.seq_1001_to_1500; "
               f"DELETE FROM {database}.t WHERE id <= 100; "
               f"UPDATE {database}.t SET v = 'changed' WHERE id <= 200;")
    first = backup(source, container)
    assert first["database_kind"] == "binlog", first["stderr"][-2000:]
    shipped = manifest(container, first["backup_id"]).mariadb
    assert shipped.kind == "binlog" and shipped.parent == full["backup_id"]
    assert shipped.base == full["backup_id"] and shipped.start == dumped.end
    assert [o["name"].split("/", 1)[1] for o in first["objects"]] == [
        f"mariadb-binlog-{log['file']}.zst" for log in shipped.binlogs]
    assert {t.table: t.rows for t in shipped.databases[database]} == {"t": 1400}

    source.sql(f"INSERT INTO {database}.t SELECT seq, 'night 2' FROM {database}.seq_1501_to_1600;"
               f"USE {database}; CREATE TABLE later (id INT PRIMARY KEY); "
               f"INSERT INTO {database}.later VALUES (1), (2), (3);")
    second = backup(source, container)
    assert second["database_kind"] == "binlog"
    assert manifest(container, second["backup_id"]).mariadb.parent == first["backup_id"]
    listed = backup_cli("--list", "--container", container)
    assert f"{second['backup_id']}  full  database binlog" in listed.stdout, listed.stdout

    # the newest nightly: the full dump, then both nights' logs, to its end point
    done = restore(target, container, "--backup-id", second["backup_id"], "--all-databases",
                   "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)["databases"]
    assert result["compared"] >= 2 and result["matching"] == result["compared"], result
    assert result["users_and_grants"] is True
    assert target.counts(f"{database}.t", f"{database}.later") == {
        f"{database}.t": 1500, f"{database}.later": 3}
    assert target.sql(f"SELECT COUNT(*) FROM {database}.t WHERE v = 'changed'").strip() == "100"

    # verify test-restores the chain the same way into its throwaway server
    verified = cli_in_process("verify", "--container", container, "--backup-id",
                              second["backup_id"], "--no-signature-check", "--json")
    assert verified.returncode == 0, verified.stderr[-3000:]
    report = json.loads(verified.stdout)
    assert report["database"]["loaded"] is True
    assert report["database"]["compared"] >= 2
    assert report["database"]["matching"] == report["database"]["compared"]

    # the first nightly alone stops at its own end point, not later
    done = restore(target, container, "--backup-id", first["backup_id"], "--database",
                   database, "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert target.counts(f"{database}.t") == {f"{database}.t": 1400}
    assert "later" not in target.sql(f"SHOW TABLES FROM {database}")


def test_until_restores_any_second_and_refuses_what_no_log_reaches(source, target, database,
                                                                  container):
    before_everything = utc_second(source)
    full = backup(source, container)
    source.sql(f"INSERT INTO {database}.t SELECT seq, 'before' FROM {database}.seq_2001_to_2010;")
    point = utc_second(source)
    utc_second(source)
    source.sql(f"INSERT INTO {database}.t SELECT seq, 'after' FROM {database}.seq_3001_to_3010;")
    nightly = backup(source, container)
    assert nightly["database_kind"] == "binlog"
    end = manifest(container, nightly["backup_id"]).mariadb.end

    done = restore(target, container, "--until", point, "--database", database)
    assert done.returncode == 0, done.stderr[-3000:]
    assert target.sql(f"SELECT v, COUNT(*) FROM {database}.t WHERE id > 2000 GROUP BY v"
                      ).split() == ["before", "10"]
    assert full["backup_id"] in done.stderr  # the full dump it started from is named

    target.sql(f"DROP DATABASE {database}")
    for when, says in ((before_everything, "before the first full dump"),
                       ("2999-01-01 00:00:00", "no shipped binary log reaches it")):
        refused = restore(target, container, "--until", when, "--database", database)
        assert refused.returncode == 80, refused.stderr[-2000:]
        assert says in refused.stderr
        assert f"newest point that can be reached is {end['time']} UTC" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert database not in target.sql("SHOW DATABASES")


def test_purged_log_forces_a_full_dump_and_nothing_replays_past_the_gap(source, database,
                                                                        container):
    full = backup(source, container)
    start = manifest(container, full["backup_id"]).mariadb.end["file"]
    source.sql(f"INSERT INTO {database}.t VALUES (5001, 'lost to the purge')")
    for _ in range(50):  # a log is purged once the engines no longer need it for recovery
        source.sql("FLUSH BINARY LOGS")
        current = source.sql("SHOW MASTER STATUS").split()[0]
        source.sql(f"PURGE BINARY LOGS TO '{current}'")
        if start not in source.sql("SHOW BINARY LOGS"):
            break
        time.sleep(0.1)
    assert start not in source.sql("SHOW BINARY LOGS")
    forced = backup(source, container)
    assert forced["database_kind"] == "dump"
    section = manifest(container, forced["backup_id"]).mariadb
    assert "no longer on the server (purged" in section.full_reason
    assert "dumping the databases in FULL instead of shipping the binary log" in \
        forced["stderr"]
    after = backup(source, container)
    assert after["database_kind"] == "binlog"
    assert manifest(container, after["backup_id"]).mariadb.parent == forced["backup_id"]


def test_a_damaged_shipped_log_is_refused_before_anything_is_written(source, target, database,
                                                                     container):
    backup(source, container)
    source.sql(f"INSERT INTO {database}.t VALUES (6001, 'x');")
    nightly = backup(source, container)
    name = nightly["objects"][0]["name"]
    store = swift_store()
    body = store.get_bytes(container, name)
    store.put(container, name, bytes(reversed(body)), content_type="application/zstd",
              operation="PUT")
    refused = restore(target, container, "--backup-id", nightly["backup_id"], "--database",
                      database)
    assert refused.returncode in (43, 56), refused.stderr[-2000:]
    assert name in refused.stderr and "Traceback" not in refused.stderr
    assert database not in target.sql("SHOW DATABASES")


def test_log_bin_off_says_how_to_turn_it_on(db_cnf, sample_databases, container):
    result = backup_in_process("--db-only", "--db-defaults-file", db_cnf, "--container",
                               container, "--no-prune", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["database_kind"] == "dump"
    section = manifest(container, summary["backup_id"]).mariadb
    assert "log_bin=OFF" in section.full_reason and "expire_logs_days" in section.full_reason
    assert section.end is None
    assert "log_bin=binlog, binlog_format=ROW, server_id=" in result.stderr


def test_identity_format_and_grants_force_a_full_dump(source, database, container):
    backup(source, container)
    with changed(source, "SET GLOBAL binlog_format = 'MIXED'",
                 "SET GLOBAL binlog_format = 'ROW'"):
        mixed = backup(source, container)
    assert mixed["database_kind"] == "dump"
    assert "binlog_format changed from ROW to MIXED" in \
        manifest(container, mixed["backup_id"]).mariadb.full_reason

    with changed(source, "REVOKE REPLICATION SLAVE ON *.* FROM 'ucbbinlog'@'127.0.0.1'",
                 "GRANT REPLICATION SLAVE ON *.* TO 'ucbbinlog'@'127.0.0.1'"):
        ungranted = backup(source, container)
    assert ungranted["database_kind"] == "dump"
    assert "lacks REPLICATION SLAVE ON *.*" in \
        manifest(container, ungranted["backup_id"]).mariadb.full_reason

    # a restart between two nightlies only rotates the log: still shipped
    backup(source, container)
    source.stop()
    source.start()
    source.sql(f"INSERT INTO {database}.t VALUES (7001, 'after restart')")
    restarted = backup(source, container)
    assert restarted["database_kind"] == "binlog", restarted["stderr"][-2000:]


def test_a_reinstalled_server_forces_a_full_dump(container, services):
    server = BinlogServer(server_id=9)
    try:
        server.install()
        server.start()
        server.create_backup_user()
        server.sql(f"CREATE DATABASE {DB}_r; CREATE TABLE {DB}_r.t (id INT PRIMARY KEY);"
                   f"INSERT INTO {DB}_r.t VALUES (1), (2);")
        backup(server, container)
        server.stop()
        server.install()  # same server_id, a fresh log and GTID position
        server.start()
        server.create_backup_user()
        again = backup(server, container)
        assert again["database_kind"] == "dump"
        reason = manifest(container, again["backup_id"]).mariadb.full_reason
        assert "reinstalled" in reason, reason
    finally:
        server.remove()



def test_binlogs_only_ships_a_small_backup_or_refuses_saying_why(source, database, container):
    refused = backup_in_process("--binlogs-only", "--db-defaults-file", str(source.cnf),
                                "--container", container, "--no-prune", "--json")
    assert refused.returncode == 83, refused.stderr[-2000:]
    assert "No binary log was shipped (--binlogs-only): no earlier backup of this host " \
           "recorded binary-log coordinates" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert catalogue.list_backups(swift_store(), container) == []

    backup(source, container)
    source.sql(f"INSERT INTO {database}.t VALUES (8001, 'a quarter of an hour later')")
    shipped = backup_in_process("--binlogs-only", "--db-defaults-file", str(source.cnf),
                                "--container", container, "--no-prune", "--json")
    assert shipped.returncode == 0, shipped.stderr[-2000:]
    summary = json.loads(shipped.stdout)
    assert summary["database_kind"] == "binlog"
    assert summary["objects"] and all("/mariadb-binlog-" in o["name"]
                                      for o in summary["objects"])
    assert manifest(container, summary["backup_id"]).paths is None


def test_retention_keeps_every_link_a_kept_shipped_log_needs(source, target, database,
                                                           container):
    import datetime as dt

    from undercloud_backup.store import retention

    ids = [backup(source, container)["backup_id"]]
    for n in range(3):
        source.sql(f"INSERT INTO {database}.t VALUES ({9001 + n}, 'night {n}')")
        ids.append(backup(source, container)["backup_id"])
    result = retention.prune(swift_store(), container,
                             retention.RetentionPolicy(keep_last=1, keep_daily=0,
                                                       keep_weekly=0),
                             dt.datetime.now(dt.UTC))
    assert result.deleted == []
    reasons = {k.backup_id: k.reasons for k in result.kept}
    assert reasons[ids[0]] and reasons[ids[1]] and reasons[ids[2]], reasons
    # and what is kept still restores to the newest end point
    done = restore(target, container, "--backup-id", ids[-1], "--database", database,
                   "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert target.counts(f"{database}.t") == {f"{database}.t": 1003}


def by_hand_block() -> str:
    """The bash block of docs/by-hand.md marked ``by-hand-binlog``, as written there."""
    text = (REPO / "docs/by-hand.md").read_text()
    found = re.search(r"<!-- by-hand-binlog -->\n```bash\n(.*?)```", text, re.S)
    assert found, "docs/by-hand.md lost its by-hand binary-log block"
    return found.group(1)


def test_the_documented_commands_restore_a_nightly_by_hand(source, database, container,
                                                          os_env, tmp_path):
    backup(source, container)
    source.sql(f"INSERT INTO {database}.t VALUES (10001, 'by hand'); "
               f"DELETE FROM {database}.t WHERE id <= 10")
    first = backup(source, container)
    source.sql(f"UPDATE {database}.t SET v = 'second night' WHERE id <= 50")
    second = backup(source, container)
    assert (first["database_kind"], second["database_kind"]) == ("binlog", "binlog")
    expected = source.sql(f"SELECT COUNT(*), SUM(v = 'second night') FROM {database}.t")
    fresh = BinlogServer(log_bin=False)
    try:
        fresh.install()
        fresh.start()
        work = tmp_path / "work"
        work.mkdir()
        done = subprocess.run(["bash", "-c", by_hand_block()], cwd=work,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, **os_env, "CONTAINER": container,
                                   "ID": second["backup_id"], "DB_SOCKET": fresh.socket,
                                   "PATH": f"{Path(sys.executable).parent}:"
                                           f"{os.environ['PATH']}"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert fresh.sql(f"SELECT COUNT(*), SUM(v = 'second night') FROM {database}.t"
                         ) == expected == "991\t40\n"
    finally:
        fresh.remove()


def test_until_gtid_stops_after_that_transaction(source, target, database, container):
    backup(source, container)
    source.sql(f"INSERT INTO {database}.t VALUES (11001, 'kept')")
    kept = source.sql("SELECT @@gtid_binlog_pos").strip()
    source.sql(f"INSERT INTO {database}.t VALUES (11002, 'not kept')")
    backup(source, container)
    done = restore(target, container, "--until-gtid", kept, "--database", database,
                   "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert target.sql(f"SELECT id FROM {database}.t WHERE id > 11000").split() == ["11001"]
