"""Swift behind Keystone v3: connection, a streaming SLO uploader, and the backup catalogue.

Two layers, as in python-swiftclient: ``swiftclient.Connection`` does single requests with the
one retry policy (re-auth on 401, back-off on 5xx/429, a PUT retried only from a rewindable
body); :class:`StreamUploader` cuts a stream into segments, spools each one to an anonymous
file (so memory stays flat and a segment can be re-sent), keeps a SHA-256 of every segment and
of the whole stream (restore checks a segment's before using it, verify both) and records
Swift's ETag of each segment, and only commits the object when the producer said it finished
cleanly.

No MD5 is computed here: it cost 1.1 s of CPU per GB on the 2-core machines we run on, SHA-256
(SHA-NI) 0.5 s, and the backup is CPU-bound (benchmarks/RESULTS.md). So Swift does not check
a segment as it receives it; our SHA-256 catches a segment damaged on its way, at verify or
before restore uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import IO

import requests
from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3
from swiftclient import client as swift_client
from swiftclient.exceptions import ClientException

from undercloud_backup.errors import (
    BackupError,
    ConfigError,
    SwiftAuthError,
    SwiftRequestFailed,
    SwiftUnreachable,
    UploadVerifyFailed,
    redact,
)

READ_CHUNK = 1024 * 1024
DEFAULT_SEGMENT_SIZE = 64 * 1024**2
MANIFEST_NAME = "manifest.json"
SHA256_HEADER = "X-Object-Meta-Backup-Sha256"


@dataclass(frozen=True)
class SwiftSettings:
    """Keystone v3 credentials and where backups go; the password and secret are secrets."""

    auth_url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    user_domain_name: str = "Default"
    project_name: str | None = None
    project_domain_name: str = "Default"
    application_credential_id: str | None = None
    application_credential_secret: str | None = field(default=None, repr=False)
    region_name: str | None = None
    interface: str = "public"
    storage_url: str | None = None
    container: str = "undercloud-backups"
    segment_size: int | None = None  # None: chosen per stream (backup.auto_segment_size)
    retries: int = 5
    timeout: float = 60.0

    @property
    def segment_container(self) -> str:
        return f"{self.container}_segments"

    @property
    def secrets(self) -> list[str | None]:
        return [self.password, self.application_credential_secret]

    @property
    def who(self) -> str:
        return self.username or self.application_credential_id or "?"


def keystone_session(settings: SwiftSettings) -> ks_session.Session:
    if settings.application_credential_id:
        auth = v3.ApplicationCredential(
            auth_url=settings.auth_url,
            application_credential_id=settings.application_credential_id,
            application_credential_secret=settings.application_credential_secret,
        )
    elif settings.username and settings.password:
        auth = v3.Password(
            auth_url=settings.auth_url, username=settings.username, password=settings.password,
            user_domain_name=settings.user_domain_name, project_name=settings.project_name,
            project_domain_name=settings.project_domain_name,
        )
    else:
        raise ConfigError(detail="Swift needs a username and password or an application "
                                 "credential (OS_USERNAME/OS_PASSWORD or a Swift block)")
    return ks_session.Session(auth=auth, timeout=settings.timeout)


def connect(settings: SwiftSettings) -> swift_client.Connection:
    """Authenticate now (so a wrong password fails before any work) and return a connection."""
    session = keystone_session(settings)
    try:
        session.get_token()
        storage_url = settings.storage_url or session.get_endpoint(
            service_type="object-store", interface=settings.interface,
            region_name=settings.region_name)
    except ks_exceptions.Unauthorized as error:
        raise SwiftAuthError(auth_url=settings.auth_url, user=settings.who,
                             reason=redact(_first_line(error), settings.secrets)) from None
    except (ks_exceptions.ConnectFailure, ks_exceptions.ConnectTimeout,
            ks_exceptions.DiscoveryFailure) as error:
        raise SwiftUnreachable(service="Keystone", url=settings.auth_url,
                               reason=redact(_first_line(error), settings.secrets)) from None
    except ks_exceptions.ClientException as error:
        raise SwiftAuthError(auth_url=settings.auth_url, user=settings.who,
                             reason=redact(_first_line(error), settings.secrets)) from None
    if not storage_url:
        raise ConfigError(detail=f"no object-store endpoint ({settings.interface}) in the "
                                 "Keystone catalog; set a storage URL")
    return swift_client.Connection(
        session=session, retries=settings.retries, starting_backoff=1, max_backoff=16,
        timeout=settings.timeout,
        os_options={"object_storage_url": storage_url, "region_name": settings.region_name,
                    "interface": settings.interface},
    )


def _first_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.strip().splitlines()[0][:300]


@contextmanager
def swift_errors(operation: str, target: str, url: str = "") -> Iterator[None]:
    """Translate what swiftclient and requests raise into our errors, keeping the txn id."""
    try:
        yield
    except BackupError:
        raise
    except ClientException as error:
        reason = f"HTTP {error.http_status} {error.http_reason or ''}".strip()
        if error.http_status is None:
            reason = _first_line(error)
        raise SwiftRequestFailed(operation=operation, target=target, reason=reason,
                                 transaction_id=error.transaction_id or "none") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, OSError) as error:
        raise SwiftUnreachable(service="Swift", url=url or target,
                               reason=_first_line(error)) from None
    except ks_exceptions.ClientException as error:
        raise SwiftUnreachable(service="Keystone", url=url or target,
                               reason=_first_line(error)) from None


def storage_url(conn: swift_client.Connection) -> str:
    return conn.os_options.get("object_storage_url") or conn.url or ""


def ensure_containers(conn: swift_client.Connection, settings: SwiftSettings) -> None:
    for container in (settings.container, settings.segment_container):
        with swift_errors("PUT container", container, storage_url(conn)):
            conn.put_container(container)


# ------------------------------------------------------------------------------------ upload
@dataclass
class Segment:
    name: str
    size: int
    etag: str  # Swift's MD5 of what it stored
    sha256: str = ""  # ours, of what we read: restore checks it before using the segment

    def slo_entry(self, segment_container: str) -> dict:
        return {"path": f"/{segment_container}/{self.name}", "etag": self.etag,
                "size_bytes": self.size}


@dataclass
class StoredObject:
    """What the manifest records of one object; JSON-able."""

    name: str
    size: int
    sha256: str
    compression: str
    content: str
    etag: str = ""
    segment_container: str | None = None
    segments: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class _Spool:
    """One segment on its way: an anonymous file (nothing left behind, even after SIGKILL)."""

    def __init__(self, staging_dir: str) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=staging_dir)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.sha256.update(chunk)
        self.size += len(chunk)

    def close(self) -> None:
        self.file.close()


ProgressCallback = Callable[[int, int], None]


class StreamUploader:
    """Upload a stream of unknown length as one object, segmented when it is large.

    ``feed(stream)`` reads to EOF; the caller then checks its producer and calls ``commit()``,
    or ``abort()`` to delete what was sent. A stream that fits in one segment becomes a plain
    object, a larger one a Static Large Object whose manifest is written at commit.
    """

    def __init__(self, conn: swift_client.Connection, settings: SwiftSettings, name: str, *,
                 staging_dir: str, compression: str, content: str,
                 progress: ProgressCallback | None = None) -> None:
        self.conn = conn
        self.settings = settings
        self.name = name
        self.staging_dir = staging_dir
        self.compression = compression
        self.content = content
        self.progress = progress
        self.segment_size = settings.segment_size or DEFAULT_SEGMENT_SIZE
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.segments: list[Segment] = []
        self._last: _Spool | None = None
        self._queue: queue.Queue[tuple[int, _Spool] | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._worker: threading.Thread | None = None

    # The uploading thread owns the connection while the stream is being read.
    def _upload_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            index, spool = item
            try:
                if self._error is None:
                    self.segments.append(self._put_segment(index, spool))
            except BaseException as error:  # noqa: BLE001 - handed to the reading thread
                self._error = error
            finally:
                spool.close()

    def _segment_name(self, index: int) -> str:
        return f"{self.name}/{index:08d}"

    def _put_segment(self, index: int, spool: _Spool) -> Segment:
        name = self._segment_name(index)
        spool.file.seek(0)
        with swift_errors("PUT segment", f"{self.settings.segment_container}/{name}",
                          storage_url(self.conn)):
            etag = self.conn.put_object(
                self.settings.segment_container, name, spool.file, content_length=spool.size,
                chunk_size=READ_CHUNK, content_type="application/octet-stream")
        return Segment(name=name, size=spool.size, etag=etag, sha256=spool.sha256.hexdigest())

    def feed(self, stream: IO[bytes]) -> None:
        spool = _Spool(self.staging_dir)
        index = 0
        started = time.monotonic()
        try:
            while True:
                chunk = stream.read(READ_CHUNK)
                if not chunk:
                    break
                self.sha256.update(chunk)
                self.size += len(chunk)
                while chunk:
                    room = self.segment_size - spool.size
                    spool.write(chunk[:room])
                    chunk = chunk[room:]
                    if spool.size == self.segment_size:
                        self._hand_over(index, spool)
                        index += 1
                        spool = _Spool(self.staging_dir)
                if self.progress is not None:
                    self.progress(self.size, int(time.monotonic() - started))
            if index == 0:
                self._last = spool  # small enough for one plain object, sent at commit
            else:
                if spool.size:
                    self._hand_over(index, spool)
                else:
                    spool.close()
            self._finish_worker()
        except BaseException:
            spool.close()
            self._finish_worker()
            raise

    def _hand_over(self, index: int, spool: _Spool) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._upload_loop, daemon=True,
                                            name=f"upload-{self.name}")
            self._worker.start()
        while True:
            if self._error is not None:
                spool.close()
                raise self._error
            try:
                self._queue.put((index, spool), timeout=0.5)
                return
            except queue.Full:
                continue

    def _finish_worker(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        if self._error is not None:
            raise self._error

    def commit(self, extra_headers: dict[str, str] | None = None) -> StoredObject:
        """Make the object visible: a plain PUT, or the SLO manifest over the segments."""
        headers = {SHA256_HEADER: self.sha256.hexdigest(), **(extra_headers or {})}
        url = storage_url(self.conn)
        container = self.settings.container
        if self._last is not None:
            spool, self._last = self._last, None
            try:
                spool.file.seek(0)
                with swift_errors("PUT object", f"{container}/{self.name}", url):
                    etag = self.conn.put_object(
                        container, self.name, spool.file, content_length=spool.size,
                        chunk_size=READ_CHUNK, headers=headers,
                        content_type="application/octet-stream")
            finally:
                spool.close()
            record = StoredObject(name=self.name, size=self.size,
                                  sha256=self.sha256.hexdigest(), compression=self.compression,
                                  content=self.content, etag=etag)
        else:
            segments = sorted(self.segments, key=lambda s: s.name)
            entries = [s.slo_entry(self.settings.segment_container) for s in segments]
            with swift_errors("PUT SLO manifest", f"{container}/{self.name}", url):
                self.conn.put_object(
                    container, self.name, json.dumps(entries),
                    query_string="multipart-manifest=put",
                    headers=headers, content_type="application/octet-stream")
            slo_etag = hashlib.md5("".join(s.etag for s in segments).encode(),
                                   usedforsecurity=False).hexdigest()
            record = StoredObject(name=self.name, size=self.size,
                                  sha256=self.sha256.hexdigest(), compression=self.compression,
                                  content=self.content, etag=slo_etag,
                                  segment_container=self.settings.segment_container,
                                  segments=[asdict(s) for s in segments])
        verify_stored(self.conn, container, record)
        return record

    def abort(self) -> None:
        """Delete the segments this upload sent (best effort) and drop any spooled data."""
        if self._last is not None:
            self._last.close()
            self._last = None
        for segment in self.segments:
            try:
                self.conn.delete_object(self.settings.segment_container, segment.name)
            except Exception:  # noqa: BLE001 - Swift may be the reason we abort
                pass
        self.segments.clear()


def verify_stored(conn: swift_client.Connection, container: str, record: StoredObject) -> None:
    """HEAD the object by name (listings lag) and check its size and ETag."""
    with swift_errors("HEAD object", f"{container}/{record.name}", storage_url(conn)):
        headers = conn.head_object(container, record.name)
    size = int(headers.get("content-length", -1))
    etag = headers.get("etag", "").strip('"')
    if size != record.size or etag != record.etag:
        raise UploadVerifyFailed(target=f"{container}/{record.name}",
                                 got=f"{size} bytes, etag {etag}",
                                 expected=f"{record.size} bytes, etag {record.etag}")


# --------------------------------------------------------------------------------- catalogue
def manifest_name(backup_id: str) -> str:
    return f"{backup_id}/{MANIFEST_NAME}"


def put_manifest(conn: swift_client.Connection, container: str, manifest: dict) -> str:
    """Write the manifest (the commit point) and read it back by name."""
    name = manifest_name(manifest["backup_id"])
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    expected = hashlib.md5(body, usedforsecurity=False).hexdigest()
    with swift_errors("PUT manifest", f"{container}/{name}", storage_url(conn)):
        etag = conn.put_object(container, name, body, etag=expected,
                               content_type="application/json")
        conn.head_object(container, name)
    if etag != expected:
        raise UploadVerifyFailed(target=f"{container}/{name}", got=etag, expected=expected)
    return name


@dataclass(frozen=True)
class BackupEntry:
    backup_id: str
    manifest: str
    last_modified: str

    def as_dict(self) -> dict:
        return asdict(self)


def list_backups(conn: swift_client.Connection, container: str) -> list[BackupEntry]:
    """Complete backups (those with a manifest), oldest first."""
    try:
        with swift_errors("GET container", container, storage_url(conn)):
            _, objects = conn.get_container(container, full_listing=True)
    except SwiftRequestFailed as error:
        if "HTTP 404" in str(error):
            return []
        raise
    entries = [
        BackupEntry(backup_id=o["name"][: -len(MANIFEST_NAME) - 1], manifest=o["name"],
                    last_modified=o.get("last_modified", ""))
        for o in objects
        if o["name"].endswith("/" + MANIFEST_NAME) and o["name"].count("/") == 1
    ]
    return sorted(entries, key=lambda e: (e.last_modified, e.backup_id))


def get_manifest(conn: swift_client.Connection, container: str, backup_id: str) -> dict:
    with swift_errors("GET manifest", f"{container}/{manifest_name(backup_id)}",
                      storage_url(conn)):
        _, body = conn.get_object(container, manifest_name(backup_id))
    return json.loads(body)


def download(conn: swift_client.Connection, container: str, name: str,
             out: IO[bytes]) -> tuple[int, str]:
    """Stream an object into ``out``; return its size and SHA-256."""
    digest = hashlib.sha256()
    size = 0
    with swift_errors("GET object", f"{container}/{name}", storage_url(conn)):
        _, body = conn.get_object(container, name, resp_chunk_size=READ_CHUNK)
        for chunk in body:
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return size, digest.hexdigest()


def env_settings(environ: os._Environ | dict[str, str] | None = None) -> dict[str, str]:
    """The ``OS_*`` variables OpenStack tools read, by our field names."""
    env = os.environ if environ is None else environ
    mapping = {
        "OS_AUTH_URL": "auth_url", "OS_USERNAME": "username", "OS_PASSWORD": "password",
        "OS_USER_DOMAIN_NAME": "user_domain_name", "OS_PROJECT_NAME": "project_name",
        "OS_PROJECT_DOMAIN_NAME": "project_domain_name", "OS_REGION_NAME": "region_name",
        "OS_INTERFACE": "interface", "OS_STORAGE_URL": "storage_url",
        "OS_APPLICATION_CREDENTIAL_ID": "application_credential_id",
        "OS_APPLICATION_CREDENTIAL_SECRET": "application_credential_secret",
        "OS_TENANT_NAME": "project_name",
    }
    return {field_name: env[var] for var, field_name in mapping.items() if env.get(var)}
