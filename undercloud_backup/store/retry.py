"""The retry policy of every Swift request, and what the libraries below raise as our errors.

A request that failed in a way that can heal (5xx, 408, 429 and Swift's 498, a lost
connection, a timeout) is tried again after 1, 2, 4, 8, 16 s, or after what the server's
``Retry-After`` asks, at most ``retries`` times and only while the request's time budget
lasts; anything else fails at once (:class:`Attempts`). :func:`translate` turns what
swiftclient, requests and keystoneauth raise into :mod:`undercloud_backup.core.errors`,
keeping the HTTP status and the transaction id.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests
import urllib3
from keystoneauth1 import exceptions as ks_exceptions
from swiftclient.exceptions import ClientException

from undercloud_backup.core import defaults
from undercloud_backup.core.errors import (
    BackupError,
    NotFound,
    SwiftAuthError,
    SwiftRequestFailed,
    SwiftUnreachable,
)
from undercloud_backup.store.swift import SwiftSettings

log = logging.getLogger("undercloud_backup.store.connection")  # the store's log, as before

# What a lost or broken connection looks like from below swiftclient (reading a body).
_CONNECTION_ERRORS = (requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
                      http.client.HTTPException, OSError)



@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long one request is tried; see the module docstring."""

    retries: int = defaults.SWIFT_RETRIES
    budget_s: float = defaults.SWIFT_RETRY_BUDGET_S
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


class Attempts:
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


def translate(error: BaseException, operation: str, target: str, url: str,
              settings: SwiftSettings | None = None) -> BackupError:
    """What swiftclient, requests and keystoneauth raise, as our errors (the txn id kept);
    anything else is raised as it is."""
    if isinstance(error, BackupError):
        return error
    if isinstance(error, ClientException):
        status = error.http_status
        reason = (f"HTTP {status} {error.http_reason or ''}".strip() if status is not None
                  else first_line(error))
        cls = NotFound if status == 404 else SwiftRequestFailed
        return cls(operation=operation, target=target, reason=reason, status=status,
                   transaction_id=error.transaction_id or "none")
    if isinstance(error, ks_exceptions.Unauthorized):
        return SwiftAuthError(auth_url=settings.auth_url if settings else "Keystone",
                              user=settings.who if settings else "?",
                              reason=first_line(error))
    if isinstance(error, ks_exceptions.ClientException):
        return SwiftUnreachable(service="Keystone", url=url or target,
                                reason=first_line(error))
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
    return first_line(error)


def first_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.strip().splitlines()[0][:300]
