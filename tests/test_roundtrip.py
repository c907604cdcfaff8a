"""Back up a sample undercloud, then restore it with the standard tools only, and compare.

Download with plain swiftclient, ``zstd -d``, ``tar -x --xattrs --acls``, ``mariadb <``: the
backup must be restorable without this project's code.
"""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
from pathlib import Path

import pytest
import sample_undercloud as sample
from conftest import backup_cli, describe_tree, mariadb
from keystoneauth1 import session
from keystoneauth1.identity import v3
from swiftclient.client import Connection


def plain_swift(os_env: dict[str, str]) -> Connection:
    """A swiftclient connection built the way any OpenStack user would, not with our code."""
    auth = v3.Password(auth_url=os_env["OS_AUTH_URL"], username=os_env["OS_USERNAME"],
                       password=os_env["OS_PASSWORD"], project_name=os_env["OS_PROJECT_NAME"],
                       user_domain_name="Default", project_domain_name="Default")
    return Connection(session=session.Session(auth=auth),
                      os_options={"region_name": os_env["OS_REGION_NAME"]})


def download(conn: Connection, container: str, name: str, path: Path) -> str:
    digest = hashlib.sha256()
    _, body = conn.get_object(container, name, resp_chunk_size=1 << 20)
    with open(path, "wb") as out:
        for chunk in body:
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def getfacl(path: Path) -> str:
    return subprocess.run(["getfacl", "-n", "--omit-header", "--absolute-names", str(path)],
                          capture_output=True, text=True, check=True).stdout


def table_checksums(databases) -> dict[str, tuple[str, str]]:
    names = mariadb(
        "SELECT CONCAT(table_schema, '.', table_name) FROM information_schema.tables "
        f"WHERE table_schema IN ({','.join(repr(d) for d in databases)}) "
        "AND table_type = 'BASE TABLE' ORDER BY 1").split()
    result = {}
    for name in names:
        rows = mariadb(f"SELECT COUNT(*) FROM {name}").strip()
        checksum = mariadb(f"CHECKSUM TABLE {name} EXTENDED").split()[-1]
        result[name] = (rows, checksum)
    return result


@pytest.mark.slow
def test_backup_restores_with_standard_tools(sample_root, sample_databases, container, db_cnf,
                                             os_env, tmp_path):
    before_tables = table_checksums(sample_databases)
    nova = sample.SAMPLE_DATABASES[0]
    active_before = mariadb(f"SELECT COUNT(*) FROM {nova}.active")
    # The node's signing key stays out of the archive in direct mode too (the wrappers' deny
    # list keeps it out of the worker's): a plain-text backup would hand it to Swift's readers.
    key = sample_root / "etc/undercloud-backup/signing-key"
    key.parent.mkdir()
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    before_tree = describe_tree(sample_root)
    del before_tree["etc/undercloud-backup/signing-key"]
    images_acl = getfacl(sample_root / "var/lib/glance/images")
    assert "user:1000:r--" in images_acl

    result = backup_cli("--root", str(sample_root), "--container", container,
                        "--db-defaults-file", db_cnf, "--segment-size", "1MiB", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    assert summary["manifest"] == f"{summary['backup_id']}/manifest.json"

    conn = plain_swift(os_env)
    manifest = json.loads(conn.get_object(container, summary["manifest"])[1])
    assert manifest["backup_id"] == summary["backup_id"]
    assert manifest["paths"]["included"] == ["/etc", "/root", "/home/stack", "/srv/node",
                                             "/var/lib/glance/images"]
    recorded = {f"{db}.{t['table']}": (str(t["rows"]), str(t["checksum"]))
                for db, info in manifest["mariadb"]["databases"].items()
                if db in sample_databases for t in info["tables"]}
    assert recorded == before_tables

    objects = {Path(o["name"]).name: o for o in manifest["objects"]}
    # (and tar's snapshot, for the next incremental level)
    assert set(objects) == {"filesystem.tar.zst", "mariadb-all-databases.sql.zst",
                            "mariadb-users-grants.sql.zst", "filesystem.snar.zst"}
    assert manifest["kind"] == summary["kind"] == "full" and summary["parent"] is None
    assert manifest["mariadb"]["users_object"] == objects["mariadb-users-grants.sql.zst"]["name"]
    archive = objects["filesystem.tar.zst"]
    assert len(archive["segments"]) >= 3  # the 3 MiB image of random bytes spans segments
    headers = conn.head_object(container, archive["name"])
    assert headers["x-static-large-object"] == "True"
    for name, record in objects.items():
        assert download(conn, container, record["name"], tmp_path / name) == record["sha256"]
        assert (tmp_path / name).stat().st_size == record["size"]

    # Files: unpack with the standard tools into a scratch root and compare everything.
    restored = tmp_path / "restored"
    restored.mkdir()
    subprocess.run(f"zstd -dc {tmp_path / 'filesystem.tar.zst'} | tar -x --xattrs "
                   f"--xattrs-include='*' --acls --numeric-owner -p -C {restored}",
                   shell=True, check=True, executable="/bin/bash")
    assert describe_tree(restored) == before_tree
    assert getfacl(restored / "var/lib/glance/images") == images_acl
    secret = restored / "root/.my.cnf"
    assert (secret.stat().st_uid, stat.S_IMODE(secret.stat().st_mode)) == (0, 0o600)
    assert (restored / "home/stack/empty dir/inner").is_dir()

    # Databases: drop them and the service user. One database alone with the stock client's
    # --one-database (which users and grants in the databases' stream would break: why they
    # are an object of their own), then everything, then users and grants.
    user, host = sample.SAMPLE_USER
    mariadb("".join(f"DROP DATABASE {d};" for d in sample_databases)
            + f"DROP USER '{user}'@'{host}';")
    mariadb(f"CREATE DATABASE {nova};")
    subprocess.run(f"zstd -dc {tmp_path / 'mariadb-all-databases.sql.zst'} | "
                   f"mariadb --one-database {nova}", shell=True, check=True,
                   executable="/bin/bash")
    assert {k: v for k, v in table_checksums([nova]).items()} == {
        k: v for k, v in before_tables.items() if k.startswith(f"{nova}.")}
    assert mariadb(f"SHOW TRIGGERS FROM {nova}").count("instances_audit") == 1
    assert sample.SAMPLE_DATABASES[1] not in mariadb("SHOW DATABASES")
    for leaf in ("mariadb-all-databases.sql.zst", "mariadb-users-grants.sql.zst"):
        subprocess.run(f"zstd -dc {tmp_path / leaf} | mariadb", shell=True, check=True,
                       executable="/bin/bash")
    assert table_checksums(sample_databases) == before_tables
    assert mariadb(f"SELECT COUNT(*) FROM {nova}.active") == active_before
    assert mariadb(f"SHOW TRIGGERS FROM {nova}").count("instances_audit") == 1
    assert "count_active" in mariadb(f"SHOW PROCEDURE STATUS WHERE Db = '{nova}'")
    assert "purge_audit" in mariadb(f"SHOW EVENTS FROM {nova}")
    grants = mariadb(f"SHOW GRANTS FOR '{user}'@'{host}'")
    assert f"GRANT SELECT, INSERT, UPDATE ON `{nova}`.*" in grants
    engines = mariadb(f"SELECT table_name, engine FROM information_schema.tables "
                      f"WHERE table_schema = '{nova}' AND table_type = 'BASE TABLE'")
    assert "legacy_counters\tMyISAM" in engines and "instances\tInnoDB" in engines
