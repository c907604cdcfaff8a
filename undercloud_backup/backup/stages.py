"""The two streams of a backup, producer to Swift: ``mariadb-dump | zstd`` and ``tar | zstd``.

No whole artefact is staged: each pipe feeds a stream uploader. An object is committed only
after every process of its pipe exited cleanly (and the stage's own judge agreed); whatever
fails aborts the upload, which deletes the segments it sent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from undercloud_backup.backup.request import BackupRequest
from undercloud_backup.core import progress
from undercloud_backup.core.errors import (
    ArchiveFailed,
    BackupError,
    CommandFailed,
    UnreadableFiles,
    first_few,
)
from undercloud_backup.core.execute import Command, Pipeline, StageResult, capture
from undercloud_backup.core.manifest import (
    DB_OBJECT,
    FS_OBJECT,
    SNAPSHOT_OBJECT,
    USERS_OBJECT,
    DatabaseSection,
    PathsSection,
    StoredObject,
    TableRecord,
)
from undercloud_backup.core.sizes import format_size
from undercloud_backup.db import binlog, packets, privileged
from undercloud_backup.db import connection as db
from undercloud_backup.db.database import DatabaseAccess
from undercloud_backup.db.dump import DumpSpec
from undercloud_backup.db.tablestats import TableStatsReader
from undercloud_backup.files import archive as fs
from undercloud_backup.files import chain
from undercloud_backup.store.session import open_store
from undercloud_backup.store.space import DEFAULT_SEGMENT_SIZE
from undercloud_backup.store.swift import SwiftSettings, segment_container
from undercloud_backup.store.upload import StreamUploader
from undercloud_backup.trust import crypto
from undercloud_backup.trust.signing import INSTALLED_SIGNING_KEY

Logger = logging.Logger | logging.LoggerAdapter

# Relative to the archive's root, as the wrappers' `deny =` lines (deployments/privileged.conf).
INSTALL_SECRETS = (INSTALLED_SIGNING_KEY, crypto.INSTALLED_BREAK_GLASS,
                   "/etc/undercloud-backup/server.env", "/etc/undercloud-backup/alert-webhook-url",
                   "/var/lib/undercloud-backup/server")


@dataclass
class DumpResult:
    """The database stage's outcome: the manifest's section and the objects it wrote."""

    section: DatabaseSection
    objects: list[StoredObject]


@dataclass
class ArchiveResult:
    """The filesystem stage's outcome: what the archive holds, what tar said, the object;
    which level it is (:class:`chain.Level` as a dict) and the snapshot tar left for the
    next level (stored object, and the manifest's ``snapshot`` description)."""

    section: PathsSection
    object: StoredObject
    level: dict = field(default_factory=dict)
    snapshot: StoredObject | None = None
    snapshot_record: dict | None = None


def zstd_command(level: int, threads: int = 1) -> Command:
    # One compressor thread per stream: the database and the files are already two streams side
    # by side, and -T0 only added job buffers (60-70 MiB each) and, on incompressible images,
    # twice the CPU (benchmarks/RESULTS.md). The dump, the long pole of a full and nearly all of
    # an incremental's work, gets two (+~46 MiB): -10..13 % wall at scale 1 (benchmarks/RESULTS.md).
    mode = "--single-thread" if threads <= 1 else f"-T{threads}"
    return Command(argv=("zstd", "-q", f"-{level}", mode, "-c", "--no-progress"), name="zstd")


def compress_commands(request: BackupRequest, threads: int = 1) -> list[Command]:
    """``zstd``, then ``age -R recipients`` when the backup is encrypted, so that
    whoever reads the container reads no database and no file."""
    if request.recipients_file is None:
        return [zstd_command(request.compression_level, threads)]
    return [zstd_command(request.compression_level, threads),
            crypto.encrypt_command(request.recipients_file)]


def stored_leaf(request: BackupRequest, leaf: str) -> str:
    """``filesystem.tar.zst``, or ``filesystem.tar.zst.age`` when encrypted."""
    return leaf if request.recipients_file is None else crypto.encrypted_leaf(leaf)


class Progress:
    """Log a stream's progress at most every ``every`` seconds."""

    def __init__(self, logger: Logger, what: str, every: float = 10.0) -> None:
        self.logger, self.what, self.every = logger, what, every
        self._next = time.monotonic() + every

    def __call__(self, sent: int, elapsed: int, read: int | None = None) -> None:
        # The run's progress artifact and terminal line count what the compressor read: the
        # space check's estimate, their 100 %, is of uncompressed bytes.
        progress.feed(self.what, sent if read is None else read)
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every
        rate = sent / max(elapsed, 1) / 1024**2
        done = "" if read is None else f"{format_size(read)} read, "
        self.logger.info("%s: %s%s uploaded (compressed) after %d s, %.1f MiB/s", self.what,
                         done, format_size(sent), elapsed, rate)


def _reading(pipe: Pipeline, progress: Callable[..., None]) -> Callable[[int, int], None]:
    """The uploader's progress callback, with the bytes the pipe's compressor has read."""
    zstd = next((i for i, c in enumerate(pipe.commands) if c.name == "zstd"), None)
    most = 0

    def report(sent: int, elapsed: int) -> None:
        nonlocal most
        read = pipe.bytes_read(zstd) if zstd is not None else None
        most = max(most, read or 0)
        progress(sent, elapsed, most or None)
    return report


def stream_to_swift(request: BackupRequest, swift_settings: SwiftSettings, leaf: str,
                    content: str, segment_size: int | None, pipe: Pipeline, *,
                    on_failure: Callable[..., BackupError], progress: Callable[..., None],
                    after_start: Callable[[], object] | None = None,
                    judge: Callable[[list[StageResult]], object] | None = None) -> StoredObject:
    """Feed a producer pipe into Swift; commit only if every stage (and ``judge``) is happy.

    A stage that failed raises ``on_failure(reason=...)`` (an error class, or what turns the
    reason into the run's error: :meth:`dbdump.DumpSpec.failure`)."""
    with open_store(swift_settings) as store:
        # Once per run's session: the other streams' stages reuse the answer.
        store.ensure_container(swift_settings.container)
        store.ensure_container(segment_container(swift_settings.container))
        uploader = StreamUploader(store, swift_settings.container,
                                  request.object_name(stored_leaf(request, leaf)),
                                  segment_size=segment_size or DEFAULT_SEGMENT_SIZE,
                                  staging_dir=request.staging_dir, compression="zstd",
                                  content=content, progress=_reading(pipe, progress))
        try:
            with pipe:
                if after_start is not None:
                    after_start()
                assert pipe.stdout is not None
                uploader.feed(pipe.stdout)
                try:
                    results = pipe.wait()
                except CommandFailed as error:
                    raise on_failure(reason=error.unabridged()) from None
                if judge is not None:
                    judge(results)
                return uploader.commit()
        except BaseException:
            uploader.abort()
            raise


def dump_databases(request: BackupRequest, access: DatabaseAccess,
                   swift_settings: SwiftSettings, logger: Logger,
                   coordinates: list[str] | None = None) -> DumpResult:
    """Dump every database, then users and grants into an object of their own (so that the
    databases' dump loads with ``mariadb --one-database NAME``), through zstd into Swift;
    return the manifest's section and the objects. With ``coordinates``, the dump also says
    where its snapshot is in the binary log: that line is appended to the list."""
    info = access.server_info()
    logger.info("dumping %d database(s) from MariaDB %s (%s on disk): %s",
                len(info.databases), info.version, format_size(info.size_bytes),
                ", ".join(info.databases) or "(none, users only)")
    excluded = access.table_types(request.exclude_tables) if request.exclude_tables else {}
    if excluded:
        logger.warning("left out of the database dump (exclude_tables): %s",
                       ", ".join(f"{name} ({kind})" for name, kind in excluded.items()))
    stats = TableStatsReader(*access.table_stats_beside(info.databases,
                                                        request.table_checksums))
    dumps = access.dump_commands(info.databases, ignore=request.exclude_tables)
    progress = Progress(logger, "database dump")

    def progressed(sent: int, elapsed: int, read: int | None = None) -> None:
        stats.check()  # a failed read stops the dump now, not after the last byte
        progress(sent, elapsed, read)

    def started(dump: DumpSpec) -> None:
        dump.started()
        stats.start()

    objects = []
    meter = packets.MeterReport()  # the longest statement: what a restore's server must take
    try:
        with dumps.databases as dump:
            producer = binlog_tap(dump.command, coordinates)
            on_stderr: dict[int, Callable[[str], None]] = {len(producer): meter}
            if coordinates is not None:
                on_stderr[1] = coordinates.append
            objects.append(stream_to_swift(
                request, swift_settings, DB_OBJECT, "mariadb-dump",
                request.database_segment_size,
                Pipeline([*producer, packets.meter_command(),
                          *compress_commands(request, threads=2)],
                         timeout=request.dump_timeout_s, secrets=dump.secrets,
                         pass_fds=dump.pass_fds, on_stderr=on_stderr),
                on_failure=dump.failure, progress=progressed,
                # as the dump opens its snapshot: the two are as close as we can
                after_start=lambda: started(dump),
                judge=lambda _results: stats.result()))
        if dumps.users is not None:
            with dumps.users as users:
                objects.append(stream_to_swift(
                    request, swift_settings, USERS_OBJECT, "mariadb-dump --system",
                    request.database_segment_size,
                    Pipeline([users.command, *compress_commands(request)],
                             timeout=request.dump_timeout_s, secrets=users.secrets,
                             pass_fds=users.pass_fds),
                    on_failure=users.failure, progress=progress, after_start=users.started))
    finally:
        stats.cancel()
    for obj in objects:
        logger.info("database dump stored as %s: %s compressed, sha256 %s", obj.name,
                    format_size(obj.size), obj.sha256)
    section = _database_section(access, info, dumps.system_tables, stats.result(), objects,
                                excluded)
    if meter.longest is not None:
        section.max_allowed_packet = packets.needed(meter.longest)
    if section.partial:
        logger.warning("%s", section.partial_note())
    for name in section.vanished_tables:
        logger.warning("table %s was dropped while the dump ran: recorded as vanished in the "
                       "manifest, without row count", name)
    return DumpResult(section=section, objects=objects)


def binlog_tap(dump: Command, coordinates: list[str] | None) -> list[Command]:
    """The dump alone; or, to learn its snapshot's binlog coordinates, with ``--master-data=2``
    and the tap that reads them from its head (:mod:`undercloud_backup.db.headtap`)."""
    if coordinates is None:
        return [dump]
    return [binlog.with_master_data(dump), binlog.headtap_command()]


def _database_section(access: DatabaseAccess, info: db.ServerInfo, system_tables: str,
                      table_stats: list[db.TableStats], objects: list[StoredObject],
                      excluded: dict[str, str] | None = None) -> DatabaseSection:
    """The manifest's database section: what the server held and how the dump saw it (less
    what ``excluded`` left out: ``db.name`` -> ``view`` or ``table``)."""
    excluded = excluded or {}
    tables, vanished = table_records(
        info.databases, [t for t in table_stats if f"{t.database}.{t.table}" not in excluded])
    schema_objects = access.schema_objects(info.databases)
    for name, kind in excluded.items():  # what a restore of this dump brings back
        counts = schema_objects.get(name.partition(".")[0], {})
        if kind == "view" and counts.get("views"):
            counts["views"] -= 1
    # The grants the dump ran with, and what they left out: only --allow-partial-database
    # gets this far with something missing (the check before fails the run, exit 25).
    grants = access.privilege_report(info.databases)
    return DatabaseSection(
        version=info.version, object=objects[0].name, system_tables=system_tables.split(","),
        databases=tables, users_object=objects[1].name if len(objects) > 1 else None,
        privileges=list(grants.grants), schema_objects=schema_objects,
        account=grants.user, partial=not grants.complete, missing=list(grants.missing),
        fix=grants.fix, vanished_tables=vanished, excluded_tables=sorted(excluded))


def table_records(databases: tuple[str, ...] | list[str], table_stats: list[db.TableStats]
                  ) -> tuple[dict[str, list[TableRecord]], list[str]]:
    """The manifest's tables per database, and the ``db.table`` of those that vanished."""
    tables: dict[str, list[TableRecord]] = {name: [] for name in databases}
    vanished = []
    for table in table_stats:
        if table.vanished:
            vanished.append(f"{table.database}.{table.table}")
            continue
        tables[table.database].append(TableRecord(table=table.table, engine=table.engine,
                                                  rows=table.rows, checksum=table.checksum))
    return tables, vanished


def decide_level(request: BackupRequest, plan: fs.PathPlan, swift_settings: SwiftSettings,
                 logger: Logger) -> tuple[chain.Level, bytes]:
    """Full or incremental (and against what), said in the log; a forced full warns."""
    with open_store(swift_settings) as store:
        level, parent_snapshot = chain.decide(
            store, swift_settings.container, hostname=request.hostname, plan=plan,
            full=request.full, full_every_s=request.full_every_s,
            now=dt.datetime.now(dt.UTC), signing_key=request.signing_key)
    if level.forced:
        logger.warning("taking a FULL backup of the files: %s", level.full_reason)
    elif level.kind == chain.FULL:
        logger.info("taking a full backup of the files: %s", level.full_reason)
    else:
        logger.info("taking an incremental backup of the files: level %d against %s "
                    "(chain %s)", level.level, level.parent, " > ".join(level.chain))
    return level, parent_snapshot


class _Snapshot:
    """The ``--listed-incremental`` file of one archive run, and how to get it back.

    Direct: an anonymous (already unlinked) file that tar reopens as ``/dev/fd/N``, reads and
    rewrites in place, so that nothing is left in staging whatever kills the run. Privileged:
    the parent goes to the wrapper on stdin, which keeps it in root's own directory under a
    random ID; the new one comes back from ``ucb-archive ROOT --take-snapshot=ID``."""

    def __init__(self, request: BackupRequest, plan: fs.PathPlan, parent: bytes) -> None:
        self.request, self.plan = request, plan
        self.stdin = tempfile.TemporaryFile(dir=request.staging_dir)
        self.file = None if request.privileged else tempfile.TemporaryFile(
            dir=request.staging_dir)
        self.ident = secrets.token_hex(16)
        self.taken = False
        target = self.stdin if self.file is None else self.file
        target.write(parent)
        target.flush()
        target.seek(0)

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return () if self.file is None else (self.file.fileno(),)

    def tar(self, extra: tuple[str, ...]) -> Command:
        if self.file is None:
            return privileged.archive_command(self.plan, extra_excludes=extra,
                                              snapshot_id=self.ident)
        return fs.tar_command(self.plan, extra_excludes=extra,
                              snapshot=f"/dev/fd/{self.file.fileno()}")

    def take(self) -> bytes:
        if self.file is None:
            return capture(privileged.take_snapshot_command(self.plan.root, self.ident),
                           timeout=600)
        self.file.seek(0)
        return self.file.read()

    def close(self) -> None:
        self.stdin.close()
        if self.file is not None:
            self.file.close()
        elif not self.taken:  # the wrapper's file of a failed run: removed now, or after a day
            try:
                self.take()
            except BackupError:
                pass


@contextmanager
def _snapshot(request: BackupRequest, plan: fs.PathPlan, parent: bytes) -> Iterator[_Snapshot]:
    snapshot = _Snapshot(request, plan, parent)
    try:
        yield snapshot
    finally:
        snapshot.close()


def store_snapshot(request: BackupRequest, swift_settings: SwiftSettings, plain: bytes
                   ) -> tuple[StoredObject, dict]:
    """``filesystem.snar.zst`` (``.age``) into Swift; the manifest's ``snapshot`` record."""
    with tempfile.TemporaryFile(dir=request.staging_dir) as source:
        source.write(plain)
        source.seek(0)
        stored = stream_to_swift(
            request, swift_settings, SNAPSHOT_OBJECT, chain.SNAPSHOT_CONTENT, None,
            Pipeline(compress_commands(request), stdin=source, timeout=3600),
            on_failure=ArchiveFailed, progress=lambda *_: None)
    record = {"object": stored.name, "size": stored.size, "sha256": stored.sha256,
              "plain_size": len(plain), "plain_sha256": hashlib.sha256(plain).hexdigest()}
    if request.recipients_file is not None:  # the node cannot decrypt it: keep it here too
        chain.save_local_copy(swift_settings.container, request.backup_id, plain)
    return stored, record


def judge_tar(status: int | None, report: fs.TarReport, allow_unreadable: bool) -> None:
    """tar's verdict on an archive whose stream went through: status 2 fails the run only for
    a complaint of its own (not a warning such as "socket ignored", not a file it could not
    read, which ``allow_unreadable`` decides on)."""
    fatal = report.fatal()
    if status == 2 and fatal:
        raise ArchiveFailed(reason="tar: " + first_few(
            fatal, len(fatal) + report.unlisted.get("other", 0), limit=80))
    if report.unreadable and not allow_unreadable:
        raise UnreadableFiles(count=report.count("unreadable"),
                              examples=first_few(report.unreadable[:3]))


def archive_paths(request: BackupRequest, plan: fs.PathPlan, swift_settings: SwiftSettings,
                  logger: Logger) -> ArchiveResult:
    """Archive the planned paths through zstd into Swift, as a full or an incremental level
    (:mod:`chain`); then the snapshot for the next level. Return what it holds and both
    objects."""
    level, parent_snapshot = decide_level(request, plan, swift_settings, logger)
    report = fs.TarReport()
    # Never archive our own spools, should staging sit inside a backed-up path.
    staging = os.path.realpath(request.staging_dir)
    extra: tuple[str, ...] = ((os.path.relpath(staging, plan.root),)
                              if fs.inside(staging, plan.root) else ())
    # Nor the install's own secrets that no restore needs, in direct mode too (the wrappers'
    # deny list has them), nor the run's signing key: whoever reads a backup could sign forged
    # ones, decrypt every backup (the break-glass identity) or use the server's password.
    extra += INSTALL_SECRETS
    if request.signing_key is not None:
        key = os.path.realpath(request.signing_key)
        extra += (os.path.relpath(key, plan.root),) if fs.inside(key, plan.root) else ()

    def judge(results: list[StageResult]) -> None:
        judge_tar(results[0].status, report, request.allow_unreadable)

    logger.info("archiving %s under %s", ", ".join(plan.included), plan.root)
    with _snapshot(request, plan, parent_snapshot) as snapshot:
        stored = stream_to_swift(
            request, swift_settings, FS_OBJECT, "tar", request.files_segment_size,
            Pipeline([snapshot.tar(extra), *compress_commands(request)],
                     timeout=request.archive_timeout_s, on_stderr={0: report.add},
                     stdin=snapshot.stdin, pass_fds=snapshot.pass_fds),
            on_failure=ArchiveFailed, progress=Progress(logger, "filesystem archive"),
            judge=judge)
        plain = snapshot.take()
        snapshot.taken = True
    if not plain.startswith(b"GNU tar-"):
        raise ArchiveFailed(reason=f"tar left no snapshot for the next level ({len(plain)} "
                                   "bytes)")
    snapshot_object, record = store_snapshot(request, swift_settings, plain)
    for kind in ("changed", "vanished", "unreadable"):
        for path in report.listed(kind):
            logger.warning("tar: %s while archiving: %s", kind, path)
    logger.info("filesystem archive (%s) stored as %s: %s compressed, sha256 %s",
                level.kind if level.kind == chain.FULL else f"incremental level {level.level}",
                stored.name, format_size(stored.size), stored.sha256)
    section = PathsSection(root=plan.root, included=list(plan.included),
                           absent=list(plan.absent), excluded=list(plan.excluded),
                           changed=report.listed("changed"),
                           vanished=report.listed("vanished"),
                           unreadable=report.listed("unreadable"), other=report.listed("other"))
    return ArchiveResult(section=section, object=stored, level=level.to_dict(),
                         snapshot=snapshot_object, snapshot_record=record)
