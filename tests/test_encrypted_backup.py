"""An encrypted, signed backup in real Swift, restored by hand exactly as docs/by-hand.md says.

The operator's procedure uses swift, ssh-keygen -Y verify, sha256sum -c, age -d, zstd -d, tar
and mariadb only; the test runs the documented block verbatim, then shows that a Swift-side
writer who forges the manifest or swaps in an object encrypted to the (public) recipients is
stopped before a byte is restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import sample_undercloud as sample
from conftest import REPO, backup_cli, backup_in_process, describe_tree, mariadb
from test_identity import cli
from test_roundtrip import plain_swift, table_checksums
from test_verify import get_manifest

from undercloud_backup.trust import crypto

PRINCIPAL = "undercloud@node"


def by_hand_block() -> str:
    """The bash block of docs/by-hand.md marked ``by-hand-encrypted``, as written there."""
    text = (REPO / "docs/by-hand.md").read_text()
    found = re.search(r"<!-- by-hand-encrypted -->\n```bash\n(.*?)```", text, re.S)
    assert found, "docs/by-hand.md lost its by-hand block"
    return found.group(1)


def run_by_hand(workdir: Path, target: Path, os_env: dict, **env: str
                ) -> subprocess.CompletedProcess:
    workdir.mkdir(exist_ok=True)
    target.mkdir(exist_ok=True)
    return subprocess.run(["bash", "-c", by_hand_block()], cwd=workdir, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, **os_env, "TARGET": str(target),
                               "DB_SOCKET": "/run/mysqld/mysqld.sock", **env})


def tool(flow: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m flows.verify`` / ``flows.restore`` called in this process: what they find,
    not their process (their CLIs' contract: test_verify, test_restore, test_identity)."""
    return cli(flow, *args)


def last_line(done: subprocess.CompletedProcess) -> str:
    """The operator's one line: the last, after Prefect's own log of the flow run."""
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("undercloud-") and ": error: " in line, done.stderr[-2000:]
    return line


@pytest.fixture
def keys(tmp_path) -> dict[str, str]:
    """Operator and break-glass age identities with their recipients file; the undercloud's
    signing key and the allowed-signers file an operator keeps off the node."""
    keydir = tmp_path / "keys"
    keydir.mkdir()
    recipients = []
    for name in ("operator", "breakglass"):
        subprocess.run(["age-keygen", "-o", str(keydir / name)], check=True,
                       capture_output=True)
        recipients.append(subprocess.run(["age-keygen", "-y", str(keydir / name)], check=True,
                                         capture_output=True, text=True).stdout.strip())
    operator, breakglass = recipients
    (keydir / "recipients").write_text(f"# operator\n{operator}\n# break glass\n{breakglass}\n")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", PRINCIPAL, "-f",
                    str(keydir / "signing")], check=True)
    public = " ".join((keydir / "signing.pub").read_text().split()[:2])
    (keydir / "allowed").write_text(f'{PRINCIPAL} namespaces="undercloud-backup" {public}\n')
    return {"dir": str(keydir), "recipients": str(keydir / "recipients"),
            "operator": str(keydir / "operator"), "breakglass": str(keydir / "breakglass"),
            "signing": str(keydir / "signing"), "allowed": str(keydir / "allowed"),
            "fingerprints": ["sha256:" + hashlib.sha256(r.encode()).hexdigest()
                             for r in recipients]}


@pytest.mark.slow
def test_encrypted_signed_backup_restores_by_hand_and_forgeries_stop_it(
        sample_root, sample_databases, container, db_cnf, os_env, keys, tmp_path):
    before_tables = table_checksums(sample_databases)
    before_tree = describe_tree(sample_root)
    result = backup_in_process("--root", str(sample_root), "--container", container,
                               "--db-defaults-file", db_cnf, "--segment-size", "1MiB",
                               "--no-prune", "--recipients-file", keys["recipients"],
                               "--signing-key", keys["signing"], "--json")
    assert result.returncode == 0, result.stderr
    backup_id = json.loads(result.stdout)["backup_id"]

    conn = plain_swift(os_env)
    manifest_body = conn.get_object(container, f"{backup_id}/manifest.json")[1]
    manifest = json.loads(manifest_body)
    assert manifest["encryption"] == {"format": "age", "recipients": keys["fingerprints"]}
    names = {Path(o["name"]).name for o in manifest["objects"]}
    assert {"filesystem.tar.zst.age", "mariadb-all-databases.sql.zst.age",
            "mariadb-users-grants.sql.zst.age"} <= names
    assert all(name.endswith(".age") for name in names)  # the tar snapshot too: it lists every path
    age_key = Path(keys["recipients"]).read_text().splitlines()[1]
    assert age_key not in manifest_body.decode()  # fingerprints, never keys
    dump = conn.get_object(container, f"{backup_id}/mariadb-all-databases.sql.zst.age")[1]
    assert dump.startswith(b"age-encryption.org/v1\n")

    # The documented procedure, with the break-glass identity, into a scratch target.
    user, host = sample.SAMPLE_USER
    mariadb("".join(f"DROP DATABASE {d};" for d in sample_databases)
            + f"DROP USER '{user}'@'{host}';")
    env = {"ID": backup_id, "CONTAINER": container, "IDENTITY": keys["breakglass"],
           "ALLOWED": keys["allowed"], "PRINCIPAL": PRINCIPAL}
    done = run_by_hand(tmp_path / "first", tmp_path / "restored", os_env, **env)
    assert done.returncode == 0, done.stderr
    assert f'Good "undercloud-backup" signature for {PRINCIPAL}' in done.stderr + done.stdout
    assert describe_tree(tmp_path / "restored") == before_tree
    assert table_checksums(sample_databases) == before_tables
    assert "GRANT SELECT, INSERT, UPDATE" in mariadb(f"SHOW GRANTS FOR '{user}'@'{host}'")

    # The tool's verify on the undercloud: signature, presence, sizes, hashes; no identity.
    where = ("--container", container, "--backup-id", backup_id)
    done = tool("verify", *where, "--allowed-signers", keys["allowed"])
    assert done.returncode == 0, done.stderr
    assert "NOT decrypted" in done.stdout and f"{len(names)} object(s) intact" in done.stdout
    other = Path(keys["dir"]) / "other-allowed"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(Path(keys["dir"]) / "stranger")], check=True)
    stranger = " ".join((Path(keys["dir"]) / "stranger.pub").read_text().split()[:2])
    other.write_text(f"{PRINCIPAL} {stranger}\n")
    done = tool("verify", *where, "--allowed-signers", str(other))
    assert done.returncode == 54 and "not in" in last_line(done)
    # The tool's restore without an identity says how, before writing anything
    # (with one: tests/test_identity.py).
    target = tmp_path / "tool-target"
    done = tool("restore", *where, "--allowed-signers", keys["allowed"], "--target", str(target))
    assert done.returncode == 59 and "--identity FILE" in last_line(done)
    assert not target.exists()

    # A Swift-side writer alters the manifest: the signature check stops the procedure and
    # the tool.
    forged = manifest_body.replace(b'"hostname": "', b'"hostname": "x')
    conn.put_object(container, f"{backup_id}/manifest.json", forged)
    done = run_by_hand(tmp_path / "forged", tmp_path / "target-forged", os_env, **env)
    assert done.returncode != 0 and "Signature verification failed" in done.stderr
    assert not any((tmp_path / "target-forged").iterdir())
    done = tool("verify", *where, "--allowed-signers", keys["allowed"])
    assert done.returncode == 55 and "altered after signing" in last_line(done)
    conn.put_object(container, f"{backup_id}/manifest.json", manifest_body)
    # ... deletes the signature, or replays this signed manifest under another backup's name
    signature = conn.get_object(container, f"{backup_id}/manifest.json.sig")[1]
    conn.delete_object(container, f"{backup_id}/manifest.json.sig")
    done = tool("verify", *where, "--allowed-signers", keys["allowed"])
    assert done.returncode == 53 and "no manifest signature" in last_line(done)
    conn.put_object(container, f"{backup_id}/manifest.json.sig", signature)
    replay = backup_id[:-6] + "ffffff"
    conn.put_object(container, f"{replay}/manifest.json.sig", signature)
    conn.put_object(container, f"{replay}/manifest.json", manifest_body)
    done = tool("verify", "--container", container, "--backup-id", replay,
                "--allowed-signers", keys["allowed"])
    assert done.returncode == 55 and f"signed manifest of {backup_id}" in last_line(done)

    # ... or swaps in an object it encrypted to the public recipients: sha256sum -c stops it
    # before mariadb sees a byte.
    evil = subprocess.run(f"printf 'DROP DATABASE {sample_databases[0]};' | zstd -q | "
                          f"age -R {keys['recipients']}", shell=True, check=True,
                          capture_output=True).stdout
    conn.put_object(container, f"{backup_id}/mariadb-users-grants.sql.zst.age", evil)
    done = run_by_hand(tmp_path / "swapped", tmp_path / "target-swapped", os_env, **env)
    assert done.returncode != 0
    assert "mariadb-users-grants.sql.zst.age: FAILED" in done.stdout
    assert table_checksums(sample_databases) == before_tables
    done = tool("verify", *where, "--allowed-signers", keys["allowed"])
    assert done.returncode == 41 and "mariadb-users-grants.sql.zst.age" in done.stdout


def test_a_bad_recipients_file_or_signing_key_stops_the_backup_before_anything(
        os_env, db_cnf, sample_root, container, keys, tmp_path):
    bad = tmp_path / "recipients"
    secret_line = next(line for line in Path(keys["operator"]).read_text().splitlines()
                       if line.startswith("AGE-SECRET-KEY"))
    bad.write_text(f"# pasted the wrong file\n{secret_line}\n")
    result = backup_cli("--root", str(sample_root), "--container", container,
                        "--db-defaults-file", db_cnf, "--recipients-file", str(bad))
    assert result.returncode == 50, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "line 2" in last and "private key" in last and "Traceback" not in result.stderr
    assert secret_line not in result.stderr + result.stdout
    result = backup_cli("--root", str(sample_root), "--container", container,
                        "--db-defaults-file", db_cnf, "--recipients-file", keys["recipients"],
                        "--signing-key", str(tmp_path / "absent"))
    assert result.returncode == 57, result.stderr
    assert "absent" in result.stderr.strip().splitlines()[-1]
    listing = subprocess.run(["swift", "list"], capture_output=True, text=True,
                             env={**os.environ, **os_env}, check=True).stdout.split()
    assert container not in listing  # nothing was written


@pytest.fixture
def installed_recipients(keys):
    """The recipients install.sh writes (UCB_RECIPIENTS_FILE), removed afterwards."""
    path = Path(crypto.INSTALLED_RECIPIENTS)
    made_dir = not path.parent.exists()
    assert not path.exists(), f"{path} exists already: this machine has an installation"
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    path.write_text(Path(keys["recipients"]).read_text())
    try:
        yield path
    finally:
        path.unlink()
        if made_dir:
            path.parent.rmdir()


def test_once_recipients_are_installed_every_backup_is_encrypted_unless_opted_out_with_a_reason(
        installed_recipients, sample_databases, container, db_cnf, keys):
    def backup(*extra: str, run=backup_in_process) -> subprocess.CompletedProcess:
        return run("--db-only", "--container", container, "--db-defaults-file", db_cnf,
                   "--no-prune", "--json", *extra)

    def refused_backup(*extra: str) -> subprocess.CompletedProcess:
        return backup(*extra, run=lambda *args: cli("backup", *args))

    done = backup()  # names no recipients: the installed ones apply
    assert done.returncode == 0, done.stderr
    manifest = get_manifest(container, json.loads(done.stdout)["backup_id"])
    assert manifest.encryption["format"] == "age"
    assert sorted(manifest.encryption["recipients"]) == sorted(keys["fingerprints"])
    assert all(o.name.endswith(".zst.age") for o in manifest.objects), manifest.objects

    refused = refused_backup("--no-encryption", " ")
    assert refused.returncode == crypto.EncryptionRequired.exit_code == 58, refused.stderr
    assert "--no-encryption needs a reason" in last_line(refused)
    both = refused_backup("--no-encryption", "drill", "--recipients-file", keys["recipients"])
    assert both.returncode == 2 and "not both" in last_line(both)

    plain = backup("--no-encryption", "restore drill on a test node")
    assert plain.returncode == 0, plain.stderr
    manifest = get_manifest(container, json.loads(plain.stdout)["backup_id"])
    assert manifest.encryption == {"format": "none", "recipients": [], "opted_out": True,
                                   "reason": "opted out: restore drill on a test node"}
    assert not any(o.name.endswith(".age") for o in manifest.objects)
    assert "stored in plain text: opted out: restore drill" in plain.stderr


def latest_artifact() -> str:
    """The `undercloud-backup` artifact of the last run, as the UI reads it."""
    import urllib.request

    from conftest import PREFECT_API_URL

    with urllib.request.urlopen(f"{PREFECT_API_URL}/artifacts/undercloud-backup/latest",
                                timeout=30) as response:
        return json.loads(response.read())["data"]


@pytest.fixture
def left_break_glass(installed_recipients, keys):
    """The break-glass identity where install.sh leaves it (root's, 0600), removed afterwards."""
    path = Path(crypto.INSTALLED_BREAK_GLASS)
    assert not os.path.lexists(path), f"{path} exists already: this machine has an installation"
    path.write_bytes(Path(keys["breakglass"]).read_bytes())
    path.chmod(0o600)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def test_a_break_glass_identity_left_on_the_node_warns_every_backup_until_it_is_gone(
        left_break_glass, sample_databases, container, db_cnf, keys):
    """The backup still runs and is encrypted; the run's log (WARNING), its artifact and the
    CLI's last lines say the identity must leave the node, naming the path, never the key;
    once it is gone, nothing says so."""
    def backup() -> subprocess.CompletedProcess:
        return cli("backup", "--db-only", "--container", container, "--db-defaults-file",
                   db_cnf, "--no-prune", "--json")

    warning = f"the break-glass identity {left_break_glass} is still on this node"
    done = backup()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [w for w in result["warnings"] if warning in w] == result["warnings"] != []
    assert get_manifest(container, result["backup_id"]).encryption["format"] == "age"
    assert f"WARNING: {warning}" in done.stderr.strip().splitlines()[-1]
    assert re.search(rf"WARNING .*{re.escape(warning)}", done.stderr)  # the run's log
    artifact = latest_artifact()
    assert result["backup_id"] in artifact and f"**WARNING: {warning}" in artifact
    secret = Path(keys["breakglass"]).read_text().strip().splitlines()[-1]
    assert secret.startswith("AGE-SECRET-KEY-")
    assert secret not in done.stdout + done.stderr + artifact

    left_break_glass.unlink()  # moved off the node
    done = backup()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["warnings"] == []
    assert "break-glass" not in done.stderr and "break-glass" not in latest_artifact()


def test_an_install_that_chose_plain_text_records_its_reason_and_gives_no_links(
        sample_databases, container, db_cnf):
    """install.sh with UCB_NO_ENCRYPTION=REASON writes the reason (no recipients): every
    backup is plain text, its manifest and artifact record the reason, and the artifact gives
    no download link, only how to download with the Swift credentials."""
    marker = Path(crypto.INSTALLED_NO_ENCRYPTION)
    assert not os.path.lexists(crypto.INSTALLED_RECIPIENTS) and not os.path.lexists(marker)
    made_dir = not marker.parent.exists()
    marker.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    marker.write_text("lab node, no secrets\n")
    try:
        done = backup_in_process("--db-only", "--container", container, "--db-defaults-file",
                                 db_cnf, "--no-prune", "--json")
    finally:
        marker.unlink()
        if made_dir:
            marker.parent.rmdir()
    assert done.returncode == 0, done.stderr
    backup_id = json.loads(done.stdout)["backup_id"]
    manifest = get_manifest(container, backup_id)
    assert manifest.encryption == {"format": "none", "recipients": [], "opted_out": True,
                                   "reason": "opted out at install: lab node, no secrets"}
    artifact = latest_artifact()
    assert "NONE: stored in plain text** (opted out at install: lab node" in artifact
    assert "temp_url_sig" not in artifact and "no links: stored in plain text" in artifact
    assert f"swift download {container} --prefix {backup_id}/" in artifact
