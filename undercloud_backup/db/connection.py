"""MariaDB connection settings, the connection, and what is read from the server: its version,
its databases and their sizes, and each table's exact row count and checksum.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pymysql

from undercloud_backup.core.errors import (
    ConfigError,
    DatabaseAuthError,
    DatabaseUnreachable,
    redact,
)
from undercloud_backup.db.preflight import (
    ER_LOCK_WAIT_TIMEOUT,
    LOCK_WAIT_S,
    locked_error,
    set_lock_wait,
)
from undercloud_backup.db.rows import one_row

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
    # Dropped after the dump began (its SELECT found no table, ER_NO_SUCH_TABLE): no count.
    vanished: bool = False

    def to_dict(self) -> dict:
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
        version = one_row(cursor)[0]
        cursor.execute("SHOW DATABASES")
        databases = tuple(sorted(r[0] for r in cursor.fetchall() if r[0] not in SYSTEM_SCHEMAS))
        cursor.execute(
            "SELECT COALESCE(SUM(data_length + index_length), 0) FROM information_schema.tables"
            " WHERE table_schema NOT IN %s AND table_type = 'BASE TABLE'",
            (tuple(SYSTEM_SCHEMAS),),
        )
        size = int(one_row(cursor)[0])
    return ServerInfo(version=version, databases=databases, size_bytes=size)


ER_NO_SUCH_TABLE = 1146


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
            except pymysql.err.ProgrammingError as error:
                if not error.args or error.args[0] != ER_NO_SUCH_TABLE:
                    raise
                # Listed, then dropped by its application while the dump ran: not an error
                # of the backup's; the manifest says it vanished.
                stats.append(TableStats(schema, table, engine, 0, None, vanished=True))
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


StatsBeside = tuple[Callable[[], list[TableStats]], Callable[[], None] | None]
