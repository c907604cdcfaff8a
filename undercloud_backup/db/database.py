"""How a run reaches MariaDB, chosen once: the dump commands and the introspection it needs.

A run reaches the server one way, chosen once by :func:`access`: directly with an account
(:class:`DirectAccess`; the password reaches ``mariadb-dump`` through an anonymous pipe read as
``--defaults-extra-file=/dev/fd/N``, borgmatic's technique: never on argv, never on disk), or
as root through the sudo wrapper (:class:`privileged.PrivilegedAccess`). Both give the same
methods; nothing else asks which one it is.

Two dumps: the databases (``| mariadb`` and ``| mariadb --one-database NAME`` both work with
the stock client), and users and grants on their own (loaded after the databases).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from undercloud_backup.core.errors import ConfigError
from undercloud_backup.db.connection import (
    DatabaseSettings,
    ServerInfo,
    StatsBeside,
    TableStats,
    connect,
    server_info,
    table_stats,
    table_stats_beside,
)
from undercloud_backup.db.dump import (
    Dumps,
    DumpSpec,
    dump_command,
    dump_tool,
    option_pipe,
    users_dump_command,
)
from undercloud_backup.db.preflight import (
    LOCK_WAIT_S,
    PrivilegeReport,
    check_locks,
    check_privileges,
    require,
    schema_object_counts,
    table_types,
)
from undercloud_backup.db.privileged import PrivilegedAccess
from undercloud_backup.db.tablestats import DumpLockWatch


class DatabaseAccess(Protocol):
    """How a run reaches MariaDB, chosen once (:func:`access`)."""

    lock_wait_s: int

    @property
    def where(self) -> str: ...
    def server_info(self) -> ServerInfo: ...
    def table_stats(self, databases: tuple[str, ...],
                    checksums: bool = True) -> list[TableStats]: ...
    def table_stats_beside(self, databases: tuple[str, ...],
                           checksums: bool = True) -> StatsBeside: ...
    def check_privileges(self, databases: tuple[str, ...],
                         allow_partial: bool = False) -> PrivilegeReport: ...
    def check_locks(self, databases: tuple[str, ...]) -> None: ...
    def schema_objects(self, databases: tuple[str, ...]) -> dict[str, dict[str, int]]: ...
    def privileges(self) -> list[str]: ...
    def privilege_report(self, databases: tuple[str, ...]) -> PrivilegeReport: ...
    def dump_commands(self, databases: tuple[str, ...], ignore: tuple[str, ...] = ()
                      ) -> Dumps: ...
    def table_types(self, names: tuple[str, ...]) -> dict[str, str]: ...


@dataclass
class DirectAccess:
    """The server reached with the settings' account (PyMySQL, and the dump tool)."""

    settings: DatabaseSettings
    lock_wait_s: int = LOCK_WAIT_S

    @property
    def where(self) -> str:
        return self.settings.where

    def server_info(self) -> ServerInfo:
        with connect(self.settings) as connection:
            return server_info(connection)

    def table_stats(self, databases: tuple[str, ...], checksums: bool = True
                    ) -> list[TableStats]:
        with connect(self.settings) as connection:
            return table_stats(connection, databases, checksums, self.lock_wait_s, self.where)

    def table_stats_beside(self, databases: tuple[str, ...], checksums: bool = True
                           ) -> StatsBeside:
        return table_stats_beside(self.settings, databases, checksums, self.lock_wait_s)

    def check_privileges(self, databases: tuple[str, ...], allow_partial: bool = False
                         ) -> PrivilegeReport:
        with connect(self.settings) as connection:
            report = check_privileges(connection, databases)
        return require(report, self.where, allow_partial)

    def check_locks(self, databases: tuple[str, ...]) -> None:
        with connect(self.settings) as connection:
            check_locks(connection, databases, self.where, self.lock_wait_s)

    def schema_objects(self, databases: tuple[str, ...]) -> dict[str, dict[str, int]]:
        with connect(self.settings) as connection:
            return schema_object_counts(connection, databases)

    def privileges(self) -> list[str]:
        with connect(self.settings) as connection:
            return check_privileges(connection, ()).grants

    def privilege_report(self, databases: tuple[str, ...]) -> PrivilegeReport:
        """The account, its grants and what they leave out of ``databases`` (never raises)."""
        with connect(self.settings) as connection:
            return check_privileges(connection, databases)

    def table_types(self, names: tuple[str, ...]) -> dict[str, str]:
        with connect(self.settings) as connection:
            return table_types(connection, names)

    def dump_commands(self, databases: tuple[str, ...], ignore: tuple[str, ...] = ()
                      ) -> Dumps:
        tool, secrets = dump_tool(), [self.settings.password]
        text = self.settings.option_file_text()
        first = option_pipe(text)
        try:
            second = option_pipe(text)
        except BaseException:
            os.close(first)
            raise
        return Dumps(databases=DumpSpec(dump_command(databases, first, tool, ignore), secrets,
                                        (first,),
                                        DumpLockWatch(self.settings, self.lock_wait_s)),
                     users=DumpSpec(users_dump_command(second, tool), secrets, (second,)))


def access(settings: DatabaseSettings | None, privileged: bool,
           lock_wait_s: int = LOCK_WAIT_S) -> DatabaseAccess:
    """The database access for this run: root through the sudo wrapper, or ``settings``."""
    if privileged:
        return PrivilegedAccess(lock_wait_s=lock_wait_s)
    if settings is None:
        raise ConfigError(detail="no database connection settings")
    return DirectAccess(settings, lock_wait_s)
