"""The one read path: a stored object, streamed part by part, checked against its manifest.

An object is stored as :class:`Part` s (the segments of a Static Large Object, or the object
itself). Each part is read from Swift and checked against what the manifest recorded of it:
its size and SHA-256 (Swift's MD5, its ETag, for manifests older than per-segment SHA-256),
then the whole object's size and SHA-256. Two readers share that code:

- **strict** (restore): each part is spooled to an anonymous file and checked before any of
  its bytes go on, and the first problem raises :class:`ObjectDamaged`; no byte of a damaged
  part ever reaches the consumer.
- **collecting** (verify): bytes flow straight on, and every problem of every part is
  recorded; after the first one the consumer's input is closed (it sees a truncated stream)
  but the remaining parts are still read and checked, so the report names all of them.

:func:`stream_object` plumbs a reader into ``zstd -d`` and a consumer pipeline (``tar``,
``mariadb``), every process started by :mod:`undercloud_backup.core.execute`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from typing import IO

from undercloud_backup.core.errors import BackupError, BackupNotFound, NotFound
from undercloud_backup.core.manifest import MANIFEST_NAME, Manifest, StoredObject
from undercloud_backup.store import catalogue
from undercloud_backup.store.swift import SHA256_HEADER
from undercloud_backup.trust import crypto, signing

READ_CHUNK = 1024 * 1024


class ObjectDamaged(BackupError):
    """{target} is missing or damaged: {detail}; restore from another backup (python -m flows.backup --list)."""  # noqa: E501

    exit_code = 43


def load_manifest(store, container: str, backup_id: str | None,
                  allowed_signers: str | None = None) -> Manifest:
    """The manifest of ``backup_id``, or of the latest complete backup when it is None;
    with ``allowed_signers``, only if its signature passes (else exit 53-55)."""
    backup_id = backup_id or catalogue.latest_backup(store, container)
    try:
        if allowed_signers is not None:
            return signing.load_signed_manifest(store, container, backup_id, allowed_signers)
        return catalogue.get_manifest(store, container, backup_id)
    except NotFound:
        raise BackupNotFound(backup_id=backup_id, container=container) from None
    except ValueError as error:  # not JSON, or not a manifest this version reads
        raise ObjectDamaged(target=f"{container}/{backup_id}/{MANIFEST_NAME}",
                            detail=str(error)) from None


@dataclass(frozen=True)
class Part:
    """One piece of an object as Swift stores it, and the checksum the manifest recorded."""

    container: str
    name: str
    size: int
    algorithm: str  # "sha256", or "md5" (Swift's ETag) in manifests without segment SHA-256
    digest: str
    label: str  # how a problem names it

    @property
    def path(self) -> str:
        return f"{self.container}/{self.name}"


def parts_of(container: str, obj: StoredObject) -> list[Part]:
    """The parts of ``obj``: its segments (SLO) or, for a plain object, the object itself."""
    if not obj.segmented:
        algorithm, digest = ("sha256", obj.sha256) if obj.sha256 else ("md5", obj.etag)
        return [Part(container, obj.name, obj.size, algorithm, digest, f"{container}/{obj.name}")]
    seg_container = obj.segment_container or f"{container}_segments"
    return [Part(seg_container, s.name, s.size, *(("sha256", s.sha256) if s.sha256
                                                  else ("md5", s.etag)),
                 f"segment {s.name.rsplit('/', 1)[-1]} ({seg_container}/{s.name})")
            for s in obj.segments]


@dataclass
class ObjectCheck:
    """What reading one object back found; ``problems`` empty means it is exactly as recorded."""

    name: str
    expected_size: int
    expected_sha256: str
    size: int = 0
    sha256: str = ""
    segments_read: int = 0
    complete: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.complete and not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


class _Sink:
    """Where checked bytes go. Closed after a problem (collecting) or once the consumer left."""

    def __init__(self, out: IO[bytes] | None) -> None:
        self.out = out
        self.gone = False  # the consumer stopped reading; its exit status says why

    def write(self, chunk: bytes) -> None:
        if self.out is None:
            return
        try:
            self.out.write(chunk)
        except (BrokenPipeError, ValueError):
            self.out, self.gone = None, True

    def close(self) -> None:
        if self.out is not None:
            try:
                self.out.close()
            except OSError:  # a consumer that already died
                pass
            self.out = None


class _Stop(Exception):
    """Stop reading: interrupted, or (strict) the consumer is gone."""


class ObjectReader:
    """Reads one object of ``container`` into a sink, checking it part by part."""

    def __init__(self, store, container: str, obj: StoredObject, *, strict: bool,
                 spool_dir: str | None = None, stop: threading.Event | None = None) -> None:
        self.store, self.container, self.obj = store, container, obj
        self.strict, self.spool_dir = strict, spool_dir
        self.stop = stop or threading.Event()
        self.target = f"{container}/{obj.name}"
        self.check = ObjectCheck(name=obj.name, expected_size=obj.size,
                                 expected_sha256=obj.sha256)
        self.digest = hashlib.sha256()
        self.sink = _Sink(None)

    def problem(self, text: str) -> None:
        self.check.problems.append(text)
        if self.strict:
            raise ObjectDamaged(target=self.target, detail=text)
        self.sink.close()

    def read(self, out: IO[bytes] | None) -> ObjectCheck:
        """Read the whole object into ``out`` (left open unless it broke or had a problem)."""
        self.sink = _Sink(out)
        if not self._head_ok():
            self.sink.close()
            return self.check
        if self.obj.segmented:
            self._check_slo_manifest()
        try:
            for part in parts_of(self.container, self.obj):
                self._read_part(part)
        except _Stop:
            return self.check
        self.check.sha256 = self.digest.hexdigest()
        self.check.complete = True
        if self.check.problems:
            return self.check
        if self.check.size != self.obj.size:
            self.problem(f"{self.target}: read {self.check.size} bytes; the manifest records "
                         f"{self.obj.size}")
        elif self.check.sha256 != self.obj.sha256:
            self.problem(f"{self.target}: sha256 {self.check.sha256}; the manifest records "
                         f"{self.obj.sha256}")
        return self.check

    def _head_ok(self) -> bool:
        """HEAD the object as any Swift client would fetch it; False when it is not there."""
        try:
            headers = self.store.head(self.container, self.obj.name)
        except NotFound as error:
            self.problem(f"{self.target}: missing ({_status(error)})")
            return False
        size = int(headers.get("content-length", -1))
        etag = headers.get("etag", "").strip('"')
        if size != self.obj.size or etag != self.obj.etag:
            self.problem(f"{self.target}: Swift has {size} bytes, etag {etag}; the manifest "
                         f"records {self.obj.size} bytes, etag {self.obj.etag}")
        stored_sha = headers.get(SHA256_HEADER.lower())
        if stored_sha and stored_sha != self.obj.sha256:
            self.problem(f"{self.target}: metadata sha256 {stored_sha} differs from the "
                         f"manifest's {self.obj.sha256}")
        return True

    def _check_slo_manifest(self) -> None:
        """The SLO manifest Swift serves must list exactly the segments the backup recorded."""
        _, body = self.store.get(self.container, self.obj.name,
                                 query={"multipart-manifest": "get"})
        try:
            served = [(e["name"].split("/", 2)[-1], e["hash"], int(e["bytes"]))
                      for e in json.loads(b"".join(body))]
        except (ValueError, KeyError, TypeError):
            self.problem(f"{self.target}: not a Static Large Object manifest")
            return
        recorded = [(s.name, s.etag, s.size) for s in self.obj.segments]
        if served != recorded:
            self.problem(f"{self.target}: its SLO manifest lists {len(served)} segment(s) "
                         f"that differ from the {len(recorded)} the backup manifest recorded")

    def _read_part(self, part: Part) -> None:
        spool = tempfile.TemporaryFile(dir=self.spool_dir) if self.strict else None
        try:
            got, digest = self._fetch(part, spool.write if spool else self._deliver)
            if got < 0:
                return  # missing: already recorded
            self.check.segments_read += 1
            if got != part.size or digest != part.digest:
                self.problem(f"{part.label}: read {got} bytes with {part.algorithm} {digest}; "
                             f"the manifest records {part.size} bytes with {part.algorithm} "
                             f"{part.digest}")
                return
            if spool is not None:
                spool.seek(0)
                for chunk in iter(lambda: spool.read(READ_CHUNK), b""):
                    self._deliver(chunk)
        finally:
            if spool is not None:
                spool.close()

    def _fetch(self, part: Part, each) -> tuple[int, str]:
        """Read one part, handing each chunk to ``each``: (bytes, hex digest); -1 if missing.
        A connection lost mid-body is resumed or raised (retryable) by the store."""
        digest = hashlib.new(part.algorithm, usedforsecurity=False)
        got = 0
        try:
            _, body = self.store.get(part.container, part.name, chunk_size=READ_CHUNK)
            for chunk in body:
                if self.stop.is_set():
                    self.check.problems.append(f"{part.label}: reading was interrupted")
                    raise _Stop()
                digest.update(chunk)
                got += len(chunk)
                each(chunk)
        except NotFound as error:
            self.problem(f"{part.label}: missing ({_status(error)})")
            return -1, ""
        return got, digest.hexdigest()

    def _deliver(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.check.size += len(chunk)
        self.sink.write(chunk)
        if self.sink.gone and self.strict:
            raise _Stop()  # a restore has no use for the rest; a verification reads on


def _status(error: BackupError) -> str:
    return f"{error.fields.get('reason')}, transaction {error.fields.get('transaction_id')}"


def read_strict(store, container: str, obj: StoredObject, out: IO[bytes] | None, *,
                spool_dir: str | None, stop: threading.Event | None = None) -> ObjectCheck:
    """Restore's reader: raises :class:`ObjectDamaged` at the first bad part."""
    return ObjectReader(store, container, obj, strict=True, spool_dir=spool_dir,
                        stop=stop).read(out)


def read_collecting(store, container: str, obj: StoredObject, out: IO[bytes] | None = None,
                    *, stop: threading.Event | None = None) -> ObjectCheck:
    """Verify's reader: records every problem of every part and returns them."""
    return ObjectReader(store, container, obj, strict=False, stop=stop).read(out)


def precheck(store, container: str, objects: list[StoredObject]) -> None:
    """Before a restore writes anything: every object it will use is in Swift as the manifest
    recorded it (size, ETag, SHA-256 metadata; an SLO's segment list and each segment's size
    and ETag). A truncated, swapped or missing object is refused now (HEAD requests only),
    not after part of it was written; the bytes' SHA-256 is still checked as they are read.
    Raises :class:`ObjectDamaged` naming the object (an encrypted one:
    :class:`signing.ObjectTampered`, exit 56)."""
    for obj in objects:
        try:
            _precheck(store, container, obj)
        except ObjectDamaged as error:
            if not crypto.is_encrypted_object(obj):
                raise
            raise signing.ObjectTampered(name=obj.name, backup_id=obj.name.partition("/")[0],
                                        detail=error.fields.get("detail")) from None


def _precheck(store, container: str, obj: StoredObject) -> None:
    check = ObjectReader(store, container, obj, strict=True)
    check._head_ok()
    if not obj.segmented:
        return
    check._check_slo_manifest()
    for segment, part in zip(obj.segments, parts_of(container, obj), strict=True):
        try:
            headers = store.head(part.container, part.name)
        except NotFound as error:
            check.problem(f"{part.label}: missing ({_status(error)})")
        size = int(headers.get("content-length", -1))
        etag = headers.get("etag", "").strip('"')
        if size != segment.size or etag != segment.etag:
            check.problem(f"{part.label}: Swift has {size} bytes, etag {etag}; the manifest "
                          f"records {segment.size} bytes, etag {segment.etag}")
