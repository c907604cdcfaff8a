"""Signatures across a binary-log chain: verify of a nightly test-restores its full dump and
replays the nightlies' logs, so every manifest of that chain must be the node's own, not only
the nightly's. A Swift-side writer who edits the full's manifest stops verify before anything
is loaded."""

from __future__ import annotations

import json
import subprocess

import pytest
from binlog_server import BinlogServer, running, sample_database
from conftest import backup_in_process, cli_in_process, swift_store

DB = "ucb_binlog_signed"
PRINCIPAL = "undercloud@node"


@pytest.fixture(scope="module")
def source(services):
    yield from running(BinlogServer(server_id=11))


@pytest.fixture
def database(source):
    yield from sample_database(DB, source)


@pytest.fixture
def keys(tmp_path) -> dict[str, str]:
    """The node's signing key and the allowed-signers file an operator keeps."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", PRINCIPAL, "-f",
                    str(tmp_path / "signing")], check=True)
    public = " ".join((tmp_path / "signing.pub").read_text().split()[:2])
    (tmp_path / "allowed").write_text(f'{PRINCIPAL} namespaces="undercloud-backup" {public}\n')
    return {"signing": str(tmp_path / "signing"), "allowed": str(tmp_path / "allowed")}


def signed_backup(server: BinlogServer, container: str, key: str) -> dict:
    result = backup_in_process("--db-only", "--db-defaults-file", str(server.cnf),
                               "--container", container, "--no-prune", "--signing-key", key,
                               "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.slow
def test_verify_of_a_nightly_refuses_a_forged_full_of_its_chain(source, database, container,
                                                                 keys):
    full = signed_backup(source, container, keys["signing"])
    source.sql(f"INSERT INTO {database}.t SELECT seq, 'night' FROM {database}.seq_1001_to_1200")
    nightly = signed_backup(source, container, keys["signing"])
    assert (full["database_kind"], nightly["database_kind"]) == ("dump", "binlog")
    verify = ("verify", "--container", container, "--backup-id", nightly["backup_id"],
              "--allowed-signers", keys["allowed"], "--json")
    done = cli_in_process(*verify)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "signatures of 2 chained backups good" in done.stderr

    # The same JSON, other bytes: a reader that skips the signature sees nothing wrong.
    store = swift_store()
    name = f"{full['backup_id']}/manifest.json"
    body = store.get_bytes(container, name)
    store.put(container, name, body.replace(b'"hostname": ', b'"hostname":  ', 1))
    done = cli_in_process(*verify)
    assert done.returncode == 55, done.stderr[-3000:]
    assert (f"The manifest of backup {full['backup_id']} does not match its signature"
            in done.stderr.strip().splitlines()[-1])
    assert "loaded" not in done.stdout
