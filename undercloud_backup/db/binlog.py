"""The server's binary log: coordinates, what the server says about its log, and the commands.

A full dump records where its consistent snapshot sits in the binary log (``mariadb-dump
--master-data=2``: a comment near the top of the dump, read on the way by
:mod:`undercloud_backup.db.headtap`). A nightly then ships the binary log from its parent's end
coordinates to an end point it fixes itself: a consistent snapshot whose binlog position is that
end point (the row counts are read in it), then ``FLUSH BINARY LOGS`` so every file up to it is
closed, then each of those files read over the protocol (``mariadb-binlog
--read-from-remote-server --raw``). A restore replays them with ``mariadb-binlog`` (from the
start position in the first file, up to the end position or a time in the last) into
``mariadb --sandbox``.

Whatever makes the log doubtful forces a full dump instead (:func:`full_reason`): no binary log,
the parent's coordinates purged, another server (``server_id``, GTID domain, a GTID position
that went backwards: a reinstalled MariaDB), another ``binlog_format``, missing grants.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pymysql

from undercloud_backup.core.errors import BackupError
from undercloud_backup.core.execute import Command
from undercloud_backup.db import privileged
from undercloud_backup.db.connection import one_row

DUMP, BINLOG = "dump", "binlog"
# The dump's option that writes the snapshot's coordinates as a comment (2: commented out).
MASTER_DATA = "--master-data=2"
COORDINATES_LINE = re.compile(
    r"^-- CHANGE MASTER TO MASTER_LOG_FILE='([^']+)', MASTER_LOG_POS=(\d+);")
BINLOG_CONTENT = "mariadb-binlog"
# What the account needs beyond the dump's grants, and why (docs/install.md's account section).
NEEDED_GRANTS = {"REPLICATION SLAVE": "read the binary log over the protocol",
                 "BINLOG MONITOR": "list the binary logs",
                 "RELOAD": "close the current binary log (FLUSH BINARY LOGS)"}
HOW_TO_TURN_ON = (
    "the server has no binary log (log_bin=OFF), so every backup dumps the databases in full; "
    "to ship only what changed, set in the [mariadb] section of the server's configuration "
    "log_bin=binlog, binlog_format=ROW, server_id=<a number unique to this server> and "
    "expire_logs_days longer than --full-every (e.g. 10 for the default 7d), then restart "
    "MariaDB")


class BinlogUnavailable(BackupError):
    """The binary log of MariaDB at {where} could not be shipped: {reason}"""

    exit_code = 82
    retryable = True


@dataclass(frozen=True)
class Coordinates:
    """A point in the binary log: file and byte position, its GTID position and UTC time."""

    file: str
    position: int
    gtid: str = ""
    time: str = ""  # UTC, "YYYY-MM-DD HH:MM:SS"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> Coordinates | None:
        if not data or not data.get("file"):
            return None
        return cls(file=str(data["file"]), position=int(data.get("position") or 0),
                   gtid=str(data.get("gtid") or ""), time=str(data.get("time") or ""))

    def __str__(self) -> str:
        return f"{self.file}:{self.position}" + (f" (GTID {self.gtid})" if self.gtid else "")


@dataclass(frozen=True)
class ServerLog:
    """What the server says about its binary log and identity."""

    log_bin: bool
    server_id: int
    gtid_domain: int
    binlog_format: str
    gtid_position: str  # @@gtid_binlog_pos
    files: tuple[str, ...] = ()  # SHOW BINARY LOGS, oldest first
    grants_missing: tuple[str, ...] = ()

    def identity(self) -> dict:
        return {"server_id": self.server_id, "gtid_domain": self.gtid_domain,
                "binlog_format": self.binlog_format}


@dataclass(frozen=True)
class ShippedLog:
    """One closed binary-log file, shipped whole as an object. A chain ships each file once:
    a nightly ships the files after its parent's last, up to the one its end point is in."""

    file: str
    object: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ShippedLog:
        return cls(file=str(data["file"]), object=str(data["object"]))


@dataclass
class EndPoint:
    """The end point of a nightly: coordinates, and every table's row count there."""

    coordinates: Coordinates
    rows: dict[str, list[tuple[str, str | None, int]]] = field(default_factory=dict)


# ------------------------------------------------------------------------- reading the server
def _grants_missing(cursor) -> tuple[str, ...]:
    cursor.execute("SHOW GRANTS")
    grants = " ".join(row[0].upper() for row in cursor.fetchall())
    if "ALL PRIVILEGES ON *.*" in grants:
        return ()
    return tuple(g for g in NEEDED_GRANTS
                 if not re.search(rf"[ ,]{g}[ ,].*ON \*\.\*", grants)
                 and not (g == "BINLOG MONITOR" and "REPLICATION CLIENT" in grants))


def read_server_log(connection: pymysql.connections.Connection) -> ServerLog:
    """log_bin, identity, format, GTID position, the log files and the grants missing."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT @@log_bin, @@server_id, @@gtid_domain_id, @@binlog_format, "
                       "@@gtid_binlog_pos")
        log_bin, server_id, domain, fmt, gtid = one_row(cursor)
        missing = _grants_missing(cursor)
        files: tuple[str, ...] = ()
        if int(log_bin) and "BINLOG MONITOR" not in missing:
            cursor.execute("SHOW BINARY LOGS")
            files = tuple(row[0] for row in cursor.fetchall())
    return ServerLog(log_bin=bool(int(log_bin)), server_id=int(server_id),
                     gtid_domain=int(domain), binlog_format=str(fmt), gtid_position=str(gtid),
                     files=files, grants_missing=missing)


def server_log_from(status: dict) -> ServerLog:
    """``ucb-mariadb binlog status``'s answer: root lacks no grant."""
    return ServerLog(log_bin=bool(status["log_bin"]), server_id=int(status["server_id"]),
                     gtid_domain=int(status["gtid_domain"]),
                     binlog_format=str(status["binlog_format"]),
                     gtid_position=str(status["gtid_position"]),
                     files=tuple(str(f) for f in status["files"]))


def end_point_from(answer: dict) -> EndPoint:
    """``ucb-mariadb binlog end``'s answer, as :func:`end_point`'s."""
    rows = {str(name): [(str(t), e if e is None else str(e), int(r)) for t, e, r in tables]
            for name, tables in answer["rows"].items()}
    return EndPoint(Coordinates(str(answer["file"]), int(answer["position"]),
                                str(answer["gtid"]), str(answer["time"])), rows)


def gtid_at(cursor, file: str, position: int) -> str:
    cursor.execute("SELECT BINLOG_GTID_POS(%s, %s)", (file, position))
    row = cursor.fetchone()
    return str(row[0] or "") if row else ""


def utc_now(cursor) -> str:
    cursor.execute("SELECT DATE_FORMAT(UTC_TIMESTAMP(), '%Y-%m-%d %H:%i:%s')")
    return str(one_row(cursor)[0])


def end_point(connection: pymysql.connections.Connection,
              databases: tuple[str, ...]) -> EndPoint:
    """Open a consistent snapshot, take its binlog position as the end point and count every
    table's rows in it: the counts are exactly the state a replay to that position gives."""
    rows: dict[str, list[tuple[str, str | None, int]]] = {name: [] for name in databases}
    with connection.cursor() as cursor:
        cursor.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        cursor.execute("SHOW STATUS LIKE 'binlog_snapshot_%'")
        status = {name.lower(): value for name, value in cursor.fetchall()}
        file, position = status["binlog_snapshot_file"], int(status["binlog_snapshot_position"])
        when = utc_now(cursor)
        if databases:
            cursor.execute(
                "SELECT table_schema, table_name, engine FROM information_schema.tables"
                " WHERE table_schema IN %s AND table_type = 'BASE TABLE'"
                " ORDER BY table_schema, table_name", (databases,))
            for schema, table, engine in cursor.fetchall():
                quoted = f"`{schema.replace('`', '``')}`.`{table.replace('`', '``')}`"
                cursor.execute(f"SELECT COUNT(*) FROM {quoted}")
                rows[schema].append((table, engine, int(one_row(cursor)[0])))
        cursor.execute("COMMIT")
        gtid = gtid_at(cursor, file, position)
    return EndPoint(Coordinates(file, position, gtid, when), rows)


def flush(connection: pymysql.connections.Connection) -> None:
    """Close the current binary log: every file up to the end point is complete after it."""
    with connection.cursor() as cursor:
        cursor.execute("FLUSH BINARY LOGS")


def coordinates_from_line(line: str) -> tuple[str, int] | None:
    """The file and position of the dump's ``-- CHANGE MASTER TO ...`` comment."""
    match = COORDINATES_LINE.match(line.strip())
    return (match.group(1), int(match.group(2))) if match else None


# ------------------------------------------------------------------------- deciding
def _seq(gtid_position: str, domain: int) -> int | None:
    for part in gtid_position.split(","):
        pieces = part.strip().split("-")
        if len(pieces) == 3 and pieces[0].isdigit() and int(pieces[0]) == domain:
            return int(pieces[2])
    return None


def full_reason(server: ServerLog, parent_end: Coordinates | None, parent_server: dict,
                ) -> str | None:
    """Why this backup must dump in full instead of shipping the log; None: ship it."""
    if not server.log_bin:
        return HOW_TO_TURN_ON
    if server.grants_missing:
        return ("the account lacks " + ", ".join(
            f"{g} ON *.* (to {NEEDED_GRANTS[g]})" for g in server.grants_missing)
            + " needed to ship the binary log; grant them (docs/install.md)")
    if parent_end is None:
        return "no earlier backup of this host recorded binary-log coordinates"
    if parent_server.get("server_id") != server.server_id or \
            parent_server.get("gtid_domain") != server.gtid_domain:
        return (f"the server's identity changed (server_id {parent_server.get('server_id')}, "
                f"GTID domain {parent_server.get('gtid_domain')} at the last backup; now "
                f"{server.server_id}, {server.gtid_domain}): another or a reinstalled MariaDB")
    if parent_server.get("binlog_format") != server.binlog_format:
        return (f"binlog_format changed from {parent_server.get('binlog_format')} to "
                f"{server.binlog_format} since the last backup")
    then, now = _seq(parent_end.gtid, server.gtid_domain), _seq(server.gtid_position,
                                                                server.gtid_domain)
    if then is not None and (now is None or now < then):
        return (f"the server's GTID position {server.gtid_position or '(empty)'} is behind "
                f"the last backup's {parent_end.gtid}: a reinstalled or reset MariaDB")
    if parent_end.file not in server.files:
        oldest = server.files[0] if server.files else "none"
        return (f"the binary log {parent_end.file} the last backup ended in is no longer on "
                f"the server (purged; the oldest is {oldest}): a gap no replay may cross; "
                "keep the logs longer than --full-every (expire_logs_days)")
    return None


def files_to_ship(server: ServerLog, start: Coordinates, end: Coordinates,
                  shipped_before: bool) -> list[str]:
    """The log files from ``start``'s (after it, when the parent shipped it) to ``end``'s."""
    names = list(server.files)
    first = names.index(start.file) + (1 if shipped_before else 0)
    return names[first:names.index(end.file) + 1]


# ------------------------------------------------------------------------- commands
def headtap_command() -> Command:
    """The tap between the dump and the compressor (:mod:`undercloud_backup.db.headtap`)."""
    # by path, isolated: only the standard library, whatever the caller's sys.path
    return Command(argv=(sys.executable, "-I", str(Path(__file__).with_name("headtap.py"))),
                   name="binlog coordinates")


def with_master_data(dump: Command) -> Command:
    """The dump that also writes its snapshot's coordinates (:data:`MASTER_DATA`)."""
    if privileged.is_wrapper(dump):
        return privileged.with_master_data(dump)
    # after --defaults-extra-file, which must stay first
    return replace(dump, argv=(*dump.argv[:2], MASTER_DATA, *dump.argv[2:]))


def binlog_tool() -> str:
    for name in ("mariadb-binlog", "mysqlbinlog"):
        path = shutil.which(name)
        if path:
            return path
    raise BinlogUnavailable(where="this host", reason="neither mariadb-binlog nor "
                            "mysqlbinlog is installed (install the MariaDB client)")


def fetch_command(options_fd: int, file: str, prefix: str, tool: str = "mariadb-binlog"
                  ) -> Command:
    """Copy one closed log file byte for byte over the protocol into ``prefix + file``."""
    # --defaults-extra-file must stay the first option
    return Command(argv=(tool, f"--defaults-extra-file=/dev/fd/{options_fd}",
                         "--read-from-remote-server", "--raw", f"--result-file={prefix}",
                         file), name="mariadb-binlog --read-from-remote-server")


def replay_command(paths: list[str], start: int, stop_position: int | None,
                   stop_datetime: str | None, database: str | None = None,
                   tool: str = "mariadb-binlog") -> Command:
    """SQL of the events in ``paths`` from ``start`` in the first, up to ``stop_position`` in
    the last or the first event at or after ``stop_datetime`` (UTC: run with TZ=UTC)."""
    argv = [tool, "--no-defaults", f"--start-position={start}"]
    if stop_position is not None:
        argv.append(f"--stop-position={stop_position}")
    if stop_datetime is not None:
        argv.append(f"--stop-datetime={stop_datetime}")
    if database is not None:
        argv.append(f"--database={database}")
    return Command(argv=(*argv, *paths), name="mariadb-binlog")


REPLAY_ENV_TZ = "UTC"  # --stop-datetime is read in the local time zone of mariadb-binlog
