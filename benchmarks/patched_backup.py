#!/usr/bin/env python3
"""``python -m flows.backup`` with candidate optimisations patched in at run time, to measure them.

    .venv/bin/python benchmarks/patched_backup.py PATCH[,PATCH...] -- FLOW-ARGS...

The project's code is not changed: each patch replaces one function for this process only, so
``benchmarks/experiments.py`` can time every suggestion against the unpatched flow. Patches:

  stats-concurrent  row counts and CHECKSUM TABLE on a second connection while the dump runs,
                    instead of before it (they delay the dump's start by 2-4 s at scale 1)
  no-checksum       row counts only, no CHECKSUM TABLE EXTENDED (the manifest's checksum is null)
  zstd-st           zstd --single-thread instead of -T0 (same CPU, ~8 MiB instead of ~60 MiB RSS)
  zstd-1            zstd level 1 instead of 3 (about half the CPU on SQL text, +10 % size)
  no-md5            no client-side MD5 per segment: Swift's returned ETag is recorded as is and
                    the SHA-256 of the whole stream stays the end-to-end check
  no-heartbeat      Prefect flow-run heartbeats off (their thread is joined on exit: ~1 s)
  pipe-1m           1 MiB pipe between zstd and us (64 KiB by default): fewer wake-ups
  none              nothing (the same code path as the plain flow, for a fair baseline)
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
F_SETPIPE_SZ = 1031


def stats_concurrent() -> None:
    import pymysql

    from undercloud_backup import backup, database

    original = database.table_stats

    class LaterStats:
        """Computed on another connection while the dump streams; iterating waits for it."""

        def __init__(self, connection: pymysql.connections.Connection,
                     databases: tuple[str, ...]) -> None:
            params = {"user": connection.user, "password": connection.password,
                      "charset": "utf8mb4", "connect_timeout": 10, "read_timeout": 3600}
            if connection.unix_socket:
                params["unix_socket"] = connection.unix_socket
            else:
                params.update(host=connection.host, port=connection.port)
            self._result: list = []
            self._error: BaseException | None = None

            def work() -> None:
                try:
                    with pymysql.connect(**params) as other:
                        self._result = original(other, databases)
                except BaseException as error:  # noqa: BLE001 - re-raised when iterated
                    self._error = error

            self._thread = threading.Thread(target=work, daemon=True, name="table-stats")
            self._thread.start()

        def __iter__(self):  # type: ignore[no-untyped-def]
            self._thread.join()
            if self._error is not None:
                raise self._error
            return iter(self._result)

    backup.db.table_stats = LaterStats  # type: ignore[assignment]


def no_checksum() -> None:
    """Row counts only: CHECKSUM TABLE EXTENDED reads every row again (mariadbd CPU)."""
    from undercloud_backup import backup, database

    original = database.table_stats

    class CountOnly:
        def __init__(self, connection) -> None:  # type: ignore[no-untyped-def]
            self._connection = connection

        def cursor(self):  # type: ignore[no-untyped-def]
            return _Cursor(self._connection.cursor())

    class _Cursor:
        def __init__(self, cursor) -> None:  # type: ignore[no-untyped-def]
            self._cursor, self._skip = cursor, False

        def __enter__(self):  # type: ignore[no-untyped-def]
            self._cursor.__enter__()
            return self

        def __exit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
            self._cursor.__exit__(*exc)

        def execute(self, query: str, *args):  # type: ignore[no-untyped-def]
            self._skip = query.startswith("CHECKSUM TABLE")
            return None if self._skip else self._cursor.execute(query, *args)

        def fetchone(self):  # type: ignore[no-untyped-def]
            return (None, None) if self._skip else self._cursor.fetchone()

        def fetchall(self):  # type: ignore[no-untyped-def]
            return self._cursor.fetchall()

    def table_stats(connection, databases):  # type: ignore[no-untyped-def]
        return original(CountOnly(connection), databases)

    backup.db.table_stats = table_stats


def zstd(argv_change) -> None:  # type: ignore[no-untyped-def]
    from undercloud_backup import backup
    from undercloud_backup.execute import Command

    original = backup.zstd_command

    def command(level: int) -> Command:
        base = original(level)
        return Command(argv=argv_change(base.argv), name=base.name)

    backup.zstd_command = command


def no_md5() -> None:
    import hashlib

    from undercloud_backup import swift

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.size += len(chunk)

    def put_segment(self, index: int, spool) -> swift.Segment:  # type: ignore[no-untyped-def]
        name = self._segment_name(index)
        spool.file.seek(0)
        with swift.swift_errors("PUT segment", name, swift.storage_url(self.conn)):
            etag = self.conn.put_object(
                self.settings.segment_container, name, spool.file, content_length=spool.size,
                chunk_size=swift.READ_CHUNK, content_type="application/octet-stream")
        return swift.Segment(name=name, size=spool.size, etag=etag)

    original_commit = swift.StreamUploader.commit

    def commit(self, extra_headers=None):  # type: ignore[no-untyped-def]
        if self._last is not None:  # a plain object (< 1 segment): hash it now, it is small
            spool = self._last
            spool.md5 = hashlib.md5(usedforsecurity=False)
            spool.file.seek(0)
            while chunk := spool.file.read(1 << 20):
                spool.md5.update(chunk)
        return original_commit(self, extra_headers)

    swift._Spool.write = write  # type: ignore[method-assign]
    swift.StreamUploader._put_segment = put_segment  # type: ignore[method-assign]
    swift.StreamUploader.commit = commit  # type: ignore[method-assign]


def pipe_1m() -> None:
    from undercloud_backup import execute

    original = execute.Pipeline._start

    def start(self) -> None:  # type: ignore[no-untyped-def]
        original(self)
        if self.stdout is not None:
            try:
                fcntl.fcntl(self.stdout.fileno(), F_SETPIPE_SZ, 1 << 20)
            except OSError:
                pass

    execute.Pipeline._start = start  # type: ignore[method-assign]


_KEEP: list = []


def no_heartbeat() -> None:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    # Entered for the life of the process (the flow runs inside main()). ``updates={...: None}``
    # would only restore the default (180 s); ``set_defaults`` really sets None.
    # Keep a reference: a collected generator context would restore the settings at once.
    _KEEP.append(temporary_settings(set_defaults={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}))
    _KEEP[-1].__enter__()
    from prefect.settings import get_current_settings

    assert get_current_settings().flows.heartbeat_frequency is None


def _replace_threads(argv: tuple[str, ...]) -> tuple[str, ...]:
    return tuple("--single-thread" if a == "-T0" else a for a in argv)


def _level_1(argv: tuple[str, ...]) -> tuple[str, ...]:
    return tuple("-1" if a == "-3" else a for a in argv)


PATCHES = {
    "stats-concurrent": stats_concurrent,
    "no-checksum": no_checksum,
    "zstd-st": lambda: zstd(_replace_threads),
    "zstd-1": lambda: zstd(_level_1),
    "no-md5": no_md5,
    "no-heartbeat": no_heartbeat,
    "pipe-1m": pipe_1m,
    "none": lambda: None,
}


def main() -> int:
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        sys.exit(__doc__)
    names = [n for n in sys.argv[1].split(",") if n]
    for name in names:
        if name not in PATCHES:
            sys.exit(f"unknown patch {name!r}; known: {', '.join(PATCHES)}")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows import backup as flow_backup

    for name in names:
        PATCHES[name]()
    return flow_backup.main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
