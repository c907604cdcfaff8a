"""``python -m flows.restore`` against real backups: files come back byte for byte with their
owners, modes, ACLs and xattrs; databases come back with identical checksums; nothing existing
is replaced unless asked, and a dry run writes nothing."""

from __future__ import annotations

import json
import os
import random
import re
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sample_undercloud as sample
from conftest import REPO, backup_in_process, cli_in_process, describe_tree, remove_container
from test_verify import (
    archive_of,
    database_sql,
    get_manifest,
    plant_backup,
    planted_dumps,
    put_plain,
    run_sql,
    swift_store,
)

from undercloud_backup.db import dumpstream
from undercloud_backup.db.scratch import ScratchServer, scratch_mariadb
from undercloud_backup.restore import databases as restoredb
from undercloud_backup.restore import files as restore
from undercloud_backup.restore import verify
from undercloud_backup.store import upload
from undercloud_backup.store.reader import ObjectDamaged


def cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m flows.<module>`` the way an operator does: kept for the CLI's contract
    (exit status, last line, --json as the process prints them); the tests of what a restore
    does call the flow in this process (cli_in_process), without a Python start with Prefect."""
    return subprocess.run([sys.executable, "-m", f"flows.{module}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


ARCHIVED = ("etc", "root", "home/stack", "srv/node", "var/lib/glance/images")


def archived(tree: dict[str, tuple]) -> list[str]:
    """The paths of ``tree`` the archive holds: the archived paths and what is below them."""
    return [p for p in tree if any(p == a or p.startswith(a + "/") for a in ARCHIVED)]


def getfacl(path: Path) -> str:
    return subprocess.run(["getfacl", "-n", "--omit-header", "--absolute-names", str(path)],
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def private_mariadb() -> Iterator[ScratchServer]:
    """A real MariaDB of these tests' own, undisturbed by what others do to the shared one."""
    with scratch_mariadb("/var/tmp", lifetime_s=1800) as server:
        yield server


@pytest.fixture(scope="module")
def shared_backup(os_env, private_mariadb, tmp_path_factory) -> Iterator[tuple[dict, Path]]:
    """One backup of a sample tree for the tests that only read it, and that tree."""
    root = sample.make_files(tmp_path_factory.mktemp("shared") / "undercloud",
                             sample.SampleSize(images_mib=(3,)))
    container = f"ucbtest-{uuid.uuid4().hex[:10]}"
    try:
        yield make_backup(root, container, private_mariadb), root
    finally:
        remove_container(container)


def make_backup(root: Path, container: str, server: ScratchServer) -> dict:
    # In this process: the backup the restores read, not a test of the backup's CLI.
    result = backup_in_process("--root", str(root), "--container", container, "--db-socket",
                               server.socket, "--db-user", "root", "--segment-size", "1MiB",
                               "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_files_come_back_identical_in_a_new_scratch_root(shared_backup, tmp_path):
    files_backup, sample_root = shared_backup
    before = describe_tree(sample_root)
    # As a process: the CLI's --json on stdout and its exit status, as an operator gets them.
    result = cli("restore", "--container", files_backup["container"], "--staging-dir",
                 str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    restored = json.loads(result.stdout)["files"]
    target = Path(restored["target"])
    # The default target: a new directory named after the backup, with a random suffix
    # nobody could plant in advance; only root may enter it.
    assert target.parent == tmp_path
    assert re.fullmatch(rf"undercloud-restore-{files_backup['backup_id']}-[a-z0-9_]{{8}}",
                        target.name)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert restored["entries"] == len(archived(before))  # the parents of /home/stack aren't
    assert describe_tree(target) == before  # bytes, owners, modes, xattrs, links, empty dirs
    images = "var/lib/glance/images"
    assert "user:1000:r--" in getfacl(target / images)
    assert getfacl(target / images) == getfacl(sample_root / images)
    obj = next(p for p in (target / "srv/node").rglob("*.data"))
    assert os.getxattr(obj, "user.swift.metadata") == os.getxattr(
        sample_root / obj.relative_to(target), "user.swift.metadata")


@pytest.mark.slow
def test_restore_refuses_to_overwrite_names_the_files_and_dry_run_writes_nothing(
        shared_backup, tmp_path):
    files_backup, sample_root = shared_backup
    container = files_backup["container"]
    target = tmp_path / "target"
    assert cli_in_process("restore", "--container", container, "--target", str(target),
                          "--staging-dir", str(tmp_path)).returncode == 0
    stackrc = target / "home/stack/stackrc"
    stackrc.write_text("changed after the restore\n")
    snapshot = describe_tree(target)

    # As a process: a refusal's exit status and last line, as an operator gets them.
    refused = cli("restore", "--container", container, "--target", str(target))
    assert refused.returncode == restore.WouldOverwrite.exit_code
    error = refused.stderr.strip().splitlines()[-1]
    tree = describe_tree(sample_root)
    files = [p for p in archived(tree) if tree[p][0] != stat.S_IFDIR]
    assert error.startswith(f"undercloud-restore: error: {len(files)} existing file(s) under ")
    assert "etc/keystone/keystone.conf" in error and "--overwrite" in error
    assert describe_tree(target) == snapshot  # nothing was written

    dry = cli_in_process("restore", "--container", container, "--target", str(target), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert f"replace  {stackrc}" in lines
    assert f"merge    {target}/home/stack/" in lines
    assert len(lines) == len(archived(describe_tree(sample_root))) + 1  # + the summary line
    assert lines[-1].startswith("dry run of backup ")
    assert describe_tree(target) == snapshot

    new_target = tmp_path / "never-created"
    dry_json = cli_in_process("restore", "--container", container, "--target", str(new_target),
                              "--dry-run", "--json")
    plan = json.loads(dry_json.stdout)["files"]
    assert plan["creates"] == plan["entries"] == len(archived(describe_tree(sample_root)))
    assert {"path": f"{new_target}/root/.my.cnf", "kind": "file", "action": "create"} in \
        plan["listed"]
    assert not new_target.exists()

    overwritten = cli_in_process("restore", "--container", container, "--target", str(target),
                                 "--overwrite")
    assert overwritten.returncode == 0, overwritten.stderr
    assert stackrc.read_text() == (sample_root / "home/stack/stackrc").read_text()
    assert describe_tree(target) == describe_tree(sample_root)


@pytest.mark.slow
def test_only_some_paths_and_never_over_slash_without_the_flag(shared_backup, tmp_path):
    files_backup, sample_root = shared_backup
    container = files_backup["container"]
    target = tmp_path / "keys"
    result = cli_in_process("restore", "--container", container, "--target", str(target), "--path",
                            "/etc/keystone", "--path", "/root/.my.cnf", "--json")
    assert result.returncode == 0, result.stderr
    restored = describe_tree(target)
    expected = {p: v for p, v in describe_tree(sample_root).items()
                if p == "etc/keystone" or p.startswith("etc/keystone/") or p == "root/.my.cnf"}
    assert "etc/keystone/fernet-keys/0" in expected
    assert {p: v for p, v in restored.items() if p in expected} == expected
    assert set(restored) - set(expected) == {"etc", "root"}  # and their parents

    missing = cli_in_process("restore", "--container", container, "--target", str(tmp_path / "x"),
                             "--path", "/opt/not-backed-up")
    assert missing.returncode == restore.NotInBackup.exit_code
    assert "/opt/not-backed-up" in missing.stderr

    root = cli_in_process("restore", "--container", container, "--target", "/")
    assert root.returncode == restore.RootTargetRefused.exit_code
    assert "--allow-root-target" in root.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_damaged_segment_stops_the_restore_before_its_bytes_are_written(
        sample_root, container, private_mariadb, tmp_path):
    files_backup = make_backup(sample_root, container, private_mariadb)
    archive = archive_of(get_manifest(files_backup["container"], files_backup["backup_id"]))
    segment = archive.segments[-1]
    swift_store().put(archive.segment_container, segment.name, os.urandom(segment.size))
    result = cli_in_process("restore", "--container", files_backup["container"], "--target",
                            str(tmp_path / "t"))
    # Refused by the HEAD checks before anything is read (reader.precheck), naming
    # the segment; nothing was written.
    assert result.returncode == ObjectDamaged.exit_code, result.stderr
    assert segment.name in result.stderr and f"etag {segment.etag}" in result.stderr
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


@pytest.mark.slow
def test_a_segment_damaged_on_its_way_into_swift_is_caught_before_restore_uses_it(
        sample_root, container, private_mariadb, tmp_path, monkeypatch, os_env):
    """Swift took the damaged bytes (its ETag is their MD5): our SHA-256 of what was read
    is what catches them."""
    from flows.backup import undercloud_backup
    from flows.params import grouped

    original = upload.StreamUploader._put_segment

    def damaged_on_the_way(self, index, spool):
        if self.name.endswith("filesystem.tar.zst") and index == 1:
            spool.file.seek(0)
            first = spool.file.read(1)
            spool.file.seek(0)
            spool.file.write(bytes([first[0] ^ 0xFF]))  # after it was hashed
        return original(self, index, spool)

    monkeypatch.setattr(upload.StreamUploader, "_put_segment", damaged_on_the_way)
    summary = undercloud_backup(**grouped(root=str(sample_root), container=container,
                                          db_socket=private_mariadb.socket, db_user="root",
                                          segment_size="1MiB", prune=False))
    monkeypatch.undo()
    segment = archive_of(get_manifest(container, summary.backup_id)).segments[1]

    checked = cli_in_process("verify", "--container", container, "--skip-database", "--json")
    assert checked.returncode == verify.VerificationFailed.exit_code, checked.stderr
    assert any(segment.name in p and "sha256" in p
               for p in json.loads(checked.stdout)["problems"])
    target = tmp_path / "t"
    result = cli_in_process("restore", "--container", container, "--target", str(target))
    assert result.returncode == 43, result.stderr  # damaged, with what had been written
    assert segment.name in result.stderr and "sha256" in result.stderr


# ----------------------------------------------------------------------------- databases
def checksums(server: ScratchServer, database: str) -> dict[str, tuple[str, str]]:
    tables = run_sql(server, f"SELECT table_name FROM information_schema.tables WHERE "
                             f"table_schema = '{database}' AND table_type = 'BASE TABLE' "
                             "ORDER BY 1").split()
    return {t: (run_sql(server, f"SELECT COUNT(*) FROM {database}.{t}").strip(),
                run_sql(server, f"CHECKSUM TABLE {database}.{t} EXTENDED").split()[-1])
            for t in tables}


@pytest.fixture
def two_databases(private_mariadb):
    """Two databases, and a service account with a grant on the first."""
    names = [f"ucb_restore_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for name in names:
        run_sql(private_mariadb, database_sql(name))
    run_sql(private_mariadb, "CREATE USER ucb_restore_svc@localhost IDENTIFIED BY 'x';"
                             f"GRANT SELECT, UPDATE ON {names[0]}.* TO ucb_restore_svc@localhost;")
    yield names
    run_sql(private_mariadb, "".join(f"DROP DATABASE IF EXISTS {n};" for n in names)
            + "DROP USER IF EXISTS ucb_restore_svc@localhost;")


@pytest.fixture
def db_backup(two_databases, private_mariadb, container, os_env) -> dict:
    # In this process: the backup the restores read, not a test of the backup's CLI.
    result = backup_in_process("--db-only", "--container", container, "--json", "--db-socket",
                               private_mariadb.socket, "--db-user", "root")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_databases_dropped_and_restored_have_identical_checksums(db_backup, two_databases,
                                                                private_mariadb):
    server = private_mariadb
    first, second = two_databases
    before = checksums(server, first)
    run_sql(server, f"DROP DATABASE {first}; INSERT INTO {second}.counters VALUES ('after', 1);")
    second_after = checksums(server, second)
    target = ("--db-socket", server.socket, "--db-user", "root")

    dry = cli_in_process("restore", "--container", db_backup["container"], "--no-files",
                         "--database", first, "--dry-run", *target)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip().splitlines()[0] == \
        f"would load database(s) {first} into {server.socket}"
    assert first not in run_sql(server, "SHOW DATABASES").split()

    result = cli_in_process("restore", "--container", db_backup["container"], "--no-files",
                            "--database", first, "--json", *target)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)["databases"]
    assert loaded["compared"] == loaded["matching"] == 3 and loaded["differences"] == []
    assert checksums(server, first) == before
    assert run_sql(server, f"SELECT COUNT(*) FROM {first}.first_items").strip() == "9"
    assert "items_log" in run_sql(server, f"SHOW TRIGGERS FROM {first}")
    assert "count_items" in run_sql(server, f"SHOW PROCEDURE STATUS WHERE Db = '{first}'")
    assert checksums(server, second) == second_after  # only the named database was loaded

    again = cli_in_process("restore", "--container", db_backup["container"], "--no-files",
                           "--database", first, *target)
    assert again.returncode == restoredb.DatabasesExist.exit_code
    assert f"Database(s) {first} (5 tables, views, routines or events) already exist" in \
        again.stderr.strip().splitlines()[-1]
    replaced = cli_in_process("restore", "--container", db_backup["container"], "--no-files",
                              "--database", first, "--overwrite", *target)
    assert replaced.returncode == 0, replaced.stderr
    assert checksums(server, first) == before


@pytest.mark.slow
def test_all_databases_with_users_into_another_server(db_backup, two_databases):
    """Everything, users and grants included, into another server."""
    with scratch_mariadb("/var/tmp", lifetime_s=600) as server:
        result = cli_in_process("restore", "--container", db_backup["container"], "--no-files",
                                "--all-databases", "--db-socket", server.socket, "--db-user",
                                "root", "--json")
        assert result.returncode == 0, result.stderr
        loaded = json.loads(result.stdout)["databases"]
        assert loaded["users_and_grants"] is True
        assert set(two_databases) <= set(loaded["databases"])
        assert loaded["compared"] == loaded["matching"] and loaded["differences"] == []
        with server.session.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM mysql.user WHERE user = 'mariadb.sys'")
            assert cursor.fetchone()[0] == 1
            cursor.execute("SHOW GRANTS FOR 'ucb_restore_svc'@'localhost'")
            grants = " ".join(row[0] for row in cursor.fetchall())
        assert f"ON `{two_databases[0]}`.*" in grants  # the accounts came along


def test_database_filter_keeps_only_the_named_database_whatever_the_chunking(two_databases,
                                                                            private_mariadb):
    first, second = two_databases
    dump = subprocess.run(["mariadb-dump", "--no-defaults", "--user=root",
                           f"--socket={private_mariadb.socket}", "--system=users",
                           "--insert-ignore", "--routines",
                           "--events", "--triggers", "--add-drop-database", "--hex-blob",
                           "--databases", first, second], capture_output=True,
                          check=True).stdout
    whole = dumpstream.DatabaseFilter([second])
    expected = whole.feed(dump) + whole.finish()
    assert whole.seen == [first, second]
    text = expected.decode()
    assert f"CREATE DATABASE /*!32312 IF NOT EXISTS*/ `{second}`" in text
    assert f"`{first}`" not in text and "CREATE USER" not in text
    assert "CREATE DEFINER=" in text and "DELIMITER ;;" in text  # routine and trigger kept
    assert text.rstrip().endswith(dump.decode().rstrip().splitlines()[-1])  # footer kept
    rng = random.Random(4)
    for _ in range(5):
        chunked = dumpstream.DatabaseFilter([second])
        out, position = bytearray(), 0
        while position < len(dump):
            size = rng.choice((1, 7, 100, 1023, 1024, 1025, 5000))
            out += chunked.feed(dump[position:position + size])
            position += size
        out += chunked.finish()
        assert bytes(out) == expected


@pytest.mark.slow
def test_files_and_databases_are_restored_side_by_side(two_databases, private_mariadb,
                                                       container, os_env, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    root = sample.make_files(tmp_path / "undercloud", sample.SampleSize(images_mib=(3,)))
    backup = make_backup(root, container, private_mariadb)
    with scratch_mariadb("/var/tmp", lifetime_s=600) as server:
        result = cli_in_process("restore", "--container", container, "--staging-dir",
                                str(tmp_path), "--all-databases", "--db-socket", server.socket,
                                "--db-user", "root", "--json")
        assert result.returncode == 0, result.stderr
        restored = json.loads(result.stdout)
        assert restored["backup_id"] == backup["backup_id"]
        assert describe_tree(Path(restored["files"]["target"])) == describe_tree(root)
        loaded = restored["databases"]
        assert set(two_databases) <= set(loaded["databases"])
        assert loaded["compared"] == loaded["matching"] and loaded["differences"] == []
        assert checksums(server, two_databases[0]) == checksums(private_mariadb,
                                                                two_databases[0])
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(
            any_=["undercloud_restore"])), sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        tasks = {t.name: t for t in client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[run.id])))}
    files = next(t for name, t in tasks.items() if name.startswith("restore_files"))
    databases = next(t for name, t in tasks.items() if name.startswith("restore_databases"))
    # each started before the other ended
    assert files.start_time < databases.end_time and databases.start_time < files.end_time


@pytest.mark.parametrize("kind", ["bare", "disguised"])
def test_restore_never_runs_shell_lines_of_a_planted_dump(kind, private_mariadb, container,
                                                          os_env, tmp_path):
    """Whoever can write the container can plant a dump; the root restore must not run it."""
    marker = tmp_path / "ran"
    backup_id = plant_backup(container, planted_dumps(marker)[kind])
    result = cli_in_process("restore", "--container", container, "--backup-id", backup_id,
                            "--no-files", "--all-databases", "--db-socket", private_mariadb.socket,
                            "--db-user", "root")
    last = result.stderr.strip().splitlines()[-1]
    if kind == "bare":  # refused before a byte reached the server
        assert result.returncode == dumpstream.NotADump.exit_code == 49, result.stderr
        assert last.startswith(f"undercloud-restore: error: {backup_id}/mariadb-all-databases"
                               ".sql.zst does not begin the way mariadb-dump's output begins")
        assert "planted" not in run_sql(private_mariadb, "SHOW DATABASES").split()
    else:  # it looked like a dump: the client's sandbox refused the shell line
        assert result.returncode == restore.RestoreFailed.exit_code, result.stderr
        assert "Not allowed in the sandbox mode" in last
    assert not marker.exists() and not Path(f"{marker}.system").exists()


def _hostile_archive(outside: Path) -> bytes:
    """A tar a Swift-side writer could plant: a member climbing out with ``..``, an absolute
    one, and a symlink to a directory outside followed by a file written through it."""
    import io
    import tarfile

    def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = kind, link, 0o644
        data = b"" if kind != tarfile.REGTYPE else b"planted\n"
        info.size = len(data)
        return info, io.BytesIO(data)

    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(*member("etc/", tarfile.DIRTYPE))
        tar.addfile(*member("etc/hosts"))
        tar.addfile(*member(f"etc/../../../../../..{outside}/climbed"))
        tar.addfile(*member(f"{outside}/absolute"))
        tar.addfile(*member("etc/link", tarfile.SYMTYPE, str(outside)))
        tar.addfile(*member("etc/link/through"))
    return body.getvalue()


def test_a_hostile_archive_from_the_store_writes_nothing_outside_the_target(container, os_env,
                                                                            tmp_path):
    """Whoever can write the container can plant an archive; tar as root must keep every
    member under the target: no ``..`` climb, no absolute path, no write through a symlink
    the archive itself made."""
    from undercloud_backup.core.manifest import FS_OBJECT, Manifest, PathsSection, StoredObject
    from undercloud_backup.store import catalogue

    outside = tmp_path / "outside"
    outside.mkdir()
    store = swift_store()
    store.ensure_container(container)
    backup_id = "planted-tar"
    packed = subprocess.run(["zstd", "-q", "-c"], input=_hostile_archive(outside),
                            capture_output=True, check=True).stdout
    obj = StoredObject(name=f"{backup_id}/{FS_OBJECT}", size=0, sha256="", compression="zstd",
                       content="tar")
    put_plain(store, container, obj, packed)
    catalogue.put_manifest(store, container, Manifest(
        backup_id=backup_id, created_at="2026-11-30T22:00:00+00:00",
        paths=PathsSection(root="/", included=["/etc"]), objects=[obj]))
    target = tmp_path / "target"
    result = cli_in_process("restore", "--container", container, "--backup-id", backup_id,
                            "--target", str(target), "--json")
    assert list(outside.iterdir()) == [], result.stderr
    assert (target / "etc/hosts").read_bytes() == b"planted\n", result.stderr
    # what tar wrote stays inside: the absolute member under the target, the link a link
    for path in [target, *target.rglob("*")]:
        assert os.path.realpath(path).startswith(str(target)) or path.is_symlink(), path
    assert (target / str(outside).lstrip("/") / "absolute").read_bytes() == b"planted\n"
    # and the run says it failed, with tar's reasons, rather than passing for a restore
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == restore.RestoreFailed.exit_code, result.stderr
    assert "Member name contains '..'" in last and "etc/link/through: Cannot open" in last


@pytest.mark.unit
@pytest.mark.parametrize("module_name, flow_name", [
    ("flows.restore", "undercloud_restore"), ("flows.verify", "verify_backup"),
    ("flows.prune", "prune_backups")])
def test_each_flat_flow_parameter_is_declared_once_for_form_flags_and_call(module_name,
                                                                          flow_name):
    """The form's description, the flag and its default all come from the one declaration."""
    import importlib

    from prefect.utilities.callables import parameter_schema

    from flows import params

    module = importlib.import_module(module_name)
    flow = getattr(module, flow_name)
    declared = params.declared(flow.fn)
    properties = parameter_schema(flow).model_dump_for_openapi()["properties"]
    assert [d.name for d in declared] == list(properties)
    for d in declared:
        assert properties[d.name]["description"] == d.param.description, d.name
    call = params.flow_arguments(module._parser().parse_args([]), module.PARAMETERS)
    assert set(call) == set(properties)  # every parameter is reachable from the CLI
    for d in declared:
        default = [] if d.default is None and "list" in str(d.kind) else d.default
        assert call[d.name] == default, d.name


@pytest.mark.unit
def test_restore_flags_map_back_to_the_flows_parameters():
    from flows import params
    from flows import restore as restore_flow

    args = restore_flow._parser().parse_args([
        "--no-files", "--path", "/a", "--path", "/b", "--database", "nova", "--db-user", "root",
        "--no-signature-check", "--timeout-hours", "2", "--staging-dir", "/srv/x"])
    call = params.flow_arguments(args, restore_flow.PARAMETERS)
    assert call["files"] is False and call["check_signature"] is False
    assert call["paths"] == ["/a", "/b"] and call["databases"] == ["nova"]
    assert call["database"].db_user == "root" and call["timeout_hours"] == 2.0
    assert call["staging_dir"] == "/srv/x" and call["dry_run"] is False
