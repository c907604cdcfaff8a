"""Swift settings: Keystone v3 credentials, where backups go, and how long to wait for Swift.

The requests themselves are in :mod:`undercloud_backup.store` (one store, one retry policy),
the uploader in :mod:`undercloud_backup.upload`, the backup listing and manifests in
:mod:`undercloud_backup.catalogue`. The names at the end of this module are transitional
shims for callers not yet switched to those; they go once nothing imports them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from undercloud_backup.errors import ConfigError

READ_CHUNK = 1024 * 1024
DEFAULT_SEGMENT_SIZE = 64 * 1024**2
MANIFEST_NAME = "manifest.json"
SHA256_HEADER = "X-Object-Meta-Backup-Sha256"
CONNECT_TIMEOUT = 10.0
MAX_CONTAINER_NAME = 256  # bytes of UTF-8: Swift's constraints.MAX_CONTAINER_NAME_LENGTH
SEGMENTS_SUFFIX = "_segments"


def segment_container(container: str) -> str:
    return f"{container}{SEGMENTS_SUFFIX}"


def check_container_name(name: str) -> None:
    """Refuse a name Swift would take as something else: ``a/evil`` is container ``a`` and
    an object prefix, ``q?x=1`` a query. Swift's rules (not empty, no ``/``, at most 256
    bytes of UTF-8) for it and its ``_segments`` container; no ``?``, ``#`` or control
    characters either, which URLs and tools mangle."""
    if not name:
        raise ConfigError(detail="the Swift container name is empty")
    bad = sorted({c for c in name if c in "/?#" or ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ConfigError(detail=f"Swift container name {name!r} contains "
                                 f"{', '.join(repr(c) for c in bad)}; use letters, digits, "
                                 "'-', '_' or '.'")
    try:
        size = len(segment_container(name).encode())
    except UnicodeEncodeError:
        raise ConfigError(detail=f"Swift container name {name!r} is not valid UTF-8") from None
    if size > MAX_CONTAINER_NAME:
        raise ConfigError(detail=f"Swift container name {name[:40]!r}... is too long: with "
                                 f"{SEGMENTS_SUFFIX!r} it is {size} bytes, Swift allows "
                                 f"{MAX_CONTAINER_NAME}")


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
    # How long Swift may take (store.RetryPolicy): each attempt of a request waits at most
    # ``timeout`` s for a byte (connecting: at most 10 s); a failed request is tried again up
    # to ``retries`` times while ``retry_budget_s`` lasts. A dead Swift fails a request after
    # at most retry_budget_s + timeout (+ 10) s: 190 s by default; a stall shorter than
    # ``timeout`` is waited out, a longer one (but not a dead Swift) is retried.
    retries: int = 5
    timeout: float = 60.0
    retry_budget_s: float = 120.0

    def __post_init__(self) -> None:
        check_container_name(self.container)
        if self.timeout <= 0 or self.retry_budget_s < 0 or self.retries < 0:
            raise ConfigError(detail="Swift timeout must be positive, retries and retry "
                                     "budget not negative")

    @property
    def segment_container(self) -> str:
        return segment_container(self.container)

    @property
    def timeouts(self) -> tuple[float, float]:
        """(connect, read) timeouts of one attempt, as requests takes them."""
        return (min(CONNECT_TIMEOUT, self.timeout), self.timeout)

    @property
    def secrets(self) -> list[str | None]:
        return [self.password, self.application_credential_secret]

    @property
    def who(self) -> str:
        return self.username or self.application_credential_id or "?"


# ------------------------------------------------------------------------------------------
# Transitional shims, for callers not yet switched to store/upload/catalogue (remove after).
# They take a raw swiftclient connection from connect() and do the work through a SwiftStore.
def connect(settings: SwiftSettings):
    """Transitional: a raw swiftclient connection (swiftclient's retries) for old callers."""
    from undercloud_backup.store import SwiftStore

    conn = SwiftStore.connect(settings)._conn
    conn.retries = settings.retries
    return conn


def _adopt(conn, settings: SwiftSettings | None = None):
    from swiftclient.client import Connection

    from undercloud_backup.store import SwiftStore

    if isinstance(conn, SwiftStore):
        return conn
    settings = settings or SwiftSettings(auth_url="")
    raw = Connection(session=conn.session, retries=0, starting_backoff=0.5,
                     timeout=settings.timeouts, os_options=dict(conn.os_options))
    return SwiftStore(raw, settings, storage_url(conn))


def storage_url(conn) -> str:
    return conn.os_options.get("object_storage_url") or conn.url or ""


@contextmanager
def swift_errors(operation: str, target: str, url: str = "") -> Iterator[None]:
    from undercloud_backup.store import translate

    try:
        yield
    except Exception as error:  # noqa: BLE001 - translated (unknown ones re-raised as they are)
        raise translate(error, operation, target, url) from None


def ensure_containers(conn, settings: SwiftSettings) -> None:
    store = _adopt(conn, settings)
    for container in (settings.container, settings.segment_container):
        store.ensure_container(container)


def StoredObject(**record):  # noqa: N802 - was a class
    from undercloud_backup.manifest import StoredObject as Typed

    return Typed.from_dict(record)


def verify_stored(conn, container: str, record) -> None:
    from undercloud_backup import upload

    upload.verify_stored(_adopt(conn), container, record)


def manifest_name(backup_id: str) -> str:
    return f"{backup_id}/{MANIFEST_NAME}"


def put_manifest(conn, container: str, manifest: dict) -> str:
    import json

    from undercloud_backup import catalogue

    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    return catalogue.put_manifest_body(_adopt(conn), container, manifest["backup_id"], body)


def list_backups(conn, container: str):
    from undercloud_backup import catalogue

    return catalogue.list_backups(_adopt(conn), container)


def get_manifest(conn, container: str, backup_id: str) -> dict:
    import json

    return json.loads(_adopt(conn).get_bytes(container, manifest_name(backup_id)))


def _uploader_class():
    from undercloud_backup import manifest, upload

    class _Recorded(manifest.StoredObject):
        def as_dict(self) -> dict:
            return self.to_dict()

    class StreamUploader(upload.StreamUploader):
        """Transitional: the old (conn, settings, name) signature; ``commit()`` gives an
        object with the old ``as_dict()``."""

        def __init__(self, conn, settings: SwiftSettings, name: str, **kwargs) -> None:
            super().__init__(_adopt(conn, settings), settings.container, name,
                             segment_size=settings.segment_size or DEFAULT_SEGMENT_SIZE,
                             **kwargs)

        def commit(self, extra_headers: dict[str, str] | None = None):
            return _Recorded(**vars(super().commit(extra_headers)))

    return StreamUploader


def __getattr__(name: str):
    if name == "StreamUploader":  # imported late: upload imports this module
        globals()[name] = _uploader_class()
        return globals()[name]
    if name == "ProgressCallback":
        from undercloud_backup.upload import ProgressCallback

        return ProgressCallback
    raise AttributeError(name)

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
