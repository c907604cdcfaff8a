"""One Swift store: every request the project makes to Swift, under one retry policy.

Nothing else talks to ``swiftclient`` (or Keystone, for Swift): callers get lower-case header
dicts, bytes, iterators and our errors (:mod:`undercloud_backup.core.errors`), never a
``ClientException`` and never an HTTP status to parse out of a message.

The retry policy (:class:`RetryPolicy`): a request that failed in a way that can heal (5xx, 408,
429 and Swift's 498, a lost connection, a timeout) is tried again after 1, 2, 4, 8, 16 s, or
after what the server's ``Retry-After`` asks, at most ``retries`` times and only while the
request's time budget (``retry_budget_s``) lasts; anything else (400, 401 after one re-auth,
403, 404, 409, 413, ...) fails at once. Every attempt has a connect and a read timeout, so a
Swift that accepts and never answers fails one request after at most
``retry_budget_s + timeout`` seconds (plus the connect timeout): with the defaults, 180 s.

swiftclient's own retries are off (``retries=0``) so that nothing is retried twice; it still
re-authenticates once on a 401. A PUT body is rewound before every attempt, ``bytes`` included
(swiftclient alone cannot re-send those).
"""

from __future__ import annotations

import builtins
import email.utils
import http.client
import io
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, TypeVar
from urllib.parse import urlencode

import requests
import urllib3
from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3
from swiftclient import client as swift_client
from swiftclient.exceptions import ClientException

from undercloud_backup.core.errors import (
    BackupError,
    ConfigError,
    NotFound,
    ObjectTooLarge,
    SwiftAuthError,
    SwiftRequestFailed,
    SwiftUnreachable,
    redact,
)
from undercloud_backup.store.swift import READ_CHUNK, SwiftSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
# What get_bytes reads at most by default: a manifest lists a few hundred bytes per segment,
# about 1 MiB for 300 GB in 64 MiB segments.
SMALL_OBJECT_LIMIT = 64 << 20

# What a lost or broken connection looks like from below swiftclient (reading a body).
_CONNECTION_ERRORS = (requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
                      http.client.HTTPException, OSError)


@dataclass(frozen=True)
class SwiftLimits:
    """What the Swift cluster allows (its /info), where it says."""

    max_object_bytes: int | None = None
    max_manifest_segments: int | None = None

    @property
    def max_file_size(self) -> int | None:
        return self.max_object_bytes

    @classmethod
    def from_capabilities(cls, capabilities: dict) -> SwiftLimits:
        return cls(max_object_bytes=capabilities.get("swift", {}).get("max_file_size"),
                   max_manifest_segments=capabilities.get("slo", {}).get(
                       "max_manifest_segments"))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long one request is tried; see the module docstring."""

    retries: int = 5
    budget_s: float = 120.0
    first_backoff_s: float = 1.0
    max_backoff_s: float = 16.0

    @classmethod
    def of(cls, settings: SwiftSettings) -> RetryPolicy:
        return cls(retries=settings.retries, budget_s=settings.retry_budget_s)


def retry_after(error: BaseException) -> float | None:
    """Seconds a ``Retry-After`` header (delta-seconds or an HTTP date) asks to wait."""
    headers = getattr(error, "http_response_headers", None) or {}
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if not value:
        return None
    value = str(value).strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Attempts:
    """The attempts of one request: decides, after each failure, to wait or to give up."""

    def __init__(self, policy: RetryPolicy, sleep: Callable[[float], None]) -> None:
        self.policy = policy
        self.sleep = sleep
        self.started = time.monotonic()
        self.count = 0
        self.backoff = policy.first_backoff_s

    def failed(self, error: BackupError, asked: float | None) -> None:
        """Sleep before the next attempt, or raise ``error`` when trying again cannot help."""
        self.count += 1
        if not error.retryable:
            raise error
        elapsed = time.monotonic() - self.started
        delay = asked if asked is not None else self.backoff
        if self.count > self.policy.retries or elapsed + delay > self.policy.budget_s:
            why = (f"Swift asked to wait {delay:.0f} s" if asked is not None
                   and elapsed + delay > self.policy.budget_s else "giving up")
            fields = dict(error.fields)
            fields["reason"] = (f"{fields.get('reason', '')}; {why} after {self.count} "
                                f"attempt(s) in {elapsed:.0f} s (retry budget "
                                f"{self.policy.budget_s:.0f} s)")
            raise type(error)(**fields)
        log.warning("%s; attempt %d, retrying in %.1f s", str(error).rstrip("."), self.count,
                    delay)
        self.sleep(delay)
        self.backoff = min(self.backoff * 2, self.policy.max_backoff_s)


class SwiftStore:
    """One authenticated connection to one Swift account, and the only way to use it.

    Not thread-safe: give each thread its own store (:meth:`clone`).
    """

    def __init__(self, conn: swift_client.Connection, settings: SwiftSettings, url: str,
                 *, sleep: Callable[[float], None] = time.sleep) -> None:
        self._conn = conn
        self.settings = settings
        self.url = url
        self.policy = RetryPolicy.of(settings)
        self._sleep = sleep

    # ------------------------------------------------------------------- connecting
    @classmethod
    def connect(cls, settings: SwiftSettings) -> SwiftStore:
        """Authenticate now (so a wrong password fails before any work) and connect."""
        session = _keystone_session(settings)
        try:
            session.get_token()
            url = settings.storage_url or session.get_endpoint(
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
        if not url:
            raise ConfigError(detail=f"no object-store endpoint ({settings.interface}) in the "
                                     "Keystone catalog; set a storage URL")
        conn = swift_client.Connection(
            session=session, retries=0, starting_backoff=0.5, timeout=settings.timeouts,
            os_options={"object_storage_url": url, "region_name": settings.region_name,
                        "interface": settings.interface})
        return cls(conn, settings, url)

    def clone(self) -> SwiftStore:
        """Another connection with the same token (for another thread)."""
        conn = swift_client.Connection(
            session=self._conn.session, retries=0, starting_backoff=0.5,
            timeout=self.settings.timeouts, os_options=dict(self._conn.os_options))
        return type(self)(conn, self.settings, self.url, sleep=self._sleep)

    def close(self) -> None:
        self._conn.close()

    # ------------------------------------------------------------------ the policy
    def _call(self, operation: str, target: str, request: Callable[[], T],
              rewind: Callable[[], None] | None = None) -> T:
        attempts = _Attempts(self.policy, self._sleep)
        while True:
            try:
                return request()
            except Exception as exc:  # noqa: BLE001 - translated, then retried or raised
                self._failed(attempts, exc, operation, target, retry_after(exc))
            if rewind is not None:
                rewind()

    def _failed(self, attempts: _Attempts, exc: Exception, operation: str, target: str,
                asked: float | None) -> None:
        self._conn.close()  # a failed request can leave the connection unusable
        attempts.failed(translate(exc, operation, target, self.url, self.settings), asked)

    # --------------------------------------------------------------------- requests
    def head(self, container: str, name: str) -> dict[str, str]:
        return self._call("HEAD object", f"{container}/{name}",
                          lambda: self._conn.head_object(container, name))

    def get(self, container: str, name: str, *, query: dict | None = None,
            chunk_size: int = READ_CHUNK) -> tuple[dict[str, str], Iterator[bytes]]:
        """Headers now, the body as it arrives; a connection lost mid-body is resumed from
        where it broke (a Range request) under the same retry policy."""
        qs = urlencode(query) if query else None
        target = f"{container}/{name}"
        headers, body = self._call("GET object", target, lambda: self._conn.get_object(
            container, name, resp_chunk_size=chunk_size, query_string=qs))
        return headers, self._body(container, name, qs, chunk_size, headers, body)

    def _body(self, container: str, name: str, qs: str | None, chunk_size: int,
              headers: dict, body: Iterator[bytes]) -> Iterator[bytes]:
        target = f"{container}/{name}"
        expected = int(headers["content-length"]) if "content-length" in headers else None
        etag = headers.get("etag")
        done = 0
        attempts = _Attempts(self.policy, self._sleep)
        while True:
            try:
                for chunk in body:
                    done += len(chunk)
                    yield chunk
                if expected is None or done >= expected:
                    return
                raise ConnectionError(f"connection closed after {done} of {expected} bytes")
            except Exception as exc:  # noqa: BLE001 - translated, then resumed or raised
                self._failed(attempts, exc, "GET object", target, None)
            try:
                again, body = self._conn.get_object(
                    container, name, resp_chunk_size=chunk_size, query_string=qs,
                    headers={"Range": f"bytes={done}-"})
            except Exception as exc:  # noqa: BLE001 - same policy for the resuming request
                self._failed(attempts, exc, "GET object", target, retry_after(exc))
                body = iter(())
                continue
            if again.get("etag") != etag:
                raise SwiftRequestFailed(operation="GET object", target=target,
                                         reason="the object changed while it was being read",
                                         transaction_id=again.get("x-trans-id", "none"))

    def get_bytes(self, container: str, name: str, *, what: str = "manifest",
                  limit: int = SMALL_OBJECT_LIMIT) -> bytes:
        """A small object (a ``what``), whole, read as :meth:`get` reads; ObjectTooLarge
        beyond ``limit`` bytes, before holding them: whoever can write to the container must
        not be able to make a run hold gigabytes."""
        target = f"{container}/{name}"
        headers, body = self.get(container, name)
        data = bytearray()
        announced = int(headers.get("content-length") or 0)
        try:
            if announced > limit:
                raise ObjectTooLarge.beyond(target, what, limit, announced)
            for chunk in body:
                data += chunk
                if len(data) > limit:
                    raise ObjectTooLarge.beyond(target, what, limit)
        except ObjectTooLarge:
            self._conn.close()  # the rest of the body stays unread
            raise
        return bytes(data)

    def put(self, container: str, name: str, body: bytes | IO[bytes], *,
            etag: str | None = None, content_type: str | None = None,
            headers: dict[str, str] | None = None, query: dict | None = None,
            operation: str = "PUT object") -> str:
        """Store ``body`` (bytes, or a seekable file from its current position); its ETag."""
        stream = io.BytesIO(body) if isinstance(body, bytes | bytearray) else body
        start = stream.tell()
        length = stream.seek(0, io.SEEK_END) - start
        stream.seek(start)

        def rewind(*_args: object, **_kwargs: object) -> None:
            stream.seek(start)

        # Connection.put_object would refuse to re-send after a re-auth with retries=0:
        # _retry is what it calls, with our rewind as the reset.
        return self._call(operation, f"{container}/{name}", lambda: self._conn._retry(
            rewind, swift_client.put_object, container, name, stream, content_length=length,
            etag=etag, chunk_size=READ_CHUNK, content_type=content_type, headers=headers,
            query_string=urlencode(query) if query else None), rewind)

    def list(self, container: str, prefix: str | None = None) -> list[dict]:
        """Every object in ``container`` (under ``prefix``); NotFound if it does not exist."""
        return self._call("GET container", container, lambda: self._conn.get_container(
            container, prefix=prefix, full_listing=True)[1])

    def containers(self) -> builtins.list[dict]:  # ``list`` here is the method above
        """Every container of the account."""
        return self._call("GET account", self.url, lambda: self._conn.get_account(
            full_listing=True)[1])

    def delete(self, container: str, name: str, *, query: dict | None = None) -> None:
        qs = urlencode(query) if query else None
        self._call("DELETE object", f"{container}/{name}",
                   lambda: self._conn.delete_object(container, name, query_string=qs))

    def ensure_container(self, container: str) -> None:
        self._call("PUT container", container, lambda: self._conn.put_container(container))

    def delete_container(self, container: str) -> None:
        self._call("DELETE container", container,
                   lambda: self._conn.delete_container(container))

    def account(self) -> dict[str, str]:
        return self._call("HEAD account", self.url, self._conn.head_account)

    def post_account(self, headers: dict[str, str]) -> None:
        """Set account metadata (e.g. the temp-url key: never logged, never in errors)."""
        self._call("POST account", self.url, lambda: self._conn.post_account(headers))

    def quota_left(self) -> int | None:
        """Bytes left under the account's quota, or None when it has none."""
        headers = self.account()
        quota = headers.get("x-account-meta-quota-bytes")
        if not quota:
            return None
        return int(quota) - int(headers.get("x-account-bytes-used", 0))

    def limits(self) -> SwiftLimits:
        return SwiftLimits.from_capabilities(
            self._call("GET info", self.url, self._conn.get_capabilities))


# ------------------------------------------------------------------------- errors
def translate(error: BaseException, operation: str, target: str, url: str,
              settings: SwiftSettings | None = None) -> BackupError:
    """What swiftclient, requests and keystoneauth raise, as our errors (the txn id kept);
    anything else is raised as it is."""
    if isinstance(error, BackupError):
        return error
    if isinstance(error, ClientException):
        status = error.http_status
        reason = (f"HTTP {status} {error.http_reason or ''}".strip() if status is not None
                  else _first_line(error))
        cls = NotFound if status == 404 else SwiftRequestFailed
        return cls(operation=operation, target=target, reason=reason, status=status,
                   transaction_id=error.transaction_id or "none")
    if isinstance(error, ks_exceptions.Unauthorized):
        return SwiftAuthError(auth_url=settings.auth_url if settings else "Keystone",
                              user=settings.who if settings else "?",
                              reason=_first_line(error))
    if isinstance(error, ks_exceptions.ClientException):
        return SwiftUnreachable(service="Keystone", url=url or target,
                                reason=_first_line(error))
    if isinstance(error, _CONNECTION_ERRORS):
        where = operation if target == url else f"{operation} of {target}"
        return SwiftUnreachable(service="Swift", url=url or target,
                                reason=f"{where}: {_what_went_wrong(error, settings)}")
    raise error


def _what_went_wrong(error: BaseException, settings: SwiftSettings | None) -> str:
    """requests' words for a timeout are a repr of its pool; say it plainly."""
    connect, read = settings.timeouts if settings else (None, None)
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return f"no connection within {connect:g} s" if connect else "connect timeout"
    if isinstance(error, requests.exceptions.Timeout | urllib3.exceptions.TimeoutError
                  | TimeoutError):
        return f"no answer within {read:g} s" if read else "read timeout"
    return _first_line(error)


def _keystone_session(settings: SwiftSettings) -> ks_session.Session:
    auth: v3.ApplicationCredential | v3.Password
    if settings.application_credential_id and settings.application_credential_secret:
        auth = v3.ApplicationCredential(
            auth_url=settings.auth_url,
            application_credential_id=settings.application_credential_id,
            application_credential_secret=settings.application_credential_secret)
    elif settings.username and settings.password:
        auth = v3.Password(
            auth_url=settings.auth_url, username=settings.username, password=settings.password,
            user_domain_name=settings.user_domain_name, project_name=settings.project_name,
            project_domain_name=settings.project_domain_name)
    else:
        raise ConfigError(detail="Swift needs a username and password or an application "
                                 "credential (OS_USERNAME/OS_PASSWORD or a Swift block)")
    return ks_session.Session(auth=auth, timeout=settings.timeout)


def _first_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.strip().splitlines()[0][:300]
