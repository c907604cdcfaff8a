"""Encryption to age recipients (whoever reads the container reads no data); signing.py signs.

The undercloud holds public keys only: an age recipients file (one public key a line, ``#``
comments). Identities (age private keys) stay offline, so a compromised undercloud cannot read
its own older backups. Every stored object goes through ``zstd | age -R FILE`` and is named
``<leaf>.age``; the manifest records the SHA-256 of the stored (encrypted) bytes.

An operator decrypts with standard tools (docs/by-hand.md): ``age -d -i``. Identities are only
ever named by path: age reads them from files, never from argv.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from undercloud_backup.core import execute
from undercloud_backup.core.errors import BackupError, CommandFailed, ConfigError, one_line
from undercloud_backup.core.execute import Command
from undercloud_backup.core.manifest import Manifest, StoredObject
from undercloud_backup.trust.signing import TOOL_TIMEOUT, ObjectTampered

FORMAT = "age"
SUFFIX = ".age"
DECRYPT_STAGE = "age -d"
# Installed once by install.sh (root-owned, public keys only): when it exists, every backup is
# encrypted to it unless the run names other recipients or opts out with a reason.
INSTALLED_RECIPIENTS = "/etc/undercloud-backup/recipients"
# Made by install.sh when it was given no recipients: the break-glass identity, shown once and
# left here (root's, 0600) until the operator moves it off the node; every backup warns until
# it is gone. The reason install recorded for plain text (UCB_NO_ENCRYPTION), if it did.
INSTALLED_BREAK_GLASS = "/etc/undercloud-backup/break-glass.agekey"
INSTALLED_NO_ENCRYPTION = "/etc/undercloud-backup/no-encryption"

# age's native X25519 recipients are Bech32 with the "age" prefix; plugin recipients are
# "age1<plugin>1..."; both are lower-case Bech32 characters after "age1".
_AGE_RECIPIENT = re.compile(r"age1[02-9ac-hj-np-z]{20,}(1[02-9ac-hj-np-z]+)?")
_SSH_RECIPIENT = re.compile(r"(ssh-ed25519|ssh-rsa) [A-Za-z0-9+/]+={0,3}")


class RecipientsInvalid(BackupError):
    """Recipients file {path} is not an age recipients file: {detail}; put one public key (age1... or ssh-ed25519/ssh-rsa) a line."""  # noqa: E501

    exit_code = 50


class IdentityMissing(BackupError):
    """Identity file {path} cannot be used: {detail}; pass the age identity (private key) that the backup was encrypted to with --identity."""  # noqa: E501

    exit_code = 51


class WrongIdentity(BackupError):
    """Identity file {path} holds none of the keys backup {backup_id} was encrypted to (recipients {recipients}); use the operator's or the break-glass identity."""  # noqa: E501

    exit_code = 52


class EncryptionRequired(BackupError):
    """{detail}: give --recipients-file FILE (age public keys), or --no-encryption REASON to store this backup in plain text on purpose."""  # noqa: E501

    exit_code = 58


class IdentityRequired(BackupError):
    """Backup {backup_id} is encrypted (age, to {recipients}): pass --identity FILE with the operator's or the break-glass age identity, or restore it by hand as docs/by-hand.md says."""  # noqa: E501

    exit_code = 59


def is_encrypted(manifest: Manifest) -> bool:
    return (manifest.encryption or {}).get("format") == FORMAT


# -- recipients ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipients:
    """A parsed recipients file: the path age reads and the public keys' fingerprints."""

    path: str
    keys: tuple[str, ...]

    @property
    def fingerprints(self) -> list[str]:
        return [fingerprint(key) for key in self.keys]

    def manifest_section(self) -> dict:
        """``"encryption"`` of the manifest: fingerprints only, never the keys."""
        return {"format": FORMAT, "recipients": self.fingerprints}


def fingerprint(recipient: str) -> str:
    """``sha256:<hex>`` of the recipient as written without its comment; an operator gets the
    same with ``printf %s 'age1...' | sha256sum``."""
    return "sha256:" + hashlib.sha256(recipient.encode()).hexdigest()


def parse_recipient_line(line: str) -> str | None:
    """The recipient on ``line`` (None for a blank or comment line); ValueError names why not.

    The message never repeats the line: a private key pasted by mistake must not reach a log.
    """
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if text.upper().startswith("AGE-SECRET-KEY-") or "PRIVATE KEY" in text:
        raise ValueError("it holds a private key, which must never be on the undercloud")
    if _AGE_RECIPIENT.fullmatch(text):
        return text
    ssh = _SSH_RECIPIENT.match(text)
    if ssh and (len(text) == ssh.end() or text[ssh.end()] == " "):
        return ssh.group(0)
    raise ValueError("it is not an age1... or ssh-ed25519/ssh-rsa public key")


def load_recipients(path: str | os.PathLike) -> Recipients:
    """Parse and check a recipients file; age itself confirms it (an empty encryption)."""
    name = str(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipientsInvalid(path=name, detail=getattr(error, "strerror", None)
                                or "not UTF-8 text") from None
    keys: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            key = parse_recipient_line(line)
        except ValueError as error:
            raise RecipientsInvalid(path=name, detail=f"line {number}: {error}") from None
        if key is not None and key not in keys:
            keys.append(key)
    if not keys:
        raise RecipientsInvalid(path=name, detail="it lists no public key")
    try:
        execute.run(encrypt_command(name), timeout=TOOL_TIMEOUT)
    except CommandFailed as error:
        raise RecipientsInvalid(path=name, detail=f"age refuses it ({_age_said(error)})") from None
    return Recipients(path=name, keys=tuple(keys))


# -- commands, as data -----------------------------------------------------------------------
def encrypt_command(recipients_file: str) -> Command:
    """``age -R FILE``: stdin to stdout, encrypted to every key in the file."""
    return Command(("age", "--encrypt", "-R", recipients_file), name="age -R")


def decrypt_command(identity_file: str) -> Command:
    """``age -d -i FILE``: the identity is a path, never a key on argv. Killed by SIGPIPE
    (whatever reads its output stopped) is not its failure: the reader's status says why."""
    return Command(("age", "--decrypt", "-i", identity_file), name=DECRYPT_STAGE,
                   ok_statuses=frozenset({0, -signal.SIGPIPE}))


def identity_recipients_commands(identity_file: str) -> tuple[Command, Command]:
    """The public keys of an identity file: native age identities, else an SSH private key."""
    return (Command(("age-keygen", "-y", identity_file), name="age-keygen -y"),
            # -P "": a passphrase-protected key fails instead of prompting on a terminal
            Command(("ssh-keygen", "-y", "-P", "", "-f", identity_file), name="ssh-keygen -y"))


def encrypted_leaf(leaf: str) -> str:
    """``filesystem.tar.zst`` -> ``filesystem.tar.zst.age``."""
    return leaf if leaf.endswith(SUFFIX) else leaf + SUFFIX


def _age_said(error: CommandFailed) -> str:
    lines = [part.strip() for part in str(error.fields.get("stderr", "")).split(" | ")]
    said = [line.removeprefix("age: error: ") for line in lines
            if line and "report unexpected" not in line]
    return one_line("; ".join(said))


# -- identities ------------------------------------------------------------------------------
def identity_fingerprints(identity_file: str) -> set[str]:
    """Fingerprints of the public keys an identity file decrypts for (nothing is decrypted)."""
    if not os.path.isfile(identity_file) or not os.access(identity_file, os.R_OK):
        raise IdentityMissing(path=identity_file, detail="the file is missing or unreadable")
    native, ssh = identity_recipients_commands(identity_file)
    for command in (native, ssh):
        try:
            output = execute.capture(command, timeout=TOOL_TIMEOUT)
        except CommandFailed:
            continue
        return {fingerprint(key) for key in _recipients_in(output.decode("utf-8", "replace"))}
    raise IdentityMissing(path=identity_file,
                          detail="it holds no age identity or unencrypted SSH private key")


def _recipients_in(text: str) -> list[str]:
    keys = []
    for line in text.splitlines():
        try:
            key = parse_recipient_line(line)
        except ValueError:
            continue  # a key type age cannot encrypt to (ecdsa): it matches no recipient
        if key:
            keys.append(key)
    return keys


def check_identity(identity_file: str, *, backup_id: str, recipients: list[str]) -> str:
    """Refuse, before any download, an identity the backup was not encrypted to; return the
    fingerprint of the recipient it matches."""
    matching = sorted(identity_fingerprints(identity_file) & set(recipients))
    if not matching:
        raise WrongIdentity(path=identity_file, backup_id=backup_id,
                            recipients=", ".join(recipients) or "none recorded")
    return matching[0]


@dataclass(frozen=True)
class Decryption:
    """How a run decrypts: the identity file (a path; age reads the key) and the recipient
    fingerprint it matched, which is all a report or an artifact ever names."""

    identity_file: str
    recipient: str

    def describe(self) -> str:
        return f"decrypted with the identity of recipient {self.recipient}"


def recipients_of(manifest: Manifest) -> list[str]:
    return list((manifest.encryption or {}).get("recipients") or [])


def prepare_identity(identity_file: str | None, manifest: Manifest, *,
                     required: bool) -> Decryption | None:
    """Check an ``--identity`` before anything is read or written.

    The file must be readable and hold an age identity or an unencrypted SSH private key
    (exit 51), one of the keys the backup was encrypted to (52). Without one, an encrypted
    backup is refused when ``required`` (restore, exit 59); verify goes on without
    decrypting. None: nothing to decrypt with (a plain backup, or no identity given).
    """
    path = os.path.abspath(identity_file) if identity_file else None  # never age's "-"
    found = identity_fingerprints(path) if path else set()
    if not is_encrypted(manifest):
        return None
    recipients = recipients_of(manifest)
    if path is None:
        if required:
            raise IdentityRequired(backup_id=manifest.backup_id,
                                   recipients=", ".join(recipients) or "no recipient recorded")
        return None
    matching = sorted(found & set(recipients))
    if not matching:
        raise WrongIdentity(path=path, backup_id=manifest.backup_id,
                            recipients=", ".join(recipients) or "none recorded")
    return Decryption(identity_file=path, recipient=matching[0])


def identity_warnings(decryption: Decryption | None) -> list[str]:
    """An identity others can read is a key others hold: say so (the path, never the key)."""
    if decryption is None:
        return []
    mode = stat.S_IMODE(os.stat(decryption.identity_file).st_mode)
    if mode & 0o077:
        return [f"identity file {decryption.identity_file} is readable by others (mode "
                f"{mode:04o}): chmod 600 it"]
    return []


# The decryption of the current flow run: set by the verify and restore flows around their
# tasks (Prefect runs a submitted task in a copy of the submitting context), read where a
# stored object is streamed (:mod:`undercloud_backup.store.streams`).
_DECRYPTION: ContextVar[Decryption | None] = ContextVar("ucb_decryption", default=None)


@contextmanager
def decrypting(decryption: Decryption | None) -> Iterator[None]:
    """Decrypt ``.age`` objects streamed inside the block with ``decryption``."""
    token = _DECRYPTION.set(decryption)
    try:
        yield
    finally:
        _DECRYPTION.reset(token)


def is_encrypted_object(obj: StoredObject) -> bool:
    return obj.name.endswith(SUFFIX)


def decrypt_commands(obj: StoredObject) -> list[Command]:
    """The ``age -d`` stage in front of ``zstd -d`` for an encrypted object; none otherwise.
    An encrypted object with no identity in force is refused before it is read."""
    if not is_encrypted_object(obj):
        return []
    decryption = _DECRYPTION.get()
    if decryption is None:
        raise IdentityRequired(backup_id=obj.name.partition("/")[0],
                               recipients="see the manifest")
    return [decrypt_command(decryption.identity_file)]


def decryption_error(error: CommandFailed, *, name: str, backup_id: str,
                     identity_file: str) -> BackupError:
    """The error for a failed ``age -d`` stage: wrong key, or an object that is not intact."""
    said = _age_said(error)
    if "no identity matched" in said:
        return WrongIdentity(path=identity_file, backup_id=backup_id, recipients="see manifest")
    if "reading" in said and "failed to open" in said:
        return IdentityMissing(path=identity_file, detail="age cannot open it")
    return ObjectTampered(name=name, backup_id=backup_id, detail=f"age: {said}")


def stream_decryption_error(error: BackupError | None, obj: StoredObject) -> BackupError | None:
    """The decryption error behind a failed ``age -d | zstd -d`` pipe, if age failed."""
    if not isinstance(error, CommandFailed) or error.fields.get("name") != DECRYPT_STAGE:
        return None
    decryption = _DECRYPTION.get()
    return decryption_error(error, name=obj.name, backup_id=obj.name.partition("/")[0],
                            identity_file=decryption.identity_file if decryption else "?")


# -- encryption required after install ---------------------------------------------------------
@dataclass(frozen=True)
class EncryptionChoice:
    """What a backup encrypts to: a recipients file, or plain text and why (the manifest's
    and the artifact's words)."""

    recipients_file: str | None
    plain_reason: str | None = None
    opted_out: bool = False

    def plain_section(self) -> dict:
        """The manifest's ``encryption`` of a plain-text backup: said, with its reason."""
        return {"format": "none", "recipients": [], "reason": self.plain_reason,
                "opted_out": self.opted_out}


MAX_REASON = 200


def installed_recipients(path: str = INSTALLED_RECIPIENTS) -> str | None:
    """The recipients file install.sh configured, if it did (its existence is the setting)."""
    return path if os.path.lexists(path) else None


def installed_opt_out(path: str = INSTALLED_NO_ENCRYPTION) -> str | None:
    """The reason install recorded for storing backups in plain text, if it did."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            reason = " ".join(file.read(MAX_REASON + 1).split())[:MAX_REASON]
    except OSError:
        return None
    return reason or "no reason recorded"


def break_glass_warning(path: str = INSTALLED_BREAK_GLASS) -> str | None:
    """Why a node that still holds the break-glass identity install made is a risk, if it does
    (the path only: the worker cannot read the file, and nothing here ever reads it)."""
    if not os.path.lexists(path):
        return None
    return (f"the break-glass identity {path} is still on this node: whoever becomes root here "
            "can decrypt every backup with it; copy it to the safe, then remove it from the node "
            f"(shred -u {path})")


def require_encryption(recipients_file: str | None, opt_out: str | None,
                       installed_default: str | None,
                       installed_reason: str | None = None) -> EncryptionChoice:
    """Decide a backup's encryption before anything runs (pure; the files are parsed later).

    ``recipients_file`` (the run's --recipients-file) wins; else the installed default, so
    once install configured recipients a run that names none is still encrypted; plain text
    then needs ``opt_out`` (--no-encryption REASON), whose reason the manifest records. An
    install that chose plain text (``installed_reason``, UCB_NO_ENCRYPTION) records its reason
    the same way. Without either, a run without recipients is plain text, said so.
    """
    if opt_out is not None:
        reason = " ".join(opt_out.split())
        if recipients_file:
            raise ConfigError(detail="choose --recipients-file or --no-encryption, not both")
        if not reason:
            raise EncryptionRequired(detail="--no-encryption needs a reason, which the "
                                            "manifest and the artifact record")
        if len(reason) > MAX_REASON:
            raise ConfigError(detail=f"the --no-encryption reason is longer than {MAX_REASON} "
                                     "characters")
        return EncryptionChoice(None, f"opted out: {reason}", opted_out=True)
    if recipients_file:
        return EncryptionChoice(recipients_file)
    if installed_default:
        return EncryptionChoice(installed_default)
    if installed_reason:
        return EncryptionChoice(None, f"opted out at install: {installed_reason}",
                                opted_out=True)
    return EncryptionChoice(None, "no recipients file given and none installed: the objects "
                                  "are stored in plain text")
