"""Tables under --privileged, through real sudo as the unprivileged worker: a table dropped
while its rows are counted is recorded as vanished, and --exclude-table DB.NAME leaves a table
or view out of the dump, as on a direct connection (tests/test_causes.py); the wrapper takes
the names only as DB.NAME of plain identifiers, never as an option, a path or SQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid

import pymysql
import pytest
from conftest import remove_container, sql_on
from deploy_helpers import REPO, WORKER, as_user
from test_causes import broken_view_left_out_by_name, waiting_for_lock
from test_privileged_plan import worker_backup
from test_privileged_plan import worker_home as worker_home  # noqa: F401 - its fixture
from test_sudo import DB_SOCKET, MARIADB, PYTHON, load_wrapper, sudo
from test_sudo import installed as installed  # noqa: F401 - the module's install fixture

from undercloud_backup.backup.stages import table_records
from undercloud_backup.db import binlog, privileged
from undercloud_backup.db import dump as dbdump

MARKER = f"/var/tmp/ucb-tables-escalated-{uuid.uuid4().hex[:8]}"
WRITTEN = f"/etc/ucb-tables-escalated-{uuid.uuid4().hex[:8]}"


def as_worker(script: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Python of the library's run as the worker (its sudo, its wrapper)."""
    return as_user(WORKER, [PYTHON, "-c", script], env={"PYTHONPATH": str(REPO)},
                   timeout=timeout)


def mariadb(sql: str) -> str:
    """SQL as root in the MariaDB the installed policy points the wrapper at (test_sudo's
    private one: no other test session changes it meanwhile)."""
    return sql_on(DB_SOCKET[0], sql)


@pytest.fixture
def schema(installed):  # noqa: F811
    name = f"ucb_privtab_{uuid.uuid4().hex[:8]}"
    yield name
    mariadb(f"DROP DATABASE IF EXISTS {name}")


# ------------------------------------------------------------------ the same dump as direct
@pytest.mark.unit
def test_the_wrapper_leaves_out_what_the_direct_dump_leaves_out(monkeypatch):
    """The library's --exclude-table reaches the wrapper's dump as the direct path's
    --ignore-table options, in the same place (with --master-data too)."""
    ignore = ("nova.broken_view", "keystone.tmp-table")
    direct = dbdump.dump_command(("nova", "keystone"), options_fd=9, ignore=ignore).argv
    module = load_wrapper("ucb-mariadb")
    # not the machine's installed policy (an installer test may have put a socket in it)
    monkeypatch.setattr(module, "configured_socket", lambda: None)
    for master_data in (False, True):
        wrapped = privileged.dump_command(("nova", "keystone"), 30, ignore)
        if master_data:
            wrapped = binlog.with_master_data(wrapped)
        argv = list(wrapped.argv)
        assert argv[:4] == ["sudo", "-n", MARIADB, "dump"]
        options, databases = module.options_from(
            argv[4:], ("--lock-wait", "--master-data", module.IGNORE_TABLE))
        assert options["ignore"] == ignore and databases == ["nova", "keystone"]
        got = module.dump_argv("mariadb-dump", databases, master_data, options["ignore"])
        expected = [a for a in direct[1:] if not a.startswith("--defaults-extra-file")]
        if master_data:
            expected.insert(0, module.MASTER_DATA)
        assert got[3:] == expected


# ------------------------------------------------------------------ hostile names, real sudo
# (what is tried, argv after `sudo -n`, exit status, message): sudo lets each through (the
# `dump *` and `tables *` rules), the wrapper refuses it before any client runs.
NAME_RULE = "is not an acceptable table name (DB.NAME"
ATTEMPTS = [
    ("SQL in a table name", [MARIADB, "tables", "mysql.user' OR 1=1; SYSTEM touch " + MARKER],
     64, NAME_RULE),
    ("a quote in the database part", [MARIADB, "tables", "my'sql.user"], 64, NAME_RULE),
    ("a backtick", [MARIADB, "tables", "mysql.us`er"], 64, NAME_RULE),
    ("an option as a table", [MARIADB, "tables", "--execute=SYSTEM touch " + MARKER], 64,
     NAME_RULE),
    ("no table", [MARIADB, "tables"], 1, "sudo: a password is required"),
    ("a name without a database", [MARIADB, "tables", "user"], 64, NAME_RULE),
    ("three parts", [MARIADB, "tables", "mysql.user.x"], 64, NAME_RULE),
    ("a path", [MARIADB, "tables", "../../etc/shadow"], 64, NAME_RULE),
    ("a space", [MARIADB, "tables", "mysql.user x"], 64, NAME_RULE),
    ("a newline", [MARIADB, "tables", "mysql.user\n--result-file=" + WRITTEN], 64, NAME_RULE),
    ("a name longer than the server's", [MARIADB, "tables", "mysql." + "t" * 65], 64,
     NAME_RULE),
    ("a table name starting with -", [MARIADB, "tables", "mysql.-r" + WRITTEN], 64, NAME_RULE),
    ("an option smuggled as the ignored table",
     [MARIADB, "dump", "--ignore-table=--result-file=" + WRITTEN, "mysql"], 64, NAME_RULE),
    ("an option after the ignored table's name",
     [MARIADB, "dump", "--ignore-table=mysql.user --result-file=" + WRITTEN, "mysql"], 64,
     NAME_RULE),
    ("the dump's --result-file after --ignore-table",
     [MARIADB, "dump", "--ignore-table=mysql.user", "--result-file=" + WRITTEN, "mysql"], 64,
     "'--result-file=" + WRITTEN + "' is not an acceptable option here"),
    ("the dump tool's own spelling", [MARIADB, "dump", "--ignore-table", "mysql.user",
                                      "mysql"], 64, "'--ignore-table' is not an acceptable"),
    ("an empty ignored table", [MARIADB, "dump", "--ignore-table=", "mysql"], 64, NAME_RULE),
    ("--ignore-table on stats", [MARIADB, "stats", "--ignore-table=mysql.user", "mysql"], 64,
     "'--ignore-table=mysql.user' is not an acceptable option here"),
    ("--ignore-table on check", [MARIADB, "check", "--ignore-table=mysql.user", "mysql"], 64,
     "is not an acceptable option here"),
    ("--ignore-table on dump-users", [MARIADB, "dump-users", "--ignore-table=mysql.user"], 1,
     "sudo: a password is required"),
    ("more names than the wrapper takes", [MARIADB, "tables",
                                           *(f"mysql.t{i}" for i in range(1001))], 64,
     "1 to 1000 tables"),
]


@pytest.mark.parametrize("what,argv,status,message", ATTEMPTS, ids=[a[0] for a in ATTEMPTS])
def test_a_hostile_table_name_is_refused(installed, what, argv, status, message):  # noqa: F811
    result = sudo(*argv)
    assert (result.returncode, message in result.stderr) == (status, True), result.stderr
    assert result.stdout == ""
    assert not os.path.lexists(MARKER) and not os.path.lexists(WRITTEN)


# ------------------------------------------------------------------ what it is for
def test_the_worker_learns_what_each_excluded_name_is(installed, schema):  # noqa: F811
    mariadb(f"CREATE DATABASE {schema}; CREATE TABLE {schema}.t (id INT); "
            f"CREATE VIEW {schema}.v AS SELECT id FROM {schema}.t;")
    script = (
        "import json\nfrom undercloud_backup.db import privileged as p\n"
        "from undercloud_backup.core.errors import ConfigError\n"
        f"print(json.dumps(p.table_types(({schema + '.v'!r}, {schema + '.t'!r}))))\n"
        f"for names in (({schema + '.v'!r}, {schema + '.nope'!r}), ({schema + '.a b'!r},)):\n"
        "    try:\n"
        "        p.table_types(names)\n"
        "    except ConfigError as error:\n"
        "        print(error.exit_code, error)\n")
    result = as_worker(script)
    assert result.returncode == 0, result.stderr
    found, typo, refused = result.stdout.splitlines()
    assert json.loads(found) == {f"{schema}.v": "view", f"{schema}.t": "table"}
    assert typo == (f"2 Invalid configuration: --exclude-table {schema}.nope: no such table or "
                    "view on the server")
    assert refused.startswith(f"2 Invalid configuration: --exclude-table under --privileged: "
                              f"'{schema}.a b' is not an acceptable table name (DB.NAME")
    assert "usage:" not in refused


def test_a_table_dropped_while_the_wrapper_counts_is_recorded_as_vanished(installed,  # noqa: F811
                                                                         schema):
    """The wrapper lists the tables, then counts each in one snapshot; one dropped in between
    (held with LOCK TABLES ... WRITE, dropped by its holder while the count waits) made the
    wrapper fail (ERROR 1146, exit 70) and the run with it. Now the row is marked vanished,
    the other tables are counted and checksummed as before, and the manifest's records say
    so as on a direct connection."""
    holder = pymysql.connect(unix_socket=DB_SOCKET[0], user="root", autocommit=True)
    try:
        with holder.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {schema}")
            cursor.execute(f"CREATE TABLE {schema}.a (id INT) ENGINE=InnoDB")
            cursor.execute(f"INSERT INTO {schema}.a VALUES (1), (2)")
            cursor.execute(f"CREATE TABLE {schema}.b (id INT) ENGINE=InnoDB")
            cursor.execute(f"CREATE TABLE {schema}.c (id INT) ENGINE=InnoDB")
            cursor.execute(f"INSERT INTO {schema}.c VALUES (7)")
            cursor.execute(f"LOCK TABLES {schema}.b WRITE")
        script = ("import json\nfrom undercloud_backup.db import privileged as p\n"
                  f"print(json.dumps([s.__dict__ for s in p.table_stats(({schema!r},))]))\n")
        result: list[subprocess.CompletedProcess] = []
        counting = threading.Thread(target=lambda: result.append(as_worker(script)))
        counting.start()
        with holder.cursor() as cursor:
            waiting_for_lock(cursor, schema, time.monotonic() + 30, user="root")
            cursor.execute(f"DROP TABLE {schema}.b")
            cursor.execute("UNLOCK TABLES")
        counting.join(60)
    finally:
        holder.close()
    assert result and result[0].returncode == 0, result[0].stderr if result else "no result"
    from undercloud_backup.db.connection import TableStats

    stats = [TableStats(**row) for row in json.loads(result[0].stdout)]
    assert [(s.table, s.rows, s.vanished) for s in stats] == [
        ("a", 2, False), ("b", 0, True), ("c", 1, False)]
    assert stats[0].checksum and stats[2].checksum and stats[1].checksum is None
    tables, vanished = table_records([schema], stats)
    assert [(t.table, t.rows) for t in tables[schema]] == [("a", 2), ("c", 1)]
    assert vanished == [f"{schema}.b"]


def test_a_broken_view_is_left_out_of_a_privileged_backup_by_name(installed,  # noqa: F811
                                                                  worker_home,  # noqa: F811
                                                                  os_env, schema):
    """As tests/test_causes.py's direct run, as the installed worker: the broken view fails
    the dump, a name the server does not know is refused before anything is written, and
    --exclude-table DB.VIEW leaves it out, says so and records it (it was refused under
    --privileged before)."""
    container = f"ucbtest-{uuid.uuid4().hex[:10]}"
    try:
        broken_view_left_out_by_name(schema, container, mariadb, lambda *args: worker_backup(
            worker_home, "--db-only", "--container", container, *args))
    finally:
        remove_container(container)
