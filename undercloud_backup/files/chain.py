"""Incremental backups: which level to take, and whether a chain is whole.

The files of a backup are a GNU tar ``--listed-incremental`` level. Each nightly is a level
against the previous complete backup of this host (tar's own model: the snapshot tar leaves
after night N is the parent snapshot of night N+1), until the level-0 full is older than
``full_every``; then a full starts a new chain. The snapshot is stored with every backup
(``filesystem.snar.zst``, ``.age`` when encrypted), so any host with the container can take the
next level; an encrypted one cannot be read back by the node (it holds recipients only), so
the node keeps a local copy of its latest snapshots and uses one only if it matches the
parent manifest's recorded SHA-256.

Whatever makes the chain doubtful forces a full, with a warning and the reason in the
manifest (``full_reason``): no complete full of this host younger than ``full_every``; a
parent or ancestor missing, incomplete or damaged; a snapshot that does not match its
manifest; a parent dated in the future (the clock went backwards); paths or root that
differ from the parent's; for a signed backup, a link not signed by the same key (made before
signing was installed, or before the key changed: restores checking signatures against the
key's allowed signers would refuse the chain). Parents are only ever this host's own backups
(the manifest's ``hostname``), so hosts sharing a container never build on each other.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass

from undercloud_backup.core.errors import BackupError, BackupNotFound, NotFound, ObjectTooLarge
from undercloud_backup.core.execute import Command, Pipeline
from undercloud_backup.core.manifest import FS_OBJECT, FULL, INCREMENTAL, Manifest, StoredObject
from undercloud_backup.files.archive import PathPlan
from undercloud_backup.store import catalogue
from undercloud_backup.trust import crypto, signing

Logger = logging.Logger | logging.LoggerAdapter

# A parent dated more than this after our own clock: the clock went backwards.
CLOCK_SLACK = dt.timedelta(minutes=5)
# How many of this host's newest backups are looked at for a parent.
CANDIDATES = 20
LOCAL_COPIES_KEPT = 3
SNAPSHOT_CONTENT = "tar-snapshot"
SNAPSHOT_LIMIT = 1 << 30  # what is read of a stored snapshot (ucb-archive's own bound)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``7d``, ``36h``, ``90m``, ``2w`` or ``0`` (always full) in seconds; ValueError else."""
    if str(text).strip() == "0":
        return 0.0
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 7d, 36h, 90m, 2w or 0 (every "
                         "backup a full)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _when(text: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


@dataclass(frozen=True)
class Level:
    """What this backup's archive is: a full, or a level against ``parent``."""

    kind: str = FULL
    parent: str | None = None
    chain: tuple[str, ...] = ()
    level: int = 0
    full_reason: str | None = None
    forced: bool = False  # a full this run did not ask for

    def to_dict(self) -> dict:
        data = asdict(self)
        data["chain"] = list(self.chain)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Level:
        return cls(kind=data.get("kind", FULL), parent=data.get("parent"),
                   chain=tuple(data.get("chain") or ()), level=int(data.get("level") or 0),
                   full_reason=data.get("full_reason"), forced=bool(data.get("forced")))


class _Full(Exception):
    """A full is needed; the message says why."""


# --------------------------------------------------------------------------- chain checks
def archive_of(manifest: Manifest) -> StoredObject | None:
    return next((o for o in manifest.objects if o.content == "tar"), None) \
        or manifest.object(FS_OBJECT)


def snapshot_of(manifest: Manifest) -> StoredObject | None:
    """The stored object the manifest's ``snapshot`` names."""
    if not manifest.snapshot:
        return None
    name = manifest.snapshot.get("object")
    return next((o for o in manifest.objects if o.name == name), None)


def _object_problems(store, container: str, manifest: Manifest, obj: StoredObject | None,
                     what: str) -> list[str]:
    if obj is None:
        return [f"{manifest.backup_id} records no {what}"]
    try:
        headers = store.head(container, obj.name)
    except NotFound:
        return [f"{what} {obj.name} of {manifest.backup_id} is missing"]
    size = int(headers.get("content-length", -1))
    if size != obj.size:
        return [f"{what} {obj.name} of {manifest.backup_id} is {size} bytes, the manifest "
                f"says {obj.size}"]
    return []


def own_objects_problems(store, container: str, manifest: Manifest) -> list[str]:
    """The backup's own archive and snapshot are there, with their recorded sizes."""
    return (_object_problems(store, container, manifest, archive_of(manifest), "archive")
            + _object_problems(store, container, manifest, snapshot_of(manifest), "snapshot"))


def load_ancestors(store, container: str, manifest: Manifest
                   ) -> tuple[list[Manifest], list[str]]:
    """The manifests of ``manifest.chain`` (level 0 first) and what is wrong with them."""
    ancestors: list[Manifest] = []
    problems: list[str] = []
    if manifest.chain and manifest.parent != manifest.chain[-1]:
        problems.append(f"{manifest.backup_id}: parent {manifest.parent} is not the last "
                        f"backup of its chain {manifest.chain}")
    for index, backup_id in enumerate(manifest.chain):
        try:
            ancestor = catalogue.get_manifest(store, container, backup_id)
        except BackupNotFound:
            problems.append(f"ancestor {backup_id} of {manifest.backup_id} has no manifest "
                            "(deleted or incomplete)")
            continue
        except ValueError as error:
            problems.append(f"the manifest of ancestor {backup_id} cannot be read: {error}")
            continue
        ancestors.append(ancestor)
        if ancestor.hostname != manifest.hostname:
            problems.append(f"ancestor {backup_id} is a backup of host {ancestor.hostname!r}, "
                            f"not {manifest.hostname!r}")
        if list(ancestor.chain) != list(manifest.chain[:index]):
            problems.append(f"ancestor {backup_id} has chain {ancestor.chain}, expected "
                            f"{manifest.chain[:index]}")
        if (index == 0) != (ancestor.kind == FULL):
            problems.append(f"ancestor {backup_id} is a {ancestor.kind or 'pre-incremental'} "
                            f"backup at level {index}")
        made, own = _when(ancestor.created_at), _when(manifest.created_at)
        if made and own and made > own:
            problems.append(f"ancestor {backup_id} was created after {manifest.backup_id}")
        problems += own_objects_problems(store, container, ancestor)
    return ancestors, problems


def check_links(store, container: str, manifest: Manifest) -> list[str]:
    """Problems with every link ``manifest`` depends on (empty for a whole chain or a full):
    each ancestor has a complete, readable manifest of the same host and chain, and its
    archive and snapshot objects are present with their recorded sizes."""
    if manifest.kind != INCREMENTAL and not manifest.chain:
        return []
    if not manifest.chain:
        return [f"{manifest.backup_id} is an incremental without a chain"]
    return load_ancestors(store, container, manifest)[1]


# --------------------------------------------------------------------------- which level
def decide(store, container: str, *, hostname: str, plan: PathPlan, full: bool,
           full_every_s: float, now: dt.datetime,
           signing_key: str | None = None) -> tuple[Level, bytes]:
    """The level to take and the parent's snapshot (plain bytes; empty for a full).

    ``signing_key``: this backup's manifest will be signed with it, so every link it builds on
    must be signed with the same key."""
    try:
        if full:
            raise _Full("requested (--full / full: true)")
        if full_every_s <= 0:
            raise _Full("full_every is 0: every backup is a full")
        parent = _parent(store, container, hostname)
        level = _check_parent(store, container, parent, plan, full_every_s, now)
        if signing_key is not None:
            _require_same_signer(store, container, level.chain, signing_key)
        return level, _parent_snapshot(store, container, parent)
    except _Full as why:
        return Level(full_reason=str(why), forced=not full), b""


def _parent(store, container: str, hostname: str) -> Manifest:
    """The most recently written complete backup of this host that archived files (Swift's
    order, not our clock's: a clock that went backwards must not hide the newest)."""
    entries = [e for e in catalogue.list_backups(store, container)
               if e.backup_id.startswith(f"{hostname}-")]
    for entry in reversed(entries[-CANDIDATES:]):
        try:
            manifest = catalogue.get_manifest(store, container, entry.backup_id)
        except (BackupNotFound, ValueError):
            continue
        if manifest.hostname == hostname and manifest.paths and manifest.paths.included:
            return manifest
    raise _Full(f"no complete backup of host {hostname} with files in container {container}")


def _check_parent(store, container: str, parent: Manifest, plan: PathPlan,
                  full_every_s: float, now: dt.datetime) -> Level:
    pid = parent.backup_id
    if parent.kind is None or not parent.snapshot:
        raise _Full(f"the newest backup of this host, {pid}, has no tar snapshot (taken "
                    "before incremental backups existed)")
    made = _when(parent.created_at)
    if made is None or made > now + CLOCK_SLACK:
        raise _Full(f"parent {pid} is dated {parent.created_at}, after this host's clock "
                    f"({now.isoformat(timespec='seconds')}): the clock went backwards")
    paths = parent.paths
    assert paths is not None
    if (paths.root, list(paths.included), list(paths.excluded)) != (
            plan.root, list(plan.included), list(plan.excluded)):
        raise _Full(f"the paths differ from those of parent {pid} (root {paths.root}, "
                    f"{', '.join(paths.included)}; excluded {', '.join(paths.excluded) or '-'})")
    ancestors, problems = load_ancestors(store, container, parent)
    problems += own_objects_problems(store, container, parent)
    if problems:
        raise _Full(f"the chain of parent {pid} is broken: {problems[0]}")
    first = ancestors[0] if ancestors else parent
    started = _when(first.created_at)
    if started is None or now - started > dt.timedelta(seconds=full_every_s):
        raise _Full(f"the last full of this host, {first.backup_id} ({first.created_at}), "
                    f"is older than full_every ({_age_text(full_every_s)})")
    chain = (*parent.chain, pid)
    return Level(kind=INCREMENTAL, parent=pid, chain=chain, level=len(chain))


def _require_same_signer(store, container: str, links: tuple[str, ...],
                         signing_key: str) -> None:
    """Each link signed by ``signing_key``'s key (the one in its signature: whether the
    manifest still matches is the chain checks' and the restore's to say)."""
    own = signing.signer_key(signing.sign_manifest(b"which key", signing_key))
    unsigned, other = [], []
    for backup_id in links:
        try:
            signature = store.get_bytes(container, signing.signature_name(backup_id),
                                        what="signature", limit=signing.SIGNATURE_LIMIT)
        except NotFound:
            unsigned.append(backup_id)
            continue
        except ObjectTooLarge:
            signature = b""  # no signature by this key
        if signing.signer_key(signature) != own:
            other.append(backup_id)
    if unsigned:
        raise _Full(f"this backup is signed but its chain has unsigned links "
                    f"({', '.join(unsigned)}: made before signing was installed); restores "
                    "that check signatures would refuse it")
    if other:
        raise _Full(f"this backup is signed with {signing_key} but {', '.join(other)} of its "
                    "chain with another key (changed since); restores that check against the "
                    "new key's allowed signers would refuse it")


def _age_text(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"


def _parent_snapshot(store, container: str, parent: Manifest) -> bytes:
    """The parent's plain snapshot, checked against both SHA-256 its manifest records."""
    assert parent.snapshot is not None
    plain_sha = parent.snapshot.get("plain_sha256", "")
    if crypto.is_encrypted(parent):
        copy = local_copy(container, parent.backup_id)
        try:
            with open(copy, "rb") as source:
                plain = source.read()
        except OSError:
            raise _Full(f"parent {parent.backup_id} is encrypted and this node (which cannot "
                        f"decrypt) has no local copy of its snapshot ({copy})") from None
        if hashlib.sha256(plain).hexdigest() != plain_sha:
            raise _Full(f"the local copy of the snapshot of encrypted parent "
                        f"{parent.backup_id} ({copy}) does not match its manifest's sha256")
        return plain
    obj = snapshot_of(parent)
    assert obj is not None  # own_objects_problems checked it
    try:
        stored = store.get_bytes(container, obj.name, what="tar snapshot",
                                 limit=SNAPSHOT_LIMIT)
    except NotFound:
        raise _Full(f"the snapshot {obj.name} of parent {parent.backup_id} is missing") \
            from None
    except ObjectTooLarge as error:
        raise _Full(str(error)) from None
    if hashlib.sha256(stored).hexdigest() != parent.snapshot.get("sha256"):
        raise _Full(f"the snapshot {obj.name} of parent {parent.backup_id} does not match the "
                    "sha256 its manifest records (damaged or replaced)")
    try:
        plain = decompress(stored)
    except BackupError as error:
        raise _Full(f"the snapshot {obj.name} of parent {parent.backup_id} does not "
                    f"decompress: {error}") from None
    if hashlib.sha256(plain).hexdigest() != plain_sha:
        raise _Full(f"the snapshot {obj.name} of parent {parent.backup_id} decompresses to "
                    "other bytes than its manifest records")
    return plain


def decompress(data: bytes, timeout: float = 600, limit: int = SNAPSHOT_LIMIT) -> bytes:
    """``zstd -dc`` of ``data`` (a snapshot: small), through execute's Pipeline; no more than
    ``limit`` bytes of it are held (a planted zstd bomb is refused, not decompressed whole)."""
    with tempfile.TemporaryFile() as source:
        source.write(data)
        source.seek(0)
        with Pipeline([Command(argv=("zstd", "-dc", "-q"), name="zstd -d")], stdin=source,
                      timeout=timeout) as pipe:
            assert pipe.stdout is not None
            plain = pipe.stdout.read(limit + 1)
            if len(plain) > limit:
                raise ObjectTooLarge.beyond("(the decompressed snapshot)", "tar snapshot",
                                            limit)
            pipe.wait()
    return plain


# --------------------------------------------------------------------------- local copies
def local_dir(container: str) -> str:
    """The worker's own copies of its encrypted backups' snapshots, per container."""
    base = os.environ.get("UCB_SNAPSHOT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".local/state/undercloud-backup/snapshots")
    return os.path.join(base, container)


def local_copy(container: str, backup_id: str) -> str:
    return os.path.join(local_dir(container), f"{backup_id}.snar")


def save_local_copy(container: str, backup_id: str, plain: bytes) -> str:
    """Keep ``plain`` for the next level (0600 in a 0700 directory of ours); the newest
    :data:`LOCAL_COPIES_KEPT` per container stay."""
    directory = local_dir(container)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise BackupError(detail=f"{directory} must be this user's own, mode 0700")
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".snar")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(plain)
        path = local_copy(container, backup_id)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    copies = sorted((e for e in os.scandir(directory)
                     if e.name.endswith(".snar") and not e.name.startswith(".")),
                    key=lambda e: e.stat().st_mtime)
    for old in copies[:-LOCAL_COPIES_KEPT]:
        os.unlink(old.path)
    return path

