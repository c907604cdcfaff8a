"""Before anything is written: how big each stream's segments are, and whether the run fits.

The segment sizes are decided here, once, and travel in the
:class:`~undercloud_backup.backup.request.BackupRequest` to the stages; the staging check counts
what the uploader really spools.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

from undercloud_backup.core.errors import ConfigError, InsufficientSpace, StagingNotWritable
from undercloud_backup.core.sizes import format_size
from undercloud_backup.store.connection import SwiftLimits

try:  # the uploader's own bound, where it states it
    from undercloud_backup.store.upload import SPOOLS_PER_STREAM
except ImportError:  # pragma: no cover - until upload.py lands: swift.StreamUploader's bound
    # one segment uploading, one queued for the uploader, one being filled
    SPOOLS_PER_STREAM = 3

DEFAULT_SEGMENT_SIZE = 64 * 1024**2
__all__ = ["SwiftLimits", "SpaceReport", "check_space", "auto_segment_size"]
# Space the staging filesystem must keep free beyond our spools.
STAGING_MARGIN = 64 * 1024**2
# Automatic segment size: small enough that upload starts early and spools stay small, large
# enough that a stream of the estimated size needs at most AUTO_SEGMENT_FILL of Swift's limit
# of segments per object (compressed output is smaller; the headroom covers a wrong estimate).
AUTO_SEGMENT_MIN = DEFAULT_SEGMENT_SIZE
AUTO_SEGMENT_FILL = 0.9
DEFAULT_MAX_SEGMENTS = 1000  # Swift's default max_manifest_segments
DATABASE_STREAM = "database dump"
FILES_STREAM = "filesystem archive"


@dataclass(frozen=True)
class SpaceReport:
    """What the check found; its segment sizes are the ones the stages use."""

    database_bytes: int
    files_bytes: int
    staging_dir: str
    staging_needed: int
    staging_available: int
    swift_quota_left: int | None = None
    database_segment_size: int | None = None
    files_segment_size: int | None = None
    checks: tuple[str, ...] = field(default=())
    server_version: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


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
    if segment_size <= 0:
        raise ConfigError(detail="segment size must be more than 0 bytes")
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


def segment_sizes(streams: dict[str, int], segment_size: int | None,
                  limits: SwiftLimits) -> dict[str, int]:
    """Each stream's segment size: the one asked for, or its own from its estimated size."""
    sizes = {}
    for what, size in streams.items():
        sizes[what] = segment_size if segment_size is not None else auto_segment_size(
            size, limits)
        check_segments({what: size}, sizes[what], limits)
    return sizes


def check_writable(staging_dir: str) -> None:
    """An anonymous file made (and gone) in ``staging_dir``, as every spool is, or the
    error saying why it cannot be (read-only file system, permissions), before any work."""
    try:
        with tempfile.TemporaryFile(dir=staging_dir):
            pass
    except OSError as error:
        raise StagingNotWritable(path=staging_dir,
                                 reason=error.strerror or type(error).__name__) from None


def staging_needed(streams: dict[str, int], sizes: dict[str, int]) -> int:
    """Bytes the spools of every stream can take at once, with the margin.

    A stream holds at most SPOOLS_PER_STREAM segments on disk, and never much more than it
    produces (an eighth of a segment covers an estimate that was a little short).
    """
    if not sizes:
        return 0
    spool = sum(min(SPOOLS_PER_STREAM * sizes[what], streams[what] + sizes[what] // 8 + 1)
                for what in sizes)
    return spool + STAGING_MARGIN


def check_space(staging_dir: str, streams: dict[str, int], segment_size: int | None,
                swift_quota_left: int | None = None,
                limits: SwiftLimits | None = None) -> SpaceReport:
    """Compare what the run will write with what is free, before anything is written.

    ``streams`` maps DATABASE_STREAM and FILES_STREAM (those the run has) to their estimated
    bytes. Locally only segment spools are staged; the whole estimate has to fit in Swift's
    quota when the account has one, and each stream in Swift's limit of segments per object.
    """
    sizes = segment_sizes(streams, segment_size, limits or SwiftLimits())
    needed = staging_needed(streams, sizes)
    if not os.path.isdir(staging_dir):
        raise ConfigError(detail=f"staging directory {staging_dir} does not exist")
    check_writable(staging_dir)
    available = shutil.disk_usage(staging_dir).free
    segments = ", ".join(f"{what} {format_size(size)}" for what, size in sizes.items())
    checks = [f"staging {staging_dir}: need {format_size(needed)} (up to {SPOOLS_PER_STREAM} "
              f"segments per stream), free {format_size(available)}",
              f"segment size: {segments or 'no stream'}"]
    if needed > available:
        raise InsufficientSpace(location=staging_dir,
                                purpose=f"{len(sizes)} upload stream(s), up to "
                                        f"{SPOOLS_PER_STREAM} segments each, of {segments}",
                                needed=format_size(needed), available=format_size(available))
    estimate = sum(streams.values())
    if swift_quota_left is not None:
        checks.append(f"swift quota: need up to {format_size(estimate)}, "
                      f"left {format_size(swift_quota_left)}")
        if estimate > swift_quota_left:
            raise InsufficientSpace(location="the Swift account", purpose="the backup",
                                    needed=format_size(estimate),
                                    available=format_size(swift_quota_left))
    return SpaceReport(database_bytes=streams.get(DATABASE_STREAM, 0),
                       files_bytes=streams.get(FILES_STREAM, 0), staging_dir=staging_dir,
                       staging_needed=needed, staging_available=available,
                       swift_quota_left=swift_quota_left,
                       database_segment_size=sizes.get(DATABASE_STREAM),
                       files_segment_size=sizes.get(FILES_STREAM), checks=tuple(checks))
