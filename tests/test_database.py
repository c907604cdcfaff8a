"""Database access against the real MariaDB: the two dumps, privileges, locks, the block.

Each test creates its own ucb_dbt_* databases and ucb_dbt_* accounts and drops them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pymysql
import pytest
from conftest import REPO, backup_in_process, mariadb, swift_store

from blocks.mariadb import MariaDBConnection
from undercloud_backup.core.errors import CommandFailed
from undercloud_backup.core.execute import Pipeline
from undercloud_backup.db import connection, database
from undercloud_backup.db import dump as dbdump
from undercloud_backup.db import preflight as dbpreflight
from undercloud_backup.db.preflight import DatabaseLocked, DatabasePrivileges, evaluate
from undercloud_backup.restore import verify
from undercloud_backup.store import catalogue

SOCKET = "/run/mysqld/mysqld.sock"
ROOT = connection.DatabaseSettings(socket=SOCKET, user="root")
WRAPPER = REPO / "deployments/libexec/ucb-mariadb"
DBS = ("ucb_dbt_a", "ucb_dbt_b", "ucb_dbt_c")
SVC, ROLE = "'ucb_dbt_svc'@'localhost'", "ucb_dbt_role"
FULL = "SELECT, SHOW VIEW, TRIGGER, EVENT, SHOW DATABASES"


def _schema_sql() -> str:
    a, b, c = DBS
    return f"""
CREATE DATABASE {a}; CREATE DATABASE {b}; CREATE DATABASE {c};
CREATE TABLE {a}.t (id INT PRIMARY KEY, v VARCHAR(20)); INSERT INTO {a}.t VALUES (1, 'a');
CREATE TABLE {b}.t (id INT PRIMARY KEY, v VARCHAR(20)) ENGINE=InnoDB;
INSERT INTO {b}.t VALUES (1, 'one'), (2, 'two');
CREATE TABLE {b}.log (n INT) ENGINE=MyISAM;
CREATE TRIGGER {b}.trg AFTER INSERT ON {b}.t FOR EACH ROW INSERT INTO {b}.log VALUES (NEW.id);
CREATE VIEW {b}.v AS SELECT id FROM {b}.t;
CREATE PROCEDURE {b}.p() SELECT COUNT(*) FROM {b}.t;
CREATE EVENT {b}.e ON SCHEDULE EVERY 1 DAY DISABLE DO DELETE FROM {b}.log;
CREATE TABLE {c}.t (id INT PRIMARY KEY); INSERT INTO {c}.t VALUES (1);
CREATE USER {SVC} IDENTIFIED BY 'svc-pw'; CREATE ROLE {ROLE};
GRANT SELECT, INSERT ON {a}.* TO {SVC}; GRANT UPDATE ON {b}.t TO {SVC};
GRANT EXECUTE ON PROCEDURE {b}.p TO {SVC};
GRANT SELECT ON {c}.* TO {ROLE}; GRANT {ROLE} TO {SVC};
"""


def _drop_all() -> None:
    mariadb("".join(f"DROP DATABASE IF EXISTS {d};" for d in DBS)
            + f"DROP USER IF EXISTS {SVC}; DROP ROLE IF EXISTS {ROLE};")


@pytest.fixture
def schema(services):
    _drop_all()
    mariadb(_schema_sql())
    yield DBS
    _drop_all()


@pytest.fixture
def account(services):
    """Make restricted accounts over TCP; all dropped afterwards."""
    made: list[str] = []

    def make(name: str, grants: list[str]) -> connection.DatabaseSettings:
        user = f"'{name}'@'127.0.0.1'"
        made.append(user)
        mariadb(f"DROP USER IF EXISTS {user}; CREATE USER {user} IDENTIFIED BY 'pw-{name}';"
                + "".join(f"GRANT {g} TO {user};" for g in grants))
        return connection.DatabaseSettings(host="127.0.0.1", port=3306, user=name,
                                         password=f"pw-{name}")

    yield make
    mariadb("".join(f"DROP USER IF EXISTS {u};" for u in made))


def _run_dump(spec: dbdump.DumpSpec, out: Path) -> str:
    with spec, out.open("wb") as sink, Pipeline([spec.command], timeout=120,
                                                secrets=spec.secrets, pass_fds=spec.pass_fds,
                                                stdout=sink) as pipe:
        spec.started()
        pipe.wait()
    return out.read_text()


def _load(path: Path, *args: str) -> subprocess.CompletedProcess:
    with path.open("rb") as sql:
        return subprocess.run(["mariadb", *args], stdin=sql, capture_output=True, text=True)


def _objects(name: str) -> list[str]:
    """Rows, and every trigger, view, routine and event with its definition."""
    return mariadb(
        f"SELECT COUNT(*) FROM {name}.t;"
        f"SELECT trigger_name, action_statement FROM information_schema.triggers"
        f" WHERE trigger_schema = '{name}';"
        f"SELECT table_name, view_definition FROM information_schema.views"
        f" WHERE table_schema = '{name}';"
        f"SELECT routine_name, routine_definition FROM information_schema.routines"
        f" WHERE routine_schema = '{name}';"
        f"SELECT event_name, event_definition, status FROM information_schema.events"
        f" WHERE event_schema = '{name}';").splitlines()


def test_dumps_load_one_database_alone_and_everything_with_grants(schema, db_cnf, tmp_path):
    a, b, c = schema
    access = database.access(connection.DatabaseSettings.from_option_file(db_cnf), False)
    grants_before = mariadb(f"SHOW GRANTS FOR {SVC}")
    objects_before = _objects(b)
    dumps = access.dump_commands(schema)
    db_sql = _run_dump(dumps.databases, tmp_path / "db.sql")
    users_sql = _run_dump(dumps.users, tmp_path / "users.sql")
    assert "CREATE USER" not in db_sql and "SET ROLE" not in db_sql
    assert "DROP DATABASE" not in db_sql  # under --one-database it would empty a neighbour
    assert "\nUSE " not in users_sql and "CREATE USER IF NOT EXISTS `ucb_dbt_svc`" in users_sql

    # after the dump: a row in a and c that a one-database load of b must leave alone
    mariadb(f"INSERT INTO {a}.t VALUES (2, 'after'); INSERT INTO {c}.t VALUES (2);")
    mariadb(f"DROP DATABASE {b}; CREATE DATABASE {b};")
    loaded = _load(tmp_path / "db.sql", "--one-database", b)
    assert loaded.returncode == 0, loaded.stderr
    assert _objects(b) == objects_before
    assert mariadb(f"SELECT COUNT(*) FROM {a}.t; SELECT COUNT(*) FROM {c}.t").split() == ["2",
                                                                                        "2"]

    # everything, into a server without those databases and accounts: databases, then users
    _drop_all()
    for part in ("db.sql", "users.sql"):
        loaded = _load(tmp_path / part)
        assert loaded.returncode == 0, (part, loaded.stderr)
    assert _objects(b) == objects_before
    assert mariadb(f"SELECT COUNT(*) FROM {a}.t").split() == ["1"]
    assert sorted(mariadb(f"SHOW GRANTS FOR {SVC}").splitlines()) == sorted(
        grants_before.splitlines())
    assert mariadb(f"SHOW GRANTS FOR {ROLE}").count(f"ON `{c}`.*") == 1
    assert "mariadb_dump_import_role" not in mariadb("SELECT user FROM mysql.user")


def _wrapper(*args: str) -> subprocess.CompletedProcess:
    """The sudo wrapper's code, run as root as sudo would (the tests run as root)."""
    return subprocess.run([sys.executable, "-IS", str(WRAPPER), *args], capture_output=True,
                          text=True, timeout=120)


def test_wrapper_dumps_as_the_library_does(schema):
    dumps = database.access(ROOT, False).dump_commands(schema)
    with dumps.databases, dumps.users:
        direct = dumps.databases.command.argv[2:], dumps.users.command.argv[2:]
    module_argv = [a for a in _wrapper_module().dump_argv("t", list(schema))
                   if not a.startswith(("--protocol", "--user", "--socket"))]
    assert module_argv[1:] == list(direct[0])
    assert _wrapper_module().DUMP_STATEMENTS == dbpreflight.DUMP_STATEMENTS
    users_argv = _wrapper_module().users_dump_argv("t")
    assert users_argv[-len(direct[1]):] == list(direct[1])
    users = _wrapper("dump-users")
    assert users.returncode == 0, users.stderr
    assert "CREATE USER IF NOT EXISTS `ucb_dbt_svc`" in users.stdout
    assert "\nUSE " not in users.stdout
    dumped = _wrapper("dump", *schema)
    assert dumped.returncode == 0 and "CREATE USER" not in dumped.stdout
    assert "CREATE DEFINER" in dumped.stdout and "TRIGGER" in dumped.stdout


def _wrapper_module():
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("ucb_mariadb_under_test", str(WRAPPER))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_schema_object_counts_direct_and_through_the_wrapper(schema):
    expected = {"views": 1, "triggers": 1, "routines": 1, "events": 1}
    counts = database.access(ROOT, False).schema_objects(schema)
    assert counts == {"ucb_dbt_a": dict.fromkeys(expected, 0), "ucb_dbt_b": expected,
                      "ucb_dbt_c": dict.fromkeys(expected, 0)}
    checked = _wrapper("check", "--lock-wait=5", *schema)
    assert checked.returncode == 0, checked.stderr
    answer = json.loads(checked.stdout)
    assert answer["schema_objects"] == counts
    assert answer["user"] == "'root'@'localhost'"
    assert any("ALL PRIVILEGES ON *.*" in g for g in answer["grants"])
    assert not any("PASSWORD '" in g or "USING '" in g for g in answer["grants"])


def test_account_without_trigger_fails_naming_it_and_the_grant(schema, account):
    settings = account("ucb_dbt_notrig", ["SELECT, SHOW VIEW, EVENT, SHOW DATABASES ON *.*"])
    access = database.access(settings, False)
    databases = access.server_info().databases
    assert set(schema) <= set(databases)  # it sees everything, yet would lose the trigger
    with pytest.raises(DatabasePrivileges) as failed:
        access.check_privileges(databases)
    message = str(failed.value)
    assert failed.value.exit_code == 25 and "\n" not in message
    assert "TRIGGER on " in message and "ucb_dbt_b" in message
    assert "GRANT TRIGGER ON *.* TO 'ucb_dbt_notrig'@'127.0.0.1';" in message
    # the explicit opt-in records what is missing instead
    report = access.check_privileges(databases, allow_partial=True)
    assert not report.complete and report.missing[0].startswith("TRIGGER on ")
    # the GRANT the message gives is the fix
    mariadb(report.fix)
    assert access.check_privileges(databases).complete


def test_account_with_one_database_fails_naming_the_missing_global_privilege(schema, account):
    settings = account("ucb_dbt_onedb", ["ALL ON ucb_dbt_a.*", "SELECT ON mysql.*"])
    access = database.access(settings, False)
    databases = access.server_info().databases
    assert "ucb_dbt_a" in databases and "ucb_dbt_b" not in databases  # b is invisible
    with pytest.raises(DatabasePrivileges) as failed:
        access.check_privileges(databases)
    message = str(failed.value)
    assert "SHOW DATABASES (databases it cannot see are left out)" in message
    assert "SHOW VIEW on mysql" in message
    assert f"GRANT {FULL} ON *.* TO 'ucb_dbt_onedb'@'127.0.0.1';" in message


def test_full_account_passes_and_its_grants_are_recorded_without_secrets(schema, db_cnf):
    access = database.access(connection.DatabaseSettings.from_option_file(db_cnf), False)
    report = access.check_privileges(access.server_info().databases)
    assert report.complete and report.fix is None
    assert any(FULL.split(", ")[0] in g and "ON *.*" in g for g in report.grants)
    assert not any("PASSWORD '" in g for g in report.grants)
    assert access.privileges() == report.grants


@pytest.mark.unit
def test_grants_parsing():
    grants = ["GRANT USAGE ON *.* TO `u`@`h` IDENTIFIED BY PASSWORD '*AB'",
              "GRANT SELECT, SHOW VIEW, TRIGGER, EVENT ON `nova`.* TO `u`@`h`",
              "GRANT SELECT, SHOW VIEW, TRIGGER, EVENT ON `mysql`.* TO `u`@`h`",
              "GRANT UPDATE (`v`) ON `nova`.`t` TO `u`@`h`"]
    report = evaluate("'u'@'h'", grants, ["nova"])
    assert report.missing == ["SHOW DATABASES (databases it cannot see are left out)"]
    assert report.grants[0] == "GRANT USAGE ON *.* TO `u`@`h` IDENTIFIED ..."
    report = evaluate("'u'@'h'", grants, ["nova", "keystone"])
    assert "SELECT on keystone" in report.missing
    everything = ["GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost` WITH GRANT OPTION"]
    assert evaluate("'root'@'localhost'", everything, ["x"]).complete


@pytest.fixture
def held_lock(schema):
    """A second session holding LOCK TABLES ucb_dbt_c.t WRITE, idle, as an operator's would."""
    holder = pymysql.connect(unix_socket=SOCKET, user="root")
    with holder.cursor() as cursor:
        cursor.execute("LOCK TABLES ucb_dbt_c.t WRITE")
    yield holder.thread_id()
    holder.close()


def test_locked_table_fails_fast_naming_it(held_lock, schema):
    access = database.access(ROOT, False, lock_wait_s=2)
    started = time.monotonic()
    with pytest.raises(DatabaseLocked) as failed:
        access.check_locks(schema)
    took = time.monotonic() - started
    message = str(failed.value)
    assert 1.9 < took < 10, took
    # not retried by the stage: the wait was the run's one bound (test_causes)
    assert not failed.value.retryable and failed.value.exit_code == 26
    assert "`ucb_dbt_c`.`t`" in message and "gave up after 2 s" in message
    assert "not in the processlist" in message  # idle LOCK TABLES: the server cannot tell
    # the statistics read beside the dump give up as fast, with the same error
    started = time.monotonic()
    with pytest.raises(DatabaseLocked, match="`ucb_dbt_c`.`t`"):
        access.table_stats(schema)
    assert time.monotonic() - started < 10
    # through the sudo wrapper: its own exit status, mapped back to the same error
    wrapped = _wrapper("stats", "--lock-wait=2", *schema)
    assert wrapped.returncode == 75 and "`ucb_dbt_c`.`t` is locked" in wrapped.stderr
    checked = _wrapper("check", "--lock-wait=2", *schema)
    assert checked.returncode == 75 and "`ucb_dbt_c`.`t` is locked" in checked.stderr


def test_locked_table_names_the_holder_where_the_server_can(held_lock, schema):
    installed = mariadb("SELECT COUNT(*) FROM information_schema.plugins"
                        " WHERE plugin_name = 'METADATA_LOCK_INFO'").strip() == "1"
    if not installed:
        mariadb("INSTALL SONAME 'metadata_lock_info'")
    try:
        with pytest.raises(DatabaseLocked) as failed:
            database.access(ROOT, False, lock_wait_s=1).check_locks(schema)
        assert f"held by session {held_lock} root@localhost" in str(failed.value)
        assert f"KILL {held_lock} ends it" in str(failed.value)
        wrapped = _wrapper("check", "--lock-wait=1", *schema)
        assert wrapped.returncode == 75 and f"held by session {held_lock}" in wrapped.stderr
    finally:
        if not installed:
            mariadb("UNINSTALL SONAME 'metadata_lock_info'")


def test_locked_table_does_not_hang_the_stats_read_beside_a_dump(held_lock, schema):
    read, _stop = database.access(ROOT, False, lock_wait_s=2).table_stats_beside(schema)
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(DatabaseLocked, match="`ucb_dbt_c`.`t`"):
            pool.submit(read).result(timeout=15)


@pytest.mark.unit
def test_block_keeps_the_option_file_and_overrides_only_what_is_set(tmp_path):
    cnf = tmp_path / "my.cnf"
    cnf.write_text("[client]\nhost=db.example\nport=3307\nsocket=/run/other.sock\n"
                   "user=backup\npassword=\"s3cret\"\n")
    settings = MariaDBConnection(defaults_file=str(cnf)).settings()
    assert (settings.host, settings.port, settings.socket, settings.user, settings.password) == (
        "db.example", 3307, "/run/other.sock", "backup", "s3cret")
    settings = MariaDBConnection(defaults_file=str(cnf), user="other", port=3308).settings()
    assert (settings.host, settings.port, settings.user, settings.password) == (
        "db.example", 3308, "other", "s3cret")
    plain = MariaDBConnection(user="u").settings()
    assert (plain.host, plain.port, plain.user, plain.socket) == ("127.0.0.1", 3306, "u", None)


def test_saved_block_keeps_the_option_file_fields(tmp_path, services):
    cnf = tmp_path / "my.cnf"
    cnf.write_text("[client]\nsocket=/run/other.sock\nuser=backup\npassword=pw\n")
    name = f"ucb-dbt-{time.monotonic_ns()}"
    MariaDBConnection(defaults_file=str(cnf), user="svc").save(name)
    try:
        settings = MariaDBConnection.load(name).settings()
    finally:
        MariaDBConnection.delete(name)
    assert (settings.socket, settings.user, settings.password) == ("/run/other.sock", "svc", "pw")


@pytest.fixture
def through_sudo(monkeypatch):
    """PrivilegedAccess running this checkout's wrapper through `sudo -n` (the tests are root)."""
    from undercloud_backup.db import privileged

    monkeypatch.setattr(privileged, "MARIADB_WRAPPER", str(WRAPPER))
    return database.access(None, True, lock_wait_s=2)


def test_privileged_access_checks_counts_and_dumps(schema, through_sudo, tmp_path):
    access = through_sudo
    info = access.server_info()
    assert set(schema) <= set(info.databases)
    report = access.check_privileges(info.databases)
    assert report.complete and report.user == "'root'@'localhost'"
    assert access.schema_objects(schema)["ucb_dbt_b"] == {"views": 1, "triggers": 1,
                                                          "routines": 1, "events": 1}
    dumps = access.dump_commands(schema)
    assert "CREATE DEFINER" in _run_dump(dumps.databases, tmp_path / "db.sql")
    assert "CREATE USER IF NOT EXISTS `ucb_dbt_svc`" in _run_dump(dumps.users,
                                                                 tmp_path / "users.sql")


def test_privileged_access_gives_up_on_a_locked_table(held_lock, schema, through_sudo):
    started = time.monotonic()
    with pytest.raises(DatabaseLocked, match=r"`ucb_dbt_c`.`t`.*gave up after 2 s"):
        through_sudo.check_locks(schema)
    with pytest.raises(DatabaseLocked, match=r"`ucb_dbt_c`.`t`"):
        through_sudo.table_stats(schema)
    assert time.monotonic() - started < 15


def test_locked_table_names_a_holder_running_a_statement_on_it(held_lock, schema):
    holder = pymysql.connect(unix_socket=SOCKET, user="root")
    with holder.cursor() as cursor:
        cursor.execute("LOCK TABLES ucb_dbt_b.v READ")  # a second holder, busy on another table
    busy = threading.Thread(target=lambda: holder.cursor().execute(
        "SELECT SLEEP(4) FROM ucb_dbt_b.v LIMIT 1"))
    busy.start()
    try:
        time.sleep(0.5)
        with pytest.raises(DatabaseLocked) as failed:
            database.access(ROOT, False, lock_wait_s=1).check_locks(schema)
        # the idle LOCK TABLES on ucb_dbt_c.t is not named; nothing else is named in its place
        assert "not in the processlist" in str(failed.value)
        assert "SLEEP" not in str(failed.value)
    finally:
        busy.join()
        holder.close()


@pytest.mark.unit
def test_name_pattern_matches_whole_words_only():
    import re

    from undercloud_backup.db.preflight import name_pattern

    pattern = re.compile(name_pattern("t"), re.I)
    assert pattern.search("ALTER TABLE `t` ADD c INT") and pattern.search("DELETE FROM db.t")
    assert not pattern.search("SELECT SLEEP(200)") and not pattern.search("SELECT * FROM t2")
    assert re.search(name_pattern("a.b$c"), "UPDATE `a.b$c` SET x = 1")


@pytest.fixture(params=["direct", "through sudo"])
def bounded(request, schema):
    """A run's database access with a 2 s lock bound: as root directly, or as root through
    this checkout's sudo wrapper."""
    if request.param == "through sudo":
        return request.getfixturevalue("through_sudo")
    return database.access(ROOT, False, lock_wait_s=2)


def _wrapper_processes() -> list[str]:
    listed = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in listed.splitlines() if f"{WRAPPER} dump" in line]


def test_a_lock_taken_after_the_check_ends_the_dump_within_the_bound(bounded, schema,
                                                                      tmp_path):
    """The check passes, then another session locks the table the dump reaches last;
    the dump's own wait ends after the bound, as the same clear lock error (exit 26)."""
    bounded.check_locks(schema)  # nothing locked yet: the pre-check passes
    holder = pymysql.connect(unix_socket=SOCKET, user="root")
    try:
        with holder.cursor() as cursor:
            cursor.execute("LOCK TABLES ucb_dbt_c.t WRITE")
        spec = bounded.dump_commands(schema).databases
        started = time.monotonic()
        with pytest.raises(CommandFailed) as failed:
            _run_dump(spec, tmp_path / "db.sql")
        took = time.monotonic() - started
    finally:
        holder.close()
    error = spec.failure(str(failed.value))
    message = str(error)
    assert isinstance(error, DatabaseLocked), failed.value
    assert error.exit_code == 26 and not error.retryable and "\n" not in message
    assert "Table `ucb_dbt_c`.`t` on MariaDB at " in message, message
    assert "gave up after 2 s" in message and "not in the processlist" in message
    assert 1.9 < took < 10, took
    assert "-- Current Database: `ucb_dbt_b`" in (tmp_path / "db.sql").read_text()
    assert _wrapper_processes() == []  # the wrapper's watcher died with the dump


def test_a_dump_nothing_locks_is_not_stopped(bounded, schema, tmp_path):
    dumps = bounded.dump_commands(schema)
    assert "CREATE DEFINER" in _run_dump(dumps.databases, tmp_path / "db.sql")
    assert dumps.databases.guard is not None and dumps.databases.failure("x").exit_code == 22
    assert _wrapper_processes() == []


def test_the_servers_own_lock_wait_timeout_is_the_same_lock_error(tmp_path):
    """A server whose lock_wait_timeout is below our bound ends the dump's wait itself
    (ERROR 1205): the same error, naming the table, directly and through the wrapper."""
    from undercloud_backup.db import privileged
    from undercloud_backup.db.scratch import os_user, scratch_mariadb

    with scratch_mariadb("/var/tmp", lifetime_s=120) as server:
        with server.session.cursor() as cursor:
            for sql in ("SET GLOBAL lock_wait_timeout = 1", "CREATE DATABASE ucb_dbt_x",
                        "CREATE TABLE ucb_dbt_x.a (id INT)", "CREATE TABLE ucb_dbt_x.u (id INT)"):
                cursor.execute(sql)
        holder = pymysql.connect(unix_socket=server.socket, user=os_user())
        with holder.cursor() as cursor:
            cursor.execute("LOCK TABLES ucb_dbt_x.u WRITE")
        settings = connection.DatabaseSettings(socket=server.socket, user=os_user())
        spec = database.access(settings, False, lock_wait_s=30).dump_commands(
            ("ucb_dbt_x",)).databases
        with pytest.raises(CommandFailed) as failed:
            _run_dump(spec, tmp_path / "db.sql")
        holder.close()
    assert "(1205)" in str(failed.value)
    for error in (spec.failure(str(failed.value)),
                  privileged.WrapperLockWatch().failure(str(failed.value))):
        assert isinstance(error, DatabaseLocked) and error.exit_code == 26
        assert not error.retryable
        assert "Table `u` on MariaDB" in str(error) and "lock_wait_timeout ran out" in str(error)


def _db_only(container: str, cnf: str, *extra: str) -> subprocess.CompletedProcess:
    """A database-only backup with the CLI's flags, called in this process."""
    return backup_in_process("--container", container, "--db-defaults-file", cnf, "--db-only",
                             "--no-prune", *extra)


def test_a_partial_dump_is_recorded_and_said_and_a_full_one_records_its_grants(
        schema, account, container, db_cnf, tmp_path):
    """An account without TRIGGER, with --allow-partial-database, completes; its
    manifest says partial and what was missing, its last line says so, and so does verify.
    A full-privilege run's manifest records the grants it ran with, and no partial."""
    account("ucb_dbt_partial", ["SELECT, SHOW VIEW, EVENT, SHOW DATABASES ON *.*"])
    user = "'ucb_dbt_partial'@'127.0.0.1'"
    cnf = tmp_path / "partial.cnf"
    cnf.write_text("[client]\nhost=127.0.0.1\nport=3306\nuser=ucb_dbt_partial\n"
                   "password=pw-ucb_dbt_partial\n")
    cnf.chmod(0o600)
    partial = _db_only(container, str(cnf), "--allow-partial-database")
    assert partial.returncode == 0, partial.stderr
    assert "complete" in partial.stdout and "WARNING" not in partial.stdout
    last = partial.stderr.strip().splitlines()[-1]
    assert last.startswith(f"WARNING: PARTIAL database dump (--allow-partial-database): the "
                           f"account {user} could not dump everything: TRIGGER on "), last
    assert "ucb_dbt_b" in last and f"fix: GRANT TRIGGER ON *.* TO {user};" in last
    store = swift_store()
    backup_id = catalogue.list_backups(store, container)[0].backup_id
    manifest = catalogue.get_manifest(store, container, backup_id)
    section = manifest.mariadb
    assert section.partial and section.account == user
    assert len(section.missing) == 1 and section.missing[0].startswith("TRIGGER on ")
    assert "ucb_dbt_b" in section.missing[0] and section.fix == f"GRANT TRIGGER ON *.* TO {user};"
    assert any("SHOW DATABASES" in g and "ON *.*" in g for g in section.privileges)
    assert section.schema_objects["ucb_dbt_b"]["triggers"] == 0  # the one it could not see
    report = verify.summarize(manifest, container, {}, 0.0)
    assert report.database_partial == section.partial_note()
    assert report.warnings[0].startswith(section.partial_note())

    full = _db_only(container, db_cnf, "--json")
    assert full.returncode == 0, full.stderr
    summary = json.loads(full.stdout)
    assert summary["partial_database"] is None
    section = catalogue.get_manifest(store, container, summary["backup_id"]).mariadb
    assert not section.partial and section.missing == [] and section.fix is None
    name, host = section.account.strip("'").split("'@'")
    granted = [dbpreflight.redact_grant(g) for g in
               mariadb(f"SHOW GRANTS FOR '{name}'@'{host}'").splitlines()]
    assert section.privileges == granted and any("TRIGGER" in g for g in granted)
    assert section.schema_objects["ucb_dbt_b"]["triggers"] == 1

    # The listing tells the partial one from the complete one, in text and in JSON.
    listed = backup_in_process("--list", "--container", container)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[1:] for line in listed.stdout.splitlines()] == [
        [backup_id, "full", "PARTIAL", "database", "dump"],
        [summary["backup_id"], "full", "database", "dump"]]
    as_json = json.loads(backup_in_process("--list", "--json", "--container", container
                                           ).stdout)
    assert [b["partial_database"] for b in as_json["backups"]] == [
        manifest.mariadb.partial_note(), None]
