"""The streaming uploader: a stream of unknown length into Swift, one object or an SLO.

:class:`StreamUploader` cuts a stream into segments, spools each one to an anonymous file in
the staging directory (memory stays flat, a segment can be re-sent, nothing is left behind even
after SIGKILL), keeps a SHA-256 of every segment and of the whole stream (restore checks a
segment's before using it, verify both), records Swift's ETag of each segment, and commits the
object only when the caller says the producer finished cleanly.

At most :data:`SPOOLS_PER_STREAM` spools exist per stream: one uploading while the next fills;
a full segment waits for the previous upload to finish before the next one starts filling.
The staging space check (:mod:`undercloud_backup.store.space`) counts exactly that.

No MD5 is computed here: it cost 1.1 s of CPU per GB on the 2-core machines we run on, SHA-256
(SHA-NI) 0.5 s, and the backup is CPU-bound (benchmarks/RESULTS.md). So Swift does not check a
segment as it receives it; our SHA-256 catches a segment damaged on its way, at verify or
before restore uses it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import IO

from undercloud_backup.core.errors import (
    InsufficientSpace,
    StagingNotWritable,
    SwiftUnreachable,
    UploadVerifyFailed,
)
from undercloud_backup.core.manifest import Segment, StoredObject
from undercloud_backup.core.sizes import format_size
from undercloud_backup.store.connection import SwiftStore
from undercloud_backup.store.swift import READ_CHUNK, SHA256_HEADER, segment_container

SPOOLS_PER_STREAM = 2
ProgressCallback = Callable[[int, int], None]


def _mount_point(path: str) -> str:
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


class _Spool:
    """One segment on its way: an anonymous file in the staging directory."""

    def __init__(self, staging_dir: str, uploader: StreamUploader) -> None:
        self.uploader = uploader
        with uploader.out_of_space():
            self.file: IO[bytes] = tempfile.TemporaryFile(dir=staging_dir)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        with self.uploader.out_of_space():
            self.file.write(chunk)
        self.sha256.update(chunk)
        self.size += len(chunk)

    def close(self) -> None:
        self.file.close()


class StreamUploader:
    """Upload a stream of unknown length as one object, segmented when it is large.

    ``feed(stream)`` reads to EOF; the caller then checks its producer and calls ``commit()``,
    or ``abort()`` to delete what was sent. A stream that fits in one segment becomes a plain
    object, a larger one a Static Large Object whose manifest is written at commit.
    """

    def __init__(self, store: SwiftStore, container: str, name: str, *, segment_size: int,
                 staging_dir: str, compression: str, content: str,
                 progress: ProgressCallback | None = None) -> None:
        self.store = store
        self.container = container
        self.segment_container = segment_container(container)
        self.name = name
        self.segment_size = segment_size
        self.staging_dir = staging_dir
        self.compression = compression
        self.content = content
        self.progress = progress
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.segments: list[Segment] = []
        self._last: _Spool | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._worker_store: SwiftStore | None = None
        self._pending: deque[tuple[Future[Segment], _Spool]] = deque()

    # ------------------------------------------------------------------- staging
    @contextmanager
    def out_of_space(self) -> Iterator[None]:
        """Spooling that hits a full disk is InsufficientSpace (exit 14, not retried), naming
        the staging filesystem and what the stream needs there."""
        try:
            yield
        except OSError as error:
            if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):  # e.g. remounted ro
                raise StagingNotWritable(path=self.staging_dir,
                                         reason=error.strerror or "not writable") from None
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise InsufficientSpace(
                location=f"staging directory {self.staging_dir} (filesystem "
                         f"{_mount_point(self.staging_dir)})",
                purpose=f"spooling {self.name} in segments of {format_size(self.segment_size)}",
                needed=f"{format_size(SPOOLS_PER_STREAM * self.segment_size)} for this stream "
                       f"({SPOOLS_PER_STREAM} segments)",
                available=format_size(shutil.disk_usage(self.staging_dir).free)) from None

    def _segment_name(self, index: int) -> str:
        return f"{self.name}/{index:08d}"

    # The worker thread uploads with its own connection while this one reads the stream.
    def _put_segment(self, index: int, spool: _Spool) -> Segment:
        name = self._segment_name(index)
        spool.file.seek(0)
        assert self._worker_store is not None
        etag = self._worker_store.put(self.segment_container, name, spool.file,
                                      content_type="application/octet-stream",
                                      operation="PUT segment")
        return Segment(name=name, size=spool.size, etag=etag, sha256=spool.sha256.hexdigest())

    def _upload(self, index: int, spool: _Spool) -> Segment:
        try:
            return self._put_segment(index, spool)
        finally:
            spool.close()  # free the staging space as soon as the segment is in Swift

    def feed(self, stream: IO[bytes]) -> None:
        spool = _Spool(self.staging_dir, self)
        index = 0
        started = time.monotonic()
        try:
            while chunk := stream.read(READ_CHUNK):
                self.sha256.update(chunk)
                self.size += len(chunk)
                while chunk:
                    room = self.segment_size - spool.size
                    spool.write(chunk[:room])
                    chunk = chunk[room:]
                    if spool.size == self.segment_size:
                        self._hand_over(index, spool)
                        index += 1
                        spool = _Spool(self.staging_dir, self)
                if self.progress is not None:
                    self.progress(self.size, int(time.monotonic() - started))
            if index == 0:
                self._last = spool  # small enough for one plain object, sent at commit
            elif spool.size:
                self._hand_over(index, spool)
            else:
                spool.close()
            while self._pending:
                self._collect_oldest()
        except BaseException:
            spool.close()
            self._stop_worker()
            raise
        self._stop_worker()

    def _hand_over(self, index: int, spool: _Spool) -> None:
        if self._executor is None:
            self._worker_store = self.store.clone()
            self._executor = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix=f"upload-{self.name}")
        self._pending.append((self._executor.submit(self._upload, index, spool), spool))
        while len(self._pending) >= SPOOLS_PER_STREAM:  # the next spool waits for room
            self._collect_oldest()

    def _collect_oldest(self) -> None:
        future, spool = self._pending.popleft()
        try:
            self.segments.append(future.result())
        finally:
            spool.close()

    def _stop_worker(self) -> None:
        """Cancel what has not started, wait for what has, keep the segments it stored."""
        for future, _ in self._pending:
            future.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        while self._pending:
            future, spool = self._pending.popleft()
            spool.close()
            if not future.cancelled() and future.exception() is None:
                self.segments.append(future.result())
        if self._worker_store is not None:
            self._worker_store.close()
            self._worker_store = None

    # --------------------------------------------------------------- commit, abort
    def commit(self, extra_headers: dict[str, str] | None = None) -> StoredObject:
        """Make the object visible: a plain PUT, or the SLO manifest over the segments."""
        headers = {SHA256_HEADER: self.sha256.hexdigest(), **(extra_headers or {})}
        record = StoredObject(name=self.name, size=self.size, sha256=self.sha256.hexdigest(),
                              compression=self.compression, content=self.content)
        if self._last is not None:
            spool, self._last = self._last, None
            try:
                spool.file.seek(0)
                record.etag = self.store.put(self.container, self.name, spool.file,
                                             headers=headers,
                                             content_type="application/octet-stream")
            finally:
                spool.close()
        else:
            segments = sorted(self.segments, key=lambda s: s.name)
            entries = [s.slo_entry(self.segment_container) for s in segments]
            self.store.put(self.container, self.name, json.dumps(entries).encode(),
                           query={"multipart-manifest": "put"}, headers=headers,
                           content_type="application/octet-stream",
                           operation="PUT SLO manifest")
            record.etag = hashlib.md5("".join(s.etag for s in segments).encode(),
                                      usedforsecurity=False).hexdigest()
            record.segment_container = self.segment_container
            record.segments = segments
        verify_stored(self.store, self.container, record)
        return record

    def abort(self) -> None:
        """Delete the segments this upload sent (best effort) and drop any spooled data."""
        if self._last is not None:
            self._last.close()
            self._last = None
        self._stop_worker()
        for segment in self.segments:
            try:
                self.store.delete(self.segment_container, segment.name)
            except SwiftUnreachable:
                break  # Swift is gone: prune removes the rest once the grace period is over
            except Exception:  # noqa: BLE001 - Swift may be the reason we abort
                pass
        self.segments.clear()


def verify_stored(store: SwiftStore, container: str, record: StoredObject) -> None:
    """HEAD the object by name (listings lag) and check its size and ETag."""
    headers = store.head(container, record.name)
    size = int(headers.get("content-length", -1))
    etag = headers.get("etag", "").strip('"')
    if size != record.size or etag != record.etag:
        raise UploadVerifyFailed(target=f"{container}/{record.name}",
                                 got=f"{size} bytes, etag {etag}",
                                 expected=f"{record.size} bytes, etag {record.etag}")
