"""The dump commands, built as data: the databases dump and the users-and-grants dump.

Two objects, so that the stock client can load them the ways an operator does by hand:
``zstd -dc DB | mariadb`` then ``zstd -dc USERS | mariadb`` (everything), or, after
``CREATE DATABASE X``, ``zstd -dc DB | mariadb --one-database X`` (that database alone, with
its routines, triggers, events and views; only a missing database that follows X in the dump
is created, empty).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Protocol

from undercloud_backup.core.errors import BackupError, DumpFailed
from undercloud_backup.core.execute import Command

SYSTEM_DUMP = "users,plugins,udfs,servers"
# The databases: no --add-drop-database (under `mariadb --one-database X` the DROP DATABASE of
# the database after X runs while X is current: it would empty it), no --system (its SET ROLE
# passes the client's filter and fails); every table is dropped and recreated, so plain INSERTs.
DATABASES_DUMP_OPTIONS = (
    "--single-transaction", "--quick", "--routines", "--events", "--triggers", "--hex-blob",
    "--max-allowed-packet=1G",
)
# Users, roles, grants, plugins, UDFs and servers as portable SQL; users load as CREATE USER
# IF NOT EXISTS (--insert-ignore), so loading into a live server never aborts on the account it
# runs as. Loaded after the databases: table-level grants need their tables.
USERS_DUMP_OPTIONS = (f"--system={SYSTEM_DUMP}", "--insert-ignore")
# With no database to dump, a valid dump that holds nothing (mariadb-dump needs a database).
EMPTY_DUMP_OPTIONS = ("--no-create-db", "--no-create-info", "--no-data", "--skip-triggers",
                      "--databases", "mysql")


def dump_tool() -> str:
    """The server's own dump tool: ``mariadb-dump``, or ``mysqldump`` on older installs."""
    for name in ("mariadb-dump", "mysqldump"):
        path = shutil.which(name)
        if path:
            return path
    raise DumpFailed(reason="neither mariadb-dump nor mysqldump is installed")


def databases_dump_options(databases: tuple[str, ...]) -> tuple[str, ...]:
    """The databases dump's options after the connection's (the sudo wrapper uses the same)."""
    if not databases:
        return (*DATABASES_DUMP_OPTIONS, *EMPTY_DUMP_OPTIONS)
    return (*DATABASES_DUMP_OPTIONS, "--databases", *databases)


def dump_command(databases: tuple[str, ...], options_fd: int,
                 tool: str = "mariadb-dump", ignore: tuple[str, ...] = ()) -> Command:
    """The consistent dump of ``databases``: tables, data, routines, events, triggers, views;
    without the tables and views ``ignore`` names (``db.name``: a view whose table is gone)."""
    # --defaults-extra-file must stay the first option
    return Command(argv=(tool, f"--defaults-extra-file=/dev/fd/{options_fd}",
                         *(f"--ignore-table={name}" for name in ignore),
                         *databases_dump_options(databases)), name="mariadb-dump")


def users_dump_command(options_fd: int, tool: str = "mariadb-dump") -> Command:
    """Users, roles and grants (and plugins, UDFs, servers) as portable SQL."""
    return Command(argv=(tool, f"--defaults-extra-file=/dev/fd/{options_fd}",
                         *USERS_DUMP_OPTIONS), name="mariadb-dump --system")


class LockGuard(Protocol):
    """What bounds a dump's waits for a locked table, and tells a failure it caused."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def failure(self, reason: str) -> BackupError | None: ...


@dataclass
class DumpSpec:
    """One dump command with what it needs: secrets to redact, an option file on a pipe, and
    the guard that bounds its waits for a locked table (``tablestats.DumpLockWatch``; through
    the sudo wrapper, the wrapper's own).

    Use as a context manager around the dump's pipeline (the guard watches from entry to
    exit), call :meth:`started` once the process runs (it holds its own copy of the pipe
    then), and turn a failure into the run's error with :meth:`failure`.
    """

    command: Command
    secrets: list[str | None] = field(default_factory=list)
    pass_fds: tuple[int, ...] = ()
    guard: LockGuard | None = None

    def __enter__(self) -> DumpSpec:
        if self.guard is not None:
            try:
                self.guard.start()
            except BaseException:
                self.started()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.started()
        if self.guard is not None:
            self.guard.stop()

    def failure(self, reason: str) -> BackupError:
        """The error of a failed dump: a table that stayed locked (exit 26), or DumpFailed."""
        locked = self.guard.failure(reason) if self.guard is not None else None
        return locked or DumpFailed(reason=reason)

    def started(self) -> None:
        while self.pass_fds:
            fd, *rest = self.pass_fds
            self.pass_fds = tuple(rest)
            os.close(fd)


@dataclass
class Dumps:
    """The databases dump and the users-and-grants dump of one run."""

    databases: DumpSpec
    users: DumpSpec
    system_tables: str = SYSTEM_DUMP


def option_pipe(text: str) -> int:
    """The read end of a pipe holding ``text`` (a 64 KiB pipe holds any option file)."""
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "w") as options:
        options.write(text)
    return read_fd
