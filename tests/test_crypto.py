"""Encryption to age recipients and signed manifests, with the real age and ssh-keygen."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from undercloud_backup.core import execute
from undercloud_backup.core.errors import CommandFailed
from undercloud_backup.trust import crypto, signing

pytestmark = pytest.mark.unit

PAYLOAD = b"".join(b"line %d of a database dump\n" % n for n in range(20_000))


def _age_keygen(path: Path) -> tuple[str, str]:
    """A new age identity in ``path``; returns (recipient, identity text)."""
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(path)], check=True,
                               capture_output=True, text=True).stdout.strip()
    return recipient, path.read_text()


def _ssh_keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "x@y", "-f", str(path)],
                   check=True)
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


@pytest.fixture
def keys(tmp_path):
    """An operator and a break-glass age identity, a recipients file listing both, a signing
    key, the allowed-signers file an operator keeps off the node, and a stranger's keys."""
    operator, operator_secret = _age_keygen(tmp_path / "operator.key")
    breakglass, _ = _age_keygen(tmp_path / "breakglass.key")
    stranger, _ = _age_keygen(tmp_path / "stranger.key")
    recipients = tmp_path / "recipients.txt"
    recipients.write_text(f"# operator\n{operator}\n\n# break glass\n{breakglass}\n")
    signer = _ssh_keygen(tmp_path / "signing")
    _ssh_keygen(tmp_path / "other-signing")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'undercloud@node namespaces="undercloud-backup" {signer}\n')
    return {"dir": tmp_path, "recipients": str(recipients), "operator": operator,
            "operator_secret": operator_secret, "breakglass": breakglass, "stranger": stranger,
            "allowed": str(allowed)}


def _encrypt(recipients: str, data: bytes, tmp_path: Path) -> bytes:
    source = tmp_path / "plain"
    source.write_bytes(data)
    with source.open("rb") as stdin, execute.Pipeline(
            [crypto.encrypt_command(recipients)], timeout=60, stdin=stdin) as pipe:
        out = pipe.stdout.read()
        pipe.wait()
    return out


def _decrypt(identity: str, data: bytes, tmp_path: Path) -> bytes:
    source = tmp_path / "cipher"
    source.write_bytes(data)
    with source.open("rb") as stdin, execute.Pipeline(
            [crypto.decrypt_command(identity)], timeout=60, stdin=stdin) as pipe:
        out = pipe.stdout.read()
        pipe.wait()
    return out


# -- recipients ------------------------------------------------------------------------------
def test_recipients_file_parses_with_comments_and_gives_fingerprints_not_keys(keys):
    recipients = crypto.load_recipients(keys["recipients"])
    assert recipients.keys == (keys["operator"], keys["breakglass"])
    section = recipients.manifest_section()
    assert section["format"] == "age"
    # what an operator computes with: printf %s age1... | sha256sum
    assert section["recipients"] == [
        "sha256:" + hashlib.sha256(k.encode()).hexdigest()
        for k in (keys["operator"], keys["breakglass"])]
    assert keys["operator"] not in str(section)


def test_ssh_public_keys_are_recipients_and_their_comment_is_not_part_of_it(tmp_path):
    key = _ssh_keygen(tmp_path / "ssh")
    path = tmp_path / "r"
    path.write_text(Path(f"{tmp_path / 'ssh'}.pub").read_text())
    assert crypto.load_recipients(path).keys == (key,)


@pytest.mark.parametrize("content, why", [
    ("", "lists no public key"),
    ("# only a comment\n", "lists no public key"),
    ("age1notbech32!!\n", "line 1: it is not an age1"),
    ("# ok\nssh-dss AAAAB3NzaC1kc3M=\n", "line 2: it is not an age1"),
    # age's own parser catches what the pattern lets through (a bad Bech32 checksum)
    ("age1" + "q" * 58 + "\n", "age refuses it"),
])
def test_a_recipients_file_that_does_not_parse_is_exit_50_with_one_line(tmp_path, content, why):
    path = tmp_path / "recipients"
    path.write_text(content)
    with pytest.raises(crypto.RecipientsInvalid) as caught:
        crypto.load_recipients(path)
    assert caught.value.exit_code == 50
    assert why in str(caught.value) and "\n" not in str(caught.value)


def test_a_private_key_pasted_into_the_recipients_file_is_refused_without_repeating_it(keys,
                                                                                      tmp_path):
    path = tmp_path / "recipients"
    path.write_text(keys["operator_secret"])
    with pytest.raises(crypto.RecipientsInvalid) as caught:
        crypto.load_recipients(path)
    secret = next(line for line in keys["operator_secret"].splitlines()
                  if line.startswith("AGE-SECRET-KEY"))
    assert "private key" in str(caught.value)
    assert secret not in str(caught.value) and secret[20:40] not in repr(caught.value.fields)


def test_a_missing_recipients_file_is_exit_50(tmp_path):
    with pytest.raises(crypto.RecipientsInvalid, match="No such file"):
        crypto.load_recipients(tmp_path / "absent")


# -- encryption ------------------------------------------------------------------------------
def test_both_recipients_decrypt_what_age_r_wrote_and_nothing_is_on_argv(keys, tmp_path):
    cipher = _encrypt(keys["recipients"], PAYLOAD, tmp_path)
    assert cipher.startswith(b"age-encryption.org/v1\n") and PAYLOAD[:40] not in cipher
    for name in ("operator.key", "breakglass.key"):
        assert _decrypt(str(keys["dir"] / name), cipher, tmp_path) == PAYLOAD
    argv = crypto.decrypt_command(str(keys["dir"] / "operator.key")).argv
    assert not any("AGE-SECRET-KEY" in arg for arg in argv)
    assert crypto.encrypted_leaf("filesystem.tar.zst") == "filesystem.tar.zst.age"


def test_an_identity_is_checked_against_the_manifest_before_any_download(keys):
    recipients = crypto.load_recipients(keys["recipients"]).fingerprints
    for name in ("operator.key", "breakglass.key"):
        crypto.check_identity(str(keys["dir"] / name), backup_id="b1", recipients=recipients)
    with pytest.raises(crypto.WrongIdentity) as caught:
        crypto.check_identity(str(keys["dir"] / "stranger.key"), backup_id="b1",
                              recipients=recipients)
    assert caught.value.exit_code == 52 and "b1" in str(caught.value)
    with pytest.raises(crypto.IdentityMissing) as missing:
        crypto.check_identity(str(keys["dir"] / "absent.key"), backup_id="b1",
                              recipients=recipients)
    assert missing.value.exit_code == 51
    with pytest.raises(crypto.IdentityMissing):  # a recipients file is not an identity
        crypto.check_identity(keys["recipients"], backup_id="b1", recipients=recipients)


def test_an_ssh_key_is_an_identity_for_its_ssh_recipient(tmp_path):
    recipient = _ssh_keygen(tmp_path / "ssh")
    path = tmp_path / "r"
    path.write_text(recipient + "\n")
    recipients = crypto.load_recipients(path)
    crypto.check_identity(str(tmp_path / "ssh"), backup_id="b", recipients=recipients.fingerprints)
    cipher = _encrypt(str(path), PAYLOAD, tmp_path)
    assert _decrypt(str(tmp_path / "ssh"), cipher, tmp_path) == PAYLOAD


def _age_failure(identity: str, cipher: bytes, tmp_path: Path, keys) -> crypto.BackupError:
    with pytest.raises(CommandFailed) as caught:
        _decrypt(identity, cipher, tmp_path)
    return crypto.decryption_error(caught.value, name="b1/filesystem.tar.zst.age",
                                   backup_id="b1", identity_file=identity)


def test_wrong_truncated_and_tampered_objects_each_get_their_exit_status(keys, tmp_path):
    cipher = _encrypt(keys["recipients"], PAYLOAD, tmp_path)
    wrong = _age_failure(str(keys["dir"] / "stranger.key"), cipher, tmp_path, keys)
    assert isinstance(wrong, crypto.WrongIdentity) and wrong.exit_code == 52
    operator = str(keys["dir"] / "operator.key")
    truncated = _age_failure(operator, cipher[: len(cipher) - 100], tmp_path, keys)
    assert isinstance(truncated, signing.ObjectTampered) and truncated.exit_code == 56
    assert "b1/filesystem.tar.zst.age" in str(truncated)
    flipped = bytearray(cipher)
    flipped[len(cipher) // 2] ^= 1
    tampered = _age_failure(operator, bytes(flipped), tmp_path, keys)
    assert isinstance(tampered, signing.ObjectTampered)
    assert "failed to decrypt and authenticate" in str(tampered)
    with pytest.raises(signing.ObjectTampered, match="SHA-256"):
        signing.check_sha256("b1/x.age", "b1", hashlib.sha256(cipher).hexdigest(),
                            hashlib.sha256(bytes(flipped)).hexdigest())


# -- signatures ------------------------------------------------------------------------------
MANIFEST = b'{"backup_id": "b1", "objects": [{"name": "b1/filesystem.tar.zst.age"}]}'


def test_a_signed_manifest_verifies_with_ssh_keygen_as_an_operator_runs_it(keys, tmp_path):
    signature = signing.sign_manifest(MANIFEST, str(keys["dir"] / "signing"))
    assert signing.verify_signature(MANIFEST, signature, backup_id="b1",
                                   allowed_signers=keys["allowed"]) == "undercloud@node"
    # the documented by-hand command, on files, with nothing of ours in between
    (tmp_path / "manifest.json").write_bytes(MANIFEST)
    (tmp_path / "manifest.json.sig").write_bytes(signature)
    with (tmp_path / "manifest.json").open("rb") as stdin:
        done = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", keys["allowed"], "-I",
                               "undercloud@node", "-n", "undercloud-backup", "-s",
                               str(tmp_path / "manifest.json.sig")], stdin=stdin,
                              capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert 'Good "undercloud-backup" signature for undercloud@node' in done.stdout


def test_unsigned_foreign_and_altered_manifests_are_refused_each_with_its_status(keys):
    with pytest.raises(signing.ManifestUnsigned) as unsigned:
        signing.verify_signature(MANIFEST, None, backup_id="b1", allowed_signers=keys["allowed"])
    assert unsigned.value.exit_code == 53 and "b1/manifest.json.sig" in str(unsigned.value)
    foreign = signing.sign_manifest(MANIFEST, str(keys["dir"] / "other-signing"))
    with pytest.raises(signing.SignatureUntrusted) as untrusted:
        signing.verify_signature(MANIFEST, foreign, backup_id="b1",
                                allowed_signers=keys["allowed"])
    assert untrusted.value.exit_code == 54
    signature = signing.sign_manifest(MANIFEST, str(keys["dir"] / "signing"))
    altered = MANIFEST.replace(b"b1/filesystem", b"b1/filesystxm")
    with pytest.raises(signing.SignatureInvalid) as invalid:
        signing.verify_signature(altered, signature, backup_id="b1",
                                allowed_signers=keys["allowed"])
    assert invalid.value.exit_code == 55 and "incorrect signature" in str(invalid.value)
    assert "\r" not in str(invalid.value) and "\n" not in str(invalid.value)  # one line
    with pytest.raises(signing.SignatureUntrusted):  # garbage where the signature should be
        signing.verify_signature(MANIFEST, b"not a signature", backup_id="b1",
                                allowed_signers=keys["allowed"])


def test_a_signature_for_another_namespace_does_not_count(keys, tmp_path):
    """A signature the same key made for something else (git commits) is not a manifest's."""
    done = subprocess.run(["ssh-keygen", "-Y", "sign", "-f", str(keys["dir"] / "signing"),
                           "-n", "git"], input=MANIFEST, capture_output=True, check=True)
    with pytest.raises((signing.SignatureUntrusted, signing.SignatureInvalid)):
        signing.verify_signature(MANIFEST, done.stdout, backup_id="b1",
                                allowed_signers=keys["allowed"])


def test_signing_with_a_missing_or_unusable_key_is_exit_57(keys, tmp_path):
    with pytest.raises(signing.SigningFailed) as missing:
        signing.sign_manifest(MANIFEST, str(tmp_path / "absent"))
    assert missing.value.exit_code == 57
    with pytest.raises(signing.SigningFailed):
        signing.sign_manifest(MANIFEST, keys["recipients"])


def test_exit_statuses_are_distinct_and_in_the_50s():
    classes = [crypto.RecipientsInvalid, crypto.IdentityMissing, crypto.WrongIdentity,
               signing.ManifestUnsigned, signing.SignatureUntrusted, signing.SignatureInvalid,
               signing.ObjectTampered, signing.SigningFailed, crypto.EncryptionRequired,
               crypto.IdentityRequired]
    statuses = [c.exit_code for c in classes]
    assert len(set(statuses)) == len(statuses) and all(50 <= s < 60 for s in statuses)


# -- wiring (pure) ---------------------------------------------------------------------------
def test_an_encrypted_request_pipes_zstd_into_age_and_names_objects_age(keys):
    from undercloud_backup.backup import run as backup
    from undercloud_backup.backup import stages
    from undercloud_backup.backup.request import BackupRequest
    from undercloud_backup.core.manifest import Manifest

    plain = BackupRequest(backup_id="h-1", created_at="now", hostname="h")
    assert [c.name for c in stages.compress_commands(plain)] == ["zstd"]
    assert stages.stored_leaf(plain, "filesystem.tar.zst") == "filesystem.tar.zst"
    assert backup.encryption_section(plain)["format"] == "none"  # said, not implied
    sealed = BackupRequest(backup_id="h-1", created_at="now", hostname="h",
                           recipients_file=keys["recipients"])
    commands = stages.compress_commands(sealed)
    assert [c.argv for c in commands][1] == ("age", "--encrypt", "-R", keys["recipients"])
    assert stages.stored_leaf(sealed, "filesystem.tar.zst") == "filesystem.tar.zst.age"
    section = backup.encryption_section(sealed)
    manifest = Manifest(backup_id="h-1", created_at="now", encryption=section)
    again = Manifest.from_json(manifest.to_json())
    assert again.encryption == section and crypto.is_encrypted(again)
    assert not crypto.is_encrypted(Manifest.from_json(Manifest("h-1", "now").to_json()))


def test_sha256sums_is_what_sha256sum_c_reads(tmp_path):
    from undercloud_backup.core.manifest import Manifest, StoredObject

    body = b"encrypted bytes"
    (tmp_path / "h-1").mkdir()
    (tmp_path / "h-1/filesystem.tar.zst.age").write_bytes(body)
    manifest = Manifest("h-1", "now", objects=[StoredObject(
        name="h-1/filesystem.tar.zst.age", size=len(body),
        sha256=hashlib.sha256(body).hexdigest(), compression="zstd", content="tar")])
    (tmp_path / "SUMS").write_bytes(signing.sha256sums(manifest))
    done = subprocess.run(["sha256sum", "--strict", "-c", "SUMS"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "h-1/filesystem.tar.zst.age: OK" in done.stdout
    (tmp_path / "h-1/filesystem.tar.zst.age").write_bytes(body + b"x")
    assert subprocess.run(["sha256sum", "-c", "SUMS"], cwd=tmp_path,
                          capture_output=True).returncode == 1


# -- encryption required after install --------------------------------------------------------
def test_once_installed_recipients_exist_a_run_naming_none_is_still_encrypted(tmp_path):
    installed = tmp_path / "recipients"
    assert crypto.installed_recipients(str(installed)) is None
    installed.write_text("age1...\n")
    assert crypto.installed_recipients(str(installed)) == str(installed)
    choice = crypto.require_encryption(None, None, str(installed))
    assert choice.recipients_file == str(installed) and choice.plain_reason is None
    # the run's own recipients file wins over the installed one
    assert crypto.require_encryption("/other", None, str(installed)).recipients_file == "/other"


def test_plain_text_needs_an_opt_out_with_a_reason_that_the_manifest_records(tmp_path):
    choice = crypto.require_encryption(None, "  restore drill,\n no keys yet ", "/installed")
    assert choice.recipients_file is None and choice.opted_out
    assert choice.plain_section() == {"format": "none", "recipients": [], "opted_out": True,
                                      "reason": "opted out: restore drill, no keys yet"}
    for blank in ("", "   "):
        with pytest.raises(crypto.EncryptionRequired) as caught:
            crypto.require_encryption(None, blank, "/installed")
        assert caught.value.exit_code == 58 and "needs a reason" in str(caught.value)
    with pytest.raises(crypto.ConfigError, match="not both"):
        crypto.require_encryption("/r", "because", None)
    with pytest.raises(crypto.ConfigError, match="longer than"):
        crypto.require_encryption(None, "x" * 201, None)


def test_without_installed_recipients_a_run_naming_none_is_plain_text_and_says_why():
    choice = crypto.require_encryption(None, None, None)
    assert choice.recipients_file is None and not choice.opted_out
    assert "plain text" in choice.plain_section()["reason"]


def test_an_identity_is_prepared_before_anything_is_read(keys, tmp_path, monkeypatch):
    from undercloud_backup.core.manifest import Manifest

    section = crypto.load_recipients(keys["recipients"]).manifest_section()
    sealed = Manifest(backup_id="b1", created_at="now", encryption=section)
    plain = Manifest(backup_id="b2", created_at="now", encryption={"format": "none"})
    operator = str(keys["dir"] / "operator.key")
    decryption = crypto.prepare_identity(operator, sealed, required=True)
    assert decryption.identity_file == operator
    assert decryption.recipient == section["recipients"][0]
    assert "AGE-SECRET" not in decryption.describe() and operator not in decryption.describe()
    assert crypto.prepare_identity(None, sealed, required=False) is None  # verify goes on
    with pytest.raises(crypto.IdentityRequired) as required:
        crypto.prepare_identity(None, sealed, required=True)
    assert required.value.exit_code == 59 and section["recipients"][0] in str(required.value)
    assert crypto.prepare_identity(operator, plain, required=True) is None
    with pytest.raises(crypto.IdentityMissing):  # a bad file is refused even for plain text
        crypto.prepare_identity(str(tmp_path / "absent"), plain, required=True)
    with pytest.raises(crypto.WrongIdentity):
        crypto.prepare_identity(str(keys["dir"] / "stranger.key"), sealed, required=True)
    # age reads "-" as standard input (the object!): the identity is always a file's path
    monkeypatch.chdir(tmp_path)
    with pytest.raises(crypto.IdentityMissing):
        crypto.prepare_identity("-", sealed, required=True)
    os.chmod(operator, 0o644)
    assert "readable by others" in crypto.identity_warnings(decryption)[0]
    os.chmod(operator, 0o600)
    assert crypto.identity_warnings(decryption) == []
