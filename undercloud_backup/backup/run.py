"""A backup from start to commit, as plain functions; ``tasks/`` wraps each one in a Prefect task.

Plan what to archive (here), decide segment sizes and check there is room
(:mod:`~undercloud_backup.store.space`), stream the database and the files into Swift side by
side (:mod:`~undercloud_backup.backup.stages`), then write the manifest: its presence is what
makes a backup complete. The manifest is a :class:`~undercloud_backup.core.manifest.Manifest`
until it is written.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from dataclasses import replace

from undercloud_backup import __version__
from undercloud_backup.backup.request import BackupRequest, new_backup_id
from undercloud_backup.backup.stages import ArchiveResult, DumpResult
from undercloud_backup.core.errors import ConfigError
from undercloud_backup.core.manifest import (
    DB_OBJECT,
    FORMAT,
    FS_OBJECT,
    FULL,
    INCREMENTAL,
    INCREMENTAL_FORMAT,
    Manifest,
)
from undercloud_backup.db import privileged
from undercloud_backup.files import archive as fs
from undercloud_backup.files import estimate
from undercloud_backup.store.catalogue import put_manifest
from undercloud_backup.store.connection import SwiftStore
from undercloud_backup.store.space import SpaceReport
from undercloud_backup.store.upload import verify_stored
from undercloud_backup.trust import crypto, signing

__all__ = ["DB_OBJECT", "FS_OBJECT", "BackupRequest", "new_backup_id", "plan_files",
           "build_manifest", "write_manifest"]


def plan_files(request: BackupRequest) -> fs.PathPlan:
    """What tar will archive and about how many bytes it will write; an error when that is
    nothing (all absent, or all excluded), or when the privileged policy refuses a path.

    A privileged run learns what exists and how big it is from the wrapper, as root: the worker
    cannot see into root-only directories, and the wrapper checks every path against the
    policy now, before anything is written."""
    if not request.include_files:
        return fs.PathPlan(root=os.path.realpath(request.root), included=(), absent=(),
                           excluded=())
    root = os.path.realpath(request.root)
    if not os.path.isdir(root):
        raise ConfigError(detail=f"root {root!r} is not a directory")
    candidates = fs.candidate_paths(request.add_paths)
    excluded = [fs.normalize(p) for p in request.exclude_paths]
    sizes = (privileged.estimate_paths(root, candidates, excluded) if request.privileged
             else estimate.measure(root, candidates, excluded))
    plan = fs.plan_paths(root, request.add_paths, request.exclude_paths, exists=sizes.exists)
    plan = replace(plan, estimated_bytes=sizes.total(plan.included))
    if not plan.included and plan.excluded_whole:
        raise ConfigError(detail=f"--exclude-path {' '.join(plan.excluded)} leaves out every "
                                 f"path to back up ({', '.join(plan.excluded_whole)}); the "
                                 "archive would be empty (use --db-only for databases only)")
    if not plan.included:
        raise ConfigError(detail=f"none of the paths to back up exists under {plan.root}")
    return plan


def build_manifest(request: BackupRequest, space: SpaceReport | None,
                   database: DumpResult | None, files: ArchiveResult | None, *,
                   flow_run_id: str | None = None) -> Manifest:
    # The archive stays the last object (its snapshot, for the next level, just before it).
    objects = [*(database.objects if database else []),
               *([files.snapshot] if files and files.snapshot else []),
               *([files.object] if files else [])]
    level = files.level if files else {}
    kind = level.get("kind", FULL)
    return Manifest(
        backup_id=request.backup_id, created_at=request.created_at,
        completed_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        hostname=request.hostname, tool={"name": "undercloud-backup", "version": __version__},
        flow_run_id=flow_run_id,
        platform={"python": platform.python_version(), "kernel": platform.release()},
        mariadb=database.section if database else None,
        paths=files.section if files else None,
        space=space.to_dict() if space else None, objects=objects,
        encryption=encryption_section(request),
        # An incremental is format 3: older tools refuse it rather than restore one level.
        format=INCREMENTAL_FORMAT if kind == INCREMENTAL else FORMAT,
        kind=kind, parent=level.get("parent"), chain=list(level.get("chain") or []),
        level=int(level.get("level") or 0),
        snapshot=files.snapshot_record if files else None,
        full_reason=level.get("full_reason") if kind == FULL and files else None)


def encryption_section(request: BackupRequest) -> dict:
    """The manifest's ``encryption``: recipient fingerprints, or plain text said plainly."""
    if request.recipients_file is None:
        return crypto.EncryptionChoice(
            None, request.plain_reason or "no recipients file given: the objects are stored "
            "in plain text", request.encryption_opted_out).plain_section()
    return crypto.load_recipients(request.recipients_file).manifest_section()


def write_manifest(store: SwiftStore, container: str, manifest: Manifest,
                   signing_key: str | None = None) -> str:
    """Check every object is still there as recorded, then write the manifest: the commit.

    With a signing key, ``SHA256SUMS``, its signature and ``manifest.json.sig`` (of exactly
    the bytes stored) go first: a manifest is never there without its signature."""
    for stored in manifest.objects:
        verify_stored(store, container, stored)
    if signing_key is not None:
        for name, body in signing.signed_objects(manifest, signing_key):
            store.put(container, name, body, content_type="text/plain",
                      operation="PUT signature")
    return put_manifest(store, container, manifest)
