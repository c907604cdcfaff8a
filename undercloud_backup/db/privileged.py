"""Root-only work for an unprivileged worker: through ``sudo -n`` and the project's wrappers.

The worker never runs tar or the dump tool as root directly (their options can run programs and
write anywhere). It runs two small root-owned wrappers with fixed behaviour that validate every
argument (``deployments/libexec/``, installed into :data:`LIBEXEC`), and
``deployments/sudoers/undercloud-backup`` allows exactly those. This module builds their command
lines; the wrappers and the sudoers file change together with it and are tested together
(``tests/test_sudo.py``).

``sudo -n`` never prompts: a missing rule fails at once and :class:`~execute.Pipeline` turns it
into :class:`SudoRefused`, naming the sudoers file to install.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace

from undercloud_backup.core.errors import (
    BackupError,
    CommandFailed,
    ConfigError,
    DatabaseAuthError,
    DatabaseUnreachable,
    PathNotAllowed,
    SudoRefused,
)
from undercloud_backup.core.execute import Command, capture
from undercloud_backup.db.connection import ServerInfo, StatsBeside, TableStats
from undercloud_backup.db.dump import SYSTEM_DUMP, Dumps, DumpSpec
from undercloud_backup.db.preflight import (
    LOCK_WAIT_S,
    DatabaseLocked,
    PrivilegeReport,
    dump_lock_timeout,
    evaluate,
    require,
)
from undercloud_backup.files.archive import PathPlan
from undercloud_backup.files.estimate import PathSizes

LIBEXEC = "/usr/local/libexec/undercloud-backup"
ARCHIVE_WRAPPER = f"{LIBEXEC}/ucb-archive"
MARIADB_WRAPPER = f"{LIBEXEC}/ucb-mariadb"
SUDOERS_FILE = "/etc/sudoers.d/undercloud-backup"
CONFIG_FILE = "/etc/undercloud-backup/privileged.conf"
SNAPSHOT_DIR = "/var/lib/undercloud-backup/snapshots"  # ucb-archive's, root 0700

INFO_TIMEOUT_S = 120.0
ESTIMATE_TIMEOUT_S = 3600.0  # a walk of every tree to back up, as the archive will read it
STATS_TIMEOUT_S = 3600.0
# The wrappers' exit statuses (sysexits.h) that mean something to the retry logic.
EX_UNAVAILABLE = 69
EX_AUTH = 71
EX_TEMPFAIL = 75  # a table stayed locked
EX_USAGE = 64  # a malformed request
EX_NOPERM = 77  # ucb-archive: not allowed by the policy
WHERE = "the local MariaDB socket (as root, through sudo)"
_LOCKED = re.compile(r"table (.+?) is locked by another session \((.*)\); gave up after "
                     r"([0-9]+) s")
_WITHDRAWN = "ucb-mariadb: withdrawn:"  # ucb-mariadb's WITHDRAWN, after its NAME


def _sudo(*argv: str) -> tuple[str, ...]:
    if shutil.which("sudo") is None:
        raise SudoRefused(command=" ".join(argv), stderr="sudo is not installed")
    return ("sudo", "-n", *argv)


def archive_command(plan: PathPlan, extra_excludes: Iterable[str] = (),
                    snapshot_id: str | None = None) -> Command:
    """``ucb-archive``: the same tar stream as :func:`archive.tar_command`, read as root.

    Paths go as the plan's absolute paths (the wrapper checks them against its allowed list);
    exclusions as tar_command anchors them, relative to root. ``snapshot_id`` (32 hex digits):
    an incremental level; the parent snapshot goes on the command's stdin (empty: level 0)
    and the new one is collected with :func:`take_snapshot_command`.
    """
    argv = [ARCHIVE_WRAPPER, plan.root]
    if snapshot_id is not None:
        argv.append(f"--snapshot={snapshot_id}")
    argv += [f"--exclude={pattern.lstrip('/') or '.'}"
             for pattern in (*plan.excluded, *extra_excludes)]
    argv += ["--", *plan.included]
    # tar's own statuses, judged as for tar_command; the wrapper's refusals are 64 and 77.
    return Command(argv=_sudo(*argv), name="tar", ok_statuses=frozenset({0, 1, 2}))


def estimate_command(root: str, paths: Iterable[str], excludes: Iterable[str] = ()) -> Command:
    """``ucb-archive ROOT --estimate``: which ``paths`` exist and their tar bytes, as root,
    refused as an archive of them would be (:mod:`files.estimate`)."""
    argv = [ARCHIVE_WRAPPER, root, "--estimate",
            *(f"--exclude={pattern.lstrip('/') or '.'}" for pattern in excludes), "--", *paths]
    return Command(argv=_sudo(*argv), name="ucb-archive --estimate")


def estimate_paths(root: str, paths: Iterable[str], excludes: Iterable[str] = ()) -> PathSizes:
    """What exists of ``paths`` under ``root`` and how big, read by root through the wrapper;
    a path the policy refuses is :class:`PathNotAllowed` (before anything is written)."""
    try:
        answer = json.loads(capture(estimate_command(root, paths, excludes),
                                    timeout=ESTIMATE_TIMEOUT_S))
    except CommandFailed as error:
        status, stderr = error.fields.get("status"), str(error.fields.get("stderr", ""))
        reason = stderr.strip().splitlines()[-1] if stderr.strip() else "no reason given"
        reason = reason.removeprefix("ucb-archive: refused: ")
        if status == EX_NOPERM:
            raise PathNotAllowed(reason=reason, config=CONFIG_FILE) from None
        if status == EX_USAGE:
            raise ConfigError(detail=f"{ARCHIVE_WRAPPER} refused the plan: {reason}") from None
        raise
    return PathSizes.from_answer(answer)


def take_snapshot_command(root: str, snapshot_id: str) -> Command:
    """``ucb-archive ROOT --take-snapshot=ID``: the snapshot tar left, to stdout, then removed."""
    return Command(argv=_sudo(ARCHIVE_WRAPPER, root, f"--take-snapshot={snapshot_id}"),
                   name="ucb-archive --take-snapshot")


def wrapper_snapshot_path(uid: int, snapshot_id: str) -> str:
    """Where the wrapper keeps a snapshot while tar runs (root's own directory)."""
    return f"{SNAPSHOT_DIR}/{uid}-{snapshot_id}.snar"


def dump_command(databases: tuple[str, ...], lock_wait_s: int = LOCK_WAIT_S,
                 ignore: tuple[str, ...] = ()) -> Command:
    """``ucb-mariadb dump``: :func:`dbdump.dump_command`'s dump, as root over the socket,
    without the tables and views ``ignore`` names (``db.name``); the wrapper ends a wait of
    the dump's for a locked table after ``lock_wait_s``, saying so on stderr
    (:class:`WrapperLockWatch`)."""
    return Command(argv=_sudo(MARIADB_WRAPPER, "dump", f"--lock-wait={int(lock_wait_s)}",
                              *(f"--ignore-table={name}" for name in ignore), *databases),
                   name="mariadb-dump")


def users_dump_command() -> Command:
    """``ucb-mariadb dump-users``: :func:`dbdump.users_dump_command`'s, as root."""
    return Command(argv=_sudo(MARIADB_WRAPPER, "dump-users"), name="mariadb-dump --system")


def _locked(stderr: str) -> DatabaseLocked | None:
    """The wrapper's line about a table that stayed locked, as :class:`DatabaseLocked`;
    not one it withdrew (the statement ended before the watch could stop it)."""
    locked = _LOCKED.search(stderr.rpartition(_WITHDRAWN)[2])
    if locked is None:
        return None
    return DatabaseLocked(table=locked.group(1), where=WHERE, holder=locked.group(2),
                          waited=int(locked.group(3)))


@dataclass
class WrapperLockWatch:
    """The dump's lock waits are watched by the wrapper, as root (``ucb-mariadb dump
    --lock-wait=S``); here its line, or the dump's own 1205, becomes the run's error."""

    lock_wait_s: int = LOCK_WAIT_S

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def failure(self, reason: str) -> BackupError | None:
        return _locked(reason) or dump_lock_timeout(reason, WHERE, self.lock_wait_s)


def _query(*args: str, timeout: float) -> object:
    command = Command(argv=_sudo(MARIADB_WRAPPER, *args), name=f"ucb-mariadb {args[0]}")
    try:
        return json.loads(capture(command, timeout=timeout))
    except CommandFailed as error:
        status, stderr = error.fields.get("status"), str(error.fields.get("stderr", ""))
        if status == EX_UNAVAILABLE:
            raise DatabaseUnreachable(where=WHERE, reason=stderr) from None
        if status == EX_AUTH:
            raise DatabaseAuthError(where=WHERE, user="root", reason=stderr) from None
        locked = _locked(stderr) if status == EX_TEMPFAIL else None
        if locked:
            raise locked from None
        raise


def server_info() -> ServerInfo:
    """Version, the databases to dump and their size, read by root through the socket."""
    info = _query("info", timeout=INFO_TIMEOUT_S)
    assert isinstance(info, dict)
    return ServerInfo(version=info["version"], databases=tuple(info["databases"]),
                      size_bytes=int(info["size_bytes"]))


def table_stats(databases: tuple[str, ...], checksums: bool = True,
                lock_wait_s: int = LOCK_WAIT_S) -> list[TableStats]:
    """Row counts and checksums of every base table, as :func:`database.table_stats`."""
    if not databases:
        return []
    rows = _query("stats", *(() if checksums else ("--rows-only",)),
                  f"--lock-wait={int(lock_wait_s)}", *databases, timeout=STATS_TIMEOUT_S)
    assert isinstance(rows, list)
    return [TableStats(row["database"], row["table"], row["engine"], int(row["rows"]),
                       row["checksum"], vanished=bool(row.get("vanished", False)))
            for row in rows]


def table_types(names: tuple[str, ...]) -> dict[str, str]:
    """``ucb-mariadb tables``: ``db.name`` -> ``view`` or ``table``, for each of ``names``
    (``exclude_tables``), as :func:`preflight.table_types`; a name the server does not know
    is an error, one the wrapper refuses (not DB.NAME of letters, digits, _, $ and -) too."""
    try:
        answer = _query("tables", *names, timeout=INFO_TIMEOUT_S)
    except CommandFailed as error:
        if error.fields.get("status") != EX_USAGE:
            raise
        stderr = str(error.fields.get("stderr", "")).strip()
        reason = stderr.splitlines()[-1] if stderr else "no reason given"
        reason = reason.removeprefix("ucb-mariadb: refused: ").split("; usage:")[0]
        raise ConfigError(detail=f"--exclude-table under --privileged: {reason}") from None
    assert isinstance(answer, dict)
    for name in names:
        if answer.get(name) is None:
            raise ConfigError(detail=f"--exclude-table {name}: no such table or view on the "
                                     "server")
    return {name: str(answer[name]) for name in names}


def check(databases: tuple[str, ...], lock_wait_s: int = LOCK_WAIT_S) -> dict:
    """``ucb-mariadb check``: tables opened once (bounded wait), root's grants, object counts."""
    answer = _query("check", f"--lock-wait={int(lock_wait_s)}", *databases,
                    timeout=INFO_TIMEOUT_S + len(databases) * lock_wait_s)
    assert isinstance(answer, dict)
    return answer


@dataclass
class PrivilegedAccess:
    """root through the unix socket, via the sudo wrapper: no password involved.

    The table statistics are not cancellable (root's client, under sudo): on failure they run
    to their end (or their timeout), killed with the process the caller tracks.
    """

    lock_wait_s: int = LOCK_WAIT_S
    where: str = WHERE

    def server_info(self) -> ServerInfo:
        return server_info()

    def table_stats(self, databases: tuple[str, ...], checksums: bool = True
                    ) -> list[TableStats]:
        return table_stats(databases, checksums, self.lock_wait_s)

    def table_stats_beside(self, databases: tuple[str, ...], checksums: bool = True
                           ) -> StatsBeside:
        return (lambda: table_stats(databases, checksums, self.lock_wait_s)), None

    def check_privileges(self, databases: tuple[str, ...], allow_partial: bool = False
                         ) -> PrivilegeReport:
        answer = check(databases, self.lock_wait_s)
        return require(evaluate(answer["user"], answer["grants"], databases), self.where,
                       allow_partial)

    def check_locks(self, databases: tuple[str, ...]) -> None:
        check(databases, self.lock_wait_s)

    def schema_objects(self, databases: tuple[str, ...]) -> dict[str, dict[str, int]]:
        return check(databases, self.lock_wait_s)["schema_objects"]

    def privileges(self) -> list[str]:
        return list(check((), self.lock_wait_s)["grants"])

    def privilege_report(self, databases: tuple[str, ...]) -> PrivilegeReport:
        answer = check((), self.lock_wait_s)  # no table opened: grants only
        return evaluate(answer["user"], answer["grants"], databases)

    def table_types(self, names: tuple[str, ...]) -> dict[str, str]:
        return table_types(names)

    def dump_commands(self, databases: tuple[str, ...], ignore: tuple[str, ...] = ()
                      ) -> Dumps:
        return Dumps(databases=DumpSpec(dump_command(databases, self.lock_wait_s, ignore),
                                        guard=WrapperLockWatch(self.lock_wait_s)),
                     users=DumpSpec(users_dump_command()), system_tables=SYSTEM_DUMP)


# ------------------------------------------------------------------------- the binary log
BINLOG_ACTION = "binlog"
BINLOG_READ_TIMEOUT_S = 3600.0


def binlog_status() -> dict:
    """``ucb-mariadb binlog status``: log_bin, identity, format, GTID position, the files."""
    answer = _query(BINLOG_ACTION, "status", timeout=INFO_TIMEOUT_S)
    assert isinstance(answer, dict)
    return answer


def binlog_flush() -> str:
    """``FLUSH BINARY LOGS`` as root; the server's UTC time after it."""
    answer = _query(BINLOG_ACTION, "flush", timeout=INFO_TIMEOUT_S)
    assert isinstance(answer, dict)
    return str(answer["time"])


def binlog_end(databases: tuple[str, ...], lock_wait_s: int = LOCK_WAIT_S) -> dict:
    """A consistent snapshot's binlog coordinates and the row counts in it."""
    answer = _query(BINLOG_ACTION, "end", f"--lock-wait={int(lock_wait_s)}", *databases,
                    timeout=STATS_TIMEOUT_S)
    assert isinstance(answer, dict)
    return answer


def binlog_gtid(file: str, position: int) -> str:
    answer = _query(BINLOG_ACTION, "gtid", file, str(int(position)), timeout=INFO_TIMEOUT_S)
    assert isinstance(answer, dict)
    return str(answer["gtid"])


def binlog_read_command(file: str) -> Command:
    """``ucb-mariadb binlog read FILE``: one closed log file, byte for byte, on stdout."""
    return Command(argv=_sudo(MARIADB_WRAPPER, BINLOG_ACTION, "read", file),
                   name="ucb-mariadb binlog read")


def with_master_data(command: Command) -> Command:
    """The wrapper's dump that also writes its snapshot's binlog coordinates."""
    argv = list(command.argv)
    at = argv.index(MARIADB_WRAPPER) + 2  # after the action
    return replace(command, argv=(*argv[:at], "--master-data", *argv[at:]))


def is_wrapper(command: Command) -> bool:
    return MARIADB_WRAPPER in command.argv
