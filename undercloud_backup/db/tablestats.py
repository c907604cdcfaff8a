"""Beside the dump, on connections and threads of their own: the row counts and checksums,
and the watch that bounds the dump's own waits for a locked table."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack

import pymysql

from undercloud_backup.core import execute
from undercloud_backup.core.errors import BackupError, DatabaseUnreachable, DumpFailed
from undercloud_backup.db import connection as db
from undercloud_backup.db.preflight import (
    DatabaseLocked,
    dump_lock_timeout,
    locked_error,
    waiting_dump_statement,
)


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


UNKNOWN_QUERY_ID = 1957  # ER_NO_SUCH_QUERY: KILL QUERY ID of a statement that has ended


class DumpLockWatch:
    """End a wait of the dump's for a locked table after ``lock_wait_s``.

    ``mariadb-dump`` cannot be given a session ``lock_wait_timeout`` (dbpreflight), so a lock
    taken after the check would hold its SELECT up to the server's (a day). From a connection
    opened before the dump's (so the dump's has a greater id), this polls the processlist for
    a statement of a dump of the same account that has waited that long, names the table and
    its holder, and ends the wait with ``KILL QUERY ID`` (an account may end its own queries).
    The dump then fails, and :meth:`failure` says why: :class:`DatabaseLocked`. Use
    :meth:`start` before the dump's process starts and :meth:`stop` after it ended.
    """

    def __init__(self, settings: db.DatabaseSettings, lock_wait_s: int) -> None:
        self.settings, self.lock_wait_s = settings, int(lock_wait_s)
        self.interval = min(1.0, max(0.1, self.lock_wait_s / 4))
        self.locked: DatabaseLocked | None = None
        self._stack = ExitStack()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        connection = self._stack.enter_context(db.connect(self.settings))
        after = connection.thread_id()
        self._thread = threading.Thread(target=self._watch, args=(connection, after),
                                        name="dump-lock-watch", daemon=True)
        self._thread.start()

    def _watch(self, connection: pymysql.connections.Connection, after: int) -> None:
        try:
            while not self._stopped.wait(self.interval):
                with connection.cursor() as cursor:
                    found = waiting_dump_statement(cursor, after, self.lock_wait_s)
                    if found is None:
                        continue
                    query, schema, table = found
                    # said before the KILL: the dump's failure must find it
                    self.locked = locked_error(connection, schema, table, self.settings.where,
                                               self.lock_wait_s)
                    try:
                        cursor.execute(f"KILL QUERY ID {int(query)}")
                    except pymysql.err.MySQLError as error:
                        if error.args[0] != UNKNOWN_QUERY_ID:
                            raise
                        self.locked = None  # it ended meanwhile: the dump goes on, watched
                        continue
                    return
        except pymysql.err.MySQLError:
            return  # the watch's connection is gone: the dump's own outcome will tell

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self._stack.close()
        except BackupError:  # its connection was lost: nothing more to say
            pass

    def failure(self, reason: str) -> BackupError | None:
        """The lock behind a failed dump, if that is what ended it."""
        return self.locked or dump_lock_timeout(reason, self.settings.where, self.lock_wait_s)
