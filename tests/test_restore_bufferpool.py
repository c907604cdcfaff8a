"""A restore raises the target server's InnoDB buffer pool for the load and the binary log's
replay, and sets it back afterwards, also when the load fails; an account that may not change
a global loads with the server's pool and says so in one line. Against a scratch source with
the binary log on and a scratch target started with a small pool (tests/binlog_server.py);
the size decision itself is the unit tests at the end."""
# ruff: noqa: F811 - test_binlog's source server and database are this file's fixtures too

from __future__ import annotations

import pytest
from binlog_server import BinlogServer
from test_binlog import backup, database, manifest, restore, source  # noqa: F401

from undercloud_backup.db import bufferpool
from undercloud_backup.restore import databases as restoredb
from undercloud_backup.restore.files import RestoreFailed

MIB = 1 << 20
SMALL_POOL = 16 * MIB
ROWS = 150_000  # ~45 MB of InnoDB: more than the target's pool, a raise the decision makes


@pytest.fixture(scope="module")
def target(services):
    """Where restores go: a server of its own without a binary log, its pool 16 MiB."""
    server = BinlogServer(log_bin=False)
    try:
        server.install()
        server.start(f"--innodb-buffer-pool-size={SMALL_POOL}")
        yield server
    finally:
        server.remove()


def _pool(server: BinlogServer) -> int:
    return int(server.sql("SELECT @@global.innodb_buffer_pool_size").strip())


def _fill(server: BinlogServer, name: str) -> None:
    server.sql(f"CREATE TABLE {name}.big (id INT PRIMARY KEY, v VARCHAR(255)) ENGINE=InnoDB; "
               f"INSERT INTO {name}.big SELECT seq, REPEAT(CHAR(65 + seq % 26), 250) "
               f"FROM {name}.seq_1_to_{ROWS}; ANALYZE TABLE {name}.big;")


def _watch(monkeypatch, target: BinlogServer, fail_load: bool = False) -> dict[str, list[int]]:
    """The target's pool as each load and the replay start (the load failing if asked)."""
    seen: dict[str, list[int]] = {"load": [], "replay": []}
    load, replay = restoredb._load, restoredb._replay

    def watched_load(*args, **kwargs):
        seen["load"].append(_pool(target))
        if fail_load:
            raise RestoreFailed(what="the dump", reason="the server went away (injected)")
        return load(*args, **kwargs)

    def watched_replay(*args, **kwargs):
        seen["replay"].append(_pool(target))
        return replay(*args, **kwargs)

    monkeypatch.setattr(restoredb, "_load", watched_load)
    monkeypatch.setattr(restoredb, "_replay", watched_replay)
    return seen


def test_the_load_and_the_replay_run_with_the_pool_raised_then_it_is_set_back(
        source, target, database, container, monkeypatch):
    _fill(source, database)
    full = backup(source, container)
    recorded = manifest(container, full["backup_id"]).space["database_bytes"]
    assert recorded > 2 * SMALL_POOL, recorded  # the data does not fit the target's pool
    source.sql(f"UPDATE {database}.big SET v = 'night 1' WHERE id % 10 = 1;")
    nightly = backup(source, container)
    assert nightly["database_kind"] == "binlog", nightly["stderr"][-2000:]
    seen = _watch(monkeypatch, target)
    done = restore(target, container, "--backup-id", nightly["backup_id"], "--database",
                   database, "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    raised = -(-int(recorded * bufferpool.HEADROOM) // MIB) * MIB  # the data and a quarter
    assert seen == {"load": [raised], "replay": [raised]}, (seen, done.stderr[-2000:])
    assert "raised innodb_buffer_pool_size" in done.stderr
    assert "back to 16.0 MiB" in done.stderr
    assert _pool(target) == SMALL_POOL
    assert target.sql(f"SELECT COUNT(*) FROM {database}.big WHERE v = 'night 1'").strip() \
        == str(ROWS // 10)


def test_a_failed_load_sets_the_pool_back(source, target, database, container, monkeypatch):
    full = backup(source, container)
    seen = _watch(monkeypatch, target, fail_load=True)
    done = restore(target, container, "--backup-id", full["backup_id"], "--database",
                   database, "--overwrite", "--load-buffer-pool-mib", "48")
    assert done.returncode != 0 and "injected" in done.stderr, done.stderr[-2000:]
    assert seen["load"] == [48 * MIB]
    assert _pool(target) == SMALL_POOL


def test_an_account_that_may_not_raise_it_restores_with_the_servers_pool(
        source, target, database, container, monkeypatch, tmp_path):
    full = backup(source, container)
    target.sql("CREATE USER IF NOT EXISTS ucbpool@localhost IDENTIFIED BY 'pw-for-tests'; "
               "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, INDEX, ALTER, "
               "LOCK TABLES, CREATE VIEW, SHOW VIEW, TRIGGER, EVENT, CREATE ROUTINE, "
               "ALTER ROUTINE, REFERENCES ON *.* TO ucbpool@localhost;")
    options = tmp_path / "restorer.cnf"
    options.write_text("[client]\nuser = ucbpool\npassword = pw-for-tests\n")
    options.chmod(0o600)
    seen = _watch(monkeypatch, target)
    try:
        done = restore(target, container, "--backup-id", full["backup_id"], "--database",
                       database, "--overwrite", "--load-buffer-pool-mib", "48",
                       "--db-defaults-file", str(options), "--db-user", "ucbpool")
    finally:
        target.sql("DROP USER IF EXISTS ucbpool@localhost")
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "innodb_buffer_pool_size" in line]
    assert len(said) == 1 and "may not raise innodb_buffer_pool_size" in said[0], said
    assert "SUPER" in said[0]
    assert seen["load"] == [SMALL_POOL] and _pool(target) == SMALL_POOL
    assert target.sql(f"SELECT COUNT(*) FROM {database}.t").strip() == "1000"


# ------------------------------------------------------------------- the size decision
GIB = 1 << 30


@pytest.mark.unit
def test_the_pool_holds_the_data_and_a_quarter_more():
    assert bufferpool.load_pool_size(128 * MIB, 400 * MIB, 16 * GIB) == 500 * MIB
    # whole MiB, rounded up
    assert bufferpool.load_pool_size(128 * MIB, 400 * MIB + 1, 16 * GIB) == 501 * MIB


@pytest.mark.unit
def test_the_raise_takes_at_most_a_quarter_of_the_memory_available():
    assert bufferpool.load_pool_size(128 * MIB, 40 * GIB, 2 * GIB) == 128 * MIB + 512 * MIB
    # too little to spare: left alone
    assert bufferpool.load_pool_size(128 * MIB, 40 * GIB, 40 * MIB) is None


@pytest.mark.unit
def test_the_pool_is_never_lowered_nor_raised_for_nothing():
    assert bufferpool.load_pool_size(4 * GIB, 400 * MIB, 16 * GIB) is None  # fits already
    assert bufferpool.load_pool_size(128 * MIB, 110 * MIB, 16 * GIB) is None  # +10 MiB
    assert bufferpool.load_pool_size(128 * MIB, 120 * MIB, 16 * GIB) == 150 * MIB
    assert bufferpool.load_pool_size(128 * MIB, None, 16 * GIB) is None  # not recorded
    assert bufferpool.load_pool_size(128 * MIB, 400 * MIB, None) is None  # another host


@pytest.mark.unit
def test_the_operators_size_wins_but_never_lowers():
    assert bufferpool.load_pool_size(128 * MIB, 400 * MIB, 16 * GIB, requested_mib=0) is None
    assert bufferpool.load_pool_size(128 * MIB, None, None, requested_mib=2048) == 2 * GIB
    assert bufferpool.load_pool_size(128 * MIB, 40 * GIB, 1 * GIB, requested_mib=2048) \
        == 2 * GIB  # the operator knows the host
    assert bufferpool.load_pool_size(4 * GIB, None, None, requested_mib=2048) is None


@pytest.mark.unit
def test_a_throwaway_server_starts_with_room_for_the_data():
    default = 256 * MIB
    assert bufferpool.scratch_pool_size(default, None, 16 * GIB) == default
    assert bufferpool.scratch_pool_size(default, 100 * MIB, 16 * GIB) == default
    assert bufferpool.scratch_pool_size(default, 800 * MIB, 16 * GIB) == 1000 * MIB
    assert bufferpool.scratch_pool_size(default, 40 * GIB, 8 * GIB) == 2 * GIB
    assert bufferpool.scratch_pool_size(default, 40 * GIB, 512 * MIB) == default


@pytest.mark.unit
def test_memavailable_and_which_servers_are_local(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683772 kB\nMemFree:  100 kB\n"
                       "MemAvailable:   22641192 kB\n")
    assert bufferpool.mem_available(str(meminfo)) == 22641192 * 1024
    meminfo.write_text("MemTotal:       24683772 kB\n")
    assert bufferpool.mem_available(str(meminfo)) is None
    assert bufferpool.mem_available(str(tmp_path / "absent")) is None
    assert bufferpool.is_local("127.0.0.1", None) and bufferpool.is_local("localhost", None)
    assert bufferpool.is_local("db.example", "/run/mysqld/mysqld.sock")
    assert not bufferpool.is_local("192.0.2.10", None)
