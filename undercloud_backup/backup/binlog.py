"""The database part of a backup: a full dump, or the binary log since the last backup.

:func:`back_up_databases` decides (:func:`decide`), says why in the log and the manifest, and
either dumps (recording the snapshot's coordinates when the server keeps a binary log) or ships
the closed log files from the parent's end point to one it fixes itself (:func:`ship`).
Over a direct connection the worker reads the server and the logs itself; with
``--privileged`` root does, through the ``ucb-mariadb binlog`` wrapper actions.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, replace

from undercloud_backup.backup.request import BackupRequest
from undercloud_backup.backup.stages import (
    DumpResult,
    Logger,
    Progress,
    compress_commands,
    dump_databases,
    stream_to_swift,
)
from undercloud_backup.core.errors import BackupError, BackupNotFound, NotFound
from undercloud_backup.core.execute import Pipeline
from undercloud_backup.core.manifest import DatabaseSection, Manifest, StoredObject, TableRecord
from undercloud_backup.core.sizes import format_size
from undercloud_backup.db import binlog, privileged
from undercloud_backup.db import connection as db
from undercloud_backup.db.database import DatabaseAccess, DirectAccess
from undercloud_backup.db.dump import option_pipe
from undercloud_backup.db.privileged import PrivilegedAccess
from undercloud_backup.store import catalogue
from undercloud_backup.store.session import open_store
from undercloud_backup.store.swift import SwiftSettings

LOG_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.[0-9]+$")
FETCH_TIMEOUT_S = 3600.0
CANDIDATES = 50  # this host's newest backups looked at for a parent


class BinlogsNotShipped(BackupError):
    """No binary log was shipped (--binlogs-only): {reason}. Nothing was written; the next nightly backup dumps the databases in full."""  # noqa: E501

    exit_code = 83


@dataclass
class Decision:
    """Ship the log (``reason`` None) from ``parent``'s end, or dump, and why."""

    server: binlog.ServerLog | None
    parent: Manifest | None = None
    base: str | None = None
    reason: str | None = None

    @property
    def ship(self) -> bool:
        return self.reason is None


def object_leaf(file: str) -> str:
    return f"mariadb-binlog-{file}.zst"


def database_parent(store, container: str, hostname: str, backup_id: str
                    ) -> Manifest | None:
    """This host's newest complete backup with a database part (not this one)."""
    entries = [e for e in catalogue.list_backups(store, container) if e.backup_id != backup_id]
    for entry in reversed(entries[-CANDIDATES:]):
        try:
            manifest = catalogue.get_manifest(store, container, entry.backup_id)
        except (BackupNotFound, ValueError):
            continue
        if manifest.hostname == hostname and manifest.mariadb is not None:
            return manifest
    return None


def database_objects(manifest: Manifest) -> list[StoredObject]:
    """The objects of a backup's database part: the dumps, or the shipped logs."""
    section = manifest.mariadb
    if section is None:
        return []
    names = {section.object, section.users_object or "",
             *(f"{manifest.backup_id}/{log['object']}" for log in section.binlogs),
             *(log["object"] for log in section.binlogs)}
    return [o for o in manifest.objects if o.name in names]


def _damage(store, container: str, manifest: Manifest) -> str | None:
    section = manifest.mariadb
    assert section is not None
    objects = database_objects(manifest)
    if section.kind == binlog.DUMP and not any(o.name == section.object for o in objects):
        return f"{manifest.backup_id} records no database dump object"
    if len(objects) < len(section.binlogs):
        return f"{manifest.backup_id} records a shipped log it has no object for"
    for obj in objects:
        try:
            size = int(store.head(container, obj.name).get("content-length", -1))
        except NotFound:
            return f"{obj.name} is missing"
        if size != obj.size:
            return f"{obj.name} is {size} bytes, the manifest says {obj.size}"
    return None


def _when(text: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def decide(request: BackupRequest, access: DatabaseAccess, swift_settings: SwiftSettings
           ) -> Decision:
    """Whether this backup can ship the binary log, and from where; else why it dumps."""
    if not isinstance(access, DirectAccess | PrivilegedAccess):
        return Decision(None, reason="a binary log is shipped only over a direct connection "
                                     "or through the sudo wrapper")
    server = server_log(access)
    if not server.log_bin:
        return Decision(server, reason=binlog.HOW_TO_TURN_ON)
    if request.full:
        return Decision(server, reason="a full backup was asked for (--full)")
    with open_store(swift_settings) as store:
        parent = database_parent(store, swift_settings.container, request.hostname,
                                 request.backup_id)
        section = parent.mariadb if parent else None
        end = binlog.Coordinates.from_dict(section.end) if section else None
        reason = binlog.full_reason(server, end, section.server if section else {})
        if reason is not None or parent is None or section is None:
            return Decision(server, parent, reason=reason or "no earlier backup")
        damage = _damage(store, swift_settings.container, parent)
        if damage:
            return Decision(server, parent, reason=f"the last backup's database part is "
                                                   f"missing or damaged: {damage}")
        base = parent.backup_id if section.kind == binlog.DUMP else section.base
        try:
            base_manifest = catalogue.get_manifest(store, swift_settings.container, base or "")
        except (BackupNotFound, ValueError):
            return Decision(server, parent, reason=f"the full dump {base} the last backup "
                                                   "builds on is gone")
    born = _when(base_manifest.created_at)
    now = dt.datetime.now(dt.UTC)
    if request.full_every_s <= 0 or born is None or \
            (now - born).total_seconds() >= request.full_every_s:
        return Decision(server, parent, base, reason=f"the last full dump ({base}) is older "
                                                     "than --full-every")
    return Decision(server, parent, base)


# ------------------------------------------------------------------------- either access
def server_log(access: DirectAccess | PrivilegedAccess) -> binlog.ServerLog:
    if isinstance(access, PrivilegedAccess):
        return binlog.server_log_from(privileged.binlog_status())
    with db.connect(access.settings) as connection:
        return binlog.read_server_log(connection)


def flush(access: DirectAccess | PrivilegedAccess) -> str:
    """Close the current log; the UTC time after."""
    if isinstance(access, PrivilegedAccess):
        return privileged.binlog_flush()
    with db.connect(access.settings) as connection, connection.cursor() as cursor:
        binlog.flush(connection)
        return binlog.utc_now(cursor)


def gtid_at(access: DirectAccess | PrivilegedAccess, file: str, position: int) -> str:
    if isinstance(access, PrivilegedAccess):
        return privileged.binlog_gtid(file, position)
    with db.connect(access.settings) as connection, connection.cursor() as cursor:
        return binlog.gtid_at(cursor, file, position)


def end_point(access: DirectAccess | PrivilegedAccess, databases: tuple[str, ...]
              ) -> tuple[binlog.EndPoint, binlog.ServerLog]:
    """The end point, the log closed after it, and the server's files then."""
    if isinstance(access, PrivilegedAccess):
        end = binlog.end_point_from(privileged.binlog_end(databases, access.lock_wait_s))
        privileged.binlog_flush()
        return end, server_log(access)
    with db.connect(access.settings) as connection:
        end = binlog.end_point(connection, databases)
        binlog.flush(connection)
        return end, binlog.read_server_log(connection)


def back_up_databases(request: BackupRequest, access: DatabaseAccess,
                      swift_settings: SwiftSettings, logger: Logger) -> DumpResult:
    """The database part: ship the binary log where it can, else a full dump, said why."""
    decision = decide(request, access, swift_settings)
    if decision.ship:
        return ship(request, access, swift_settings, decision, logger)
    if request.binlogs_only:
        raise BinlogsNotShipped(reason=decision.reason)
    if decision.server is not None and decision.server.log_bin and (
            request.full or decision.parent is None):
        logger.info("dumping the databases in full: %s", decision.reason)
    elif decision.server is not None and decision.server.log_bin:
        logger.warning("dumping the databases in FULL instead of shipping the binary log: %s",
                       decision.reason)
    elif decision.server is not None:
        logger.info("%s", decision.reason)
    return dump_with_coordinates(request, access, swift_settings, decision, logger)


def dump_with_coordinates(request: BackupRequest, access: DatabaseAccess,
                          swift_settings: SwiftSettings, decision: Decision,
                          logger: Logger) -> DumpResult:
    """A full dump; with a binary log, it records where its snapshot sits in it."""
    server = decision.server
    if server is None or not server.log_bin or server.grants_missing:
        result = dump_databases(request, access, swift_settings, logger)
        result.section.full_reason = decision.reason
        return result
    assert isinstance(access, DirectAccess | PrivilegedAccess)
    # a fresh log file for the snapshot: the first nightly ships what came after the dump,
    # not what the current file held before it
    started = flush(access)
    lines: list[str] = []
    result = dump_databases(request, access, swift_settings, logger, coordinates=lines)
    found = next((c for c in map(binlog.coordinates_from_line, lines) if c), None)
    if found is None:
        raise binlog.BinlogUnavailable(where=access.where, reason="the dump did not say "
                                       "where its snapshot is in the binary log")
    gtid = gtid_at(access, *found)
    coordinates = binlog.Coordinates(found[0], found[1], gtid, started).to_dict()
    result.section = replace(result.section, kind=binlog.DUMP, start=coordinates,
                             end=coordinates, server=server.identity(),
                             full_reason=decision.reason)
    logger.info("the dump's snapshot is at %s in the binary log",
                binlog.Coordinates.from_dict(coordinates))
    return result


def _fetch(access: DirectAccess, file: str, directory: str) -> str:
    if not LOG_NAME.match(file):
        raise binlog.BinlogUnavailable(where=access.where, reason=f"unexpected log name {file!r}")
    fd = option_pipe(access.settings.option_file_text())
    try:
        command = binlog.fetch_command(fd, file, directory + "/", binlog.binlog_tool())
        with Pipeline([command], timeout=FETCH_TIMEOUT_S, secrets=[access.settings.password],
                      pass_fds=(fd,), stdout=subprocess.DEVNULL) as pipe:
            os.close(fd)  # the process holds its own copy
            fd = -1
            try:
                pipe.wait()
            except BackupError as error:
                raise binlog.BinlogUnavailable(where=access.where, reason=str(error)) from None
    finally:
        if fd >= 0:
            os.close(fd)
    path = os.path.join(directory, file)
    if not os.path.isfile(path):
        raise binlog.BinlogUnavailable(where=access.where, reason=f"{file} was not written")
    return path


def _store(request: BackupRequest, swift_settings: SwiftSettings, access: DatabaseAccess,
           file: str, pipeline: Pipeline, logger: Logger) -> StoredObject:
    return stream_to_swift(
        request, swift_settings, object_leaf(file), binlog.BINLOG_CONTENT,
        request.database_segment_size, pipeline,
        on_failure=lambda reason: binlog.BinlogUnavailable(where=access.where, reason=reason),
        progress=Progress(logger, "binary log"))


def ship(request: BackupRequest, access: DatabaseAccess, swift_settings: SwiftSettings,
         decision: Decision, logger: Logger) -> DumpResult:
    """Fix an end point, close the log there, and store every closed file since the parent."""
    assert isinstance(access, DirectAccess | PrivilegedAccess) and decision.parent is not None
    parent_section = decision.parent.mariadb
    assert parent_section is not None
    start = binlog.Coordinates.from_dict(parent_section.end)
    assert start is not None
    info = access.server_info()
    end, server = end_point(access, info.databases)
    shipped_before = bool(parent_section.binlogs) and \
        parent_section.binlogs[-1]["file"] == start.file
    files = binlog.files_to_ship(server, start, end.coordinates, shipped_before)
    logger.info("shipping the binary log from %s to %s (%s) on top of %s instead of a dump",
                start, end.coordinates, ", ".join(files) or "no new file",
                decision.parent.backup_id)
    objects, shipped = [], []
    directory = tempfile.mkdtemp(prefix="undercloud-binlog-", dir=request.staging_dir)
    try:
        for file in files:
            if isinstance(access, PrivilegedAccess):
                # root reads it over the protocol; its bytes go straight to the compressor
                stored = _store(request, swift_settings, access, file, Pipeline(
                    [privileged.binlog_read_command(file), *compress_commands(request)],
                    timeout=FETCH_TIMEOUT_S), logger)
            else:
                path = _fetch(access, file, directory)
                with open(path, "rb") as source:
                    stored = _store(request, swift_settings, access, file, Pipeline(
                        compress_commands(request), stdin=source, timeout=FETCH_TIMEOUT_S),
                        logger)
                os.unlink(path)
            objects.append(stored)
            shipped.append(binlog.ShippedLog(file, stored.name).to_dict())
            logger.info("binary log %s stored as %s: %s compressed, sha256 %s", file,
                        stored.name, format_size(stored.size), stored.sha256)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    grants = access.privilege_report(info.databases)
    section = DatabaseSection(
        version=info.version, object="", system_tables=[],
        databases={name: [TableRecord(table=t, engine=e, rows=r, checksum=None)
                          for t, e, r in tables] for name, tables in end.rows.items()},
        privileges=list(grants.grants), schema_objects=access.schema_objects(info.databases),
        account=grants.user, kind=binlog.BINLOG, start=start.to_dict(),
        end=end.coordinates.to_dict(), binlogs=shipped, server=server.identity(),
        base=decision.base, parent=decision.parent.backup_id)
    return DumpResult(section=section, objects=objects)
