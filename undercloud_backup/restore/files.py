"""Restore a backup's files into a target root (the databases:
:mod:`undercloud_backup.restore.databases`).

Everything streams: Swift -> one checked segment at a time (the strict reader) -> ``zstd -d``
-> ``tar -x``. Each segment is spooled to an anonymous file and its SHA-256 checked before any
of its bytes go on, so a damaged backup stops the restore before it writes damaged data.

An incremental backup restores with its chain: the level-0 full, then each level
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
replaced, merged and kept, and writes nothing (:mod:`undercloud_backup.restore.plan`).

Whatever the archives hold, nothing outside the target is written, changed or deleted: each
``tar -x`` runs confined to the target (:mod:`undercloud_backup.files.confine`), and a chain
restored into ``/`` is refused, before anything is written, when a level would write through a
symlink an earlier level made, however its own links alias it (:func:`tarlist.leading_out`),
or when a later level renames directories (:class:`tarlist.RenamesIntoRoot`). The default target
is a new directory with a random suffix, made exclusively; a named one is reached only through
directories only root can change.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from undercloud_backup.core.errors import (
    BackupError,
    ChainBroken,
    ChainTargetNotEmpty,
    ConfigError,
)
from undercloud_backup.core.execute import Command
from undercloud_backup.core.manifest import Manifest, StoredObject
from undercloud_backup.core.sizes import format_size
from undercloud_backup.files import archive as fs
from undercloud_backup.files import chain, confine
from undercloud_backup.files.tarlist import (
    ChainLeadsOut,
    ChainPaths,
    Entry,
    RenamesIntoRoot,
    level_renames,
    read_entries,
    tar_list_command,
)
from undercloud_backup.restore.plan import (
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
from undercloud_backup.restore.target import (
    DamagedWhileRestoring,
    TargetFull,
    check_free_space,
    disk_full,
)
from undercloud_backup.restore.target import damaged as target_damaged
from undercloud_backup.store.reader import ObjectCheck, ObjectDamaged
from undercloud_backup.store.streams import Consumer, StreamOutcome, stream_object

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


@dataclass(frozen=True)
class FilesPlanned:
    """A dry run of the files: what extracting would do, and for an incremental its chain."""

    target: str
    excluded: list[str]
    plan: FilesPlan
    chain: list[str] | None = None  # ids, full first; None for a full backup
    dry_run: bool = True

    def to_dict(self) -> dict:
        """The JSON edge (``--json``'s "files"): its keys and their order are a contract."""
        values: dict = {"target": self.target, "dry_run": True, "excluded": self.excluded}
        if self.chain is not None:
            values["chain"] = self.chain
        return {**values, **self.plan.to_dict()}


@dataclass(frozen=True)
class FilesRestored:
    """Files written into ``target``: of one archive, or of each level of a chain."""

    target: str
    entries: int
    deleted: int  # by an incremental level: what its backup no longer held
    paths: list[str]
    excluded: list[str]
    object: ObjectCheck | None  # the last archive read
    seconds: float
    chain: list[str] | None = None  # ids, full first; None for a full backup
    objects: list[ObjectCheck] | None = None  # each level's, for a chain
    dry_run: bool = False

    def to_dict(self) -> dict:
        """The JSON edge (``--json``'s "files"): its keys and their order are a contract."""
        check = self.object.to_dict() if self.object else None
        if self.chain is None:
            return {"target": self.target, "dry_run": False, "entries": self.entries,
                    "paths": self.paths, "excluded": self.excluded, "object": check,
                    "seconds": self.seconds, "deleted": self.deleted}
        return {"target": self.target, "dry_run": False, "entries": self.entries,
                "deleted": self.deleted, "paths": self.paths, "excluded": self.excluded,
                "object": check, "objects": [o.to_dict() for o in self.objects or []],
                "chain": self.chain, "seconds": self.seconds}


FilesResult = FilesPlanned | FilesRestored


def default_target(staging_dir: str, backup_id: str, *, create: bool = True) -> str:
    """A new scratch root ``undercloud-restore-<backup_id>-<random>`` in ``staging_dir``, so
    the operator knows where to look and nobody can plant it in advance; a dry run only
    shows its pattern."""
    if not create:
        return confine.default_target_pattern(staging_dir, backup_id)
    return confine.new_default_target(staging_dir, backup_id)


def check_target(target: str, allow_root_target: bool) -> str:
    """The real target directory; ``/`` only with the explicit flag; reached only through
    names only root can change, and, if it exists, a directory of root's nobody else writes
    into (:func:`confine.secure_directory`)."""
    if not os.path.isabs(target):
        raise ConfigError(detail=f"restore target {target!r} must be an absolute path")
    if os.path.normpath(target) == "/" and not allow_root_target:
        raise RootTargetRefused()
    real = confine.secure_directory(target)
    if real == "/" and not allow_root_target:
        raise RootTargetRefused()
    return real


def target_of(request: RestoreRequest) -> str:
    """The request's target: named, or (empty) the default one, made now unless a dry run."""
    if request.target:
        return check_target(request.target, request.allow_root_target)
    return default_target(request.staging_dir, request.backup_id, create=not request.dry_run)


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
               check_found: bool = True, *, target: str | None = None,
               paths: ChainPaths | None = None) -> FilesPlan:
    """Read the archive's listing; compare it with what exists under the target, and check
    that every requested path is in it (before anything is written). ``paths``: also feed
    every entry to the chain's check of links leading out."""
    obj = archive_object(manifest)
    selection = select(manifest, request)
    literal = selection._literal
    plan = FilesPlan(target=target or target_of(request))

    def on_entry(entry: Entry) -> None:
        if paths is not None:
            paths.add(entry)
        member = entry.name
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
        [tar_list_command()], read_output=lambda out: read_entries(out, on_entry)),
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
    # Not root, tar runs as root of a user namespace: it must not try to give files away.
    argv.append("--same-owner" if os.geteuid() == 0 else "--no-same-owner")
    if not overwrite:
        argv.append("--keep-old-files")  # belt and braces: the plan already checked
    argv += [f"--exclude={pattern}" for pattern in selection.excluded]
    argv.append("--")
    argv += list(selection.members)
    return Command(argv=tuple(argv), name="tar --extract")


def make_target(target: str, explicit: bool) -> str:
    """Make a missing named target (and its missing parents), never through a link: 0755 (a
    stand-in root services must enter); a scratch one 0700 (the restored tree holds secrets).
    Then check that it can be confined to, before anything is read."""
    mode = 0o755 if explicit else 0o700
    real = confine.secure_directory(target, create=True, mode=mode)
    if real != "/":
        confine.probe(real)
    return real


def restore_files(store, container: str, manifest: Manifest, request: RestoreRequest,
                  logger: logging.Logger | logging.LoggerAdapter) -> FilesResult:
    """Extract the archive (or some paths of it) into the target; refuse to overwrite. An
    incremental backup's chain is applied in order (:func:`restore_chain`)."""
    levels = chain_of(store, container, manifest)
    if len(levels) > 1:
        return restore_chain(store, container, levels, request, logger)
    started = time.monotonic()
    obj = archive_object(manifest)
    selection = select(manifest, request)
    target = target_of(request)
    occupied = os.path.isdir(target) and bool(os.listdir(target))
    plan: FilesPlan | None = None
    if request.dry_run or selection.members or (occupied and not request.overwrite):
        logger.info("reading the listing of %s to check it against %s", obj.name, target)
        plan = plan_files(store, container, manifest, request, target=target)
        if plan.conflicts and not request.overwrite and not request.dry_run:
            raise WouldOverwrite(count=plan.replaces, target=target, examples=", ".join(
                os.path.relpath(p, target) for p in plan.conflicts[:EXAMPLES]))
    if request.dry_run:
        assert plan is not None
        logger.info("dry run: %d entries under %s: %d new, %d replacing existing files, %d "
                    "existing directories kept, %d excluded and left alone", plan.entries,
                    target, plan.creates, plan.replaces, plan.merges, plan.kept)
        return FilesPlanned(target, list(selection.excluded), plan)
    if not selection.members and not occupied:
        check_free_space(target, manifest)  # exit 14 before anything is written
    target = make_target(target, request.explicit_target)
    if os.geteuid() != 0:
        logger.warning("not running as root: owners and trusted/security xattrs cannot be "
                       "restored")
    return _extract(store, container, obj, selection, target, request, logger, started)


def _extract(store, container: str, obj: StoredObject, selection: Selection, target: str,
             request: RestoreRequest, logger: logging.Logger | logging.LoggerAdapter,
             started: float, *, incremental: bool = False,
             overwrite: bool | None = None) -> FilesRestored:
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
    command = confine.confined(extract_command(
        target, selection, request.overwrite if overwrite is None else overwrite,
        incremental), target)
    try:
        outcome = stream_object(store, container, obj, Consumer([command], read_output=record),
                                timeout=request.timeout_s, strict=True,
                                spool_dir=request.staging_dir)
    except ObjectDamaged as error:
        raise DamagedWhileRestoring(
            what=f"files into {target}", detail=target_damaged(error),
            progress=f"{len(written)} entries had been written under {target}") from None
    if outcome.first_failure is not None:
        raise _extract_failure(outcome, obj, target, len(written))
    seconds = time.monotonic() - started
    logger.info("restored %d entries into %s in %.1f s", len(written), target, seconds)
    return FilesRestored(target, len(written), len(deleted), list(selection.members),
                         list(selection.excluded), outcome.check, round(seconds, 2))


def _extract_failure(outcome: StreamOutcome, obj: StoredObject, target: str,
                     written: int) -> BackupError:
    """Why a confined ``tar -x`` failed: the confinement itself, an attempt to leave the
    target (which it stopped), or tar's own reasons."""
    stderr = outcome.results[0].stderr_lines if outcome.results else []
    if outcome.first_failure is outcome.consumer_error:
        setup = confine.setup_failure(stderr)
        if setup is not None:
            return confine.ConfinementUnavailable(target=target, reason=setup)
        escape = confine.escape_attempt(stderr)
        if escape is not None:
            return confine.OutsideRefused(name=obj.name, target=target, example=escape)
        full = disk_full(stderr)
        if full is not None:
            return TargetFull(target=target, reason=full, written=written)
    return RestoreFailed(what=f"files into {target}",
                         reason=f"{outcome.reason()} ({written} entries had been written)")


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


def _read_chain(store, container: str, levels: list[Manifest], request: RestoreRequest,
                target: str, logger: logging.Logger | logging.LoggerAdapter
                ) -> list[FilesPlan]:
    """Every level's listing, before anything is written: the plans, and the refusal of a
    chain whose levels would lead out of the target (:class:`tarlist.ChainLeadsOut`)."""
    paths = ChainPaths()
    plans = []
    for index, level in enumerate(levels):
        logger.info("reading the listing of %s", archive_object(level).name)
        paths.start_level(index)
        if target == "/" and index > 0:
            for rename in _renames(store, container, level, request):
                paths.add(rename)
        plans.append(plan_files(store, container, level, request, check_found=False,
                                target=target, paths=paths))
    if paths.problems:
        more = f" (and {paths.count - len(paths.problems)} more)" \
            if paths.count > len(paths.problems) else ""
        raise ChainLeadsOut(backup_id=levels[-1].backup_id, target=target,
                            problems="; ".join(paths.problems[:3]) + more)
    if paths.renaming:
        raise RenamesIntoRoot(backup_id=levels[-1].backup_id,
                              levels=", ".join(map(str, paths.renaming)))
    return plans


def _renames(store, container: str, level: Manifest, request: RestoreRequest) -> list[Entry]:
    """A later level's directory rename records (GNU dumpdir ``R``/``T``), which ``tar
    --list`` does not show. Into ``/`` any of them refuses the chain rather than being checked
    path by path: tar prints their names unquoted (a name can fake or cut a line), applies
    them with rules of its own (temporary directories, stripped prefixes) and moves whole
    trees with them, and a gap in imitating that would write outside; a genuine rename
    restores into a scratch target, whose confinement makes any rename harmless."""
    obj = archive_object(level)
    renames, outcome = level_renames(store, container, obj, timeout=request.timeout_s,
                                     strict=True, spool_dir=request.staging_dir)
    if outcome.first_failure is not None:
        raise RestoreFailed(what=f"the dumpdirs of {obj.name}", reason=outcome.reason())
    return renames


def restore_chain(store, container: str, levels: list[Manifest], request: RestoreRequest,
                  logger: logging.Logger | logging.LoggerAdapter) -> FilesResult:
    """The full, then each incremental level, in order, deletions included. Into ``/`` (and
    whenever the listings are read anyway) the chain is checked first for links leading out;
    elsewhere each extraction is confined to the target."""
    started = time.monotonic()
    manifest = levels[-1]
    ids = [m.backup_id for m in levels]
    selection = select(manifest, request)
    target = target_of(request)
    occupied = os.path.isdir(target) and bool(os.listdir(target))
    if occupied and not request.overwrite and not request.dry_run:
        raise ChainTargetNotEmpty(backup_id=manifest.backup_id, target=target)
    logger.info("backup %s is incremental level %d: restoring its chain %s in this order",
                manifest.backup_id, len(levels) - 1, " > ".join(ids))
    plans: list[FilesPlan] = []
    if request.dry_run or selection.members or target == "/":
        plans = _read_chain(store, container, levels, request, target, logger)
        merged = merge_plans(target, plans)
        require_found(manifest, selection, merged.found)
    if request.dry_run:
        logger.info("dry run: %d entries under %s from %d archives (%s): %d new, %d replacing "
                    "existing files, %d existing directories kept, %d excluded", merged.entries,
                    target, len(levels), " > ".join(ids), merged.creates, merged.replaces,
                    merged.merges, merged.kept)
        return FilesPlanned(target, list(selection.excluded), merged, chain=ids)
    if not selection.members and not occupied:
        check_free_space(target, manifest)  # exit 14 before anything is written
    target = make_target(target, request.explicit_target)
    if occupied:
        logger.warning("restoring an incremental chain over %s (--overwrite): archived "
                       "directories become exactly what they were, files the backup did not "
                       "hold are deleted", target)
    results = []
    for index, level in enumerate(levels):
        level_selection = selection
        if selection.members:  # a level holds only what changed: its own members
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
    return FilesRestored(target, sum(r.entries for r in results),
                         sum(r.deleted for r in results), list(selection.members),
                         list(selection.excluded), results[-1].object if results else None,
                         round(seconds, 2), chain=ids,
                         objects=[r.object for r in results if r.object is not None])


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
