"""The privileged steps through real sudo: the shipped sudoers file, the root-owned wrappers and
undercloud_backup.db.privileged, tested together, as an unprivileged worker user.

Every escalation attempt below is made with sudo directly (no Python of ours in between) and
must be refused by sudo itself or by a wrapper, with their own exit status and message.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import io
import os
import stat
import subprocess
import sys
import tarfile
import time
import uuid

import pymysql
import pytest
import sample_undercloud as sample
from deploy_helpers import (
    NOSUDO,
    REPO,
    VENV,
    WORKER,
    as_user,
    grant_traverse,
    machine_lock,
    privileged_install,
    remove_tree,
    revoke_traverse,
    sample_root,
    scratch_dir,
    scratch_mariadb,
)

from undercloud_backup.db import connection as dbconn
from undercloud_backup.db import dump as dbdump
from undercloud_backup.db import privileged
from undercloud_backup.files import archive

SUDOERS_SOURCE = REPO / "deployments/sudoers/undercloud-backup"
LIBEXEC = REPO / "deployments/libexec"
ARCHIVE = privileged.ARCHIVE_WRAPPER
MARIADB = privileged.MARIADB_WRAPPER
PYTHON = str(VENV / "bin/python")
# The socket of the MariaDB the installed policy points the wrapper at (while installed): a
# private one, whose database list and locks no other test session can change meanwhile.
DB_SOCKET: list[str] = []


@pytest.fixture(scope="module")
def installed():
    """The sudoers file and wrappers installed by install.sh; a sample root allowed; the
    dump pointed at a private MariaDB (DB_SOCKET)."""
    with machine_lock():
        state = scratch_dir("ucb-worker-state-")
        root = sample_root()
        try:
            with scratch_mariadb() as db_socket, \
                    privileged_install(state, [root], socket=db_socket):
                DB_SOCKET.append(db_socket)
                granted = grant_traverse(WORKER, [REPO, VENV])
                granted += grant_traverse(NOSUDO, [REPO, VENV])
                try:
                    yield root
                finally:
                    revoke_traverse(WORKER, granted)
                    revoke_traverse(NOSUDO, granted)
                    DB_SOCKET.clear()
        finally:
            remove_tree(root)
            remove_tree(state)


def sudo(*argv: str, user: str = WORKER, env: dict[str, str] | None = None,
         **kwargs) -> subprocess.CompletedProcess:
    return as_user(user, ["sudo", "-n", *argv], env=env, **kwargs)


def load_wrapper(name: str):
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(LIBEXEC / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


# ------------------------------------------------------------------------- the files shipped
def test_sudoers_file_passes_visudo():
    result = subprocess.run(["visudo", "-cf", str(SUDOERS_SOURCE)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parsed OK" in result.stdout


@pytest.mark.unit
def test_sudoers_grants_the_wrappers_only():
    text = SUDOERS_SOURCE.read_text()
    granted = [line for line in text.splitlines() if "NOPASSWD" in line]
    assert granted == ["%undercloud-backup ALL = (root) NOPASSWD: UCB_PRIVILEGED"]
    commands = text.split("Cmnd_Alias UCB_PRIVILEGED =")[1].split("\n\n")[0]
    assert "/usr/bin/tar" not in commands and "mariadb-dump" not in commands
    assert commands.count(privileged.LIBEXEC) == 9


@pytest.mark.unit
def test_wrappers_load_only_the_standard_library():
    for name in ("ucb-archive", "ucb-mariadb"):
        source = (LIBEXEC / name).read_text()
        # -I: no PYTHON* variables, no user site, no script directory; -S: no site-packages.
        assert source.startswith("#!/usr/bin/python3 -IS\n")
        imported = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
        assert imported <= sys.stdlib_module_names, imported - sys.stdlib_module_names


def test_wrappers_run_what_the_library_would_run():
    plan = archive.PathPlan(root="/srv/uc", included=("/etc", "/home/stack"), absent=(),
                            excluded=("/home/stack/.cache", "/srv/node/*/tmp"))
    tar = archive.tar_command(plan, extra_excludes=("var/tmp",)).argv
    wrapped = privileged.archive_command(plan, extra_excludes=("var/tmp",)).argv
    module = load_wrapper("ucb-archive")
    root, excludes, paths = module.parse(list(wrapped[3:]))
    assert module.tar_argv("tar", root, excludes, paths) == list(tar)
    assert module.DEFAULT_PATHS == archive.DEFAULT_PATHS

    dump = dbdump.dump_command(("nova", "keystone"), options_fd=9).argv
    mariadb = load_wrapper("ucb-mariadb")
    expected = [a for a in dump[1:] if not a.startswith("--defaults-extra-file")]
    got = mariadb.dump_argv("mariadb-dump", ["nova", "keystone"])
    assert got[:3] == ["mariadb-dump", "--protocol=socket", "--user=root"]
    assert got[3:] == expected
    assert set(mariadb.SYSTEM_SCHEMAS) == dbconn.SYSTEM_SCHEMAS
    # A lock line the wrapper's watch takes back (its statement ended before KILL QUERY ID)
    # is not the dump's failure; a later one is.
    assert privileged._WITHDRAWN == f"{mariadb.NAME}: {mariadb.WITHDRAWN}"
    line = (f"{mariadb.NAME}: failed: table `a`.`t` is locked by another session (held by x); "
            "gave up after 60 s")
    assert privileged._locked(line).exit_code == 26
    withdrawn = f"{line}\n{privileged._WITHDRAWN} the statement ended\nmariadb-dump: Got error"
    assert privileged._locked(withdrawn) is None
    assert privileged._locked(f"{withdrawn}\n{line}") is not None

    policy = (REPO / "deployments/privileged.conf").read_text().splitlines()
    assert tuple(line.split("=", 1)[1].strip() for line in policy
                 if line.startswith("path =")) == archive.DEFAULT_PATHS


def test_installed_files_are_root_owned_and_the_worker_cannot_change_them(installed):
    for path in (privileged.SUDOERS_FILE, ARCHIVE, MARIADB, privileged.LIBEXEC,
                 os.path.dirname(privileged.LIBEXEC), privileged.CONFIG_FILE,
                 os.path.dirname(privileged.CONFIG_FILE)):
        st = os.lstat(path)
        assert st.st_uid == 0 and st.st_gid == 0, path
        assert not st.st_mode & 0o022, f"{path} is writable by group or others"
        assert as_user(WORKER, ["test", "-w", path]).returncode != 0, path
    assert stat.S_IMODE(os.stat(privileged.SUDOERS_FILE).st_mode) == 0o440
    assert stat.S_IMODE(os.stat(ARCHIVE).st_mode) == 0o755
    replaced = as_user(WORKER, ["cp", "/bin/sh", ARCHIVE])
    assert replaced.returncode != 0 and "Permission denied" in replaced.stderr


# ------------------------------------------------------------------------ what it is for
def test_worker_archives_root_only_files_through_sudo(installed):
    root = installed
    secret = root / "root/.my.cnf"
    assert os.stat(secret).st_uid == 0 and stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert as_user(WORKER, ["cat", str(secret)]).returncode != 0  # really root-only

    plan = archive.plan_paths(str(root))
    command = privileged.archive_command(plan)
    result = as_user(WORKER, list(command.argv), text=False)
    assert result.returncode == 0, result.stderr
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        names = tar.getnames()
        assert "root/.my.cnf" in names and "etc/keystone/fernet-keys/0" in names
        member = tar.getmember("root/.my.cnf")
        assert (member.uid, member.mode) == (0, 0o600)
        assert tar.extractfile(member).read() == secret.read_bytes()


@pytest.fixture
def private_sample_databases(installed) -> tuple[str, ...]:
    """The sample databases in the installed policy's MariaDB (gone with it)."""
    subprocess.run(["mariadb", f"--socket={DB_SOCKET[0]}"], input=sample.database_sql(),
                   text=True, check=True)
    return sample.SAMPLE_DATABASES


def test_worker_reads_the_database_as_root_through_sudo(installed, private_sample_databases):
    names = private_sample_databases
    script = (
        "import json; from undercloud_backup.db import privileged as p\n"
        "info = p.server_info()\n"
        f"stats = p.table_stats({tuple(names)!r})\n"
        f"rows = p.table_stats({tuple(names)!r}, checksums=False)\n"
        "print(json.dumps({'databases': info.databases, 'version': info.version,"
        " 'stats': [s.__dict__ for s in stats], 'rows': [s.__dict__ for s in rows]}))\n")
    result = as_user(WORKER, [PYTHON, "-c", script], env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    got = __import__("json").loads(result.stdout)
    connection = pymysql.connect(unix_socket=DB_SOCKET[0], user="root")
    try:
        expected_info = dbconn.server_info(connection)
        expected = dbconn.table_stats(connection, tuple(names))
        expected_rows = dbconn.table_stats(connection, tuple(names), checksums=False)
    finally:
        connection.close()
    assert set(names) <= set(got["databases"])
    assert tuple(got["databases"]) == expected_info.databases
    assert got["version"] == expected_info.version
    assert [dbconn.TableStats(**s) for s in got["stats"]] == expected
    assert any(s.checksum is not None for s in expected)
    # --rows-only: the same counts, no CHECKSUM TABLE
    assert [dbconn.TableStats(**s) for s in got["rows"]] == expected_rows
    assert [(s.table, s.rows) for s in expected_rows] == [(s.table, s.rows) for s in expected]
    assert all(s.checksum is None for s in expected_rows)

    dump = as_user(WORKER, list(privileged.dump_command(names).argv), timeout=120)
    assert dump.returncode == 0, dump.stderr
    assert f"CREATE DATABASE /*!32312 IF NOT EXISTS*/ `{names[0]}`" in dump.stdout
    assert "CREATE DEFINER" in dump.stdout  # routines/triggers
    assert dump.stdout.rstrip().splitlines()[-1].startswith("-- Dump completed")
    # Users and grants in a dump of their own (--system=users --insert-ignore).
    users = as_user(WORKER, list(privileged.users_dump_command().argv), timeout=120)
    assert users.returncode == 0, users.stderr
    assert "CREATE USER IF NOT EXISTS" in users.stdout
    assert "CREATE USER IF NOT EXISTS" not in dump.stdout


# ------------------------------------------------------------------------ escalation attempts
MARKER = f"/var/tmp/ucb-escalated-{uuid.uuid4().hex[:8]}"
WRITTEN = f"/etc/ucb-escalated-{uuid.uuid4().hex[:8]}"
SUDO_NO = "sudo: a password is required"
SUDO_NO_ENV = "sudo: sorry, you are not allowed to set the following environment variables"

# (what is tried, argv after `sudo -n` ({root} = the allowed sample root), exit status, message)
ATTEMPTS = [
    ("a shell", ["/bin/sh", "-c", f"touch {MARKER}"], 1, SUDO_NO),
    ("tar directly", ["/usr/bin/tar", "-cf", "-", "/etc/shadow"], 1, SUDO_NO),
    ("tar running a program", ["/usr/bin/tar", "-cf", "/dev/null", f"--to-command=touch {MARKER}",
                               "/etc/hostname"], 1, SUDO_NO),
    ("the dump tool writing a file", ["/usr/bin/mariadb-dump", f"--result-file={WRITTEN}",
                                      "mysql"], 1, SUDO_NO),
    ("a shell through sudo -s", ["-s"], 1, SUDO_NO),
    ("another target user", ["-u", "mysql", MARIADB, "info"], 1, SUDO_NO),
    ("an option after info", [MARIADB, "info", "--execute=SELECT 1"], 1, SUDO_NO),
    ("an unknown action", [MARIADB, "shell"], 1, SUDO_NO),
    ("a relative archive root", [ARCHIVE, "etc", "--", "/etc"], 1, SUDO_NO),
    ("TAR_OPTIONS in the environment", [f"TAR_OPTIONS=--to-command=touch {MARKER}", ARCHIVE,
                                        "{root}", "--", "/etc"], 1, SUDO_NO_ENV),
    ("PYTHONPATH in the environment", ["PYTHONPATH=/var/tmp", ARCHIVE, "{root}", "--", "/etc"],
     1, SUDO_NO_ENV),
    ("the caller's environment", ["-E", ARCHIVE, "{root}", "--", "/etc"], 1,
     "sudo: sorry, you are not allowed to preserve the environment"),
    ("tar --to-command", [ARCHIVE, "{root}", f"--to-command=touch {MARKER}", "--", "/etc"], 64,
     "ucb-archive: refused: unexpected argument '--to-command"),
    ("tar --checkpoint-action=exec", [ARCHIVE, "{root}", "--checkpoint=1",
                                      f"--checkpoint-action=exec=touch {MARKER}", "--", "/etc"],
     64, "ucb-archive: refused: unexpected argument '--checkpoint=1'"),
    ("tar --use-compress-program", [ARCHIVE, "{root}", f"--use-compress-program=touch {MARKER}",
                                    "--", "/etc"], 64,
     "ucb-archive: refused: unexpected argument '--use-compress-program"),
    ("tar -I", [ARCHIVE, "{root}", "-I", f"touch {MARKER}", "--", "/etc"], 64,
     "ucb-archive: refused: unexpected argument '-I'"),
    ("tar -f to a root-owned file", [ARCHIVE, "{root}", "-f", WRITTEN, "--", "/etc"], 64,
     "ucb-archive: refused: unexpected argument '-f'"),
    ("tar --file= to a root-owned file", [ARCHIVE, "{root}", f"--file={WRITTEN}", "--", "/etc"],
     64, "ucb-archive: refused: unexpected argument '--file="),
    ("an option as a path", [ARCHIVE, "{root}", "--", f"--to-command=touch {MARKER}"], 64,
     "is not absolute"),
    ("/etc/shadow from the real root", [ARCHIVE, "/", "--", "/etc/shadow"], 77,
     "ucb-archive: refused: root / is not allowed"),
    ("a root not in the policy", [ARCHIVE, "/var/tmp", "--", "/etc"], 77,
     "ucb-archive: refused: root /var/tmp is not allowed"),
    ("'..' out of the root", [ARCHIVE, "{root}", "--", "/etc/../../../../etc/shadow"], 64,
     "is not normalized"),
    ("a path outside the allowed ones", [ARCHIVE, "{root}", "--", "/var/log"], 77,
     "/var/log is not below an allowed path"),
    ("an unnormalized path", [ARCHIVE, "{root}", "--", "/etc//shadow"], 64, "is not normalized"),
    ("the dump's --result-file", [MARIADB, "dump", f"--result-file={WRITTEN}", "mysql"], 64,
     "ucb-mariadb: refused: '--result-file="),
    ("the dump's -r", [MARIADB, "dump", f"-r{WRITTEN}", "mysql"], 64,
     "ucb-mariadb: refused: '-r"),
    ("an option file of the caller's", [MARIADB, "dump", "--defaults-file=/var/tmp/evil.cnf"],
     64, "ucb-mariadb: refused: '--defaults-file"),
    ("SQL in a database name", [MARIADB, "stats", "mysql'; SYSTEM touch " + MARKER + "; --"],
     64, "is not an acceptable database name"),
]


@pytest.mark.parametrize("what,argv,status,message", ATTEMPTS, ids=[a[0] for a in ATTEMPTS])
def test_escalation_attempt_is_refused(installed, what, argv, status, message):
    argv = [arg.replace("{root}", str(installed)) for arg in argv]
    result = sudo(*argv)
    assert (result.returncode, message in result.stderr) == (status, True), result.stderr
    assert result.stdout == ""
    assert not os.path.lexists(MARKER) and not os.path.lexists(WRITTEN)


def test_symlink_and_owned_directory_tricks_are_refused(installed):
    """A directory of the worker's inside an allowed path cannot redirect root elsewhere."""
    root = installed
    own = root / "home/stack/worker-owned"
    own.mkdir()
    try:
        os.chown(own, __import__("pwd").getpwnam(WORKER).pw_uid, -1)
        assert as_user(WORKER, ["ln", "-s", "/etc", str(own / "etc-link")]).returncode == 0
        assert as_user(WORKER, ["ln", "-s", "/etc/shadow", str(own / "shadow")]).returncode == 0

        through_link = sudo(ARCHIVE, str(root), "--", "/home/stack/worker-owned/etc-link/shadow")
        assert through_link.returncode == 77
        assert "etc-link is a symbolic link" in through_link.stderr

        direct = sudo(ARCHIVE, str(root), "--", "/home/stack/worker-owned/shadow")
        assert direct.returncode == 77
        assert "can be changed by the calling user" in direct.stderr

        # A hard link to a root-only file would be archived as that file: the kernel refuses
        # it (fs.protected_hardlinks, which the wrapper insists on).
        key = root / "etc/keystone/fernet-keys/0"
        hard = as_user(WORKER, ["ln", str(key), str(own / "key")])
        assert hard.returncode != 0 and "Operation not permitted" in hard.stderr

        # Archiving the allowed parent is fine: tar stores the links as links, not targets.
        whole = sudo(ARCHIVE, str(root), "--", "/home/stack", text=False)
        assert whole.returncode == 0, whole.stderr
        with tarfile.open(fileobj=io.BytesIO(whole.stdout)) as tar:
            link = tar.getmember("home/stack/worker-owned/shadow")
            assert link.issym() and link.linkname == "/etc/shadow"
            assert not any(m.name.endswith("etc-link/shadow") for m in tar.getmembers())
    finally:
        remove_tree(own)


def test_worker_without_the_sudoers_rule_gets_a_clear_error_fast(installed):
    script = (
        "import time; from undercloud_backup.db import privileged\n"
        "from undercloud_backup.core.errors import SudoRefused\n"
        "start = time.monotonic()\n"
        "try:\n"
        "    privileged.server_info()\n"
        "except SudoRefused as error:\n"
        "    print(f'{time.monotonic() - start:.2f}', error.exit_code, error)\n")
    started = time.monotonic()
    result = as_user(NOSUDO, [PYTHON, "-c", script], env={"PYTHONPATH": str(REPO)}, timeout=30)
    assert time.monotonic() - started < 10
    assert result.returncode == 0, result.stderr
    seconds, code, message = result.stdout.split(" ", 2)
    assert float(seconds) < 3 and code == "6"
    assert f"sudo refused to run '{MARIADB} info' without a password" in message
    assert "install deployments/sudoers/undercloud-backup into /etc/sudoers.d/" in message
    assert "sudo: a password is required" in message
