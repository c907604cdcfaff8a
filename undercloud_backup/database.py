"""MariaDB: connection settings, introspection, the dump commands, and the access chosen once.

A run reaches the server one way, chosen once by :func:`access`: directly with an account
(:class:`DirectAccess`; the password reaches ``mariadb-dump`` through an anonymous pipe read as
``--defaults-extra-file=/dev/fd/N``, borgmatic's technique: never on argv, never on disk), or
as root through the sudo wrapper (:class:`privileged.PrivilegedAccess`). Both give the same
methods; nothing else asks which one it is.

Two dumps: the databases (``| mariadb`` and ``| mariadb --one-database NAME`` both work with
the stock client), and users and grants on their own (loaded after the databases).
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import pymysql

from undercloud_backup.dbdump import SYSTEM_DUMP as SYSTEM_DUMP  # re-exported
from undercloud_backup.dbdump import (
    Dumps,
    DumpSpec,
    dump_command,
    dump_tool,
    option_pipe,
    users_dump_command,
)
from undercloud_backup.dbpreflight import (
    ER_LOCK_WAIT_TIMEOUT,
    LOCK_WAIT_S,
    PrivilegeReport,
    check_locks,
    check_privileges,
    locked_error,
    require,
    schema_object_counts,
    set_lock_wait,
)
from undercloud_backup.errors import (
    ConfigError,
    DatabaseAuthError,
    DatabaseUnreachable,
    redact,
)

# Schemas that are not data: information_schema/performance_schema/sys are views of the server,
# and `mysql` is dumped portably through --system (dumping its tables directly is not restorable
# across versions).
SYSTEM_SCHEMAS = frozenset({"information_schema", "performance_schema", "sys", "mysql"})


@dataclass(frozen=True)
class DatabaseSettings:
    """Where and as whom to connect; ``password`` is the only secret."""

    host: str = "127.0.0.1"
    port: int = 3306
    socket: str | None = None
    user: str = "root"
    password: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return self.socket if self.socket else f"{self.host}:{self.port}"

    @classmethod
    def from_option_file(cls, path: str | os.PathLike[str]) -> DatabaseSettings:
        """Read the ``[client]`` (and ``[client-mariadb]``) groups of a MariaDB option file."""
        parser = configparser.ConfigParser(allow_no_value=True, strict=False, interpolation=None)
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError(detail=f"cannot read MariaDB option file {path}: {error}") from None
        # MariaDB option files allow lines outside a group and !include directives: skip both.
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("!")]
        try:
            parser.read_string("[__top__]\n" + "\n".join(lines))
        except configparser.Error as error:
            raise ConfigError(detail=f"cannot parse MariaDB option file {path}: {error}") from None
        values: dict[str, str] = {}
        for group in ("client", "client-server", "client-mariadb"):
            if parser.has_section(group):
                values.update({k.replace("-", "_"): v for k, v in parser.items(group) if v})
        settings = cls()
        password = values.get("password")
        if password and len(password) >= 2 and password[0] == password[-1] and password[0] in "'\"":
            password = password[1:-1]
        return replace(
            settings,
            host=values.get("host", settings.host),
            port=int(values.get("port", settings.port)),
            socket=values.get("socket", settings.socket),
            user=values.get("user", settings.user),
            password=password,
        )

    def option_file_text(self) -> str:
        """The ``[client]`` group handed to the dump tool through a pipe."""
        lines = ["[client]", f"user={self.user}"]
        if self.socket:
            lines.append(f"socket={self.socket}")
        else:
            lines += [f"host={self.host}", f"port={self.port}", "protocol=tcp"]
        if self.password:
            escaped = self.password.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'password="{escaped}"')
        return "\n".join(lines) + "\n"


@contextmanager
def connect(settings: DatabaseSettings) -> Iterator[pymysql.connections.Connection]:
    """Open a PyMySQL connection, turning refusals into errors an operator can act on."""
    kwargs: dict = {"user": settings.user, "password": settings.password or "",
                    "connect_timeout": 10, "read_timeout": 3600, "charset": "utf8mb4"}
    if settings.socket:
        kwargs["unix_socket"] = settings.socket
    else:
        kwargs.update(host=settings.host, port=settings.port)
    try:
        connection = pymysql.connect(**kwargs)
    except pymysql.err.OperationalError as error:
        code = error.args[0] if error.args else None
        reason = redact(str(error.args[1] if len(error.args) > 1 else error), [settings.password])
        if code in (1044, 1045, 1698):
            raise DatabaseAuthError(where=settings.where, user=settings.user,
                                    reason=reason) from None
        raise DatabaseUnreachable(where=settings.where, reason=reason) from None
    try:
        yield connection
    except pymysql.err.OperationalError as error:  # lost mid-query: server gone or KILLed
        reason = redact(str(error.args[-1] if error.args else error), [settings.password])
        raise DatabaseUnreachable(where=settings.where, reason=reason) from None
    finally:
        connection.close()


@dataclass(frozen=True)
class TableStats:
    database: str
    table: str
    engine: str | None
    rows: int
    checksum: int | None

    def as_dict(self) -> dict:
        return {"table": self.table, "engine": self.engine, "rows": self.rows,
                "checksum": self.checksum}


@dataclass(frozen=True)
class ServerInfo:
    version: str
    databases: tuple[str, ...]
    size_bytes: int


def server_info(connection: pymysql.connections.Connection) -> ServerInfo:
    """Version, the databases to dump, and their size on disk from information_schema."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT VERSION()")
        version = cursor.fetchone()[0]
        cursor.execute("SHOW DATABASES")
        databases = tuple(sorted(r[0] for r in cursor.fetchall() if r[0] not in SYSTEM_SCHEMAS))
        cursor.execute(
            "SELECT COALESCE(SUM(data_length + index_length), 0) FROM information_schema.tables"
            " WHERE table_schema NOT IN %s AND table_type = 'BASE TABLE'",
            (tuple(SYSTEM_SCHEMAS),),
        )
        size = int(cursor.fetchone()[0])
    return ServerInfo(version=version, databases=databases, size_bytes=size)


def table_stats(connection: pymysql.connections.Connection, databases: tuple[str, ...],
                checksums: bool = True, lock_wait_s: int = LOCK_WAIT_S,
                where: str = "MariaDB") -> list[TableStats]:
    """Exact row counts and ``CHECKSUM TABLE`` (unless not wanted) of every base table.

    They are read in a consistent-snapshot transaction opened as the dump starts its own; on a
    busy server the two snapshots can differ by the writes in between. A table locked for
    longer than ``lock_wait_s`` raises :class:`DatabaseLocked`.
    """
    stats: list[TableStats] = []
    if not databases:
        return stats
    with connection.cursor() as cursor:
        set_lock_wait(cursor, lock_wait_s)
        cursor.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        cursor.execute(
            "SELECT table_schema, table_name, engine FROM information_schema.tables"
            " WHERE table_schema IN %s AND table_type = 'BASE TABLE'"
            " ORDER BY table_schema, table_name",
            (databases,),
        )
        for schema, table, engine in cursor.fetchall():
            try:
                stats.append(_table_stats(cursor, schema, table, engine, checksums))
            except pymysql.err.OperationalError as error:
                if error.args and error.args[0] == ER_LOCK_WAIT_TIMEOUT:
                    raise locked_error(connection, schema, table, where, lock_wait_s) from None
                raise
        cursor.execute("COMMIT")
    return stats


def _table_stats(cursor, schema: str, table: str, engine: str | None,
                 checksums: bool) -> TableStats:
    quoted = f"`{schema.replace('`', '``')}`.`{table.replace('`', '``')}`"
    cursor.execute(f"SELECT COUNT(*) FROM {quoted}")
    rows = int(cursor.fetchone()[0])
    checksum = None
    if checksums:
        cursor.execute(f"CHECKSUM TABLE {quoted} EXTENDED")
        checksum = cursor.fetchone()[1]
    return TableStats(schema, table, engine, rows,
                      int(checksum) if checksum is not None else None)


def table_stats_beside(settings: DatabaseSettings, databases: tuple[str, ...],
                       checksums: bool = True, lock_wait_s: int = LOCK_WAIT_S
                       ) -> tuple[Callable[[], list[TableStats]], Callable[[], None]]:
    """:func:`table_stats` on a connection of its own, and a way to stop it from elsewhere.

    The stop is ``KILL CONNECTION`` from a third connection: a user may kill its own.
    """
    thread_id: list[int] = []

    def read() -> list[TableStats]:
        with connect(settings) as connection:
            thread_id.append(connection.thread_id())
            return table_stats(connection, databases, checksums, lock_wait_s, settings.where)

    def stop() -> None:
        if thread_id:
            with connect(settings) as connection, connection.cursor() as cursor:
                cursor.execute(f"KILL CONNECTION {int(thread_id[0])}")

    return read, stop


# ---------------------------------------------------------------------------- access
StatsBeside = tuple[Callable[[], list[TableStats]], Callable[[], None] | None]


class DatabaseAccess(Protocol):
    """How a run reaches MariaDB, chosen once (:func:`access`)."""

    where: str
    lock_wait_s: int

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
    def dump_commands(self, databases: tuple[str, ...]) -> Dumps: ...


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

    def dump_commands(self, databases: tuple[str, ...]) -> Dumps:
        tool, secrets = dump_tool(), [self.settings.password]
        text = self.settings.option_file_text()
        first = option_pipe(text)
        try:
            second = option_pipe(text)
        except BaseException:
            os.close(first)
            raise
        from undercloud_backup.tablestats import DumpLockWatch

        return Dumps(databases=DumpSpec(dump_command(databases, first, tool), secrets, (first,),
                                        DumpLockWatch(self.settings, self.lock_wait_s)),
                     users=DumpSpec(users_dump_command(second, tool), secrets, (second,)))


def access(settings: DatabaseSettings | None, privileged: bool,
           lock_wait_s: int = LOCK_WAIT_S) -> DatabaseAccess:
    """The database access for this run: root through the sudo wrapper, or ``settings``."""
    if privileged:
        from undercloud_backup.privileged import PrivilegedAccess

        return PrivilegedAccess(lock_wait_s=lock_wait_s)
    if settings is None:
        raise ConfigError(detail="no database connection settings")
    return DirectAccess(settings, lock_wait_s)
