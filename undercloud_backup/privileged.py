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
import shutil
from collections.abc import Iterable

from undercloud_backup.archive import PathPlan
from undercloud_backup.database import ServerInfo, TableStats
from undercloud_backup.errors import (
    CommandFailed,
    DatabaseAuthError,
    DatabaseUnreachable,
    SudoRefused,
)
from undercloud_backup.execute import Command, capture

LIBEXEC = "/usr/local/libexec/undercloud-backup"
ARCHIVE_WRAPPER = f"{LIBEXEC}/ucb-archive"
MARIADB_WRAPPER = f"{LIBEXEC}/ucb-mariadb"
SUDOERS_FILE = "/etc/sudoers.d/undercloud-backup"
CONFIG_FILE = "/etc/undercloud-backup/privileged.conf"

INFO_TIMEOUT_S = 120.0
STATS_TIMEOUT_S = 3600.0
# The wrappers' exit statuses (sysexits.h) that mean something to the retry logic.
EX_UNAVAILABLE = 69
EX_AUTH = 71
WHERE = "the local MariaDB socket (as root, through sudo)"


def _sudo(*argv: str) -> tuple[str, ...]:
    if shutil.which("sudo") is None:
        raise SudoRefused(command=" ".join(argv), stderr="sudo is not installed")
    return ("sudo", "-n", *argv)


def archive_command(plan: PathPlan, extra_excludes: Iterable[str] = ()) -> Command:
    """``ucb-archive``: the same tar stream as :func:`archive.tar_command`, read as root.

    Paths go as the plan's absolute paths (the wrapper checks them against its allowed list);
    exclusions as tar_command anchors them, relative to root.
    """
    argv = [ARCHIVE_WRAPPER, plan.root]
    argv += [f"--exclude={pattern.lstrip('/') or '.'}"
             for pattern in (*plan.excluded, *extra_excludes)]
    argv += ["--", *plan.included]
    # tar's own statuses, judged as for tar_command; the wrapper's refusals are 64 and 77.
    return Command(argv=_sudo(*argv), name="tar", ok_statuses=frozenset({0, 1, 2}))


def dump_command(databases: tuple[str, ...]) -> Command:
    """``ucb-mariadb dump``: :func:`database.dump_command`'s dump, as root over the socket."""
    return Command(argv=_sudo(MARIADB_WRAPPER, "dump", *databases), name="mariadb-dump")


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
        raise


def server_info() -> ServerInfo:
    """Version, the databases to dump and their size, read by root through the socket."""
    info = _query("info", timeout=INFO_TIMEOUT_S)
    assert isinstance(info, dict)
    return ServerInfo(version=info["version"], databases=tuple(info["databases"]),
                      size_bytes=int(info["size_bytes"]))


def table_stats(databases: tuple[str, ...], checksums: bool = True) -> list[TableStats]:
    """Row counts and checksums of every base table, as :func:`database.table_stats`."""
    if not databases:
        return []
    rows = _query("stats", *(() if checksums else ("--rows-only",)), *databases,
                  timeout=STATS_TIMEOUT_S)
    assert isinstance(rows, list)
    return [TableStats(row["database"], row["table"], row["engine"], int(row["rows"]),
                       row["checksum"]) for row in rows]
