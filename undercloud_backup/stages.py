"""The two streams of a backup, producer to Swift: ``mariadb-dump | zstd`` and ``tar | zstd``.

No whole artefact is staged: each pipe feeds a stream uploader. An object is committed only
after every process of its pipe exited cleanly (and the stage's own judge agreed); whatever
fails aborts the upload, which deletes the segments it sent.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from undercloud_backup import archive as fs
from undercloud_backup import crypto, progress
from undercloud_backup import database as db
from undercloud_backup.errors import (
    ArchiveFailed,
    BackupError,
    CommandFailed,
    DumpFailed,
    UnreadableFiles,
)
from undercloud_backup.execute import Command, Pipeline, StageResult
from undercloud_backup.manifest import (
    DB_OBJECT,
    FS_OBJECT,
    USERS_OBJECT,
    DatabaseSection,
    PathsSection,
    StoredObject,
    TableRecord,
)
from undercloud_backup.request import BackupRequest
from undercloud_backup.sizes import format_size
from undercloud_backup.space import DEFAULT_SEGMENT_SIZE
from undercloud_backup.store import SwiftStore
from undercloud_backup.swift import SwiftSettings, segment_container
from undercloud_backup.tablestats import TableStatsReader
from undercloud_backup.upload import StreamUploader

Logger = logging.Logger | logging.LoggerAdapter


@dataclass
class DumpResult:
    """The database stage's outcome: the manifest's section and the objects it wrote."""

    section: DatabaseSection
    objects: list[StoredObject]


@dataclass
class ArchiveResult:
    """The filesystem stage's outcome: what the archive holds, what tar said, the object."""

    section: PathsSection
    object: StoredObject


def zstd_command(level: int) -> Command:
    # One compressor thread per stream: the database and the files are already two streams side
    # by side, and -T0 only added job buffers (60-70 MiB each) and, on incompressible images,
    # twice the CPU (benchmarks/RESULTS.md).
    return Command(argv=("zstd", "-q", f"-{level}", "--single-thread", "-c", "--no-progress"),
                   name="zstd")


def compress_commands(request: BackupRequest) -> list[Command]:
    """``zstd``, then ``age -R recipients`` when the backup is encrypted (issue 12)."""
    if request.recipients_file is None:
        return [zstd_command(request.compression_level)]
    return [zstd_command(request.compression_level),
            crypto.encrypt_command(request.recipients_file)]


def stored_leaf(request: BackupRequest, leaf: str) -> str:
    """``filesystem.tar.zst``, or ``filesystem.tar.zst.age`` when encrypted."""
    return leaf if request.recipients_file is None else crypto.encrypted_leaf(leaf)


class Progress:
    """Log a stream's progress at most every ``every`` seconds."""

    def __init__(self, logger: Logger, what: str, every: float = 10.0) -> None:
        self.logger, self.what, self.every = logger, what, every
        self._next = time.monotonic() + every

    def __call__(self, sent: int, elapsed: int) -> None:
        progress.feed(self.what, sent)  # the run's progress artifact and terminal line
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every
        rate = sent / max(elapsed, 1) / 1024**2
        self.logger.info("%s: %s uploaded (compressed) after %d s, %.1f MiB/s", self.what,
                         format_size(sent), elapsed, rate)


def stream_to_swift(request: BackupRequest, swift_settings: SwiftSettings, leaf: str,
                    content: str, segment_size: int | None, pipe: Pipeline, *,
                    on_failure: type[BackupError], progress: Callable[[int, int], None],
                    after_start: Callable[[], None] | None = None,
                    judge: Callable[[list[StageResult]], None] | None = None) -> StoredObject:
    """Feed a producer pipe into Swift; commit only if every stage (and ``judge``) is happy."""
    store = SwiftStore.connect(swift_settings)
    store.ensure_container(swift_settings.container)
    store.ensure_container(segment_container(swift_settings.container))
    uploader = StreamUploader(store, swift_settings.container,
                              request.object_name(stored_leaf(request, leaf)),
                              segment_size=segment_size or DEFAULT_SEGMENT_SIZE,
                              staging_dir=request.staging_dir, compression="zstd",
                              content=content, progress=progress)
    try:
        with pipe:
            if after_start is not None:
                after_start()
            assert pipe.stdout is not None
            uploader.feed(pipe.stdout)
            try:
                results = pipe.wait()
            except CommandFailed as error:
                raise on_failure(reason=str(error)) from None
            if judge is not None:
                judge(results)
            return uploader.commit()
    except BaseException:
        uploader.abort()
        raise
    finally:
        store.close()


def dump_databases(request: BackupRequest, access: db.DatabaseAccess,
                   swift_settings: SwiftSettings, logger: Logger) -> DumpResult:
    """Dump every database, then users and grants into an object of their own (so that the
    databases' dump loads with ``mariadb --one-database NAME``), through zstd into Swift;
    return the manifest's section and the objects."""
    info = access.server_info()
    logger.info("dumping %d database(s) from MariaDB %s (%s on disk): %s",
                len(info.databases), info.version, format_size(info.size_bytes),
                ", ".join(info.databases) or "(none, users only)")
    stats = TableStatsReader(*access.table_stats_beside(info.databases,
                                                        request.table_checksums))
    dumps = access.dump_commands(info.databases)
    progress = Progress(logger, "database dump")

    def progressed(sent: int, elapsed: int) -> None:
        stats.check()  # a failed read stops the dump now, not after the last byte
        progress(sent, elapsed)

    objects = []
    try:
        with dumps.databases as dump:
            objects.append(stream_to_swift(
                request, swift_settings, DB_OBJECT, "mariadb-dump",
                request.database_segment_size,
                Pipeline([dump.command, *compress_commands(request)],
                         timeout=request.dump_timeout_s, secrets=dump.secrets,
                         pass_fds=dump.pass_fds),
                on_failure=DumpFailed, progress=progressed,
                # as the dump opens its snapshot: the two are as close as we can
                after_start=lambda: (dump.started(), stats.start()),
                judge=lambda _results: stats.result()))
        if dumps.users is not None:
            with dumps.users as users:
                objects.append(stream_to_swift(
                    request, swift_settings, USERS_OBJECT, "mariadb-dump --system",
                    request.database_segment_size,
                    Pipeline([users.command, *compress_commands(request)],
                             timeout=request.dump_timeout_s, secrets=users.secrets,
                             pass_fds=users.pass_fds),
                    on_failure=DumpFailed, progress=progress, after_start=users.started))
    finally:
        stats.cancel()
    tables: dict[str, list[TableRecord]] = {name: [] for name in info.databases}
    for table in stats.result():
        tables[table.database].append(TableRecord(table=table.table, engine=table.engine,
                                                  rows=table.rows, checksum=table.checksum))
    for obj in objects:
        logger.info("database dump stored as %s: %s compressed, sha256 %s", obj.name,
                    format_size(obj.size), obj.sha256)
    section = DatabaseSection(
        version=info.version, object=objects[0].name,
        system_tables=dumps.system_tables.split(","),
        databases=tables, users_object=objects[1].name if len(objects) > 1 else None,
        privileges=list(access.privileges()), schema_objects=access.schema_objects(
            info.databases))
    return DumpResult(section=section, objects=objects)


def archive_paths(request: BackupRequest, plan: fs.PathPlan, swift_settings: SwiftSettings,
                  logger: Logger) -> ArchiveResult:
    """Archive the planned paths through zstd into Swift; return what it holds and the object."""
    report = fs.TarReport()
    # Never archive our own spools, should staging sit inside a backed-up path.
    staging = os.path.realpath(request.staging_dir)
    extra = (os.path.relpath(staging, plan.root),) if fs.inside(staging, plan.root) else ()
    if request.privileged:
        from undercloud_backup import privileged

        tar = privileged.archive_command(plan, extra_excludes=extra)
    else:
        tar = fs.tar_command(plan, extra_excludes=extra)

    def judge(results: list[StageResult]) -> None:
        if results[0].status == 2 and report.other:
            raise ArchiveFailed(reason="tar: " + "; ".join(report.other[:5]))
        if report.unreadable and not request.allow_unreadable:
            raise UnreadableFiles(count=len(report.unreadable),
                                  examples=", ".join(report.unreadable[:3]))

    logger.info("archiving %s under %s", ", ".join(plan.included), plan.root)
    stored = stream_to_swift(
        request, swift_settings, FS_OBJECT, "tar", request.files_segment_size,
        Pipeline([tar, *compress_commands(request)],
                 timeout=request.archive_timeout_s, on_stderr={0: report.add}),
        on_failure=ArchiveFailed, progress=Progress(logger, "filesystem archive"), judge=judge)
    for kind in ("changed", "vanished", "unreadable"):
        for path in getattr(report, kind):
            logger.warning("tar: %s while archiving: %s", kind, path)
    logger.info("filesystem archive stored as %s: %s compressed, sha256 %s", stored.name,
                format_size(stored.size), stored.sha256)
    section = PathsSection(root=plan.root, included=list(plan.included),
                           absent=list(plan.absent), excluded=list(plan.excluded),
                           changed=report.changed, vanished=report.vanished,
                           unreadable=report.unreadable, other=report.other)
    return ArchiveResult(section=section, object=stored)
