"""The restore day: a reinstalled node keeps its identity,
requested paths are checked before anything is written, a fresh MariaDB's empty databases do
not stop the restore, a named target can be entered, and the manual procedure of
docs/by-hand.md works with the stock client."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import uuid
from pathlib import Path

import pytest
import sample_undercloud as sample
from conftest import backup_in_process, cli_in_process
from test_restore import (  # noqa: F401 - private_mariadb is a fixture
    make_backup,
    private_mariadb,
    remove_container,
)
from test_verify import database_sql, run_sql, swift_store

from undercloud_backup.db.scratch import ScratchServer, os_user, scratch_mariadb
from undercloud_backup.restore import databases as restoredb
from undercloud_backup.restore import files as restore

# What a restore does on the bad day, called in this process (test_restore keeps the CLI's own
# contract as processes): the same parsing, flow run, statuses and printed lines.
cli = cli_in_process

IDENTITY = {"etc/fstab": "UUID=old / xfs defaults 0 0\n", "etc/machine-id": "old-machine\n",
            "etc/passwd": "root:x:0:0::/root:/bin/bash\nswift:x:160:160::/srv:/sbin/nologin\n",
            "etc/hostname": "undercloud.old\n",
            "etc/sysconfig/network-scripts/ifcfg-eth0": "HWADDR=52:54:00:00:00:01\n"}


@pytest.fixture(scope="module")
def node_backup(os_env, private_mariadb, tmp_path_factory):  # noqa: F811
    """A backup of a sample undercloud that also has the host-identity files."""
    root = sample.make_files(tmp_path_factory.mktemp("node") / "undercloud",
                             sample.SampleSize(images_mib=(1,)))
    for path, text in IDENTITY.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    container = f"ucbtest-{uuid.uuid4().hex[:10]}"
    try:
        yield make_backup(root, container, private_mariadb), root
    finally:
        remove_container(container)


def reinstalled(target: Path) -> dict[str, str]:
    """A freshly installed node: its own identity files, and an /etc the restore fills."""
    fresh = {path: f"new {path}\n" for path in IDENTITY}
    fresh["etc/keystone/keystone.conf"] = "installer default\n"
    for path, text in fresh.items():
        (target / path).parent.mkdir(parents=True, exist_ok=True)
        (target / path).write_text(text)
    return fresh


@pytest.mark.slow
def test_a_reinstalled_host_keeps_its_identity_and_dry_run_says_what_is_replaced(
        node_backup, tmp_path):
    backup, root = node_backup
    target = tmp_path / "node"
    fresh = reinstalled(target)
    args = ("restore", "--container", backup["container"], "--target", str(target),
            "--reinstalled-host", "--overwrite", "--staging-dir", str(tmp_path))

    dry = cli(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    for path in IDENTITY:
        assert f"keep     {target}/{path}" in lines
    assert f"replace  {target}/etc/keystone/keystone.conf" in lines
    assert f"create   {target}/etc/keystone/fernet-keys/0" in lines
    assert {p: (target / p).read_text() for p in fresh} == fresh  # nothing written

    done = cli(*args)
    assert done.returncode == 0, done.stderr
    for path in IDENTITY:  # the node's own, untouched
        assert (target / path).read_text() == fresh[path]
    assert (target / "etc/keystone/keystone.conf").read_text() == \
        (root / "etc/keystone/keystone.conf").read_text()
    assert (target / "etc/keystone/fernet-keys/0").read_bytes() == \
        (root / "etc/keystone/fernet-keys/0").read_bytes()

    asked = cli(*args, "--path", "/etc/passwd")  # unless asked for
    assert asked.returncode == 0, asked.stderr
    assert (target / "etc/passwd").read_text() == IDENTITY["etc/passwd"]
    assert (target / "etc/fstab").read_text() == fresh["etc/fstab"]


@pytest.mark.slow
def test_exclude_path_patterns_are_anchored_and_the_dry_run_matches_tar(node_backup, tmp_path):
    """``*`` does not cross ``/``; what the dry run says is kept is exactly what tar skips."""
    backup, root = node_backup
    target = tmp_path / "t"
    args = ("restore", "--container", backup["container"], "--target", str(target),
            "--staging-dir", str(tmp_path), "--exclude-path", "/etc/keystone/*.conf",
            "--exclude-path", "/home/stack/stackrc", "--exclude-path", "/keystone.conf")
    plan = json.loads(cli(*args, "--dry-run", "--json").stdout)["files"]
    kept = {os.path.relpath(p, target) for p in plan["kept_paths"]}
    assert kept == {"etc/keystone/keystone.conf", "home/stack/stackrc"}
    assert cli(*args).returncode == 0
    whole = tmp_path / "whole"
    assert cli(*args[:3], "--target", str(whole), "--staging-dir", str(tmp_path)).returncode == 0

    def tree(top: Path) -> set[str]:
        return {str(p.relative_to(top)) for p in top.rglob("*")}

    assert tree(whole) - tree(target) == kept
    assert (target / "etc/keystone/fernet-keys/0").exists()  # * stops at /


@pytest.mark.slow
def test_every_requested_path_is_checked_before_anything_is_written(node_backup, tmp_path):
    backup, _ = node_backup
    target = tmp_path / "t"
    result = cli("restore", "--container", backup["container"], "--target", str(target),
                 "--staging-dir", str(tmp_path), "--path", "/etc/keystone",
                 "--path", "/etc/not-there", "--path", "/root/.not-there")
    assert result.returncode == restore.NotInBackup.exit_code, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "/etc/not-there, /root/.not-there" in last and "Nothing was written" in last
    assert not target.exists()


@pytest.mark.slow
def test_a_named_missing_target_is_created_0755_the_default_scratch_0700(node_backup,
                                                                           tmp_path):
    backup, _ = node_backup
    named = tmp_path / "stand-in-root"
    assert cli("restore", "--container", backup["container"], "--target", str(named),
               "--path", "/etc/keystone", "--staging-dir", str(tmp_path)).returncode == 0
    assert stat.S_IMODE(named.stat().st_mode) == 0o755
    result = cli("restore", "--container", backup["container"], "--path", "/etc/keystone",
                 "--staging-dir", str(tmp_path), "--json")
    default = Path(json.loads(result.stdout)["files"]["target"])
    assert default.parent == tmp_path and stat.S_IMODE(default.stat().st_mode) == 0o700


# ----------------------------------------------------------------------------- databases
@pytest.fixture
def services_backup(private_mariadb, container, os_env):  # noqa: F811
    """Two service databases and an empty one, with a service account, backed up."""
    names = [f"ucb_day_{uuid.uuid4().hex[:6]}_{n}" for n in ("a", "b", "empty")]
    run_sql(private_mariadb, database_sql(names[0]) + database_sql(names[1])
            + f"CREATE DATABASE {names[2]};"
            f"CREATE USER ucb_day_svc@localhost IDENTIFIED BY 'x';"
            f"GRANT SELECT ON {names[0]}.* TO ucb_day_svc@localhost;")
    result = backup_in_process("--db-only", "--container", container, "--json", "--db-socket",
                        private_mariadb.socket, "--db-user", "root", "--no-prune")
    assert result.returncode == 0, result.stderr
    yield json.loads(result.stdout), names
    run_sql(private_mariadb, "".join(f"DROP DATABASE IF EXISTS {n};" for n in names)
            + "DROP USER IF EXISTS ucb_day_svc@localhost;")


def grants(server: ScratchServer) -> str:
    return run_sql(server, "SELECT COUNT(*) FROM mysql.user WHERE user = 'ucb_day_svc'").strip()


@pytest.mark.slow
def test_over_a_fresh_server_empty_databases_are_replaced_and_others_left_alone(
        services_backup):
    backup, (first, second, empty) = services_backup
    with scratch_mariadb("/var/tmp", lifetime_s=600) as server:
        run_sql(server, f"CREATE DATABASE {empty}; CREATE DATABASE {first};"
                        f"CREATE TABLE {first}.mine (id INT); INSERT INTO {first}.mine VALUES (7);")
        args = ("restore", "--container", backup["container"], "--no-files",
                "--all-databases", "--db-socket", server.socket, "--db-user", "root")
        refused = cli(*args)
        assert refused.returncode == restoredb.DatabasesExist.exit_code
        last = refused.stderr.strip().splitlines()[-1]
        assert f"{first} (1 tables, views, routines or events)" in last
        assert f"{empty} (empty)" in last and "--overwrite-empty" in last
        assert cli(*args, "--overwrite-empty").returncode == restoredb.DatabasesExist.exit_code

        done = cli(*args, "--overwrite-empty", "--skip-existing", "--json")
        assert done.returncode == 0, done.stderr
        loaded = json.loads(done.stdout)["databases"]
        assert loaded["skipped"] == [first] and loaded["existing"] == [empty]
        assert set(loaded["databases"]) >= {second, empty} and first not in loaded["databases"]
        assert loaded["differences"] == []
        assert run_sql(server, f"SELECT * FROM {first}.mine").strip() == "7"  # left alone
        assert run_sql(server, f"SELECT COUNT(*) FROM {second}.items").strip() == "300"
        assert grants(server) == "1"  # users and grants came too

        replaced = cli(*args, "--overwrite")  # all of them, nothing of the old ones left
        assert replaced.returncode == 0, replaced.stderr
        tables = run_sql(server, f"SHOW TABLES FROM {first}").split()
        assert "mine" not in tables and "items" in tables


@pytest.mark.slow
def test_the_manual_procedure_works_with_the_stock_client(services_backup, tmp_path):
    """docs/by-hand.md, without this tool: everything with ``| mariadb`` (then the users
    object), one database with ``| mariadb --one-database NAME``."""
    backup, (first, second, _) = services_backup
    backup_id = backup["backup_id"]
    # What `swift download` does (the venv's swift CLI lacks keystoneclient): a GET of each
    # object, Swift reassembling the segments.
    store = swift_store()
    files = {}
    for leaf in ("mariadb-all-databases.sql.zst", "mariadb-users-grants.sql.zst"):
        files[leaf] = tmp_path / leaf
        with open(files[leaf], "wb") as out:
            for chunk in store.get(backup["container"], f"{backup_id}/{leaf}")[1]:
                out.write(chunk)
    dump, users = files.values()

    def client(server: ScratchServer, *extra: str) -> str:
        # the documented client options, pointed at the scratch server
        return " ".join([f"mariadb --no-defaults --socket={server.socket} --user={os_user()}",
                         "--sandbox --local-infile=0", *extra])

    with scratch_mariadb("/var/tmp", lifetime_s=600) as server:
        subprocess.run(f"set -o pipefail; zstd -dc {dump} | {client(server)} && zstd -dc "
                       f"{users} | {client(server)}", shell=True, executable="/bin/bash",
                       check=True, capture_output=True)
        assert {first, second} <= set(run_sql(server, "SHOW DATABASES").split())
        assert grants(server) == "1"
    with scratch_mariadb("/var/tmp", lifetime_s=600) as server:
        run_sql(server, f"CREATE DATABASE {first}")
        done = subprocess.run(f"set -o pipefail; zstd -dc {dump} | "
                              f"{client(server, '--one-database', first)}", shell=True,
                              executable="/bin/bash", capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        # The client's filter lets the other databases' CREATE DATABASE through: empty.
        assert run_sql(server, "SELECT COUNT(*) FROM information_schema.TABLES WHERE "
                               f"TABLE_SCHEMA = '{second}'").strip() == "0"
        assert run_sql(server, f"SELECT COUNT(*) FROM {first}.items").strip() == "300"
        assert run_sql(server, f"SELECT COUNT(*) FROM {first}.first_items").strip() == "9"
        assert "items_log" in run_sql(server, f"SHOW TRIGGERS FROM {first}")
        assert "count_items" in run_sql(server, f"SHOW PROCEDURE STATUS WHERE Db = '{first}'")


# ------------------------------------------------------------------------ pure functions
@pytest.mark.unit
def test_selection_matches_as_tar_does_and_identity_is_kept_unless_asked():
    from undercloud_backup.core.manifest import Manifest, PathsSection

    manifest = Manifest(backup_id="b", created_at="", paths=PathsSection(
        root="/", included=["/etc", "/root"]))
    request = restore.RestoreRequest(backup_id="b", target="/t", reinstalled_host=True,
                                     exclude_paths=("/etc/keystone/*.conf", "/root/[ab]?"))
    selection = restore.select(manifest, request)
    literal = selection._literal
    excluded = [m for m in ("etc/fstab", "etc/fstab.d/x", "etc/keystone/keystone.conf",
                            "etc/keystone/fernet-keys/0", "etc/sysconfig/network-scripts/",
                            "etc/sysconfig/network-scripts/ifcfg-eth0", "root/a1",
                            "root/c1", "etc/passwd", "etc/passwdx", "etc/hosts")
                if selection.is_excluded(m, literal)]
    assert excluded == ["etc/fstab", "etc/keystone/keystone.conf",
                        "etc/sysconfig/network-scripts/",
                        "etc/sysconfig/network-scripts/ifcfg-eth0", "root/a1", "etc/passwd"]
    asked = restore.select(manifest, restore.RestoreRequest(
        backup_id="b", target="/t", reinstalled_host=True, paths=("/etc/passwd",)))
    assert "etc/passwd" not in asked.excluded and "etc/fstab" in asked.excluded
    with pytest.raises(restore.NotInBackup):
        restore.select(manifest, restore.RestoreRequest(backup_id="b", target="/t",
                                                        paths=("/opt/x",)))


@pytest.mark.unit
def test_the_dump_gate_passes_mariadb_dump_output_and_refuses_anything_else():
    from undercloud_backup.db.dumpstream import DatabaseFilter, DumpGate, NotADump

    new = (b"/*M!999999\\- enable the sandbox mode */ \n"
           b"-- MariaDB dump 10.19  Distrib\n--\nSELECT 1;\n")
    old = b"-- MariaDB dump 10.19  Distrib 10.5\n--\nSELECT 1;\n"
    for dump in (new, old):
        for size in (1, 3, 17, 4096):
            gate = DumpGate("x")
            out = b"".join(gate.feed(dump[i:i + size]) for i in range(0, len(dump), size))
            assert out + gate.finish() == dump
    for planted in (b"\\! id\n-- MariaDB dump\n", b"", b"/*M!999999\\- enable the sandbox "
                    b"mode */\nsystem id\n", b"SELECT 1;\n" * 100):
        gate = DumpGate("x")
        with pytest.raises(NotADump):
            gate.feed(planted)
            gate.finish()
    chained = DumpGate("x", DatabaseFilter(["a"]))
    assert chained.feed(old) + chained.finish() == old  # header and footer pass the filter


@pytest.mark.unit
def test_a_verification_failure_without_a_report_prints_one_line(monkeypatch, capsys):
    """flows.verify's error printer must not assume every VerificationFailed has a report."""
    from flows import verify as verify_flow
    from undercloud_backup.restore.verify import VerificationFailed

    def fails(**_kwargs):
        raise VerificationFailed(backup_id="b1", summary="a new kind of failure")

    monkeypatch.setattr(verify_flow, "verify_backup", fails)
    for extra in ([], ["--json"]):
        assert verify_flow.main(extra) == VerificationFailed.exit_code
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.strip().splitlines() == [
            "undercloud-verify: error: Backup b1 failed verification: a new kind of failure"]
