"""``--identity``: verify and restore decrypt an encrypted, signed backup in real Swift.

One encrypted and signed backup (files and the databases of a MariaDB of these tests' own) is
made once; verify with the identity lists the archive and test-restores the dump, restore
with it brings back files and databases equal to the source. A missing, unusable or foreign
identity, no identity, and a truncated object are each refused with their own exit status
and one line, before anything is written. The identity's key appears in no argv, output,
log, flow-run parameter or artifact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sample_undercloud as sample
from conftest import REPO, backup_in_process, cli_in_process, describe_tree
from test_restore import archived, checksums, remove_container
from test_verify import database_sql, run_sql, swift_store

from undercloud_backup.core.manifest import StoredObject
from undercloud_backup.db.scratch import ScratchServer, scratch_mariadb
from undercloud_backup.trust import crypto

PRINCIPAL = "undercloud@node"


def cli_process(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m flows.<module>`` as an operator runs it: for the CLI's own contract."""
    return subprocess.run([sys.executable, "-m", f"flows.{module}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))


# The flow called in this process (what it does, not its process): its stderr holds the run's
# log lines with any traceback a record carried, then its own lines.
cli = cli_in_process


def one_line(done: subprocess.CompletedProcess, prog: str) -> str:
    """The operator's one line (the last), and no traceback."""
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{prog}: error: "), done.stderr[-2000:]
    return line


def age_identity(path: Path) -> str:
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    os.chmod(path, 0o600)
    return subprocess.run(["age-keygen", "-y", str(path)], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    """Operator and break-glass identities (the recipients), a stranger's, the undercloud's
    signing key and the allowed-signers file an operator keeps off the node."""
    keydir = tmp_path_factory.mktemp("keys")
    operator, breakglass = age_identity(keydir / "operator"), age_identity(keydir / "breakglass")
    age_identity(keydir / "stranger")
    (keydir / "recipients").write_text(f"{operator}\n{breakglass}\n")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", PRINCIPAL, "-f",
                    str(keydir / "signing")], check=True)
    public = " ".join((keydir / "signing.pub").read_text().split()[:2])
    (keydir / "allowed").write_text(f'{PRINCIPAL} namespaces="undercloud-backup" {public}\n')
    secrets = [line for name in ("operator", "breakglass", "stranger")
               for line in (keydir / name).read_text().splitlines()
               if line.startswith("AGE-SECRET-KEY-")]
    return {**{name: str(keydir / name) for name in
               ("operator", "breakglass", "stranger", "recipients", "signing", "allowed")},
            "secrets": secrets}


@pytest.fixture(scope="module")
def source_mariadb() -> Iterator[ScratchServer]:
    with scratch_mariadb("/var/tmp", lifetime_s=1800) as server:
        yield server


@pytest.fixture(scope="module")
def encrypted(keys, source_mariadb, os_env, tmp_path_factory) -> Iterator[dict]:
    """One encrypted, signed backup of a sample tree and two databases with a user."""
    root = sample.make_files(tmp_path_factory.mktemp("enc") / "undercloud",
                             sample.SampleSize(images_mib=(3,)))
    names = [f"ucb_identity_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for name in names:
        run_sql(source_mariadb, database_sql(name))
    run_sql(source_mariadb, "CREATE USER ucb_identity_svc@localhost IDENTIFIED BY 'x';"
                            f"GRANT SELECT ON {names[0]}.* TO ucb_identity_svc@localhost;")
    container = f"ucbtest-{uuid.uuid4().hex[:10]}"
    # In this process: the backup these tests read, not a test of the backup's CLI.
    result = backup_in_process("--root", str(root), "--container", container, "--db-socket",
                               source_mariadb.socket, "--db-user", "root", "--segment-size",
                               "1MiB", "--no-prune", "--recipients-file", keys["recipients"],
                               "--signing-key", keys["signing"], "--json")
    assert result.returncode == 0, result.stderr
    backup_id = json.loads(result.stdout)["backup_id"]
    try:
        yield {"container": container, "backup_id": backup_id, "root": root,
               "databases": names, "where": ("--container", container, "--backup-id", backup_id)}
    finally:
        remove_container(container)


def assert_no_secret(keys: dict, *texts: str) -> None:
    for text in texts:
        assert not any(secret in text for secret in keys["secrets"])


@pytest.mark.slow
def test_verify_with_the_identity_lists_the_archive_and_test_restores_the_dump(keys, encrypted):
    done = cli("verify", *encrypted["where"], "--allowed-signers", keys["allowed"],
               "--identity", keys["operator"], "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["ok"] and report["decrypted"] is True
    assert report["signature"] == "good"
    assert report["decryption"].startswith("decrypted with the identity of recipient sha256:")
    assert report["archive"]["entries"] == len(archived(describe_tree(encrypted["root"])))
    database = report["database"]
    assert database["loaded"] and database["compared"] == database["matching"] > 0
    assert all(o["name"].endswith(".age") and o["ok"] for o in report["objects"])
    # the users and grants are loaded after the dump, not only read back
    users = next(o["name"] for o in report["objects"]
                 if o["name"].endswith("/mariadb-users-grants.sql.zst.age"))
    assert f"loading {users} (" in done.stderr
    assert_no_secret(keys, done.stdout, done.stderr)

    # Without it (the undercloud's weekly verify): everything but decryption, and it says so.
    done = cli("verify", *encrypted["where"], "--allowed-signers", keys["allowed"], "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["ok"] and report["decrypted"] is False
    assert "NOT decrypted" in report["decryption"] and report["archive"] is None
    assert report["database"] is None and report["objects"]
    assert all(o["name"].endswith(".age") and o["ok"] for o in report["objects"])
    done = cli("verify", *encrypted["where"], "--allowed-signers", keys["allowed"])
    said = [line for line in done.stdout.splitlines() if "NOT decrypted" in line]
    assert done.returncode == 0 and len(said) == 1 and "--identity" in said[0]


@pytest.mark.slow
def test_restore_with_the_identity_brings_back_files_and_databases_equal_to_the_source(
        keys, encrypted, source_mariadb, tmp_path):
    target = tmp_path / "restored"
    with scratch_mariadb("/var/tmp", lifetime_s=600) as server:
        done = cli("restore", *encrypted["where"], "--allowed-signers", keys["allowed"],
                   "--identity", keys["breakglass"], "--target", str(target),
                   "--all-databases", "--db-socket", server.socket, "--db-user", "root",
                   "--json")
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout)
        assert result["decryption"].startswith("decrypted with the identity of recipient")
        assert result["warnings"] == []
        assert describe_tree(target) == describe_tree(encrypted["root"])
        for name in encrypted["databases"]:
            assert checksums(server, name) == checksums(source_mariadb, name)
        grants = run_sql(server, "SHOW GRANTS FOR ucb_identity_svc@localhost")
        assert f"ON `{encrypted['databases'][0]}`.*" in grants
        assert result["databases"]["matching"] == result["databases"]["compared"] > 0
    assert_no_secret(keys, done.stdout, done.stderr)
    _assert_no_secret_in_prefect(keys, encrypted["backup_id"])


def _assert_no_secret_in_prefect(keys: dict, backup_id: str) -> None:
    """Neither the runs' parameters, their logs nor any artifact hold a key (only paths)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
    )

    with get_client(sync_client=True) as client:
        runs = [r for prefix in ("verify-", "restore-") for r in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=f"{prefix}{backup_id}")))]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [r.id for r in runs]}))
        # the runs' own artifacts: an unfiltered read returns only the server's first page
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in runs])))
    assert runs and logs and artifacts
    identities = [r.parameters.get("identity") for r in runs]
    assert keys["breakglass"] in identities and keys["operator"] in identities  # a path
    assert_no_secret(keys, json.dumps([r.parameters for r in runs]),
                     "\n".join(log.message for log in logs),
                     "\n".join(str(a.data) for a in artifacts))


# ------------------------------------------------------------------------ refused, one line
@pytest.mark.slow
@pytest.mark.parametrize("case, status, says", [
    ("missing", 51, "missing or unreadable"),
    ("not-an-identity", 51, "holds no age identity"),
    ("another-recipient", 52, "holds none of the keys backup"),
    ("none", 59, "pass --identity FILE"),
])
def test_a_missing_unusable_or_foreign_identity_is_refused_before_anything_is_written(
        keys, encrypted, tmp_path, case, status, says):
    identity = {"missing": str(tmp_path / "absent"), "not-an-identity": keys["recipients"],
                "another-recipient": keys["stranger"], "none": None}[case]
    target = tmp_path / "target"
    args = [*encrypted["where"], "--allowed-signers", keys["allowed"]]
    args += ["--identity", identity] if identity else []
    # One case as the operator's process: the CLIs' exit status and last line, no traceback.
    run = cli_process if case == "another-recipient" else cli
    done = run("restore", *args, "--target", str(target))
    assert done.returncode == status, done.stderr[-2000:]
    line = one_line(done, "undercloud-restore")
    assert says in line and (identity is None or identity in line)
    assert not target.exists()
    if identity is not None:  # verify checks the identity before reading an object
        done = run("verify", *args)
        assert done.returncode == status and says in one_line(done, "undercloud-verify")
    assert_no_secret(keys, done.stdout, done.stderr)


def _dump(encrypted: dict) -> StoredObject:
    from test_verify import get_manifest

    manifest = get_manifest(encrypted["container"], encrypted["backup_id"])
    dump = next(o for o in manifest.objects if o.content == "mariadb-dump"
                and "users" not in o.leaf)
    assert not dump.segmented and dump.name.endswith(".age")
    return dump


@pytest.mark.slow
def test_a_truncated_encrypted_object_is_refused_naming_it_and_nothing_is_written(
        keys, encrypted, tmp_path):
    """A Swift-side writer truncates the dump: restore refuses (56) before a file or a table
    is written, naming the object; verify with the identity names it too (41)."""
    dump = _dump(encrypted)
    store = swift_store()
    body = store.get_bytes(encrypted["container"], dump.name)
    store.put(encrypted["container"], dump.name, body[: len(body) // 2])
    try:
        target = tmp_path / "target"
        with scratch_mariadb("/var/tmp", lifetime_s=600) as server:
            done = cli("restore", *encrypted["where"], "--allowed-signers", keys["allowed"],
                       "--identity", keys["operator"], "--target", str(target),
                       "--all-databases", "--db-socket", server.socket, "--db-user", "root")
            assert done.returncode == 56, done.stderr[-2000:]
            line = one_line(done, "undercloud-restore")
            assert f"Encrypted object {dump.name} of backup" in line
            assert not target.exists()
            assert not set(encrypted["databases"]) & set(run_sql(server, "SHOW DATABASES").split())
        done = cli("verify", *encrypted["where"], "--allowed-signers", keys["allowed"],
                   "--identity", keys["operator"])
        assert done.returncode == 41
        assert dump.name in one_line(done, "undercloud-verify")
    finally:
        store.put(encrypted["container"], dump.name, body)


def test_the_decryption_argv_holds_the_identity_path_only(keys):
    obj = StoredObject(name="b1/filesystem.tar.zst.age", size=1, sha256="", compression="zstd",
                       content="tar")
    with pytest.raises(crypto.IdentityRequired) as none:
        crypto.decrypt_commands(obj)
    assert none.value.exit_code == 59
    decryption = crypto.Decryption(identity_file=keys["operator"], recipient="sha256:x")
    with crypto.decrypting(decryption):
        [command] = crypto.decrypt_commands(obj)
        assert crypto.decrypt_commands(StoredObject(
            name="b1/filesystem.tar.zst", size=1, sha256="", compression="zstd",
            content="tar")) == []
    assert command.argv == ("age", "--decrypt", "-i", keys["operator"])
    assert_no_secret(keys, " ".join(command.argv), decryption.describe())


# ------------------------------------------------------------------------ incremental chains
@pytest.mark.slow
def test_an_encrypted_signed_incremental_chain_verifies_and_restores_with_the_identity(
        keys, source_mariadb, os_env, tmp_path):
    """A full and an incremental, both encrypted and signed: verify with the identity checks
    the chain's links and test-restores; restore brings the tree back as the incremental saw
    it. A forged ancestor manifest stops both (its signature); a lost ancestor archive is a
    verify problem naming it."""
    root = sample.make_files(tmp_path / "undercloud", sample.SampleSize(images_mib=(1,)))
    container = f"ucbtest-{uuid.uuid4().hex[:10]}"
    common = ("--root", str(root), "--container", container, "--db-socket",
              source_mariadb.socket, "--db-user", "root", "--no-prune", "--staging-dir",
              str(tmp_path), "--recipients-file", keys["recipients"], "--signing-key",
              keys["signing"], "--json")
    try:
        full = backup_in_process(*common)
        assert full.returncode == 0, full.stderr
        full_id = json.loads(full.stdout)["backup_id"]
        with open(root / "etc/keystone/keystone.conf", "a") as conf:
            conf.write("[cache]\nenabled = true\n")
        (root / "etc/keystone/added.yaml").write_text("added in level 1\n")
        (root / "etc/hosts").unlink()
        level = backup_in_process(*common)
        assert level.returncode == 0, level.stderr
        summary = json.loads(level.stdout)
        assert (summary["kind"], summary["parent"]) == ("incremental", full_id)
        where = ("--container", container, "--backup-id", summary["backup_id"])
        signed = ("--allowed-signers", keys["allowed"], "--identity", keys["operator"])

        done = cli("verify", *where, *signed, "--json")
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout)
        assert report["chain"] == [full_id, summary["backup_id"]] and report["decrypted"]
        assert report["database"]["loaded"] and report["archive"]["entries"] > 0

        target = tmp_path / "restored"
        done = cli("restore", *where, *signed, "--target", str(target), "--json")
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout)["files"]["chain"] == [full_id, summary["backup_id"]]
        assert describe_tree(target) == describe_tree(root)

        # A Swift-side writer alters the full's manifest: the chain's signatures stop both.
        store = swift_store()
        name = f"{full_id}/manifest.json"
        body = store.get_bytes(container, name)
        store.put(container, name, body.replace(b'"hostname": "', b'"hostname": "x'))
        for flow, prog in (("verify", "undercloud-verify"), ("restore", "undercloud-restore")):
            other = tmp_path / f"forged-{flow}"
            done = cli(flow, *where, *signed, *(("--target", str(other))
                                                if flow == "restore" else ()))
            assert done.returncode == 55, done.stderr[-2000:]
            line = one_line(done, prog)
            assert f"The manifest of backup {full_id} does not match its signature" in line
            assert not other.exists()
        store.put(container, name, body)
        # ... or deletes the full's archive: verify names it as a broken link.
        archive = next(o["name"] for o in json.loads(full.stdout)["objects"]
                       if o["name"].endswith("filesystem.tar.zst.age"))
        store.delete(container, archive)
        done = cli("verify", *where, *signed, "--json")
        assert done.returncode == 41
        assert any(archive in problem for problem in json.loads(done.stdout)["problems"])
    finally:
        remove_container(container)


@pytest.mark.slow
def test_an_object_altered_with_its_unsigned_manifest_is_refused_by_age_naming_it(
        keys, encrypted, tmp_path):
    """Without --allowed-signers nothing vouches for the manifest: a writer who alters a byte
    of the dump and rewrites the manifest's size, ETag and SHA-256 to match passes every hash,
    and age's authentication is what refuses the object (56 on restore, a verify problem)."""
    import hashlib

    from undercloud_backup.store import catalogue

    dump = _dump(encrypted)
    store = swift_store()
    container, backup_id = encrypted["container"], encrypted["backup_id"]
    body = store.get_bytes(container, dump.name)
    manifest_body = store.get_bytes(container, catalogue.manifest_name(backup_id))
    altered = bytearray(body)
    altered[-100] ^= 1  # inside the last age chunk: nothing before it is a complete dump
    store.put(container, dump.name, bytes(altered))
    data = json.loads(manifest_body)
    entry = next(o for o in data["objects"] if o["name"] == dump.name)
    entry["sha256"] = hashlib.sha256(altered).hexdigest()
    entry["etag"] = hashlib.md5(altered, usedforsecurity=False).hexdigest()
    catalogue.put_manifest_body(store, container, backup_id, json.dumps(data).encode())
    try:
        done = cli("verify", *encrypted["where"], "--identity", keys["operator"], "--json")
        assert done.returncode == 41
        problems = json.loads(done.stdout)["problems"]
        assert any(dump.name in p and "age:" in p for p in problems), problems
        with scratch_mariadb("/var/tmp", lifetime_s=600) as server:
            done = cli("restore", *encrypted["where"], "--identity", keys["operator"],
                       "--no-files", "--database", encrypted["databases"][0],
                       "--db-socket", server.socket, "--db-user", "root")
            assert done.returncode == 56, done.stderr[-2000:]
            line = one_line(done, "undercloud-restore")
            assert f"Encrypted object {dump.name}" in line and "age:" in line
            assert "signature was not checked" in done.stdout + done.stderr  # the warning
    finally:
        store.put(container, dump.name, body)
        catalogue.put_manifest_body(store, container, backup_id, manifest_body)


@pytest.mark.slow
def test_a_verify_host_worker_runs_the_decrypted_weekly_verify(keys, encrypted, os_env,
                                                               tmp_path):
    """docs/restore.md "A verify host", on this session's server standing in for the verify
    host's own: the `verify-host` pool, `prefect deploy --name weekly-verify-decrypted` from
    prefect.yaml, a process worker with the Swift credentials, and a run with the identity's
    and allowed signers' paths: it decrypts and test-restores, and no key is in the run."""
    from conftest import PREFECT_API_URL
    from deploy_helpers import Api, stop

    api, prefect = Api(PREFECT_API_URL), str(Path(sys.executable).parent / "prefect")
    env = dict(os.environ, **os_env, PREFECT_WORKER_QUERY_SECONDS="1")
    created = subprocess.run([prefect, "--no-prompt", "work-pool", "create", "verify-host",
                              "--type", "process"], env=env, capture_output=True, text=True)
    assert created.returncode == 0, created.stdout + created.stderr
    log = open(tmp_path / "worker.log", "wb")
    worker = None
    try:
        # The worker starts (a few seconds of imports) while the deployment is made.
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "verify-host"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        deployed = subprocess.run([prefect, "--no-prompt", "deploy", "--name",
                                   "weekly-verify-decrypted"], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        deployment = api("GET", "/deployments/name/verify_backup/weekly-verify-decrypted")
        assert deployment["work_pool_name"] == "verify-host"
        assert deployment["parameters"]["identity"] == "/etc/undercloud-backup/verify/identity"
        run = api("POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {
            "container": encrypted["container"], "identity": keys["operator"],
            "allowed_signers": keys["allowed"]}})
        final = api.wait_final(run["id"], timeout=300)
        assert final["state"]["type"] == "COMPLETED", (
            final["state"], (tmp_path / "worker.log").read_text()[-3000:])
        artifacts = api("POST", "/artifacts/filter", {
            "artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
        report = next(a for a in artifacts if a["key"] == "backup-verification")["data"]
        assert encrypted["backup_id"] in report and "NOT decrypted" not in report
        assert "decrypted with the identity of recipient sha256:" in report
        assert_no_secret(keys, json.dumps(final), json.dumps(artifacts),
                         (tmp_path / "worker.log").read_text())
    finally:
        if worker is not None:
            stop(worker)
        log.close()
        for deployment in api("POST", "/deployments/filter", {
                "work_pools": {"name": {"any_": ["verify-host"]}}}):
            api("DELETE", f"/deployments/{deployment['id']}")
        api("DELETE", "/work_pools/verify-host")
