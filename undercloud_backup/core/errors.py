"""The errors a backup can end with.

Each class's docstring is its one-line message template (filled from the keyword arguments) and
says what to do next; ``exit_code`` is stable and is what ``python -m flows.backup`` exits with;
``retryable`` tells the Prefect retry condition whether trying again can help.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

REDACTED = "********"


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Return ``text`` with every non-empty secret replaced by asterisks."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


# What one field of an error's message may take: a path longer than PATH_MAX, or a tool's
# complaint about thousands of files, must not make the run's one line unreadable. (Code that
# reads a tool's words out of an error takes them from ``unabridged()``.)
FIELD_CHARS_AT_MOST = 1000


def shorten(text: str, limit: int = FIELD_CHARS_AT_MOST) -> str:
    """``text`` on one line, its middle left out (and its length said) beyond ``limit``."""
    text = text.replace("\r", " ").replace("\n", " ")
    if len(text) <= limit:
        return text
    keep = max(limit // 2 - 16, 8)
    return f"{text[:keep]}...({len(text):,} characters)...{text[-keep:]}"


def first_few(items: Sequence[str], total: int | None = None, few: int = 3,
              limit: int = 120) -> str:
    """The first ``few`` of ``items`` (each shortened), and how many more there are."""
    total = len(items) if total is None else total
    shown = [shorten(item, limit) for item in items[:few]]
    more = total - len(shown)
    return ", ".join(shown) + (f" and {more:,} more" if more > 0 else "")


def one_line(text: object) -> str:
    """A tool's message on one line (ssh-keygen ends some with a carriage return)."""
    return " ".join(str(text or "").split()) or "no output"


class BackupError(Exception):
    """The backup failed: {detail}"""

    exit_code = 1
    retryable = False

    def __init__(self, **fields: object) -> None:
        self.fields = fields
        template = (type(self).__doc__ or "{detail}").strip().splitlines()[0]
        shown = {key: shorten(value) if isinstance(value, str) else value
                 for key, value in fields.items()}
        try:
            message = template.format(**shown)
        except (KeyError, IndexError):
            message = f"{template} {fields}"
        super().__init__(message)

    def unabridged(self) -> str:
        """The message with every field in full (for code that parses a tool's words)."""
        template = (type(self).__doc__ or "{detail}").strip().splitlines()[0]
        try:
            return template.format(**self.fields)
        except (KeyError, IndexError):
            return str(self)

    def __reduce__(self):  # keep the fields when Prefect pickles the exception
        return (_rebuild, (type(self), self.fields))


def _rebuild(cls: type[BackupError], fields: dict) -> BackupError:
    return cls(**fields)


class ConfigError(BackupError):
    """Invalid configuration: {detail}"""

    exit_code = 2


class PathNotFound(BackupError):
    """Path {path} does not exist under root {root}: fix or drop --add-path {path}."""

    exit_code = 3


class PathNotAllowed(BackupError):
    """The privileged policy {config} refuses this backup's plan, so nothing was written: {reason}. Change --add-path or --root, or allow the path there as root with a 'path =' line (docs/deploy.md)."""  # noqa: E501

    exit_code = 7


class InsufficientSpace(BackupError):
    """Not enough space on {location} for {purpose}: need {needed}, available {available}; free space or use another --staging-dir."""  # noqa: E501

    exit_code = 14


class StagingNotWritable(BackupError):
    """The staging directory {path} cannot be written ({reason}): segments are spooled there on their way to Swift; make it writable by the user the backup runs as, or choose another --staging-dir."""  # noqa: E501

    exit_code = 15


class CommandFailed(BackupError):
    """{name} failed (exit status {status}): {stderr}"""

    exit_code = 4


class CommandTimedOut(BackupError):
    """{name} did not finish within {timeout} s and was killed with its children; raise the timeout or look for a hung server."""  # noqa: E501

    exit_code = 5
    retryable = True


class SudoRefused(BackupError):
    """sudo refused to run {command!r} without a password: install deployments/sudoers/undercloud-backup into /etc/sudoers.d/ (see docs/deploy.md); sudo said: {stderr}"""  # noqa: E501

    exit_code = 6


class DatabaseAuthError(BackupError):
    """MariaDB at {where} refused user {user!r} ({reason}); fix the password in the database block or option file."""  # noqa: E501

    exit_code = 20


class DatabaseUnreachable(BackupError):
    """MariaDB at {where} is unreachable ({reason}); start MariaDB or fix --db-host/--db-port/--db-socket."""  # noqa: E501

    exit_code = 21
    retryable = True


class DumpFailed(BackupError):
    """The database dump failed ({reason}); nothing was committed and earlier backups are intact."""

    exit_code = 22


class ArchiveFailed(BackupError):
    """The filesystem archive failed ({reason}); nothing was committed and earlier backups are intact."""  # noqa: E501

    exit_code = 23


class UnreadableFiles(BackupError):
    """{count} file(s) could not be read and would be missing from the backup, e.g. {examples}; fix their permissions, exclude them with --exclude-path, or pass --allow-unreadable."""  # noqa: E501

    exit_code = 24


class SwiftAuthError(BackupError):
    """Keystone at {auth_url} refused the credentials of {user!r} ({reason}); check OS_PASSWORD or the Swift block."""  # noqa: E501

    exit_code = 30


class SwiftUnreachable(BackupError):
    """{service} at {url} is unreachable ({reason}); start it or fix the auth URL / endpoint."""

    exit_code = 31
    retryable = True


def transient_status(status: int | None) -> bool:
    """Whether a Swift answer can heal by itself: 5xx, 408, 429 (and Swift's ratelimit 498),
    or no answer at all; never 400, 401 (the store re-authenticates first), 403, 404, 409, ..."""
    return status is None or status in (408, 429, 498) or 500 <= status <= 599


class SwiftRequestFailed(BackupError):
    """Swift {operation} of {target} failed: {reason} (transaction {transaction_id})."""

    exit_code = 32

    @property
    def status(self) -> int | None:
        """The HTTP status Swift answered with (None: no answer)."""
        status = self.fields.get("status")
        return status if isinstance(status, int) else None

    # BackupError.retryable is a class attribute, read only; mypy has no way to let a read-only
    # property override a plain attribute, hence the ignore.
    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return transient_status(self.status)


class NotFound(SwiftRequestFailed):
    """Swift {operation} of {target} failed: {reason} (transaction {transaction_id})."""


class ContainerGone(NotFound):
    """Swift container {container} was deleted while the backup ran (HTTP 404 to {operation} of {target}, transaction {transaction_id}): nothing was committed and earlier backups are intact; run the backup again, which creates it anew."""  # noqa: E501

    exit_code = 35


class UploadVerifyFailed(BackupError):
    """Swift stored {target} with checksum {got} but we sent {expected}; the object was not committed."""  # noqa: E501

    exit_code = 33
    retryable = True


class ObjectTooLarge(BackupError):
    """Swift object {target} is larger than a {what} ever is ({size}, at most {limit}): not reading it into memory; it is damaged or was planted."""  # noqa: E501

    exit_code = 34

    @classmethod
    def beyond(cls, target: str, what: str, limit: int, size: int | None = None
               ) -> ObjectTooLarge:
        """``size`` bytes (None: more than ``limit``, read so far) of a ``what``."""
        return cls(target=target, what=what, limit=f"{limit:,}",
                   size="more bytes" if size is None else f"{size:,} bytes")


class BackupNotFound(BackupError):
    """No complete backup {backup_id} in container {container}."""

    exit_code = 40


# ------------------------------------------------------------------------ incremental chains
class ChainBroken(BackupError):
    """Backup {backup_id} is an incremental that needs every backup before it, and its chain is broken: {problems}. Restore an earlier complete chain (python -m flows.backup --list) or a full."""  # noqa: E501

    exit_code = 60


class ChainTargetNotEmpty(BackupError):
    """Backup {backup_id} is an incremental: restoring its chain makes every archived directory under {target} exactly as it was, deleting files the backup did not hold; restore into an empty --target, or pass --overwrite to accept that."""  # noqa: E501

    exit_code = 61
