"""Signed manifests and SHA256SUMS: what makes a backup authentic.

The manifest is signed with ``ssh-keygen -Y sign -n undercloud-backup``; the signature is
``<backup_id>/manifest.json.sig``, written before the manifest (the commit point), beside
``SHA256SUMS`` and its own signature so that an operator checks a backup with standard tools
(docs/by-hand.md): ``ssh-keygen -Y verify`` and ``sha256sum -c``. Keys are only ever named by
path: ssh-keygen reads them from files, never from argv.

install.sh makes the node's key once (``INSTALLED_SIGNING_KEY``, root:undercloud-backup 0640,
so that the worker can sign) and the allowed-signers file with its public half
(``INSTALLED_ALLOWED_SIGNERS``, 0644): from then on a backup that names no key is signed with
it, and verify and restore that name no allowed-signers file check against it.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from undercloud_backup.core import execute
from undercloud_backup.core.errors import (
    BackupError,
    CommandFailed,
    ConfigError,
    NotFound,
    one_line,
)
from undercloud_backup.core.execute import Command
from undercloud_backup.core.manifest import MANIFEST_NAME, Manifest

NAMESPACE = "undercloud-backup"  # ssh-keygen -Y namespace: a signature made for git won't do
SIGNATURE_SUFFIX = ".sig"
SUMS = "SHA256SUMS"
TOOL_TIMEOUT = 60.0
# Installed once by install.sh (as crypto.INSTALLED_RECIPIENTS): the key every backup is signed
# with unless a run names another, and the allowed signers verify and restore check against.
INSTALLED_SIGNING_KEY = "/etc/undercloud-backup/signing-key"
INSTALLED_ALLOWED_SIGNERS = "/etc/undercloud-backup/allowed_signers"
SIGNATURE_LIMIT = 64 << 10  # what is read of a .sig object: a signature is a few hundred bytes


class ManifestUnsigned(BackupError):
    """Backup {backup_id} has no manifest signature ({name}): refusing a manifest nobody vouches for; it may be forged."""  # noqa: E501

    exit_code = 53


class SignatureUntrusted(BackupError):
    """The manifest of backup {backup_id} is signed by a key that is not in {allowed_signers}: refusing it; it may be forged."""  # noqa: E501

    exit_code = 54


class SignatureInvalid(BackupError):
    """The manifest of backup {backup_id} does not match its signature ({detail}): it was altered after signing; refusing it."""  # noqa: E501

    exit_code = 55


class ObjectTampered(BackupError):
    """Encrypted object {name} of backup {backup_id} is not what its manifest says: {detail}; refusing to use it."""  # noqa: E501

    exit_code = 56


class SigningFailed(BackupError):
    """Cannot sign the manifest with signing key {path}: {detail}; the backup is not complete."""  # noqa: E501

    exit_code = 57


def installed_signing_key(path: str = INSTALLED_SIGNING_KEY) -> str | None:
    """The signing key install.sh made, if there is one and this user may read it (the worker
    through its group, root); else None and the backup is not signed (see unsigned_warning)."""
    return path if os.path.isfile(path) and os.access(path, os.R_OK) else None


def unsigned_warning(path: str = INSTALLED_SIGNING_KEY) -> str | None:
    """Why a backup that names no key is not signed although install made one; None when
    no key is installed (nothing to say: a test bed, a machine that never ran install.sh)."""
    if not os.path.lexists(path):
        return None
    return (f"this backup is NOT signed: the installed signing key {path} is not readable by "
            f"uid {os.getuid()} (run it as the worker's user or root, or give --signing-key); "
            "verify and restore against the installed allowed signers will refuse it (53)")


def installed_allowed_signers(path: str = INSTALLED_ALLOWED_SIGNERS) -> str | None:
    """The allowed-signers file install.sh configured, if it did (its existence is the
    setting: an unreadable one is refused by verify, never skipped)."""
    return path if os.path.lexists(path) else None


def allowed_signers_for(allowed_signers: str | None, check_signature: bool = True,
                        installed_default: str | None = None) -> str | None:
    """The allowed-signers file verify and restore check the manifest against: the one given,
    else the installed one; None (not checked) only without either, or when the run turns
    the check off (--no-signature-check: a backup made before signing was installed)."""
    if not check_signature:
        if allowed_signers:
            raise ConfigError(detail="choose --allowed-signers or --no-signature-check, "
                                     "not both")
        return None
    return allowed_signers or installed_default


def sign_command(signing_key: str) -> Command:
    """``ssh-keygen -Y sign``: the manifest on stdin, the signature on stdout."""
    return Command(("ssh-keygen", "-Y", "sign", "-f", signing_key, "-n", NAMESPACE),
                   name="ssh-keygen -Y sign")


def find_principals_command(allowed_signers: str, signature_file: str) -> Command:
    return Command(("ssh-keygen", "-Y", "find-principals", "-f", allowed_signers,
                    "-s", signature_file), name="ssh-keygen -Y find-principals")


def verify_command(allowed_signers: str, principal: str, signature_file: str) -> Command:
    """``ssh-keygen -Y verify``: the manifest on stdin, exactly as an operator runs it."""
    return Command(("ssh-keygen", "-Y", "verify", "-f", allowed_signers, "-I", principal,
                    "-n", NAMESPACE, "-s", signature_file), name="ssh-keygen -Y verify")


def signature_name(backup_id: str) -> str:
    return f"{backup_id}/manifest.json{SIGNATURE_SUFFIX}"


def sums_name(backup_id: str) -> str:
    return f"{backup_id}/{SUMS}"


def sha256sums(manifest: Manifest) -> bytes:
    """``sha256sum -c`` input for every stored object (names as ``swift download`` writes
    them under its output directory): the by-hand check needs no JSON parser."""
    return "".join(f"{o.sha256}  {o.name}\n" for o in manifest.objects).encode()


def signed_objects(manifest: Manifest, signing_key: str) -> list[tuple[str, bytes]]:
    """What goes to Swift before the manifest: SHA256SUMS, its signature, the manifest's."""
    sums = sha256sums(manifest)
    return [(sums_name(manifest.backup_id), sums),
            (sums_name(manifest.backup_id) + SIGNATURE_SUFFIX, sign_manifest(sums, signing_key)),
            (signature_name(manifest.backup_id),
             sign_manifest(manifest.to_json(), signing_key))]


def sign_manifest(manifest_json: bytes, signing_key: str) -> bytes:
    """The ``ssh-keygen -Y sign`` signature of exactly these manifest bytes."""
    if not os.access(signing_key, os.R_OK):
        raise SigningFailed(path=signing_key, detail="the file is missing or unreadable")
    with tempfile.TemporaryFile() as body, _key_file(signing_key) as (key_path, fds):
        body.write(manifest_json)
        body.seek(0)
        try:
            with execute.Pipeline([sign_command(key_path)], timeout=TOOL_TIMEOUT,
                                  stdin=body, pass_fds=fds) as pipe:
                assert pipe.stdout is not None
                signature = pipe.stdout.read()
                pipe.wait()
        except CommandFailed as error:
            raise SigningFailed(path=signing_key,
                                detail=one_line(error.fields.get("stderr"))) from None
    if b"BEGIN SSH SIGNATURE" not in signature:
        raise SigningFailed(path=signing_key, detail="ssh-keygen wrote no signature")
    return signature


def signer_key(signature: bytes) -> bytes:
    """The public key inside an armored SSH signature (OpenSSH's PROTOCOL.sshsig: magic,
    version, then the key as a length-prefixed blob); b"" when it is not one."""
    lines = signature.decode("ascii", "replace").splitlines()
    try:
        blob = base64.b64decode("".join(ln for ln in lines if not ln.startswith("-----")),
                                validate=True)
        (size,) = struct.unpack_from(">I", blob, 10)
    except (binascii.Error, ValueError, struct.error):
        return b""
    key = blob[14:14 + size]
    return key if blob.startswith(b"SSHSIG") and len(key) == size else b""


@contextmanager
def _key_file(signing_key: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """The path ssh-keygen reads the key from, and the descriptors it needs.

    ssh-keygen ignores a private key file owned by its own user that anyone else may read.
    The installed key is root's and readable by the worker's group (0640) on purpose, so when
    root signs with it (an ad hoc ``python -m flows.backup``), ssh-keygen reads a private copy
    (0600) in memory, ``/dev/fd/N`` of a memfd: never a file on disk, never an argument. A key
    that others (not only its group) may read is left for ssh-keygen to refuse (57).
    """
    try:
        st = os.stat(signing_key)
    except OSError:
        st = None
    if (st is None or st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode)
            or not st.st_mode & 0o070 or st.st_mode & 0o007):
        yield signing_key, ()
        return
    fd = os.memfd_create("ucb-signing-key", os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)
        with open(signing_key, "rb") as key:
            data = key.read()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        yield f"/dev/fd/{fd}", (fd,)
    finally:
        os.close(fd)


def verify_signature(manifest_json: bytes, signature: bytes | None, *, backup_id: str,
                     allowed_signers: str) -> str:
    """Check the manifest's signature against an allowed-signers file; return the principal.

    ``signature`` None means the ``.sig`` object is absent. find-principals tells a key that
    is not allowed (54) from a manifest altered after signing (55).
    """
    if signature is None:
        raise ManifestUnsigned(backup_id=backup_id, name=signature_name(backup_id))
    if not os.access(allowed_signers, os.R_OK):
        raise SignatureUntrusted(backup_id=backup_id,
                                 allowed_signers=f"{allowed_signers} (missing or unreadable)")
    with tempfile.TemporaryDirectory(prefix="ucb-sig-") as scratch:
        sig_file = os.path.join(scratch, "manifest.json.sig")
        Path(sig_file).write_bytes(signature)
        try:
            found = execute.capture(find_principals_command(allowed_signers, sig_file),
                                    timeout=TOOL_TIMEOUT)
        except CommandFailed:
            raise SignatureUntrusted(backup_id=backup_id,
                                     allowed_signers=_which(allowed_signers)) from None
        principal = found.decode("utf-8", "replace").splitlines()[0].strip() if found else ""
        if not principal:
            raise SignatureUntrusted(backup_id=backup_id, allowed_signers=_which(allowed_signers))
        with tempfile.TemporaryFile() as body:
            body.write(manifest_json)
            body.seek(0)
            try:
                with execute.Pipeline([verify_command(allowed_signers, principal, sig_file)],
                                      timeout=TOOL_TIMEOUT, stdin=body,
                                      stdout=subprocess.DEVNULL) as pipe:
                    pipe.wait()
            except CommandFailed as error:
                raise SignatureInvalid(backup_id=backup_id,
                                       detail=one_line(error.fields.get("stderr"))) from None
    return principal


def _which(allowed_signers: str) -> str:
    """An allowed-signers file as a refusal names it: the installed one says what else to try."""
    if allowed_signers != INSTALLED_ALLOWED_SIGNERS:
        return allowed_signers
    return (f"{allowed_signers}, this node's (a backup signed before the node was reinstalled "
            "or its key replaced needs the allowed_signers copy kept off the node: "
            "--allowed-signers FILE)")


def check_sha256(name: str, backup_id: str, expected: str, actual: str) -> None:
    if expected and expected != actual:
        raise ObjectTampered(name=name, backup_id=backup_id,
                             detail=f"SHA-256 {actual} where the manifest says {expected}")


def load_signed_manifest(store, container: str, backup_id: str,
                         allowed_signers: str) -> Manifest:
    """The manifest of ``backup_id``, parsed from exactly the bytes whose signature passed.

    A validly signed manifest stored under another backup's name (a replay) is refused too.
    NotFound for the manifest itself is the caller's (no such backup).
    """
    body = store.get_bytes(container, f"{backup_id}/{MANIFEST_NAME}")
    try:
        signature = store.get_bytes(container, signature_name(backup_id), what="signature",
                                    limit=SIGNATURE_LIMIT)
    except NotFound:
        signature = None
    verify_signature(body, signature, backup_id=backup_id, allowed_signers=allowed_signers)
    manifest = Manifest.from_json(body)
    strays = [o.name for o in manifest.objects if not o.name.startswith(f"{backup_id}/")]
    if manifest.backup_id != backup_id or strays:
        raise SignatureInvalid(backup_id=backup_id, detail=(
            f"it is the signed manifest of {manifest.backup_id}, stored under {backup_id}"))
    return manifest
