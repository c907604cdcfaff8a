"""Retention: which complete backups to keep, and deleting the others so that no state of an
interrupted prune can look like a complete backup.

The policy speaks restic's vocabulary: keep the last N backups, the newest backup of each of
the last D days that have backups, and of each of the last W ISO weeks that have backups (UTC).
A backup is kept if any rule keeps it, and the newest complete backup is always kept; so is
every backup a kept incremental depends on (its ``chain``: "parent of X"). The
policy applies to each backed-up host on its own (the manifest's ``hostname``), so underclouds
sharing a container never prune each other's backups away. The clock is a parameter: backup
times come from each manifest's ``created_at``.

Deleting a backup first leaves a marker object (``<backup_id>/deleting``), then removes its
manifest (from then on it is incomplete by definition and nothing will restore from it), then
its objects and their segments, the marker last. Incomplete backups (objects without a
manifest: a failed run, or a backup still uploading) are removed once nothing of theirs was
written for a grace period, except that one whose run is still alive is never touched,
whatever the grace (``running``: the flow runs the orchestrator knows are live, whose ids
the backup ids end with), and one with the marker (a prune stopped half way) or whose run is
known to have ended (a failed run's leftovers) is deleted at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from undercloud_backup.core import defaults
from undercloud_backup.core.errors import BackupNotFound, ConfigError, NotFound
from undercloud_backup.core.manifest import MANIFEST_NAME, Manifest
from undercloud_backup.store import catalogue
from undercloud_backup.store.connection import SwiftStore
from undercloud_backup.store.swift import segment_container as segments_of

# backup.new_backup_id: <host>-<UTC time>-<6 hex>. Only names of this shape are ever removed
# as incomplete backups; anything else in the container is left alone.
BACKUP_ID = re.compile(r"^.+-\d{8}T\d{6}Z-[0-9a-f]{6}$")
# Written before a backup's manifest is deleted: what is left after an interrupted prune is
# recognisably a deletion to finish, not a backup that may still be uploading.
DELETING = "deleting"


@dataclass(frozen=True)
class RetentionPolicy:
    """How many backups to keep; ``grace`` protects incomplete ones still being written."""

    keep_last: int = defaults.KEEP_LAST
    keep_daily: int = defaults.KEEP_DAILY
    keep_weekly: int = defaults.KEEP_WEEKLY
    grace: dt.timedelta = dt.timedelta(hours=defaults.GRACE_HOURS)

    def __post_init__(self) -> None:
        counts = (self.keep_last, self.keep_daily, self.keep_weekly)
        if any(n < 0 for n in counts):
            raise ConfigError(detail="keep-last, keep-daily and keep-weekly cannot be negative")
        if not any(counts):
            raise ConfigError(detail="a retention policy that keeps nothing would delete all "
                                     "but the newest backup: set keep-last, keep-daily or "
                                     "keep-weekly")
        if self.grace < dt.timedelta(0):
            raise ConfigError(detail="the grace period cannot be negative")

    @property
    def grace_hours(self) -> float:
        return self.grace / dt.timedelta(hours=1)

    def to_dict(self) -> dict:
        return {"keep_last": self.keep_last, "keep_daily": self.keep_daily,
                "keep_weekly": self.keep_weekly, "grace_hours": self.grace_hours}


@dataclass
class StoredBackup:
    """One backup id as found in Swift: its objects, its segments, and when it was made."""

    backup_id: str
    complete: bool = False
    created_at: dt.datetime | None = None
    hostname: str = ""
    last_modified: dt.datetime | None = None
    objects: list[str] = field(default_factory=list)
    segments: list[tuple[str, str]] = field(default_factory=list)
    chain: list[str] = field(default_factory=list)  # what an incremental needs, full first

    @property
    def deleting(self) -> bool:
        """A prune had started deleting it (the marker is there)."""
        return f"{self.backup_id}/{DELETING}" in self.objects

    def run_alive(self, runs: Iterable[str]) -> bool:
        """Whether the flow run that wrote it is among ``runs`` (run ids, hex): a backup id
        ends with the first 6 hex digits of its run's id."""
        tail = self.backup_id.rsplit("-", 1)[-1]
        return any(run.replace("-", "").startswith(tail) for run in runs)

    def touch(self, stamp: dt.datetime) -> None:
        if self.last_modified is None or stamp > self.last_modified:
            self.last_modified = stamp

    def summary(self, reasons: list[str] | None = None) -> BackupSummary:
        return BackupSummary(self.backup_id, self.hostname, _iso(self.created_at),
                             _iso(self.last_modified), len(self.objects), len(self.segments),
                             reasons)


@dataclass(frozen=True)
class BackupSummary:
    """A backup as a prune reports it; ``reasons`` (the policy's rules) only for one kept."""

    backup_id: str
    hostname: str
    created_at: str | None
    last_modified: str | None
    objects: int
    segments: int
    reasons: list[str] | None = None

    def to_dict(self) -> dict:
        values = asdict(self)
        if self.reasons is None:  # the --json output has "reasons" for kept backups only
            del values["reasons"]
        return values


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _utc(text: str) -> dt.datetime:
    """Swift's ``last_modified`` (naive UTC) and manifests' ``created_at`` (aware)."""
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def inventory(store: SwiftStore, container: str) -> tuple[list[StoredBackup], list[str]]:
    """Every backup id in ``container`` and its segment container; and names left alone."""
    backups: dict[str, StoredBackup] = {}
    ignored: list[str] = []
    segment_container = segments_of(container)
    for source in (container, segment_container):
        for entry in catalogue.listing(store, source):
            name = entry["name"]
            backup_id, slash, rest = name.partition("/")
            if not slash or not rest:
                ignored.append(f"{source}/{name}")
                continue
            backup = backups.setdefault(backup_id, StoredBackup(backup_id))
            if entry.get("last_modified"):
                backup.touch(_utc(entry["last_modified"]))
            if source == container:
                backup.objects.append(name)
                if rest == MANIFEST_NAME:
                    backup.complete = True
            else:
                backup.segments.append((source, name))
    for backup in backups.values():
        if backup.complete:
            manifest = _manifest(store, container, backup)
            if manifest is None:
                continue
            backup.created_at = _utc(manifest.created_at) if manifest.created_at \
                else backup.last_modified
            backup.hostname = manifest.hostname
            backup.chain = list(manifest.chain)
            section = manifest.mariadb  # shipped binary log: its full dump and the link before
            if section is not None and section.kind == "binlog":
                backup.chain += [b for b in (section.base, section.parent)
                                 if b and b not in backup.chain]
            # Segments kept in another container than <container>_segments are found through
            # the manifest.
            for record in manifest.objects:
                other = record.segment_container
                if other and other != segment_container:
                    backup.segments += [(other, s.name) for s in record.segments]
    return sorted(backups.values(), key=lambda b: b.backup_id), ignored


def _manifest(store: SwiftStore, container: str, backup: StoredBackup) -> Manifest | None:
    """A complete backup's manifest; None (and the backup counted incomplete) if it vanished."""
    try:
        return catalogue.get_manifest(store, container, backup.backup_id)
    except BackupNotFound:  # listings lag deletions
        backup.complete = False
        backup.objects.remove(catalogue.manifest_name(backup.backup_id))
        return None
    except ValueError:  # unreadable: still the commit point of a backup, dated by Swift
        return Manifest(backup_id=backup.backup_id, created_at="")


def _day(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).date().isoformat()


def _week(when: dt.datetime) -> str:
    year, week, _ = when.astimezone(dt.UTC).isocalendar()
    return f"{year}-W{week:02d}"


def select(backups: Iterable[StoredBackup], policy: RetentionPolicy) -> dict[str, list[str]]:
    """Which complete backups the policy keeps, each with the rules that keep it.

    For each host, newest first, each rule keeps the first backup of every new bucket (the
    backup itself, its day, its ISO week) until it has kept its count.
    """
    backups = list(backups)
    hosts: dict[str, list[StoredBackup]] = {}
    for backup in backups:
        if backup.complete and backup.created_at:
            hosts.setdefault(backup.hostname, []).append(backup)
    kept: dict[str, list[str]] = {}
    for group in hosts.values():
        kept.update(_select_one_host(group, policy))
    return keep_parents(backups, kept)


def keep_parents(backups: Iterable[StoredBackup],
                 kept: dict[str, list[str]]) -> dict[str, list[str]]:
    """Add every backup a kept incremental depends on, saying which ("parent of X")."""
    complete = {b.backup_id: b for b in backups if b.complete}
    for backup_id in list(kept):
        backup = complete.get(backup_id)
        for ancestor in backup.chain if backup else []:
            if ancestor in complete:
                reasons = kept.setdefault(ancestor, [])
                reasons.append(f"parent of {backup_id}")
    # A shipped binary log records only its parent and full dump: what the parent needs,
    # and so on, is kept too.
    pending = list(kept)
    while pending:
        backup_id = pending.pop()
        backup = complete.get(backup_id)
        for ancestor in backup.chain if backup else []:
            if ancestor in complete and ancestor not in kept:
                kept[ancestor] = [f"parent of {backup_id}"]
                pending.append(ancestor)
    return kept


def _select_one_host(backups: list[StoredBackup],
                     policy: RetentionPolicy) -> dict[str, list[str]]:
    # created_at has whole seconds: two backups of one second (quick runs one after the other)
    # are told apart by when Swift last wrote to them (their manifests), never by the id's
    # random tail, or the run just made could be pruned as the older one.
    ordered = sorted(backups, key=lambda b: (b.created_at, b.last_modified or b.created_at,
                                             b.backup_id), reverse=True)
    kept: dict[str, list[str]] = {}
    rules = (("last", policy.keep_last, lambda b: b.backup_id),
             ("daily", policy.keep_daily, lambda b: _day(b.created_at)),
             ("weekly", policy.keep_weekly, lambda b: _week(b.created_at)))
    for rule, count, bucket in rules:
        previous = None
        for backup in ordered:
            if count <= 0:
                break
            key = bucket(backup)
            if key != previous:
                kept.setdefault(backup.backup_id, []).append(
                    rule if rule == "last" else f"{rule} {key}")
                previous = key
                count -= 1
    if ordered:
        kept.setdefault(ordered[0].backup_id, []).append("newest")
    return kept


@dataclass
class PruneResult:
    container: str
    now: str
    dry_run: bool
    policy: RetentionPolicy
    kept: list[BackupSummary] = field(default_factory=list)
    deleted: list[BackupSummary] = field(default_factory=list)
    incomplete_deleted: list[BackupSummary] = field(default_factory=list)
    incomplete_kept: list[BackupSummary] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def removed(self) -> list[str]:
        """The ids of the backups deleted (or, in a dry run, that would be), incomplete too."""
        return [b.backup_id for b in self.deleted + self.incomplete_deleted]

    def to_dict(self) -> dict:
        """The JSON edge (``python -m flows.prune --json``): its keys are a contract."""
        entries = ("kept", "deleted", "incomplete_deleted", "incomplete_kept")
        return {"container": self.container, "now": self.now, "dry_run": self.dry_run,
                "policy": self.policy.to_dict(),
                **{key: [b.to_dict() for b in getattr(self, key)] for key in entries},
                "ignored": list(self.ignored)}


def _delete(store: SwiftStore, container: str, name: str) -> None:
    try:
        store.delete(container, name)
    except NotFound:  # already gone: a re-run finishing an earlier prune
        pass


def delete_backup(store: SwiftStore, container: str, backup: StoredBackup) -> None:
    """The marker, then the manifest, then the objects (SLO manifests among them), then the
    segments, the marker last: a prune stopped anywhere leaves something the next one
    finishes at once."""
    manifest = catalogue.manifest_name(backup.backup_id)
    marker = f"{backup.backup_id}/{DELETING}"
    if backup.complete and not backup.deleting:
        store.put(container, marker, b"", content_type="text/plain")
    if backup.complete:
        _delete(store, container, manifest)
    for name in backup.objects:
        if name not in (manifest, marker):
            _delete(store, container, name)
    for segment_container, name in backup.segments:
        _delete(store, segment_container, name)
    _delete(store, container, marker)


def prune(store: SwiftStore, container: str, policy: RetentionPolicy, now: dt.datetime, *,
          dry_run: bool = False, running: Iterable[str] = (), ended: Iterable[str] = (),
          logger: logging.Logger | logging.LoggerAdapter | None = None) -> PruneResult:
    """Apply ``policy`` to the backups in ``container`` as of ``now``.

    Complete backups the policy does not keep are deleted, manifest first; incomplete ones
    are deleted when their last write is older than ``policy.grace`` and their run is not
    among ``running`` (live flow run ids), or at once when an earlier prune had started
    deleting them or their run is among ``ended`` (runs the orchestrator knows have ended:
    a failed run's leftovers). With ``dry_run`` nothing is deleted and the result says what
    would be.
    """
    running, ended = list(running), list(ended)
    log = logger or logging.getLogger(__name__)
    now = now.replace(tzinfo=dt.UTC) if now.tzinfo is None else now.astimezone(dt.UTC)
    backups, ignored = inventory(store, container)
    kept = select(backups, policy)
    result = PruneResult(container=container, now=_iso(now) or "", dry_run=dry_run,
                         policy=policy)
    for backup in backups:
        if not backup.complete and not BACKUP_ID.match(backup.backup_id):
            result.ignored += backup.objects + [f"{c}/{n}" for c, n in backup.segments]
    result.ignored += ignored
    verb = "would delete" if dry_run else "deleting"
    for backup in sorted(backups, key=lambda b: (b.created_at or b.last_modified or now)):
        if backup.complete:
            if backup.backup_id in kept:
                result.kept.append(backup.summary(reasons=kept[backup.backup_id]))
                continue
            log.info("%s backup %s (created %s): manifest first, then %d object(s) and %d "
                     "segment(s)", verb, backup.backup_id, _iso(backup.created_at),
                     len(backup.objects) - 1, len(backup.segments))
            if not dry_run:
                delete_backup(store, container, backup)
            result.deleted.append(backup.summary())
        elif BACKUP_ID.match(backup.backup_id):
            idle = now - (backup.last_modified or now)
            if backup.deleting:
                log.info("%s what is left of backup %s: an earlier prune was stopped while "
                         "deleting it", verb, backup.backup_id)
            elif backup.run_alive(running):
                log.info("keeping incomplete backup %s: its run is still running (whatever "
                         "the grace period)", backup.backup_id)
                result.incomplete_kept.append(backup.summary())
                continue
            elif backup.run_alive(ended) and not backup.run_alive(running):
                log.info("%s incomplete backup %s at once: its run has ended", verb,
                         backup.backup_id)
            elif idle < policy.grace:
                log.info("keeping incomplete backup %s: last written %s ago, within the grace "
                         "period (it may still be uploading)", backup.backup_id, idle)
                result.incomplete_kept.append(backup.summary())
                continue
            log.info("%s incomplete backup %s (no manifest, last written %s): %d object(s), "
                     "%d segment(s)", verb, backup.backup_id, _iso(backup.last_modified),
                     len(backup.objects), len(backup.segments))
            if not dry_run:
                delete_backup(store, container, backup)
            result.incomplete_deleted.append(backup.summary())
    log.info("%s: kept %d complete backup(s), %s %d and %d incomplete", container,
             len(result.kept), "would delete" if dry_run else "deleted", len(result.deleted),
             len(result.incomplete_deleted))
    return result
