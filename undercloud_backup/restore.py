"""Restore a backup's files into a target root (databases: :mod:`undercloud_backup.restoredb`).

Everything streams: Swift -> one checked segment at a time (the strict reader) -> ``zstd -d``
-> ``tar -x``. Each segment is spooled to an anonymous file and its SHA-256 checked before any
of its bytes go on, so a damaged backup stops the restore before it writes damaged data.

An incremental backup (issue 13) restores with its chain: the level-0 full, then each level
in order, each extracted with ``--listed-incremental=/dev/null`` so that tar applies the
deletions each level records (exactly the by-hand procedure). That makes every archived
directory what it was at backup time, deleting files the backup did not hold: such a restore
into a target that holds anything needs ``overwrite``. The database is a full dump in every
backup and restores from the requested backup alone (:mod:`restoredb`).

Nothing existing is replaced unless asked: files that would be overwritten are named and the
restore refuses (``overwrite``). Writing over ``/`` takes an explicit flag of its own. Every
requested path is looked up in the archive's listing before anything is written. Excluded
paths (``exclude_paths``, and with ``reinstalled_host`` the host-identity files of
:data:`restoreplan.HOST_IDENTITY`) are left alone. A dry run says what would be created,
replaced, merged and kept, and writes nothing (:mod:`restoreplan`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

from undercloud_backup import archive as fs
from undercloud_backup import chain
from undercloud_backup.errors import (
    BackupError,
    ChainBroken,
    ChainTargetNotEmpty,
    ConfigError,
)
from undercloud_backup.execute import Command
from undercloud_backup.manifest import Manifest, StoredObject
from undercloud_backup.reader import ObjectDamaged
from undercloud_backup.restoreplan import (
    CONFLICTS_LIMIT,
    DRY_RUN_LIST_LIMIT,
    FilesPlan,
    NotInBackup,
    RestoreRequest,
    Selection,
    merge_plans,
    require_found,
    select,
)
from undercloud_backup.sizes import format_size
from undercloud_backup.streams import Consumer, stream_object
from undercloud_backup.tarlist import read_members, tar_list_command

EXAMPLES = 5


class RootTargetRefused(BackupError):
    """Refusing to restore files over / without --allow-root-target: restore into a scratch --target first and compare, or pass the flag to write into the live system."""  # noqa: E501

    exit_code = 44


class WouldOverwrite(BackupError):
    """{count} existing file(s) under {target} would be overwritten, e.g. {examples}; pass --overwrite to replace them, --exclude-path to keep some, or restore into an empty --target."""  # noqa: E501

    exit_code = 45


class RestoreFailed(BackupError):
    """Restoring {what} failed: {reason}"""

    exit_code = 48


def default_target(staging_dir: str, backup_id: str) -> str:
    """A predictable scratch root, so the operator knows where to look."""
    return os.path.join(staging_dir, f"undercloud-restore-{backup_id}")


def check_target(target: str, allow_root_target: bool) -> str:
    """The real target directory; ``/`` only with the explicit flag."""
    if not os.path.isabs(target):
        raise ConfigError(detail=f"restore target {target!r} must be an absolute path")
    real = os.path.realpath(target)
    if real == "/" and not allow_root_target:
        raise RootTargetRefused()
    if os.path.exists(real) and not os.path.isdir(real):
        raise ConfigError(detail=f"restore target {real} exists and is not a directory")
    return real


def archive_object(manifest: Manifest) -> StoredObject:
    obj = next((o for o in manifest.objects if o.content == "tar"), None) or manifest.object(
        "filesystem.tar.zst")
    if obj is None:
        raise NotInBackup(what="Object", backup_id=manifest.backup_id,
                          names="a filesystem archive",
                          available=", ".join(o.leaf for o in manifest.objects) or "nothing")
    return obj


# ------------------------------------------------------------------------- what, not where


# --------------------------------------------------------------------------------- files


def plan_files(store, container: str, manifest: Manifest, request: RestoreRequest,
               check_found: bool = True) -> FilesPlan:
    """Read the archive's listing; compare it with what exists under the target, and check
    that every requested path is in it (before anything is written)."""
    obj = archive_object(manifest)
    selection = select(manifest, request)
    literal = selection._literal
    plan = FilesPlan(target=check_target(request.target, request.allow_root_target))

    def on_member(member: str) -> None:
        if not selection.wanted(member):
            return
        bare = member.rstrip("/")
        for wanted in selection.members:
            if wanted not in plan.found and fs.inside(bare, wanted):
                plan.found.append(wanted)
        if selection.is_excluded(member, literal):
            plan.kept += 1
            if len(plan.kept_paths) < CONFLICTS_LIMIT:
                plan.kept_paths.append(os.path.join(plan.target, bare))
            plan.add(member, "keep")
        else:
            plan.add(member, plan.action(member))

    outcome = stream_object(store, container, obj, Consumer(
        [tar_list_command()], read_output=lambda out: read_members(out, on_member)),
        timeout=request.timeout_s, strict=True, spool_dir=request.staging_dir)
    if outcome.first_failure is not None:
        raise RestoreFailed(what=f"the listing of {obj.name}", reason=outcome.reason())
    if check_found:
        require_found(manifest, selection, plan.found)
    return plan


def extract_command(target: str, selection: Selection, overwrite: bool,
                    incremental: bool = False) -> Command:
    """``tar -x`` keeping numeric owners, modes, ACLs, xattrs and SELinux labels; exclusions
    anchored at the archive's root, as the backup's are. ``incremental``: a level of a chain,
    whose recorded deletions tar applies (``--listed-incremental=/dev/null``)."""
    argv = ["tar", "--extract", "--file=-", f"--directory={target}", "--verbose",
            "--xattrs", "--xattrs-include=*", "--acls", "--selinux", "--numeric-owner",
            "--same-permissions", "--keep-directory-symlink", "--anchored",
            "--no-wildcards-match-slash"]
    if incremental:
        argv.append("--listed-incremental=/dev/null")
    if os.geteuid() == 0:
        argv.append("--same-owner")
    if not overwrite:
        argv.append("--keep-old-files")  # belt and braces: the plan already checked
    argv += [f"--exclude={pattern}" for pattern in selection.excluded]
    argv.append("--")
    argv += list(selection.members)
    return Command(argv=tuple(argv), name="tar --extract")


def make_target(target: str, explicit: bool) -> None:
    """Create a missing target: 0755 when named (a stand-in root services must enter),
    0700 for the default scratch directory (the restored tree holds secrets)."""
    if os.path.isdir(target):
        return
    os.makedirs(target, exist_ok=True)
    os.chmod(target, 0o755 if explicit else 0o700)


def restore_files(store, container: str, manifest: Manifest, request: RestoreRequest,
                  logger: logging.Logger | logging.LoggerAdapter) -> dict:
    """Extract the archive (or some paths of it) into the target; refuse to overwrite. An
    incremental backup's chain is applied in order (:func:`restore_chain`)."""
    levels = chain_of(store, container, manifest)
    if len(levels) > 1:
        return restore_chain(store, container, levels, request, logger)
    started = time.monotonic()
    obj = archive_object(manifest)
    selection = select(manifest, request)
    target = check_target(request.target, request.allow_root_target)
    occupied = os.path.isdir(target) and bool(os.listdir(target))
    plan: FilesPlan | None = None
    if request.dry_run or selection.members or (occupied and not request.overwrite):
        logger.info("reading the listing of %s to check it against %s", obj.name, target)
        plan = plan_files(store, container, manifest, request)
        if plan.conflicts and not request.overwrite and not request.dry_run:
            raise WouldOverwrite(count=plan.replaces, target=target, examples=", ".join(
                os.path.relpath(p, target) for p in plan.conflicts[:EXAMPLES]))
    if request.dry_run:
        assert plan is not None
        logger.info("dry run: %d entries under %s: %d new, %d replacing existing files, %d "
                    "existing directories kept, %d excluded and left alone", plan.entries,
                    target, plan.creates, plan.replaces, plan.merges, plan.kept)
        return {"target": target, "dry_run": True, "excluded": list(selection.excluded),
                **plan.as_dict()}
    make_target(target, request.explicit_target)
    if os.geteuid() != 0:
        logger.warning("not running as root: owners and trusted/security xattrs cannot be "
                       "restored")
    return _extract(store, container, obj, selection, target, request, logger, started)


def _extract(store, container: str, obj: StoredObject, selection: Selection, target: str,
             request: RestoreRequest, logger: logging.Logger | logging.LoggerAdapter,
             started: float, *, incremental: bool = False,
             overwrite: bool | None = None) -> dict:
    written: list[str] = []
    deleted: list[str] = []

    def record(stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith("tar: Deleting "):
                deleted.append(line[len("tar: Deleting "):])
            elif len(written) < DRY_RUN_LIST_LIMIT:
                written.append(line)

    logger.info("extracting %s (%s) into %s%s%s", obj.name, format_size(obj.size), target,
                f" (only {', '.join(selection.members)})" if selection.members else "",
                f" (excluding {', '.join(selection.excluded)})" if selection.excluded else "")
    try:
        outcome = stream_object(store, container, obj, Consumer(
            [extract_command(target, selection,
                             request.overwrite if overwrite is None else overwrite,
                             incremental)], read_output=record),
            timeout=request.timeout_s, strict=True, spool_dir=request.staging_dir)
    except ObjectDamaged as error:
        raise RestoreFailed(what=f"files into {target}",
                            reason=f"{error} ({len(written)} entries had been written)") \
            from None
    if outcome.first_failure is not None:
        raise RestoreFailed(what=f"files into {target}",
                            reason=f"{outcome.reason()} ({len(written)} entries had been "
                                   "written)")
    seconds = time.monotonic() - started
    logger.info("restored %d entries into %s in %.1f s", len(written), target, seconds)
    return {"target": target, "dry_run": False, "entries": len(written),
            "paths": list(selection.members), "excluded": list(selection.excluded),
            "object": outcome.check.as_dict(), "seconds": round(seconds, 2),
            "deleted": len(deleted)}


# ---------------------------------------------------------------------- incremental chains
def chain_of(store, container: str, manifest: Manifest) -> list[Manifest]:
    """The backups whose archives make ``manifest``'s files, level 0 first; ChainBroken when
    one is missing, another host's, or lacks its objects."""
    if not manifest.incremental:
        return [manifest]
    if not manifest.chain:
        raise ChainBroken(backup_id=manifest.backup_id, problems="it records no chain")
    ancestors, problems = chain.load_ancestors(store, container, manifest)
    if problems:
        raise ChainBroken(backup_id=manifest.backup_id, problems="; ".join(problems[:3]))
    return [*ancestors, manifest]


def restore_chain(store, container: str, levels: list[Manifest], request: RestoreRequest,
                  logger: logging.Logger | logging.LoggerAdapter) -> dict:
    """The full, then each incremental level, in order, deletions included."""
    started = time.monotonic()
    manifest = levels[-1]
    ids = [m.backup_id for m in levels]
    selection = select(manifest, request)
    target = check_target(request.target, request.allow_root_target)
    occupied = os.path.isdir(target) and bool(os.listdir(target))
    if occupied and not request.overwrite and not request.dry_run:
        raise ChainTargetNotEmpty(backup_id=manifest.backup_id, target=target)
    logger.info("backup %s is incremental level %d: restoring its chain %s in this order",
                manifest.backup_id, len(levels) - 1, " > ".join(ids))
    plans: list[FilesPlan] = []
    if request.dry_run or selection.members:
        for level in levels:
            logger.info("reading the listing of %s", archive_object(level).name)
            plans.append(plan_files(store, container, level, request, check_found=False))
        merged = merge_plans(target, plans)
        require_found(manifest, selection, merged.found)
    if request.dry_run:
        logger.info("dry run: %d entries under %s from %d archives (%s): %d new, %d replacing "
                    "existing files, %d existing directories kept, %d excluded", merged.entries,
                    target, len(levels), " > ".join(ids), merged.creates, merged.replaces,
                    merged.merges, merged.kept)
        return {"target": target, "dry_run": True, "excluded": list(selection.excluded),
                "chain": ids, **merged.as_dict()}
    make_target(target, request.explicit_target)
    if occupied:
        logger.warning("restoring an incremental chain over %s (--overwrite): archived "
                       "directories become exactly what they were, files the backup did not "
                       "hold are deleted", target)
    results = []
    for index, level in enumerate(levels):
        level_selection = selection
        if plans and selection.members:  # a level holds only what changed: its own members
            level_selection = Selection(
                members=tuple(m for m in selection.members if m in plans[index].found),
                excluded=selection.excluded)
            if not level_selection.members:
                continue
        results.append(_extract(store, container, archive_object(level), level_selection,
                                target, request, logger, time.monotonic(), incremental=True,
                                overwrite=request.overwrite or index > 0))
    seconds = time.monotonic() - started
    logger.info("restored the chain %s into %s in %.1f s", " > ".join(ids), target, seconds)
    return {"target": target, "dry_run": False,
            "entries": sum(r["entries"] for r in results),
            "deleted": sum(r["deleted"] for r in results),
            "paths": list(selection.members), "excluded": list(selection.excluded),
            "object": results[-1]["object"] if results else None,
            "objects": [r["object"] for r in results], "chain": ids,
            "seconds": round(seconds, 2)}


def selected_databases(manifest: Manifest, databases: Sequence[str] | None) -> list[str]:
    """Named databases (each must be in the backup), or every database of the dump."""
    recorded = manifest.mariadb.databases if manifest.mariadb else {}
    if not databases:
        return list(recorded)
    unknown = [d for d in databases if d not in recorded]
    if unknown:
        raise NotInBackup(what="Database(s)", backup_id=manifest.backup_id,
                          names=", ".join(unknown), available=", ".join(recorded) or "none")
    return list(dict.fromkeys(databases))
