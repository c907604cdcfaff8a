"""A planted dump cannot read the restoring host's files.

Whoever can write the Swift container can plant a dump that looks like mariadb-dump's output
and asks the client for ``LOAD DATA LOCAL INFILE '/root/...'``: a client with local files
enabled reads the file as the restoring user (root) and sends it to the server, where the
dump can store it in a table, or make it an error message with ``PREPARE``. Every load (the
restore, verify's test restore, the documented commands) runs the client with local files
disabled; these tests plant both files and check they reach neither a table nor any output.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO
from test_verify import plant_backup, run_sql

from undercloud_backup.db.scratch import ScratchServer, scratch_mariadb
from undercloud_backup.restore import verify
from undercloud_backup.restore.files import RestoreFailed

BANNER = (b"-- MariaDB dump 10.19  Distrib 10.11.19-MariaDB, for debian-linux-gnu (x86_64)\n"
          b"--\n-- Host: localhost    Database: \n")


@pytest.fixture
def host_secrets(tmp_path) -> Iterator[list[tuple[Path, str]]]:
    """Two root-only files as a restoring host holds them: one in /root, one standing in for
    the node's signing key (a 0600 file in a root-only directory)."""
    in_root = Path("/root") / f"ucb-test-secret-{secrets.token_hex(6)}"
    key_dir = tmp_path / "etc-undercloud-backup"
    key_dir.mkdir(mode=0o700)
    key = key_dir / "signing-key"
    made = []
    for path in (in_root, key):
        text = f"SECRET-{secrets.token_hex(12)}"
        path.write_text(text + "\n")
        path.chmod(0o600)
        made.append((path, text))
    yield made
    in_root.unlink(missing_ok=True)


def forged_dump(files: list[tuple[Path, str]]) -> bytes:
    """A dump that loads each file into a table, then makes their text a table name."""
    loads = "".join(f"LOAD DATA LOCAL INFILE '{path}' INTO TABLE loot;\n" for path, _ in files)
    return BANNER + (
        "CREATE DATABASE IF NOT EXISTS planted;\nUSE planted;\n"
        "CREATE TABLE loot (line TEXT);\n" + loads +
        "SET @leak = (SELECT CONCAT('SELECT * FROM `', GROUP_CONCAT(line), '`') FROM loot);\n"
        "PREPARE leak FROM @leak;\nEXECUTE leak;\n").encode()


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"flows.{module}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def assert_not_leaked(files: list[tuple[Path, str]], *outputs: str) -> None:
    for _, text in files:
        for output in outputs:
            assert text not in output


def loot(server: ScratchServer) -> str:
    """Whatever the dump managed to put into its table (the table exists, empty)."""
    return run_sql(server, "SELECT COUNT(*), IFNULL(GROUP_CONCAT(line), '') FROM planted.loot")


@pytest.fixture
def target_server() -> Iterator[ScratchServer]:
    with scratch_mariadb("/var/tmp", lifetime_s=900) as server:
        yield server


def test_restore_of_a_dump_asking_for_local_files_sends_none(host_secrets, target_server,
                                                             container, os_env):
    backup_id = plant_backup(container, forged_dump(host_secrets))
    result = cli("restore", "--container", container, "--backup-id", backup_id, "--no-files",
                 "--all-databases", "--db-socket", target_server.socket, "--db-user", "root",
                 "--no-signature-check")  # a forger may also hold the signing key
    assert result.returncode == RestoreFailed.exit_code, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("undercloud-restore: error: Restoring mariadb-all-databases.sql.zst")
    assert "disabled the local infile capability" in last, last
    assert "Traceback" not in result.stderr
    assert loot(target_server).split() == ["0"]  # the table was made; nothing reached it
    assert_not_leaked(host_secrets, result.stdout, result.stderr)


def test_verify_test_restore_of_a_dump_asking_for_local_files_sends_none(host_secrets,
                                                                         container, os_env):
    backup_id = plant_backup(container, forged_dump(host_secrets))
    result = cli("verify", "--container", container, "--backup-id", backup_id,
                 "--no-signature-check")
    assert result.returncode == verify.VerificationFailed.exit_code, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"undercloud-verify: error: Backup {backup_id} failed verification")
    assert "local infile" in last, last
    assert_not_leaked(host_secrets, result.stdout, result.stderr)


def documented_loads() -> list[str]:
    """Every command of docs/restore.md and docs/by-hand.md that pipes a dump into the client."""
    text = "".join((REPO / "docs" / page).read_text() for page in ("restore.md", "by-hand.md"))
    return re.findall(r"^.*\| mariadb .*$", text, re.M)


def test_every_documented_load_disables_local_files_and_stops_the_forgery(host_secrets,
                                                                          target_server,
                                                                          tmp_path):
    commands = documented_loads()
    assert len(commands) >= 4, commands
    for command in commands:
        assert re.search(r"\| mariadb --sandbox --local-infile=0( |$)", command), command
    # The first one as written, pointed at the scratch server (the documented command reads
    # the operator's own option files; here there are none to read).
    dump = tmp_path / "mariadb-all-databases.sql"
    dump.write_bytes(forged_dump(host_secrets))
    client = commands[0][commands[0].index("| mariadb ") + 2:].replace(
        "mariadb ", f"mariadb --no-defaults --socket={target_server.socket} --user=root ", 1)
    done = subprocess.run(f"set -o pipefail; cat {dump} | {client}", shell=True,
                          executable="/bin/bash", capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DB_SOCKET": target_server.socket})
    assert done.returncode == 1 and "disabled the local infile capability" in done.stderr
    assert loot(target_server).split() == ["0"]
    assert_not_leaked(host_secrets, done.stdout, done.stderr)
