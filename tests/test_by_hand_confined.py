"""The single-archive by-hand blocks of docs/by-hand.md ("The whole backup" and the encrypted
one) keep a forged full's device node and its links inside a new scratch target, run exactly
as written there; and nothing the docs or the backup's artifact tell an operator to run
extracts with plain ``tar -x`` or into a fixed name under /var/tmp.

The forger holds the worker's signing key (the worker reads it to sign) and writes straight
into Swift; the recipients are public. Every victim is under the test's tmp path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_restore_confinement as confinement
from conftest import REPO, swift_store
from deploy_helpers import scratch_mariadb
from test_restore_confinement import assert_untouched, plain_archive, zstd

from undercloud_backup.core.manifest import Manifest, PathsSection, StoredObject

PRINCIPAL = "undercloud@node"
DOCS = REPO / "docs"
NO_MKNOD = "Cannot mknod: Operation not permitted"
victim = confinement.victim  # a directory outside every target, the forgeries aim at it


def doc_block(marker: str) -> str:
    """The bash block of docs/by-hand.md marked ``marker``, as written there."""
    text = (DOCS / "by-hand.md").read_text()
    found = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```", text, re.S)
    assert found, f"docs/by-hand.md lost its {marker} block"
    return found.group(1)


def confined_tar_definitions() -> list[str]:
    return re.findall(r"^confined_tar\(\) \{.*?^\}\n", (DOCS / "by-hand.md").read_text(),
                      re.S | re.M)


# ------------------------------------------------------------------- what the text says
@pytest.mark.unit
def test_every_documented_extraction_is_confined_and_every_target_unpredictable():
    text = (DOCS / "by-hand.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    definitions = confined_tar_definitions()
    # one definition, the same in each block that extracts, so each runs copied alone
    assert len(definitions) == 3 and len(set(definitions)) == 1, definitions
    for block in blocks:
        body = block.replace(definitions[0], "")
        assert not re.search(r"\btar\s+-x", body), body  # only through confined_tar
        if "confined_tar " in body:
            assert definitions[0] in block
    for page in DOCS.glob("*.md"):
        for fixed in re.findall(r"(?:-C|--target)\s+/var/tmp/[\w.-]+", page.read_text()):
            pytest.fail(f"{page.name}: {fixed}: a name other users can plant in advance")
    backup_md = (DOCS / "backup.md").read_text()
    assert "by hand, `tar -x" not in backup_md and "confined_tar" in backup_md
    assert "undercloud-restore-<id>/" not in (DOCS / "restore.md").read_text()


@pytest.mark.unit
def test_the_artifact_gives_the_confined_commands_into_a_new_directory():
    from flows import backup as flow

    full = Manifest(backup_id="h-0", created_at="t", kind="full",
                    paths=PathsSection(root="/", included=["/etc"]))
    chained = Manifest(backup_id="h-2", created_at="t", kind="incremental", parent="h-1",
                       chain=["h-0", "h-1"], level=2,
                       paths=PathsSection(root="/", included=["/etc"]))
    for manifest in (full, chained):
        text = flow._by_hand_text("c", manifest.backup_id, manifest)
        assert text.startswith("Restore without this tool (docs/by-hand.md")
        assert "T=$(mktemp -d)" in text and 'confined_tar "$T" ' in text, text
        assert not re.search(r"`[^`]*\|\s*tar -x", text) and "/target" not in text, text
        assert "/var/tmp/" not in text.replace("never a fixed name in /var/tmp", "")


# ------------------------------------------------------------------- forged single fulls
def forgery(kind: str, victim: Path) -> bytes:
    keys = [("etc/keystone/fernet-keys/0", tarfile.REGTYPE, "", 0o600, "k"),
            ("etc/pki/ca.pem", tarfile.REGTYPE, "", 0o644, "c"),
            ("root/.my.cnf", tarfile.REGTYPE, "", 0o600, "[client]\n")]
    if kind == "device node":  # /dev/sda-like, readable and writable by every user
        return plain_archive(*keys, ("etc/disk", tarfile.BLKTYPE, "", 0o666, ""))
    return plain_archive(*keys, ("etc/link", tarfile.SYMTYPE, str(victim), 0o777, ""),
                         ("etc/link/pwned", tarfile.REGTYPE, "", 0o4755, "x"),
                         ("etc/hl", tarfile.LNKTYPE, "etc/link/secret", 0o644, ""))


@pytest.fixture(scope="module")
def db_socket() -> Iterator[str]:
    """A MariaDB of the test's own to load the (empty) forged dumps into."""
    with scratch_mariadb() as socket:
        yield socket


@pytest.fixture
def forger(tmp_path) -> dict[str, str]:
    """The node's signing key (which the worker reads), its allowed-signers file, and an age
    identity whose recipient is public."""
    keydir = tmp_path / "keys"
    keydir.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", PRINCIPAL, "-f",
                    str(keydir / "signing")], check=True)
    public = " ".join((keydir / "signing.pub").read_text().split()[:2])
    (keydir / "allowed").write_text(f'{PRINCIPAL} namespaces="undercloud-backup" {public}\n')
    subprocess.run(["age-keygen", "-o", str(keydir / "identity")], check=True,
                   capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(keydir / "identity")], check=True,
                               capture_output=True, text=True).stdout.strip()
    return {"signing": str(keydir / "signing"), "allowed": str(keydir / "allowed"),
            "identity": str(keydir / "identity"), "recipient": recipient}


def sign(forger: dict[str, str], body: bytes) -> bytes:
    return subprocess.run(["ssh-keygen", "-Y", "sign", "-f", forger["signing"], "-n",
                           "undercloud-backup"], input=body, capture_output=True,
                          check=True).stdout


def plant(container: str, backup_id: str, archive: bytes, forger: dict[str, str], *,
          encrypted: bool) -> None:
    """A signed full with ``archive`` as its files and empty dumps, written into Swift."""
    store = swift_store()
    store.ensure_container(container)
    bodies = {"filesystem.tar.zst": zstd(archive),
              "mariadb-all-databases.sql.zst": zstd(b"-- forged\n"),
              "mariadb-users-grants.sql.zst": zstd(b"-- forged\n")}
    if encrypted:
        bodies = {f"{name}.age": subprocess.run(
            ["age", "-r", forger["recipient"]], input=body, capture_output=True,
            check=True).stdout for name, body in bodies.items()}
    objects = []
    for name, body in bodies.items():
        obj = StoredObject(name=f"{backup_id}/{name}", size=len(body),
                           sha256=hashlib.sha256(body).hexdigest(), compression="zstd",
                           content="tar")
        store.put(container, obj.name, body)
        objects.append(obj)
    sums = "".join(f"{o.sha256}  {o.name}\n" for o in objects).encode()
    manifest = json.dumps({"backup_id": backup_id, "kind": "full", "objects": [
        {"name": o.name, "sha256": o.sha256} for o in objects]}).encode()
    for name, body in {"SHA256SUMS": sums, "manifest.json": manifest}.items():
        store.put(container, f"{backup_id}/{name}", body)
        store.put(container, f"{backup_id}/{name}.sig", sign(forger, body))


def run_block(marker: str, workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    workdir.mkdir()
    return subprocess.run(["bash", "-c", doc_block(marker)], cwd=workdir, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


@pytest.mark.parametrize("block", ["by-hand-whole", "by-hand-encrypted"])
@pytest.mark.parametrize("kind", ["device node", "link out"])
def test_a_forged_full_restored_by_hand_stays_in_its_new_target(
        block, kind, container, os_env, db_socket, forger, tmp_path, victim):
    encrypted = block == "by-hand-encrypted"
    backup_id = "forged-full"
    plant(container, backup_id, forgery(kind, victim), forger, encrypted=encrypted)
    target = Path(tempfile.mkdtemp(dir=tmp_path))  # as TARGET=$(mktemp -d)
    done = run_block(block, tmp_path / "work", {
        **os_env, "ID": backup_id, "CONTAINER": container, "TARGET": str(target),
        "DB_SOCKET": db_socket, "ALLOWED": forger["allowed"], "PRINCIPAL": PRINCIPAL,
        "IDENTITY": forger["identity"]})
    output = done.stdout + done.stderr
    assert f'Good "undercloud-backup" signature for {PRINCIPAL}' in output  # it got that far
    assert done.returncode != 0, output
    assert_untouched(victim)
    assert not (target / "etc/disk").exists() and not (target / "etc/hl").exists()
    assert (target / "etc/keystone/fernet-keys/0").read_text() == "k"  # the rest came back
    if kind == "device node":
        assert NO_MKNOD in output, output
    else:  # tar's own refusal within one archive, or the confinement's
        assert "etc/link/pwned: Cannot open" in output, output


def test_into_slash_the_documented_extraction_makes_no_device_node(tmp_path):
    """Nothing can be confined into /; the documented function drops CAP_MKNOD there. The
    member lies under this test's tmp path, so even a regression writes only there."""
    member = f"{str(tmp_path).lstrip('/')}/slash/disk"
    (tmp_path / "slash").mkdir()
    archive = plain_archive((member, tarfile.BLKTYPE, "", 0o666, ""))
    done = subprocess.run(["bash", "-c", confined_tar_definitions()[0]
                           + 'confined_tar / --numeric-owner -p'], input=archive,
                          capture_output=True, timeout=60)
    assert done.returncode != 0 and NO_MKNOD.encode() in done.stderr, done.stderr
    assert not (tmp_path / "slash/disk").exists()
