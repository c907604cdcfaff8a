"""Swift settings: Keystone v3 credentials, where backups go, and how long to wait for Swift.

The requests themselves are in :mod:`undercloud_backup.store.connection` (one store, one retry
policy), the uploader in :mod:`undercloud_backup.store.upload`, the backup listing and manifests in
:mod:`undercloud_backup.store.catalogue`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from undercloud_backup.core import defaults
from undercloud_backup.core.errors import ConfigError

READ_CHUNK = 1024 * 1024
DEFAULT_SEGMENT_SIZE = 64 * 1024**2
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
    retries: int = defaults.SWIFT_RETRIES
    timeout: float = defaults.SWIFT_TIMEOUT_S
    retry_budget_s: float = defaults.SWIFT_RETRY_BUDGET_S
    # A keystoneauth session the caller has already set up (the `openstack` client's, with
    # whatever authentication it was given): used instead of a login from the fields above,
    # so no secret of it ever reaches these settings. Never closed by a store or session.
    keystone_session: object | None = field(default=None, repr=False, compare=False)

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
