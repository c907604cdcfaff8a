"""Before a dump: can this account dump everything, is any table locked, what is there to dump.

``mariadb-dump`` skips silently what its account may not see: triggers without ``TRIGGER``,
whole databases without ``SHOW DATABASES``. So the account's grants are read
(``SHOW GRANTS``) and compared with what a complete dump needs, per database to dump, before
anything is written; the grants and the number of views, triggers, routines and events per
database go into the manifest, so verify can compare what a restore brings back.

A table held by ``LOCK TABLES ... WRITE`` (or an ``ALTER``) makes every reader wait up to
``lock_wait_timeout`` (a day by default): the checks and the table statistics run with a
bounded wait, and a timeout names the table and, where the processlist shows it, the holder.
The dump's own session cannot be given that bound (``mariadb-dump`` 10.11 has no
``--init-command``, and its option parser rejects one in an option file), so a lock taken
after the check is bounded from beside it: a statement of the dump's that has waited
:data:`LOCK_WAIT_S` for a lock is ended with ``KILL QUERY ID`` (:func:`waiting_dump_statement`,
``tablestats.DumpLockWatch``, and the same in the sudo wrapper), and the dump fails with
:class:`DatabaseLocked`, as it does if the server's own ``lock_wait_timeout`` (1205) ends it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pymysql

from undercloud_backup.core.errors import BackupError, ConfigError
from undercloud_backup.db.rows import one_row

# What a complete `mariadb-dump --single-transaction --routines --events --triggers` needs
# (measured on MariaDB 10.11: without TRIGGER triggers vanish silently, without SHOW DATABASES
# whole databases do; without SHOW VIEW or EVENT the dump fails). LOCK TABLES, RELOAD and
# PROCESS (docs/backup.md) are not needed by --single-transaction; PROCESS lets a lock's holder
# be named.
REQUIRED_PRIVILEGES = ("SELECT", "SHOW VIEW", "TRIGGER", "EVENT", "SHOW DATABASES")
GLOBAL_ONLY = frozenset({"SHOW DATABASES"})
# How long a session of ours (the checks, the table statistics and the dump itself) waits for
# a table another session has locked before the run fails with exit 26: the run's one bound,
# never multiplied by a stage's retries (the wait itself is the retry).
LOCK_WAIT_S = 60
ER_LOCK_WAIT_TIMEOUT = 1205
# The statements of mariadb-dump's that wait for a table's metadata lock: the rows' SELECT
# (which a LOCK TABLES ... WRITE blocks) and the definitions' SHOW (which a DDL's exclusive
# lock blocks). The sudo wrapper watches the same ones (a test compares them).
DUMP_STATEMENTS = ("SELECT /*!40001 SQL_NO_CACHE */ ", "SHOW CREATE TABLE ", "SHOW FIELDS FROM ")
OBJECT_KINDS = ("views", "triggers", "routines", "events")


class DatabasePrivileges(BackupError):
    """MariaDB user {user} at {where} cannot dump everything: {missing}. Fix: {fix} (or pass --allow-partial-database to back up what it can see, recorded and warned about)."""  # noqa: E501

    exit_code = 25


class DatabaseLocked(BackupError):
    """Table {table} on MariaDB at {where} is locked by another session ({holder}); gave up after {waited} s: end that session or retry later."""  # noqa: E501

    exit_code = 26
    retryable = False  # its session waited out a bound already: a stage retry would repeat it


class DumpLockTimeout(DatabaseLocked):
    """Table {table} on MariaDB at {where} is locked by another session; the dump gave up when the server's lock_wait_timeout ran out ({holder}): end that session or retry later."""  # noqa: E501


@dataclass(frozen=True)
class PrivilegeReport:
    """The grants a dump runs with, and what they leave out."""

    user: str
    grants: list[str]
    missing: list[str] = field(default_factory=list)
    fix: str | None = None

    @property
    def complete(self) -> bool:
        return not self.missing

    def to_dict(self) -> dict:
        return {"user": self.user, "grants": self.grants, "missing": self.missing,
                "fix": self.fix}


_GRANT = re.compile(r"^GRANT (?P<privs>.+?) ON (?P<on>\S+) TO ", re.S)
_SECRET = re.compile(r" IDENTIFIED (?:BY|VIA|WITH) .*?(?= WITH |$)", re.S)


def redact_grant(grant: str) -> str:
    """A ``SHOW GRANTS`` line without its password hash or authentication string."""
    return _SECRET.sub(" IDENTIFIED ...", grant)


def _scope(on: str) -> str | None:
    """``*`` for ``*.*``, the database for ``db.*``; None for a table or routine grant."""
    if on == "*.*":
        return "*"
    match = re.fullmatch(r"`((?:[^`]|``)+)`\.\*", on)
    return match.group(1).replace("``", "`") if match else None


def granted(grants: Iterable[str]) -> dict[str, set[str]]:
    """Scope (``*`` or a database) -> privileges, from ``SHOW GRANTS`` lines."""
    scopes: dict[str, set[str]] = {}
    for line in grants:
        match = _GRANT.match(line)
        scope = _scope(match.group("on")) if match else None
        if match is None or scope is None:
            continue  # role grants, table- and routine-level grants
        privileges = {p.strip().upper() for p in match.group("privs").split(",")}
        if "ALL PRIVILEGES" in privileges or "ALL" in privileges:
            privileges |= set(REQUIRED_PRIVILEGES)
        scopes.setdefault(scope, set()).update(privileges)
    return scopes


def evaluate(user: str, grants: list[str], databases: Sequence[str]) -> PrivilegeReport:
    """What a dump of ``databases`` (and of the users, from ``mysql``) would lack."""
    scopes = granted(grants)
    everywhere = scopes.get("*", set())
    missing: list[str] = []
    for privilege in REQUIRED_PRIVILEGES:
        if privilege in everywhere:
            continue
        if privilege in GLOBAL_ONLY:
            missing.append(f"{privilege} (databases it cannot see are left out)")
            continue
        lacking = [d for d in (*databases, "mysql")
                   if privilege not in scopes.get(d, set())]
        if lacking:
            missing.append(f"{privilege} on {', '.join(lacking)}")
    needed = [p for p in REQUIRED_PRIVILEGES if p not in everywhere]
    fix = f"GRANT {', '.join(needed)} ON *.* TO {user};" if missing else None
    return PrivilegeReport(user=user, grants=[redact_grant(g) for g in grants],
                           missing=missing, fix=fix)


def check_privileges(connection: pymysql.connections.Connection,
                     databases: Sequence[str]) -> PrivilegeReport:
    """The account's grants against what dumping ``databases`` needs (never raises for them)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT CURRENT_USER()")
        name, _, host = one_row(cursor)[0].rpartition("@")
        cursor.execute("SHOW GRANTS")
        grants = [row[0] for row in cursor.fetchall()]
    return evaluate(f"'{name}'@'{host}'", grants, databases)


def require(report: PrivilegeReport, where: str, allow_partial: bool) -> PrivilegeReport:
    """Raise :class:`DatabasePrivileges` for an incomplete report, unless allowed."""
    if not report.complete and not allow_partial:
        raise DatabasePrivileges(user=report.user, where=where,
                                 missing="; ".join(report.missing), fix=report.fix)
    return report


def schema_object_counts(connection: pymysql.connections.Connection,
                         databases: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per database: how many views, triggers, routines and events it holds."""
    counts = {name: dict.fromkeys(OBJECT_KINDS, 0) for name in databases}
    if not databases:
        return counts
    queries = {
        "views": "SELECT table_schema, COUNT(*) FROM information_schema.views"
                 " WHERE table_schema IN %s GROUP BY table_schema",
        "triggers": "SELECT trigger_schema, COUNT(*) FROM information_schema.triggers"
                    " WHERE trigger_schema IN %s GROUP BY trigger_schema",
        "routines": "SELECT routine_schema, COUNT(*) FROM information_schema.routines"
                    " WHERE routine_schema IN %s GROUP BY routine_schema",
        "events": "SELECT event_schema, COUNT(*) FROM information_schema.events"
                  " WHERE event_schema IN %s GROUP BY event_schema",
    }
    with connection.cursor() as cursor:
        for kind, sql in queries.items():
            cursor.execute(sql, (tuple(databases),))
            for schema, count in cursor.fetchall():
                if schema in counts:
                    counts[schema][kind] = int(count)
    return counts


def table_types(connection: pymysql.connections.Connection, names: Sequence[str]
                ) -> dict[str, str]:
    """``db.name`` -> ``view`` or ``table``, for each of ``names`` (``exclude_tables``); a name
    the server does not know is an error (a typo would leave nothing out, silently)."""
    found: dict[str, str] = {}
    with connection.cursor() as cursor:
        for name in names:
            schema, _, table = name.partition(".")
            cursor.execute("SELECT table_type FROM information_schema.tables"
                           " WHERE table_schema = %s AND table_name = %s", (schema, table))
            row = cursor.fetchone()
            if row is None:
                raise ConfigError(detail=f"--exclude-table {name}: no such table or view on "
                                         "the server")
            found[name] = "view" if row[0] == "VIEW" else "table"
    return found


def set_lock_wait(cursor, seconds: int) -> None:
    """Bound this session's waits for metadata (``LOCK TABLES``, DDL) and InnoDB row locks."""
    cursor.execute("SET SESSION lock_wait_timeout = %s, innodb_lock_wait_timeout = %s",
                   (int(seconds), int(seconds)))


def quoted(schema: str, table: str) -> str:
    return f"`{schema.replace('`', '``')}`.`{table.replace('`', '``')}`"


def name_pattern(name: str) -> str:
    """A regular expression (PCRE) matching ``name`` as a whole word of a statement."""
    return rf"(^|[^0-9A-Za-z_$]){re.escape(name)}([^0-9A-Za-z_$]|$)"


def lock_holders(cursor, schema: str, table: str) -> str:
    """Who holds a lock on the table, as far as the server tells this account.

    ``information_schema.metadata_lock_info`` (a plugin) names any holder; otherwise the
    processlist (all sessions with PROCESS) shows a statement on the table (an ``ALTER``), but
    not an idle session that ran ``LOCK TABLES``.
    """
    cursor.execute("SELECT COUNT(*) FROM information_schema.plugins WHERE plugin_name ="
                   " 'METADATA_LOCK_INFO' AND plugin_status = 'ACTIVE'")
    if cursor.fetchone()[0]:
        cursor.execute(
            "SELECT p.id, p.user, p.host, p.command, p.time, LEFT(IFNULL(p.info, ''), 80),"
            " m.lock_mode FROM information_schema.metadata_lock_info m"
            " JOIN information_schema.processlist p ON p.id = m.thread_id"
            " WHERE m.table_schema = %s AND m.table_name = %s AND p.id <> CONNECTION_ID()"
            " LIMIT 3", (schema, table))
    else:
        cursor.execute(
            "SELECT id, user, host, command, time, LEFT(info, 80), '' FROM"
            " information_schema.processlist WHERE id <> CONNECTION_ID() AND info REGEXP %s"
            " AND state NOT LIKE 'Waiting for%%lock%%' LIMIT 3", (name_pattern(table),))
    rows = cursor.fetchall()
    if not rows:
        return ("the holder is not in the processlist: an idle session that ran LOCK TABLES or "
                "an open transaction; the metadata_lock_info plugin would name it")
    described = []
    for thread, user, host, command, seconds, info, mode in rows:
        doing = f"running {info!r}" if info else f"{command.lower()} for {seconds} s"
        lock = f", {mode}" if mode else ""
        described.append(f"session {thread} {user}@{host.rsplit(':', 1)[0]} {doing}{lock}; "
                         f"KILL {thread} ends it")
    return "held by " + " | ".join(described)


def locked_error(connection, schema: str, table: str, where: str, waited: int
                 ) -> DatabaseLocked:
    """The :class:`DatabaseLocked` of a lock wait timeout, with the holder where visible."""
    try:
        with connection.cursor() as cursor:
            holder = lock_holders(cursor, schema, table)
    except pymysql.err.MySQLError as error:
        holder = f"the processlist could not be read: {error.args[-1]}"
    return DatabaseLocked(table=quoted(schema, table), where=where, holder=holder,
                          waited=waited)


def check_locks(connection: pymysql.connections.Connection, databases: Sequence[str],
                where: str, lock_wait_s: int = LOCK_WAIT_S) -> None:
    """Open every base table once, waiting at most ``lock_wait_s`` for its metadata lock.

    A table already locked is found here, before anything is written; one locked later is
    found by the watch beside the dump (:func:`waiting_dump_statement`).
    """
    if not databases:
        return
    with connection.cursor() as cursor:
        set_lock_wait(cursor, lock_wait_s)
        cursor.execute("SELECT table_schema, table_name FROM information_schema.tables"
                       " WHERE table_schema IN %s AND table_type = 'BASE TABLE'"
                       " ORDER BY table_schema, table_name", (tuple(databases),))
        for schema, table in cursor.fetchall():
            try:
                cursor.execute(f"SELECT 1 FROM {quoted(schema, table)} LIMIT 0")
            except pymysql.err.OperationalError as error:
                if error.args and error.args[0] == ER_LOCK_WAIT_TIMEOUT:
                    raise locked_error(connection, schema, table, where, lock_wait_s) from None
                raise


_NAME = re.compile(r"`((?:[^`]|``)+)`")


def table_in_statement(statement: str) -> str:
    """The table a statement of the dump's is about: its last quoted name (``FROM `t```)."""
    names = _NAME.findall(statement)
    return names[-1].replace("``", "`") if names else "?"


def waiting_dump_statement(cursor, after_id: int, seconds: int
                           ) -> tuple[int, str, str] | None:
    """A statement of a dump (:data:`DUMP_STATEMENTS`) of this account, on a connection newer
    than ``after_id``, that has waited ``seconds`` or more for a lock: (query id, schema,
    table). The query id, not the connection's: ``KILL QUERY ID`` then ends that statement
    only, never the dump's next one should the lock be released in between.
    """
    prefixes = " OR ".join(["info LIKE %s"] * len(DUMP_STATEMENTS))
    cursor.execute(
        "SELECT query_id, IFNULL(db, ''), info FROM information_schema.processlist"
        " WHERE id > %s AND id <> CONNECTION_ID() AND user = SUBSTRING_INDEX(USER(), '@', 1)"
        " AND command = 'Query' AND state LIKE 'Waiting for%%lock%%' AND time_ms >= %s"
        f" AND ({prefixes}) ORDER BY id LIMIT 1",
        (int(after_id), int(seconds) * 1000, *(f"{p}%" for p in DUMP_STATEMENTS)))
    row = cursor.fetchone()
    if row is None:
        return None
    query, schema, statement = row
    return int(query), schema, table_in_statement(statement or "")


_DUMP_1205 = re.compile(r"Lock wait timeout exceeded[^|]*?\(1205\)|Error 1205\b")
_DUMPING = re.compile(r"when dumping table (`(?:[^`]|``)+`)")
_EXECUTING = re.compile(r"Couldn't execute '(.*?)': Lock wait timeout exceeded")


def dump_lock_timeout(stderr: str, where: str, waited: int) -> DatabaseLocked | None:
    """The dump's own lock wait timeout (ERROR 1205: the server's ``lock_wait_timeout`` ran
    out before our bound) as :class:`DumpLockTimeout`, naming the table; None otherwise."""
    if not _DUMP_1205.search(stderr):
        return None
    dumping, executing = _DUMPING.search(stderr), _EXECUTING.search(stderr)
    if dumping:
        table = dumping.group(1)
    elif executing:
        table = f"`{table_in_statement(executing.group(1)).replace('`', '``')}`"
    else:
        table = "(not named by mariadb-dump)"
    return DumpLockTimeout(table=table, where=where, waited=waited,
                           holder="mariadb-dump said: Lock wait timeout exceeded (1205)")
