"""Row counts and checksums read beside the dump, on a thread of their own."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from undercloud_backup import database as db
from undercloud_backup import execute
from undercloud_backup.errors import BackupError, DatabaseUnreachable, DumpFailed


class TableStatsReader:
    """Row counts and checksums, read on a second connection while the dump runs.

    They re-read every row: taken before the dump they delayed it by a quarter of its time
    (benchmarks/RESULTS.md). The dump object is committed only once they are in; a failure
    here fails the dump with its own error, as retryable as it was (a lost connection) or not.
    A read still running when the dump failed is stopped: ``cancel`` (``KILL CONNECTION``),
    and any process it started (the sudo wrapper) is killed.
    """

    WHAT = "reading the row counts and checksums"

    def __init__(self, read: Callable[[], list[db.TableStats]],
                 cancel: Callable[[], None] | None = None) -> None:
        self._read, self._cancel = read, cancel
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="table-stats")
        self._future: Future[list[db.TableStats]] | None = None
        self._tracker: execute.Tracker | None = None

    def _run(self) -> list[db.TableStats]:
        with execute.tracked() as tracker:
            self._tracker = tracker
            return self._read()

    def start(self) -> None:
        if self._future is None:
            self._future = self._executor.submit(self._run)
            self._executor.shutdown(wait=False)

    def check(self) -> None:
        """Raise now if the read already failed."""
        if self._future is not None and self._future.done():
            self.result()

    def result(self) -> list[db.TableStats]:
        self.start()
        assert self._future is not None
        try:
            return self._future.result()
        except BaseException as error:  # noqa: BLE001 - rewrapped with what was being done
            raise self._error(error) from None

    def cancel(self) -> None:
        """Stop a read still running (the dump failed); best effort."""
        if self._future is None or self._future.done():
            return
        if self._tracker is not None:
            self._tracker.kill()
        if self._cancel is not None:
            try:
                self._cancel()
            except Exception:  # noqa: BLE001 - the dump's own error is the one to report
                pass

    def _error(self, error: BaseException) -> BaseException:
        if isinstance(error, DatabaseUnreachable):
            return DatabaseUnreachable(where=error.fields.get("where"),
                                       reason=f"{self.WHAT}: {error.fields.get('reason')}")
        if isinstance(error, BackupError):  # names its command: sudo refused, a timeout, ...
            return error
        return DumpFailed(reason=f"{self.WHAT}: {type(error).__name__}: {error}")
