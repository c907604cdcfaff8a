"""The backup's stages as plain functions; ``tasks/`` wraps each one in a Prefect task.

Database and filesystem are each one stream, producer to Swift, with no staging of the whole
artefact: ``mariadb-dump | zstd`` and ``tar | zstd`` feed a :class:`StreamUploader`. An object is
committed only after every process in its pipe exited cleanly; the manifest, written last,
is what makes a backup complete.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from undercloud_backup import __version__, swift
from undercloud_backup import archive as fs
from undercloud_backup import database as db
from undercloud_backup.errors import (
    ArchiveFailed,
    BackupError,
    CommandFailed,
    ConfigError,
    DatabaseUnreachable,
    DumpFailed,
    InsufficientSpace,
    UnreadableFiles,
)
from undercloud_backup.execute import Command, Pipeline
from undercloud_backup.sizes import format_size

MANIFEST_FORMAT = "undercloud-backup/1"
DB_OBJECT = "mariadb-all-databases.sql.zst"
FS_OBJECT = "filesystem.tar.zst"
# Space the staging filesystem must keep free beyond our spools.
STAGING_MARGIN = 64 * 1024**2
# Automatic segment size: small enough that upload starts early and spools stay small, large
# enough that a stream of the estimated size needs at most AUTO_SEGMENT_FILL of Swift's limit
# of segments per object (compressed output is smaller; the headroom covers a wrong estimate).
AUTO_SEGMENT_MIN = swift.DEFAULT_SEGMENT_SIZE
AUTO_SEGMENT_FILL = 0.9
DEFAULT_MAX_SEGMENTS = 1000  # Swift's default max_manifest_segments


@dataclass(frozen=True)
class BackupRequest:
    """Everything a stage needs to know, without secrets (it is a Prefect task input)."""

    backup_id: str
    created_at: str
    hostname: str
    root: str = "/"
    add_paths: tuple[str, ...] = ()
    exclude_paths: tuple[str, ...] = ()
    include_files: bool = True
    include_databases: bool = True
    staging_dir: str = "/var/tmp"
    allow_unreadable: bool = False
    compression_level: int = 3
    # CHECKSUM TABLE of every table besides its row count (verify compares both).
    table_checksums: bool = True
    dump_timeout_s: float = 6 * 3600
    archive_timeout_s: float = 12 * 3600
    # Run tar and the dump as root through the sudo wrappers of deployments/ (worker mode).
    privileged: bool = False

    def object_name(self, leaf: str) -> str:
        return f"{self.backup_id}/{leaf}"


def new_backup_id(hostname: str, when: dt.datetime, unique: str | None = None) -> str:
    """``<host>-<UTC time>-<6 hex>``: readable, sortable per host, unique per run."""
    stamp = when.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{hostname}-{stamp}-{(unique or secrets.token_hex(3))[:6]}"


def zstd_command(level: int) -> Command:
    # One compressor thread per stream: the database and the files are already two streams side
    # by side, and -T0 only added job buffers (60-70 MiB each) and, on incompressible images,
    # twice the CPU (benchmarks/RESULTS.md).
    return Command(argv=("zstd", "-q", f"-{level}", "--single-thread", "-c", "--no-progress"),
                   name="zstd")


class Progress:
    """Log a stream's progress at most every ``every`` seconds."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, what: str,
                 every: float = 10.0) -> None:
        self.logger, self.what, self.every = logger, what, every
        self._next = time.monotonic() + every

    def __call__(self, sent: int, elapsed: int) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every
        rate = sent / max(elapsed, 1) / 1024**2
        self.logger.info("%s: %s uploaded (compressed) after %d s, %.1f MiB/s", self.what,
                         format_size(sent), elapsed, rate)


# -------------------------------------------------------------------------------- planning
def plan_files(request: BackupRequest) -> fs.PathPlan:
    if not request.include_files:
        return fs.PathPlan(root=os.path.realpath(request.root), included=(), absent=(),
                           excluded=())
    plan = fs.plan_paths(request.root, request.add_paths, request.exclude_paths)
    if not plan.included:
        raise ConfigError(detail=f"none of the paths to back up exists under {plan.root}")
    return plan


@dataclass(frozen=True)
class SpaceReport:
    database_bytes: int
    files_bytes: int
    staging_dir: str
    staging_needed: int
    staging_available: int
    swift_quota_left: int | None = None
    database_segment_size: int | None = None
    files_segment_size: int | None = None
    checks: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SwiftLimits:
    """What the Swift cluster allows (its /info), where it says."""

    max_object_bytes: int | None = None
    max_manifest_segments: int | None = None

    @classmethod
    def from_capabilities(cls, capabilities: dict) -> SwiftLimits:
        return cls(max_object_bytes=capabilities.get("swift", {}).get("max_file_size"),
                   max_manifest_segments=capabilities.get("slo", {}).get(
                       "max_manifest_segments"))


def auto_segment_size(stream_bytes: int, limits: SwiftLimits) -> int:
    """Segment size for a stream of about ``stream_bytes``: 64 MiB, or more for a big stream."""
    max_segments = limits.max_manifest_segments or DEFAULT_MAX_SEGMENTS
    needed = -(-stream_bytes // max(1, int(max_segments * AUTO_SEGMENT_FILL)))
    mib = 1024**2
    size = max(AUTO_SEGMENT_MIN, -(-needed // mib) * mib)
    if limits.max_object_bytes:
        size = min(size, limits.max_object_bytes)  # check_segments then says it cannot fit
    return size


def check_segments(stream_bytes: dict[str, int], segment_size: int,
                   limits: SwiftLimits) -> None:
    """Refuse a segment size Swift will not take, or one that makes an SLO too long."""
    if limits.max_object_bytes and segment_size > limits.max_object_bytes:
        raise ConfigError(detail=f"segment size {format_size(segment_size)} is over Swift's "
                                 f"object limit {format_size(limits.max_object_bytes)}")
    if not limits.max_manifest_segments:
        return
    for what, size in stream_bytes.items():
        # uncompressed size: the worst case for incompressible images
        if -(-size // segment_size) > limits.max_manifest_segments:
            least = -(-size // limits.max_manifest_segments)
            raise ConfigError(detail=f"the {what} (up to {format_size(size)}) would need more "
                                     f"than Swift's {limits.max_manifest_segments} segments per "
                                     f"object; use --segment-size {format_size(least)} or more")


def check_space(request: BackupRequest, plan: fs.PathPlan, database_bytes: int,
                segment_size: int | None, swift_quota_left: int | None = None,
                limits: SwiftLimits = SwiftLimits()) -> SpaceReport:
    """Compare what the run will write with what is free, before anything is written.

    Locally only segment spools are staged (two per stream: one filling, one uploading); the
    whole estimate has to fit in Swift's quota when the account has one, and each stream in
    Swift's limit of segments per object. Without a ``segment_size`` each stream gets its own,
    from :func:`auto_segment_size`.
    """
    files_bytes = fs.estimate_bytes(plan.root, plan.included, plan.excluded)
    streams = {"database dump": database_bytes if request.include_databases else None,
               "filesystem archive": files_bytes if plan.included else None}
    sizes: dict[str, int] = {}
    for what, size in streams.items():
        if size is None:
            continue
        sizes[what] = segment_size or auto_segment_size(size, limits)
        check_segments({what: size}, sizes[what], limits)
    # A stream never spools more than it produces, and never more than two segments.
    spool = sum(min(2 * sizes[what], streams[what] + sizes[what] // 8 + 1) for what in sizes)
    needed = spool + STAGING_MARGIN if sizes else 0
    if not os.path.isdir(request.staging_dir):
        raise ConfigError(detail=f"staging directory {request.staging_dir} does not exist")
    available = shutil.disk_usage(request.staging_dir).free
    segments = ", ".join(f"{what} {format_size(size)}" for what, size in sizes.items())
    checks = [f"staging {request.staging_dir}: need {format_size(needed)}, "
              f"free {format_size(available)}",
              f"segment size: {segments or 'no stream'}"]
    if needed > available:
        raise InsufficientSpace(location=request.staging_dir,
                                purpose=f"{len(sizes)} upload stream(s) with segments of "
                                        f"{segments}",
                                needed=format_size(needed), available=format_size(available))
    estimate = database_bytes + files_bytes
    if swift_quota_left is not None:
        checks.append(f"swift quota: need up to {format_size(estimate)}, "
                      f"left {format_size(swift_quota_left)}")
        if estimate > swift_quota_left:
            raise InsufficientSpace(location="the Swift account", purpose="the backup",
                                    needed=format_size(estimate),
                                    available=format_size(swift_quota_left))
    return SpaceReport(database_bytes=database_bytes, files_bytes=files_bytes,
                       staging_dir=request.staging_dir, staging_needed=needed,
                       staging_available=available, swift_quota_left=swift_quota_left,
                       database_segment_size=sizes.get("database dump"),
                       files_segment_size=sizes.get("filesystem archive"),
                       checks=tuple(checks))


def swift_limits(conn) -> SwiftLimits:
    with swift.swift_errors("GET info", swift.storage_url(conn)):
        return SwiftLimits.from_capabilities(conn.get_capabilities())


def swift_quota_left(conn) -> int | None:
    """Bytes left under the account's quota, or None when it has none."""
    with swift.swift_errors("HEAD account", swift.storage_url(conn)):
        headers = conn.head_account()
    quota = headers.get("x-account-meta-quota-bytes")
    if not quota:
        return None
    return int(quota) - int(headers.get("x-account-bytes-used", 0))


# ----------------------------------------------------------------------------------- stages
def dump_databases(request: BackupRequest, settings: db.DatabaseSettings | None,
                   swift_settings: swift.SwiftSettings,
                   logger: logging.Logger | logging.LoggerAdapter) -> dict:
    """Dump every database (and users/grants) through zstd into Swift; return its record."""
    read_fd, write_fd = os.pipe()
    open_fds = [read_fd]

    def close_read_end() -> None:  # the dump process holds its own copy once started
        while open_fds:
            os.close(open_fds.pop())

    try:
        if request.privileged:
            # root through the unix socket, via the sudo wrapper: no password involved
            from undercloud_backup import privileged

            os.close(write_fd)
            info = privileged.server_info()

            # Not cancellable (root's client, under sudo): on failure it runs to its end (or
            # its timeout) on a daemon thread that never holds the process back.
            stats = TableStatsReader(
                lambda: privileged.table_stats(info.databases, request.table_checksums))
            dump = privileged.dump_command(info.databases)
            secrets: list[str | None] = []
        else:
            assert settings is not None
            with os.fdopen(write_fd, "w") as options:  # a 64 KiB pipe holds it all
                options.write(settings.option_file_text())
            with db.connect(settings) as connection:
                info = db.server_info(connection)

            stats = TableStatsReader(*db.table_stats_beside(settings, info.databases,
                                                            request.table_checksums))
            dump = db.dump_command(info.databases, read_fd, db.dump_tool())
            secrets = [settings.password]
        logger.info("dumping %d database(s) from MariaDB %s (%s on disk): %s",
                    len(info.databases), info.version, format_size(info.size_bytes),
                    ", ".join(info.databases) or "(none, users only)")
        progress = Progress(logger, "database dump")

        def started() -> None:
            close_read_end()
            stats.start()  # as the dump opens its snapshot: the two are as close as we can

        def progressed(sent: int, elapsed: int) -> None:
            stats.check()  # a failed read stops the dump now, not after the last byte
            progress(sent, elapsed)

        try:
            record = _stream_to_swift(
                request, swift_settings, DB_OBJECT, "mariadb-dump",
                Pipeline([dump, zstd_command(request.compression_level)],
                         timeout=request.dump_timeout_s, secrets=secrets, pass_fds=(read_fd,)),
                on_failure=DumpFailed, progress=progressed, after_start=started,
                judge=lambda _results: stats.result())
        finally:
            stats.cancel()
        table_stats = stats.result()
    finally:
        close_read_end()
    databases: dict[str, dict] = {name: {"tables": []} for name in info.databases}
    for table in table_stats:
        databases[table.database]["tables"].append(table.as_dict())
    logger.info("database dump stored as %s: %s compressed, sha256 %s", record.name,
                format_size(record.size), record.sha256)
    return {"object": record.as_dict(), "server_version": info.version,
            "databases": databases, "system_tables": db.SYSTEM_DUMP}


class TableStatsReader:
    """Row counts and checksums, read on a second connection while the dump runs.

    They re-read every row: taken before the dump they delayed it by a quarter of its time
    (benchmarks/RESULTS.md). The dump object is committed only once they are in; a failure
    here fails the dump with its own error, as retryable as it was (a lost connection) or not.
    """

    WHAT = "reading the row counts and checksums"

    def __init__(self, read: Callable[[], list[db.TableStats]],
                 cancel: Callable[[], None] | None = None) -> None:
        self._read, self._cancel = read, cancel
        self._done = threading.Event()
        self._result: list[db.TableStats] = []
        self._error: BaseException | None = None
        # A daemon thread: an interpreter that exits never waits for a pass it abandoned.
        self._thread = threading.Thread(target=self._run, name="table-stats", daemon=True)

    def _run(self) -> None:
        try:
            self._result = self._read()
        except BaseException as error:  # noqa: BLE001 - handed to the dump's thread
            self._error = error
        finally:
            self._done.set()

    def start(self) -> None:
        self._thread.start()

    def check(self) -> None:
        """Raise now if the read already failed."""
        if self._done.is_set() and self._error is not None:
            self._raise()

    def result(self) -> list[db.TableStats]:
        if self._thread.ident is None:
            self.start()
        self._done.wait()
        if self._error is not None:
            self._raise()
        return self._result

    def cancel(self) -> None:
        """Stop a read still running (the dump failed); best effort."""
        if self._thread.is_alive() and not self._done.is_set() and self._cancel:
            try:
                self._cancel()
            except Exception:  # noqa: BLE001 - the dump's own error is the one to report
                pass

    def _raise(self) -> None:
        error = self._error
        if isinstance(error, DatabaseUnreachable):
            raise DatabaseUnreachable(where=error.fields.get("where"),
                                      reason=f"{self.WHAT}: {error.fields.get('reason')}"
                                      ) from None
        if isinstance(error, BackupError):  # names its command: sudo refused, a timeout, ...
            raise error
        raise DumpFailed(reason=f"{self.WHAT}: {type(error).__name__}: {error}") from None


def _stream_to_swift(request: BackupRequest, swift_settings: swift.SwiftSettings, leaf: str,
                     content: str, pipe: Pipeline, *, on_failure: type[BackupError],
                     progress: swift.ProgressCallback, after_start=None,
                     judge=None) -> swift.StoredObject:
    """Feed a producer pipe into Swift; commit only if every stage (and ``judge``) is happy."""
    conn = swift.connect(swift_settings)
    swift.ensure_containers(conn, swift_settings)
    uploader = swift.StreamUploader(conn, swift_settings, request.object_name(leaf),
                                    staging_dir=request.staging_dir, compression="zstd",
                                    content=content, progress=progress)
    try:
        with pipe:
            if after_start is not None:
                after_start()
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


def archive_paths(request: BackupRequest, plan: fs.PathPlan,
                  swift_settings: swift.SwiftSettings,
                  logger: logging.Logger | logging.LoggerAdapter) -> dict:
    """Archive the planned paths through zstd into Swift; return its record and tar's report."""
    report = fs.TarReport()
    # Never archive our own spools, should staging sit inside a backed-up path.
    staging = os.path.realpath(request.staging_dir)
    extra: tuple[str, ...] = ()
    if staging == plan.root or staging.startswith(plan.root.rstrip("/") + "/"):
        extra = (os.path.relpath(staging, plan.root),)
    if request.privileged:
        from undercloud_backup import privileged

        tar = privileged.archive_command(plan, extra_excludes=extra)
    else:
        tar = fs.tar_command(plan, extra_excludes=extra)

    def judge(results) -> None:
        if results[0].status == 2 and report.other:
            raise ArchiveFailed(reason="tar: " + "; ".join(report.other[:5]))
        if report.unreadable and not request.allow_unreadable:
            raise UnreadableFiles(count=len(report.unreadable),
                                  examples=", ".join(report.unreadable[:3]))

    logger.info("archiving %s under %s", ", ".join(plan.included), plan.root)
    record = _stream_to_swift(
        request, swift_settings, FS_OBJECT, "tar",
        Pipeline([tar, zstd_command(request.compression_level)],
                 timeout=request.archive_timeout_s, on_stderr={0: report.add}),
        on_failure=ArchiveFailed, progress=Progress(logger, "filesystem archive"), judge=judge)
    for kind in ("changed", "vanished", "unreadable"):
        for path in getattr(report, kind):
            logger.warning("tar: %s while archiving: %s", kind, path)
    logger.info("filesystem archive stored as %s: %s compressed, sha256 %s", record.name,
                format_size(record.size), record.sha256)
    return {"object": record.as_dict(), "tar": report.as_dict()}


def build_manifest(request: BackupRequest, plan: fs.PathPlan, space: SpaceReport | None,
                   database: dict | None, files: dict | None, *,
                   flow_run_id: str | None = None) -> dict:
    objects = [part["object"] for part in (database, files) if part]
    return {
        "format": MANIFEST_FORMAT,
        "backup_id": request.backup_id,
        "created_at": request.created_at,
        "completed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": request.hostname,
        "tool": {"name": "undercloud-backup", "version": __version__},
        "flow_run_id": flow_run_id,
        "platform": {"python": platform.python_version(), "kernel": platform.release()},
        "mariadb": None if database is None else {
            "version": database["server_version"],
            "object": database["object"]["name"],
            "system_tables": database["system_tables"],
            "databases": database["databases"],
        },
        "paths": None if files is None else {**plan.as_dict(), **files["tar"]},
        "space": space.as_dict() if space else None,
        "objects": objects,
    }


def write_manifest(conn, container: str, manifest: dict) -> str:
    """Check every object is still there as recorded, then write the manifest: the commit."""
    for record in manifest["objects"]:
        swift.verify_stored(conn, container, swift.StoredObject(**record))
    return swift.put_manifest(conn, container, manifest)
