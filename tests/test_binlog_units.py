"""The binary log's pure parts: the dump's coordinates comment, the tap that reads it, the
decision between shipping the log and a full dump, and the replay's command line."""

from __future__ import annotations

import os
import subprocess

import pytest

from undercloud_backup.db import binlog

pytestmark = pytest.mark.unit

SERVER = binlog.ServerLog(log_bin=True, server_id=9, gtid_domain=0, binlog_format="ROW",
                          gtid_position="0-9-40", files=("binlog.000003", "binlog.000004"))
PARENT = {"server_id": 9, "gtid_domain": 0, "binlog_format": "ROW"}
END = binlog.Coordinates("binlog.000003", 1237, "0-9-30", "2026-12-07 02:30:00")


def test_the_dump_comment_gives_file_and_position():
    line = "-- CHANGE MASTER TO MASTER_LOG_FILE='binlog.000012', MASTER_LOG_POS=4711;"
    assert binlog.coordinates_from_line(line) == ("binlog.000012", 4711)
    assert binlog.coordinates_from_line("-- CHANGE MASTER TO MASTER_USE_GTID=slave_pos;") is None


def test_the_tap_passes_every_byte_and_tells_the_coordinates(tmp_path):
    body = (b"-- MariaDB dump 10.19\n"
            b"-- CHANGE MASTER TO MASTER_LOG_FILE='binlog.000002', MASTER_LOG_POS=344;\n"
            + os.urandom(3 << 20))
    source = tmp_path / "dump"
    source.write_bytes(body)
    command = binlog.headtap_command()
    with open(source, "rb") as stdin:
        done = subprocess.run(command.argv, stdin=stdin, capture_output=True, timeout=60)
    assert done.returncode == 0 and done.stdout == body
    assert done.stderr.decode().splitlines() == [
        "-- CHANGE MASTER TO MASTER_LOG_FILE='binlog.000002', MASTER_LOG_POS=344;"]


@pytest.mark.parametrize(("server", "parent", "says"), [
    (SERVER, PARENT, None),
    (binlog.ServerLog(False, 1, 0, "ROW", ""), PARENT, "log_bin=OFF"),
    (binlog.ServerLog(True, 9, 0, "ROW", "0-9-40", SERVER.files, ("REPLICATION SLAVE",)),
     PARENT, "lacks REPLICATION SLAVE ON *.*"),
    (binlog.ServerLog(True, 10, 0, "ROW", "0-10-40", SERVER.files), PARENT,
     "identity changed"),
    (binlog.ServerLog(True, 9, 0, "MIXED", "0-9-40", SERVER.files), PARENT,
     "binlog_format changed from ROW to MIXED"),
    (binlog.ServerLog(True, 9, 0, "ROW", "0-9-2", ("binlog.000001",)), PARENT, "reinstalled"),
    (binlog.ServerLog(True, 9, 0, "ROW", "0-9-40", ("binlog.000004",)), PARENT, "purged"),
])
def test_what_forces_a_full_dump(server, parent, says):
    reason = binlog.full_reason(server, END, parent)
    assert (reason is None) if says is None else (says in reason)


def test_a_nightly_ships_from_the_file_after_what_its_parent_shipped():
    end = binlog.Coordinates("binlog.000004", 500)
    assert binlog.files_to_ship(SERVER, END, end, shipped_before=False) == [
        "binlog.000003", "binlog.000004"]
    assert binlog.files_to_ship(SERVER, END, end, shipped_before=True) == ["binlog.000004"]


def test_the_replay_command_reads_no_option_file_and_stops_where_asked():
    command = binlog.replay_command(["a", "b"], 1237, None, "2026-12-07 12:00:00", "nova")
    assert command.argv[1:] == ("--no-defaults", "--start-position=1237",
                                "--stop-datetime=2026-12-07 12:00:00", "--database=nova",
                                "a", "b")
