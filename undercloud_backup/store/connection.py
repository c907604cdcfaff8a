"""One Swift store: every request the project makes to Swift, under one retry policy.

Nothing else talks to ``swiftclient`` (or Keystone, for Swift): callers get lower-case header
dicts, bytes, iterators and our errors (:mod:`undercloud_backup.core.errors`), never a
``ClientException`` and never an HTTP status to parse out of a message.

The retry policy (:class:`~undercloud_backup.store.retry.RetryPolicy`): a request that failed in
a way that can heal (5xx, 408, 429 and Swift's 498, a lost connection, a timeout) is tried again
after 1, 2, 4, 8, 16 s, or after what the server's ``Retry-After`` asks, at most ``retries``
times and only while the request's time budget (``retry_budget_s``) lasts; so is an auth outage
(Swift's 401 to a new token, Keystone refusing credentials that worked earlier in the session);
anything else (400, 403, 404, 409, 413, a wrong password at the first login, ...) fails at once.
Every attempt has a connect and a read timeout, so a Swift that accepts and never answers fails
one request after at most ``retry_budget_s + timeout`` seconds (plus the connect timeout): with
the defaults, 180 s.

Requests go through swiftclient's public module functions (``put_object(url, token, ...)``),
so the policy above is the only one: nothing is retried twice. A 401 gets a new token and
one more attempt, not counted as a retry; a further 401 (to the new token) a new token before
each attempt the policy allows. A PUT body is rewound before every attempt,
``bytes`` included.

A :class:`SwiftSession` is one Keystone login (token, storage URL) and the containers checked
under it; every :class:`SwiftStore` made from it (one per thread: a store's HTTP connection is
not shared) reuses both. A run opens one session for all its stages
(:mod:`undercloud_backup.store.session`).
"""

from __future__ import annotations

import builtins
import io
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3
from requests.adapters import HTTPAdapter
from swiftclient import client as swift_client
from swiftclient.exceptions import ClientException

from undercloud_backup.core.errors import (
    BackupError,
    ConfigError,
    ContainerGone,
    NotFound,
    ObjectTooLarge,
    SwiftAuthError,
    SwiftRequestFailed,
    SwiftUnreachable,
    redact,
)
from undercloud_backup.store.retry import (
    Attempts,
    RetryPolicy,
    first_line,
    retry_after,
    translate,
)
from undercloud_backup.store.swift import READ_CHUNK, SwiftSettings

T = TypeVar("T")
# What get_bytes reads at most by default: a manifest lists a few hundred bytes per segment,
# about 1 MiB for 300 GB in 64 MiB segments.
SMALL_OBJECT_LIMIT = 64 << 20

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


# The credentials and endpoint a session is for: stores with equal keys can share one.
SessionKey = tuple[object, ...]
_KEY_FIELDS = ("auth_url", "username", "password", "user_domain_name", "project_name",
               "project_domain_name", "application_credential_id",
               "application_credential_secret", "region_name", "interface", "storage_url",
               "keystone_session")
# A storage URL's version and account (/v1/AUTH_x): Swift's /info sits where they start.
_VERSION_PATH = re.compile(r"/v\d+\.?\d*(/.*)?$")


def session_key(settings: SwiftSettings) -> SessionKey:
    return tuple(getattr(settings, name) for name in _KEY_FIELDS)


class SwiftSession:
    """One Keystone login (its token and the storage URL) and the containers known to exist,
    shared by the stores made from it, in any thread.

    Authenticates on first use, not when made: a run's first stage does it inside its task,
    whose retries cover a Keystone that is briefly away. Close it (or use ``with``) when the
    run is over; closing the stores is theirs.
    """

    def __init__(self, settings: SwiftSettings) -> None:
        self.settings = settings
        self.key = session_key(settings)
        self._keystone = _keystone_session(settings)
        self._url: str | None = None
        self.authenticated_once = False  # credentials that worked are not wrong later
        self._lock = threading.Lock()
        self._containers: set[str] = set()
        self._containers_lock = threading.Lock()
        self.closed = False

    def __enter__(self) -> SwiftSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The storage URL (authenticating first, if not yet done)."""
        return self.authenticate()

    def authenticate(self) -> str:
        """Log in to Keystone unless done (a wrong password fails here); the storage URL."""
        settings = self.settings
        with self._lock:
            if self._url is not None:
                return self._url
            try:
                self._keystone.get_token()
                url = settings.storage_url or self._keystone.get_endpoint(
                    service_type="object-store", interface=settings.interface,
                    region_name=settings.region_name)
            except ks_exceptions.Unauthorized as error:
                raise SwiftAuthError(auth_url=settings.auth_url, user=settings.who,
                                     reason=redact(first_line(error), settings.secrets)
                                     ) from None
            except (ks_exceptions.ConnectFailure, ks_exceptions.ConnectTimeout,
                    ks_exceptions.DiscoveryFailure) as error:
                raise SwiftUnreachable(service="Keystone", url=settings.auth_url,
                                       reason=redact(first_line(error), settings.secrets)
                                       ) from None
            except ks_exceptions.ClientException as error:
                raise SwiftAuthError(auth_url=settings.auth_url, user=settings.who,
                                     reason=redact(first_line(error), settings.secrets)
                                     ) from None
            if not url:
                raise ConfigError(detail=f"no object-store endpoint ({settings.interface}) in "
                                         "the Keystone catalog; set a storage URL")
            self._url = url
            self.authenticated_once = True
            return url

    def token(self) -> str:
        """The session's token: Keystone's answer is kept until it nears its expiry."""
        token = self._keystone.get_token()
        if not token:
            raise SwiftAuthError(auth_url=self.settings.auth_url, user=self.settings.who,
                                 reason="Keystone gave no token")
        return token

    def invalidate(self) -> None:
        """Forget the token (Swift refused it): the next request logs in again."""
        self._keystone.invalidate()

    def store(self, settings: SwiftSettings | None = None, *,
              sleep: Callable[[float], None] = time.sleep) -> SwiftStore:
        """A store on this session (authenticated now); ``settings`` may differ in retries,
        timeouts and container, not in credentials."""
        settings = settings or self.settings
        if session_key(settings) != self.key:
            raise ValueError("a store's credentials must be its session's")
        self.authenticate()
        return SwiftStore(self, settings, sleep=sleep)

    def ensure_container(self, container: str, put: Callable[[str], None]) -> None:
        """``put(container)`` once per session: later stages (and other threads) take the
        first one's word that it exists."""
        with self._containers_lock:  # a second thread waits for the first's PUT
            if container in self._containers:
                return
            put(container)
            self._containers.add(container)

    def forget_container(self, container: str) -> None:
        with self._containers_lock:
            self._containers.discard(container)

    def close(self) -> None:
        self.closed = True
        if self.settings.keystone_session is None:  # a caller's session is the caller's
            self._keystone.close()


class _BlockAdapter(HTTPAdapter):
    """Sends a PUT's body in blocks of ``READ_CHUNK`` (1 MiB) instead of urllib3's 16 KiB.

    Every block is a read of the spooled segment and a ``sendall`` in the uploading thread;
    at 16 KiB a 600 MB stream took ~40,000 of each and ~0.3 CPU-s more of the backup's own
    process, on a CPU-bound run (benchmarks/RESULTS.md)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, blocksize=READ_CHUNK, **kwargs)


class SwiftStore:
    """One HTTP connection to one Swift account on a :class:`SwiftSession`, and the only way
    to use it. Close it (or use ``with``).

    Not thread-safe: give each thread its own store (:meth:`clone`); stores share the session.
    """

    def __init__(self, session: SwiftSession, settings: SwiftSettings | None = None, *,
                 sleep: Callable[[float], None] = time.sleep, owns_session: bool = False
                 ) -> None:
        self.session = session
        self.settings = settings or session.settings
        self.url = session.url
        self.policy = RetryPolicy.of(self.settings)
        self._sleep = sleep
        self._http: tuple[object, swift_client.HTTPConnection] | None = None
        self._owns_session = owns_session
        self.closed = False

    # ------------------------------------------------------------------- connecting
    @classmethod
    def connect(cls, settings: SwiftSettings) -> SwiftStore:
        """A store with a session of its own, closed with it; authenticated now (so a wrong
        password fails before any work). A run's stages use the run's session instead
        (:func:`undercloud_backup.store.session.open_store`)."""
        session = SwiftSession(settings)
        try:
            session.authenticate()
        except BaseException:
            session.close()
            raise
        return cls(session, settings, owns_session=True)

    def clone(self) -> SwiftStore:
        """Another store on the same session (for another thread)."""
        return self.session.store(self.settings, sleep=self._sleep)

    def __enter__(self) -> SwiftStore:
        return self

    def __exit__(self, _type: type[BaseException] | None, _value: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._disconnect()
        self.closed = True
        if self._owns_session:
            self.session.close()

    def _disconnect(self) -> None:
        if self._http is not None:
            self._http[1].close()
            self._http = None

    def _connection(self) -> tuple[object, swift_client.HTTPConnection]:
        if self._http is None:
            parsed, http = swift_client.http_connection(self.url, timeout=self.settings.timeouts)
            for scheme in ("http://", "https://"):
                http.request_session.mount(scheme, _BlockAdapter())
            self._http = (parsed, http)
        return self._http

    # ------------------------------------------------------------------ the policy
    def _call(self, operation: str, target: str, request: Callable[..., T],
              rewind: Callable[[], None] | None = None, *, url: str | None = None) -> T:
        """``request(url, token, http_conn)`` under the retry policy."""
        attempts = Attempts(self.policy, self._sleep)
        reauthenticated = False
        while True:
            try:
                return request(self.url, self.session.token(), self._connection())
            except ClientException as exc:
                if exc.http_status == 401:
                    # A token revoked or expired early gets a new one, the first time not
                    # counted as a retry. Again with a new token, Swift could not validate
                    # it (Keystone away: delay_auth_decision makes that a 401): an auth
                    # outage, ridden out like any other within the retry budget.
                    self._disconnect()
                    self.session.invalidate()
                    if reauthenticated:
                        self._failed(attempts, exc, operation, target, retry_after(exc),
                                     auth_outage=True)
                    reauthenticated = True
                else:
                    self._failed(attempts, exc, operation, target, retry_after(exc))
            except Exception as exc:  # noqa: BLE001 - translated, then retried or raised
                self._failed(attempts, exc, operation, target, retry_after(exc),
                             auth_outage=self.session.authenticated_once)
            if rewind is not None:
                rewind()

    def _failed(self, attempts: Attempts, exc: Exception, operation: str, target: str,
                asked: float | None, *, auth_outage: bool = False) -> None:
        """Wait before the next attempt or raise. ``auth_outage``: refusals of credentials
        that worked in this session (Keystone's 401 when logging in again, Swift's 401 to a
        new token) are tried again within the budget, as a 503 would be."""
        self._disconnect()  # a failed request can leave the connection unusable
        error = translate(exc, operation, target, self.url, self.settings)
        if auth_outage and not error.retryable and _refused(error):
            error = AuthOutage.of(error)
        attempts.failed(error, asked)

    # --------------------------------------------------------------------- requests
    def head(self, container: str, name: str) -> dict[str, str]:
        return self._call("HEAD object", f"{container}/{name}",
                          lambda url, token, http: swift_client.head_object(
                              url, token, container, name, http_conn=http))

    def get(self, container: str, name: str, *, query: dict | None = None,
            chunk_size: int = READ_CHUNK) -> tuple[dict[str, str], Iterator[bytes]]:
        """Headers now, the body as it arrives; a connection lost mid-body is resumed from
        where it broke (a Range request) under the same retry policy."""
        qs = urlencode(query) if query else None
        target = f"{container}/{name}"
        headers, body = self._call("GET object", target,
                                   lambda url, token, http: swift_client.get_object(
                                       url, token, container, name, http_conn=http,
                                       resp_chunk_size=chunk_size, query_string=qs))
        return headers, self._body(container, name, qs, chunk_size, headers, body)

    def _body(self, container: str, name: str, qs: str | None, chunk_size: int,
              headers: dict, body: Iterator[bytes]) -> Iterator[bytes]:
        target = f"{container}/{name}"
        expected = int(headers["content-length"]) if "content-length" in headers else None
        etag = headers.get("etag")
        done = 0
        attempts = Attempts(self.policy, self._sleep)
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
                again, body = swift_client.get_object(
                    self.url, self.session.token(), container, name,
                    http_conn=self._connection(), resp_chunk_size=chunk_size, query_string=qs,
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
            self._disconnect()  # the rest of the body stays unread
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
        qs = urlencode(query) if query else None

        def rewind() -> None:
            stream.seek(start)

        # put_object reads exactly ``length`` bytes from the file; a retry starts it over.
        try:
            return self._call(operation, f"{container}/{name}",
                              lambda url, token, http: swift_client.put_object(
                                  url, token, container, name, stream, content_length=length,
                                  etag=etag, chunk_size=READ_CHUNK, content_type=content_type,
                                  headers=headers, http_conn=http, query_string=qs), rewind)
        except NotFound as error:  # a PUT's 404: the container is not there (any more)
            self.session.forget_container(container)
            raise ContainerGone(container=container, **error.fields) from None

    def list(self, container: str, prefix: str | None = None) -> list[dict]:
        """Every object in ``container`` (under ``prefix``); NotFound if it does not exist."""
        return self._call("GET container", container,
                          lambda url, token, http: swift_client.get_container(
                              url, token, container, prefix=prefix, full_listing=True,
                              http_conn=http)[1])

    def containers(self) -> builtins.list[dict]:  # ``list`` here is the method above
        """Every container of the account."""
        return self._call("GET account", self.url,
                          lambda url, token, http: swift_client.get_account(
                              url, token, full_listing=True, http_conn=http)[1])

    def delete(self, container: str, name: str, *, query: dict | None = None) -> None:
        qs = urlencode(query) if query else None
        self._call("DELETE object", f"{container}/{name}",
                   lambda url, token, http: swift_client.delete_object(
                       url, token, container, name, http_conn=http, query_string=qs))

    def ensure_container(self, container: str) -> None:
        """Create ``container`` unless this store's session already made sure of it."""
        self.session.ensure_container(container, lambda name: self._call(
            "PUT container", name, lambda url, token, http: swift_client.put_container(
                url, token, name, http_conn=http)))

    def delete_container(self, container: str) -> None:
        self.session.forget_container(container)
        self._call("DELETE container", container,
                   lambda url, token, http: swift_client.delete_container(
                       url, token, container, http_conn=http))

    def account(self) -> dict[str, str]:
        return self._call("HEAD account", self.url,
                          lambda url, token, http: swift_client.head_account(
                              url, token, http_conn=http))

    def post_account(self, headers: dict[str, str]) -> None:
        """Set account metadata (e.g. the temp-url key: never logged, never in errors)."""
        self._call("POST account", self.url,
                   lambda url, token, http: swift_client.post_account(
                       url, token, headers, http_conn=http))

    def quota_left(self) -> int | None:
        """Bytes left under the account's quota, or None when it has none."""
        headers = self.account()
        quota = headers.get("x-account-meta-quota-bytes")
        if not quota:
            return None
        return int(quota) - int(headers.get("x-account-bytes-used", 0))

    def limits(self) -> SwiftLimits:
        """The cluster's /info (no token needed), on a connection of its own."""
        def capabilities(_url: str, _token: str, _http: object) -> dict:
            info = swift_client.http_connection(info_url(self.url),
                                                timeout=self.settings.timeouts)
            try:
                return swift_client.get_capabilities(info)
            finally:
                info[1].close()
        return SwiftLimits.from_capabilities(self._call("GET info", self.url, capabilities))


def _refused(error: BackupError) -> bool:
    """Keystone refused the credentials, or Swift the token (HTTP 401)."""
    return isinstance(error, SwiftAuthError) or (
        isinstance(error, SwiftRequestFailed) and error.status == 401)


class AuthOutage(SwiftRequestFailed):
    """Swift {operation} of {target} failed: {reason} (transaction {transaction_id})."""

    exit_code = 30  # after the budget: the credentials stayed refused

    # Read only, as SwiftRequestFailed's: mypy has no way to let a read-only property
    # override BackupError's plain class attribute, hence the ignore.
    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return True

    @classmethod
    def of(cls, error: BackupError) -> AuthOutage:
        """``error`` (a 401 of Swift, a refusal of Keystone) as one to try again."""
        fields = error.fields
        if isinstance(error, SwiftAuthError):
            return cls(operation="login", target=f"Keystone at {fields.get('auth_url')}",
                       reason=f"credentials of {fields.get('user')!r} that worked earlier "
                              f"refused ({fields.get('reason')}): Keystone unavailable?",
                       transaction_id="none", status=401)
        return cls(**{**fields, "reason": f"{fields.get('reason')}: Swift could not "
                                          "validate a new token (Keystone unavailable?)"})


def info_url(storage_url: str) -> str:
    """Swift's /info beside a storage URL: ``http://h:8080/v1/AUTH_x`` -> ``http://h:8080/info``."""
    parts = urlsplit(storage_url)
    path = _VERSION_PATH.sub("/info", parts.path) if _VERSION_PATH.search(parts.path) \
        else parts.path.rstrip("/") + "/info"
    return urlunsplit(parts._replace(path=path, query="", fragment=""))


def _keystone_session(settings: SwiftSettings) -> ks_session.Session:
    if isinstance(settings.keystone_session, ks_session.Session):
        return settings.keystone_session
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
