"""The backup catalogue in Swift: which backups are complete, and their manifests.

A backup is complete when ``<backup_id>/manifest.json`` exists in the container; the manifest
is written last (:func:`put_manifest` is the commit point) and read back by name.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace

from undercloud_backup.core.errors import (
    BackupNotFound,
    NotFound,
    ObjectTooLarge,
    UploadVerifyFailed,
)
from undercloud_backup.core.manifest import MANIFEST_NAME, Manifest, ManifestError
from undercloud_backup.store.connection import SMALL_OBJECT_LIMIT, SwiftStore


def manifest_name(backup_id: str) -> str:
    return f"{backup_id}/{MANIFEST_NAME}"


@dataclass(frozen=True)
class BackupEntry:
    backup_id: str
    manifest: str
    last_modified: str
    # From the manifest (:func:`describe`): "full" or "incremental" (None: not read, or a
    # manifest that cannot be read), and the backup an incremental builds on.
    kind: str | None = None
    parent: str | None = None
    # The manifest's note when its database dump is partial (--allow-partial-database), so that
    # a listing never shows such a backup like a complete one.
    partial_database: str | None = None
    # "dump" or "binlog" (the binary log since the last backup); None: no databases.
    database_kind: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def listing(store: SwiftStore, container: str) -> list[dict]:
    """Every object in ``container``; none when the container does not exist (yet)."""
    try:
        return store.list(container)
    except NotFound:
        return []


def list_backups(store: SwiftStore, container: str) -> list[BackupEntry]:
    """Complete backups (those with a manifest), oldest first."""
    entries = [
        BackupEntry(backup_id=o["name"][: -len(MANIFEST_NAME) - 1], manifest=o["name"],
                    last_modified=o.get("last_modified", ""))
        for o in listing(store, container)
        if o["name"].endswith("/" + MANIFEST_NAME) and o["name"].count("/") == 1
    ]
    return sorted(entries, key=lambda e: (e.last_modified, e.backup_id))


def describe(store: SwiftStore, container: str,
             entries: list[BackupEntry]) -> list[BackupEntry]:
    """``entries`` with each manifest's kind, parent (backups from before incrementals existed
    are fulls) and partial-dump note."""
    described = []
    for entry in entries:
        try:
            manifest = get_manifest(store, container, entry.backup_id)
        except (BackupNotFound, ValueError):
            described.append(entry)
            continue
        partial = manifest.mariadb.partial_note() if manifest.mariadb else None
        described.append(replace(entry, kind=manifest.kind or "full", parent=manifest.parent,
                                 partial_database=partial,
                                 database_kind=manifest.mariadb.kind if manifest.mariadb
                                 else None))
    return described


def latest_backup(store: SwiftStore, container: str) -> str:
    """The newest complete backup in ``container``."""
    entries = list_backups(store, container)
    if not entries:
        raise BackupNotFound(backup_id="(latest)", container=container)
    return entries[-1].backup_id


def get_manifest(store: SwiftStore, container: str, backup_id: str) -> Manifest:
    """The manifest of ``backup_id``: BackupNotFound when it has none, ManifestError
    (a ValueError) when it cannot be read."""
    try:
        body = store.get_bytes(container, manifest_name(backup_id))
    except NotFound:
        raise BackupNotFound(backup_id=backup_id, container=container) from None
    except ObjectTooLarge as error:
        raise ManifestError(str(error)) from None
    return Manifest.from_json(body)


def put_manifest(store: SwiftStore, container: str, manifest: Manifest) -> str:
    """Write the manifest (the commit point) and read it back by name; its object name."""
    return put_manifest_body(store, container, manifest.backup_id, manifest.to_json())


def put_manifest_body(store: SwiftStore, container: str, backup_id: str, body: bytes) -> str:
    name = manifest_name(backup_id)
    if len(body) > SMALL_OBJECT_LIMIT:  # never commit one that get_manifest would refuse
        raise ObjectTooLarge.beyond(f"{container}/{name}", "manifest", SMALL_OBJECT_LIMIT,
                                    len(body))
    expected = hashlib.md5(body, usedforsecurity=False).hexdigest()
    etag = store.put(container, name, body, etag=expected, content_type="application/json",
                     operation="PUT manifest")
    store.head(container, name)
    if etag != expected:
        raise UploadVerifyFailed(target=f"{container}/{name}", got=etag, expected=expected)
    return name
