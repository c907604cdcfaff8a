"""Restore a backup's databases into a MariaDB server.

The dump streams through the strict reader, ``zstd -d``, the dump gate (it must begin the way
mariadb-dump's output begins) and, for some databases only, a database filter, into
``mariadb --sandbox`` (no ``\\!`` or ``system`` line of a planted dump ever runs). All
databases means users, roles and grants too: since manifest format 2 they are an object of
their own, loaded after the databases; older backups carry them at the end of the dump.

An existing database is never dropped unasked. ``overwrite`` replaces every one;
``overwrite_empty`` only those without tables, views, routines or events (the ``test``
database of a fresh ``mariadb-install-db``); ``skip_existing`` leaves them alone and loads the
rest. Otherwise the restore refuses, saying which conflicting database is empty and which not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pymysql

from undercloud_backup.core.errors import BackupError
from undercloud_backup.core.execute import Command
from undercloud_backup.core.manifest import USERS_OBJECT, Manifest, StoredObject
from undercloud_backup.db import bufferpool
from undercloud_backup.db import connection as db
from undercloud_backup.db.check import TableComparison, compare_tables
from undercloud_backup.db.dumpstream import DatabaseFilter, DumpGate, sandboxed
from undercloud_backup.restore import target
from undercloud_backup.restore.binlog import Fetched, ReplayPlan, prefetched, replay
from undercloud_backup.restore.files import (
    NotInBackup,
    RestoreFailed,
    RestoreRequest,
    selected_databases,
)
from undercloud_backup.store.reader import ObjectCheck, ObjectDamaged
from undercloud_backup.store.streams import Consumer, stream_object


class DatabasesExist(BackupError):
    """Database(s) {names} already exist in MariaDB at {where} and would be dropped and replaced; pass --overwrite to replace them, --overwrite-empty to replace only empty ones, --skip-existing to leave them alone, or drop them first."""  # noqa: E501

    exit_code = 46


def client_command(options_fd: int) -> Command:
    """``mariadb --sandbox`` reading the connection (and password) from an inherited pipe."""
    tool = shutil.which("mariadb") or shutil.which("mysql") or "mariadb"
    return Command(argv=sandboxed((tool, f"--defaults-extra-file=/dev/fd/{options_fd}",
                                   "--batch", "--max-allowed-packet=1G")), name="mariadb")


def dump_object(manifest: Manifest) -> StoredObject:
    name = manifest.mariadb.object if manifest.mariadb else ""
    obj = next((o for o in manifest.objects if o.name == name), None) or next(
        (o for o in manifest.objects if o.content == "mariadb-dump"
         and o.leaf != USERS_OBJECT), None)
    if obj is None:
        raise NotInBackup(what="Object", backup_id=manifest.backup_id, names="a database dump",
                          available=", ".join(o.leaf for o in manifest.objects) or "nothing")
    return obj


def users_object(manifest: Manifest) -> StoredObject | None:
    """Format 2: the users-and-grants object; None when they are inside the dump."""
    name = manifest.mariadb.users_object if manifest.mariadb else None
    if not name:
        return None
    obj = next((o for o in manifest.objects if o.name == name or o.leaf == name), None)
    if obj is None:
        raise NotInBackup(what="Object", backup_id=manifest.backup_id, names=name,
                          available=", ".join(o.leaf for o in manifest.objects))
    return obj


@dataclass
class DatabasePlan:
    """Which databases load, which existing ones are replaced and which are left alone."""

    where: str
    selected: list[str]
    load: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # "name (empty)", "name (N objects)"



@dataclass(frozen=True)
class DatabasesRestored:
    """The databases loaded (or, in a dry run, that would be) and, after a load, how their
    tables compare with the manifest."""

    plan: DatabasePlan
    users_and_grants: bool
    object: str  # the dump's object name
    dry_run: bool
    object_checks: list[ObjectCheck] = field(default_factory=list)  # the dump's, the users'
    comparison: TableComparison | None = None
    seconds: float | None = None

    # What the artifact and the CLI say, under the names the --json output gives them.
    @property
    def where(self) -> str:
        return self.plan.where

    @property
    def databases(self) -> list[str]:
        return self.plan.load

    @property
    def existing(self) -> list[str]:
        return self.plan.replaced

    @property
    def skipped(self) -> list[str]:
        return self.plan.skipped

    def to_dict(self) -> dict:
        """The JSON edge (``--json``'s "databases"): its keys and their order are a contract."""
        values = {"where": self.where, "databases": self.databases,
                  "selected": self.plan.selected, "existing": self.existing,
                  "skipped": self.skipped, "users_and_grants": self.users_and_grants,
                  "object": self.object, "dry_run": self.dry_run}
        if self.dry_run:
            return values
        checks = [c.to_dict() for c in self.object_checks]
        return {**values, "object_check": checks[0], "object_checks": checks,
                **(self.comparison or TableComparison()).to_dict(), "seconds": self.seconds}


def _objects_in(session, names: Sequence[str]) -> dict[str, int]:
    """Existing databases among ``names`` -> their tables, views, routines and events."""
    if not names:
        return {}
    marks = ", ".join(["%s"] * len(names))
    with session.cursor() as cursor:
        cursor.execute(
            f"SELECT s.SCHEMA_NAME, (SELECT COUNT(*) FROM information_schema.TABLES t WHERE "
            f"t.TABLE_SCHEMA = s.SCHEMA_NAME) + (SELECT COUNT(*) FROM information_schema."
            f"ROUTINES r WHERE r.ROUTINE_SCHEMA = s.SCHEMA_NAME) + (SELECT COUNT(*) FROM "
            f"information_schema.EVENTS e WHERE e.EVENT_SCHEMA = s.SCHEMA_NAME) FROM "
            f"information_schema.SCHEMATA s WHERE s.SCHEMA_NAME IN ({marks})", tuple(names))
        return {row[0]: int(row[1]) for row in cursor.fetchall()}


def plan_databases(session, where: str, selected: list[str],
                   request: RestoreRequest) -> DatabasePlan:
    """Decide per existing database; raise :class:`DatabasesExist` for unresolved ones."""
    plan = DatabasePlan(where=where, selected=selected)
    existing = _objects_in(session, selected)
    for name in selected:
        if name not in existing:
            plan.load.append(name)
        elif request.overwrite or (request.overwrite_empty and existing[name] == 0):
            plan.load.append(name)
            plan.replaced.append(name)
        elif request.skip_existing:
            plan.skipped.append(name)
        else:
            plan.conflicts.append(f"{name} (empty)" if existing[name] == 0
                                  else f"{name} ({existing[name]} tables, views, routines "
                                       "or events)")
    if plan.conflicts:
        raise DatabasesExist(names=", ".join(plan.conflicts), where=where)
    return plan


def _load(store, container: str, obj: StoredObject, settings: db.DatabaseSettings,
          line_filter, request: RestoreRequest,
          plan: DatabasePlan | None = None) -> ObjectCheck:
    """Stream one dump object into the target server; its check, or the failure that says
    how far it came (:mod:`undercloud_backup.restore.target`)."""
    progress = target.LoadProgress(then=line_filter)
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "w") as options:  # a 64 KiB pipe holds it all
        options.write(settings.option_file_text())

    def close_read() -> None:
        nonlocal read_fd
        os.close(read_fd)
        read_fd = -1

    try:
        outcome = stream_object(store, container, obj, Consumer(
            [client_command(read_fd)], line_filter=DumpGate(obj.name, progress),
            secrets=[settings.password], pass_fds=(read_fd,), after_start=close_read),
            timeout=request.timeout_s, strict=True, spool_dir=request.staging_dir)
    except ObjectDamaged as error:
        raise target.DamagedWhileRestoring(
            what=f"{obj.leaf} into {settings.where}", detail=target.damaged(error),
            progress=_progress(progress, plan)) from None
    finally:
        if read_fd >= 0:
            os.close(read_fd)
    if outcome.filter_error is not None:
        raise outcome.filter_error  # not a dump: refused before a byte reached the server
    if outcome.first_failure is not None:
        reason = outcome.reason()
        if not target.server_alive(lambda: db.connect(settings)):
            raise target.TargetServerLost(where=settings.where, object=obj.leaf,
                                          reason=reason,
                                          progress=_progress(progress, plan, reason))
        if target.packet_refused(reason) or "2006" in reason:
            reason += (" (a statement larger than the server's max_allowed_packet: raise "
                       "it, see docs/restore.md)")
        raise RestoreFailed(what=f"{obj.leaf} into {settings.where}",
                            reason=f"{reason}; {_progress(progress, plan, reason)}")
    return outcome.check


def _progress(progress: target.LoadProgress, plan: DatabasePlan | None,
              reason: str = "") -> str:
    if plan is None:  # the users and grants, after every database was loaded
        return "every database had been loaded; users and grants partly"
    return progress.describe(plan.load, plan.replaced, reason)


def restore_databases(store, container: str, manifest: Manifest,
                      settings: db.DatabaseSettings, databases: Sequence[str] | None,
                      request: RestoreRequest,
                      logger: logging.Logger | logging.LoggerAdapter,
                      replay_plan: ReplayPlan | None = None) -> DatabasesRestored:
    """Load the dump (all of it, or only ``databases``) into the MariaDB of ``settings``,
    then compare every restored table's row count and checksum with the manifest. With a
    ``replay_plan``, the dump is its full one's and the shipped binary log replays after it;
    the counts compare with its end point's, when it ends at one."""
    started = time.monotonic()
    if replay_plan is not None:
        manifest = replay_plan.end or replay_plan.base
    dumped = replay_plan.base if replay_plan is not None else manifest
    obj, users = dump_object(dumped), users_object(dumped)
    selected = selected_databases(manifest, databases)
    everything = not databases
    # One session from before the load to after it: loading every account may change the
    # authentication of the very user we connect as.
    with db.connect(settings) as session:
        plan = plan_databases(session, settings.where, selected, request)
        if everything:
            target.check_database_space(session, dumped, settings.where,
                                        replacing=bool(plan.replaced))
        # the server must take the dump's longest statement: checked (or raised) first; its
        # buffer pool is raised for the load, the replay and the comparison, then set back
        with target.packet_fits(session, dumped, settings.where, dry_run=request.dry_run,
                                logger=logger), bufferpool.raised_for_load(
                session, settings.where, data_bytes=target.database_bytes(dumped),
                local=bufferpool.is_local(settings.host, settings.socket),
                requested_mib=request.load_buffer_pool_mib, dry_run=request.dry_run,
                quiet=request.checking, logger=logger):
            if request.dry_run:
                logger.info("%s %s into MariaDB at %s%s%s%s",
                            "checked: can load" if request.checking else "dry run: would load",
                            ", ".join(plan.load) or "no database", settings.where,
                            " with users and grants" if everything else "",
                            f", replacing {', '.join(plan.replaced)}" if plan.replaced else "",
                            f", leaving {', '.join(plan.skipped)} alone" if plan.skipped else "")
                return DatabasesRestored(plan, everything, obj.name, dry_run=True)
            logger.info("loading %s into MariaDB at %s%s", ", ".join(plan.load) or "no database",
                        settings.where, " with users and grants" if everything else "")
            _drop(session, plan.replaced)
            whole = everything and not plan.skipped
            with contextlib.ExitStack() as fetching:
                # the shipped logs download while the dump loads; they replay after it
                fetched = None if replay_plan is None else fetching.enter_context(
                    prefetched(store, container, replay_plan, timeout=request.timeout_s,
                               staging_dir=request.staging_dir))
                checks = [_load(store, container, obj, settings,
                                None if whole else DatabaseFilter(plan.load,
                                                                  keep_system=everything),
                                request, plan)]
                if everything and users is not None:
                    checks.append(_load(store, container, users, settings, None, request))
                if replay_plan is not None and fetched is not None:
                    _replay(store, container, replay_plan, settings,
                            None if whole else plan.load, request, logger, fetched)
            loaded_in = time.monotonic() - started
            if replay_plan is not None and replay_plan.end is None:
                logger.info("restored to %s: no backup's row counts were taken there, so none "
                            "are compared", replay_plan.point)
                comparison = TableComparison()
            else:
                comparison = _compare(session, manifest, plan.load, logger)
    logger.info("restored %d database(s) in %.1f s; %d of %d table(s) match the manifest",
                len(plan.load), loaded_in, comparison.matching, comparison.compared)
    return DatabasesRestored(plan, everything, obj.name, dry_run=False, object_checks=checks,
                             comparison=comparison,
                             seconds=round(time.monotonic() - started, 2))


def _replay(store, container: str, replay_plan: ReplayPlan, settings: db.DatabaseSettings,
            databases: Sequence[str] | None, request: RestoreRequest,
            logger: logging.Logger | logging.LoggerAdapter, fetched: Fetched) -> None:
    logger.info("replaying the binary log: %s", replay_plan.describe())

    def open_client() -> tuple[Command, tuple[int, ...]]:
        read_fd, write_fd = os.pipe()
        with os.fdopen(write_fd, "w") as options:  # a 64 KiB pipe holds it all
            options.write(settings.option_file_text())
        return client_command(read_fd), (read_fd,)

    started = time.monotonic()
    files = replay(store, container, replay_plan, open_client, databases=databases,
                   timeout=request.timeout_s, staging_dir=request.staging_dir,
                   secrets=[settings.password], fetched=fetched)
    logger.info("replayed %d binary log file(s) to %s in %.1f s", files, replay_plan.point,
                time.monotonic() - started)


def _drop(session, names: Sequence[str]) -> None:
    """Drop the databases being replaced: the dump recreates what it holds (it carries no
    DROP DATABASE, see :mod:`undercloud_backup.db.dump`), and nothing of the old ones may
    survive beside it."""
    with session.cursor() as cursor:
        for name in names:
            cursor.execute(f"DROP DATABASE `{name.replace('`', '``')}`")


def _compare(session, manifest: Manifest, loaded: list[str],
             logger: logging.Logger | logging.LoggerAdapter) -> TableComparison:
    recorded = manifest.mariadb.databases if manifest.mariadb else {}
    try:
        session.ping(reconnect=False)
        comparison = compare_tables(session, {d: recorded[d] for d in loaded})
    except pymysql.err.MySQLError as error:  # e.g. a load longer than wait_timeout
        logger.warning("restored, but the tables could not be compared: %s", error)
        return TableComparison()
    for difference in comparison.differences:
        logger.warning("after the restore: %s", difference)
    return comparison
