"""The target server's InnoDB buffer pool while a restore loads into it.

A load, and above all the binary log's replay after it, runs at the speed of the target's
buffer pool: every nightly's row events touch pages all over the tables, and a pool smaller
than the data cycles each page through the disk once per night (benchmarks/RESULTS.md: the
same replay in 2.9-5.4 s with a 64 MiB pool and 0.7 s with 512 MiB). MariaDB resizes the pool
online (``SET GLOBAL innodb_buffer_pool_size``; since 10.11.12 the statement itself grows or
shrinks it, flushing what a shrink evicts, in 1 MiB steps; older servers resize in chunks of
``innodb_buffer_pool_chunk_size`` in a background thread, ``Innodb_buffer_pool_resize_status``
telling how far), so the restore raises it for the load and sets it back afterwards, also
when the load fails.

How big (:func:`load_pool_size`), as a DBA sizing a pool for one bulk load would: room for
the databases as they were on the backed-up server (``space.database_bytes`` of the manifest:
InnoDB's data and indexes) and a quarter more for the undo, the change buffer and what a
replay adds; the raise taking at most a quarter of the memory this host has available
(``MemAvailable``) so nothing else on the undercloud is pushed into swap; never lowered; and
only for a server on this host (a socket or loopback: another host's memory is not ours to
measure). The operator's ``load_buffer_pool_mib`` replaces that choice (0: leave the server
alone), still never lowering the pool.

Changing a global needs SUPER: an account without it (a restricted restore user) loads with
the server's pool, saying so in one line. A restore that is killed (SIGKILL, a lost worker)
leaves the pool raised until the server restarts or an administrator sets it back, as it leaves
a raised ``max_allowed_packet`` (:mod:`undercloud_backup.restore.target`); the line saying it
was raised names the size to set back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pymysql

from undercloud_backup.core.sizes import format_size

Logger = logging.Logger | logging.LoggerAdapter
MIB = 1 << 20
# Room beyond the data's own pages: undo, the change buffer, pages the replay splits.
HEADROOM = 1.25
# The raise takes at most this share of the host's available memory.
MEMORY_SHARE = 4
# A raise smaller than this is not worth changing a global of somebody's server for.
MIN_GAIN = 16 * MIB
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
ER_SPECIFIC_ACCESS_DENIED = 1227  # "you need (at least one of) the SUPER privilege(s)"


def _round_up(size: int, step: int = MIB) -> int:
    return -(-size // step) * step


def load_pool_size(current: int, data_bytes: int | None, mem_available: int | None,
                   requested_mib: int | None = None) -> int | None:
    """The ``innodb_buffer_pool_size`` for a load, or None to leave the server's alone.

    ``current``: the server's pool now; ``data_bytes``: what the databases took on the
    backed-up server (None: not recorded); ``mem_available``: this host's ``MemAvailable``
    (None: not known, or not this host's server); ``requested_mib``: the operator's choice
    (None: decide; 0: leave it alone). Never below ``current``; whole MiB.
    """
    if requested_mib is not None:
        wanted = requested_mib * MIB
        return wanted if requested_mib > 0 and wanted > current else None
    if not data_bytes or data_bytes <= 0 or not mem_available or mem_available <= 0:
        return None
    wanted = _round_up(int(data_bytes * HEADROOM))
    ceiling = (current + mem_available // MEMORY_SHARE) // MIB * MIB
    size = min(wanted, ceiling)
    return size if size >= current + MIN_GAIN else None


def scratch_pool_size(default: int, data_bytes: int | None,
                      mem_available: int | None) -> int:
    """The pool a new throwaway server starts with to load (and replay) a dump: ``default``,
    or more for data that would not fit, its whole pool at most a quarter of what this host
    has available (the server is new: all of its pool is new memory)."""
    if not data_bytes or data_bytes <= 0 or not mem_available or mem_available <= 0:
        return default
    wanted = _round_up(int(data_bytes * HEADROOM))
    return max(default, min(wanted, mem_available // MEMORY_SHARE // MIB * MIB))


def mem_available(path: str = "/proc/meminfo") -> int | None:
    """This host's ``MemAvailable`` in bytes (None where the kernel does not say)."""
    try:
        with open(path) as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def is_local(host: str | None, socket: str | None) -> bool:
    """Whether a server reached this way runs on this host (its memory is this host's)."""
    return bool(socket) or (host or "").lower() in LOCAL_HOSTS


def _pool(session) -> int | None:
    try:
        with session.cursor() as cursor:
            cursor.execute("SELECT @@global.innodb_buffer_pool_size")
            return int(cursor.fetchone()[0])
    except (pymysql.err.MySQLError, TypeError):  # no InnoDB: nothing to size
        return None


def _set(session, size: int) -> int | None:
    """Set the pool; what the server made of it (it rounds to its own step)."""
    with session.cursor() as cursor:
        cursor.execute("SET GLOBAL innodb_buffer_pool_size = %s", (size,))
    return _pool(session)


def _reason(error: pymysql.err.MySQLError) -> str:
    return str(error.args[1] if len(error.args) > 1 else error)


@contextmanager
def raised_for_load(session, where: str, *, data_bytes: int | None, local: bool,
                    requested_mib: int | None, dry_run: bool, quiet: bool,
                    logger: Logger) -> Iterator[int | None]:
    """The server's buffer pool raised for the ``with`` (see the module docstring) and set
    back after it, whatever happened inside; yields the raised size (None: left alone). In
    a dry run only says what the load would do (nothing when ``quiet``: a real restore's
    check, which says it when it loads)."""
    current = _pool(session) if requested_mib != 0 else None
    if current is None:
        yield None
        return
    available = mem_available() if local else None
    size = load_pool_size(current, data_bytes, available, requested_mib)
    if size is None:
        if requested_mib is None and not local and data_bytes and not quiet:
            logger.info("MariaDB at %s is on another host: its innodb_buffer_pool_size (%s) "
                        "is left alone (load_buffer_pool_mib sets one for the load)", where,
                        format_size(current))
        yield None
        return
    why = (f"load_buffer_pool_mib {requested_mib}" if requested_mib is not None else
           f"the databases took {format_size(data_bytes or 0)} on the backed-up server, "
           f"this host has {format_size(available or 0)} available")
    if dry_run:
        if not quiet:
            logger.info("the load would raise innodb_buffer_pool_size of MariaDB at %s from %s "
                        "to %s (%s) and set it back after", where, format_size(current),
                        format_size(size), why)
        yield None
        return
    try:
        raised = _set(session, size)
    except pymysql.err.MySQLError as error:
        denied = error.args and error.args[0] == ER_SPECIFIC_ACCESS_DENIED
        logger.warning("MariaDB at %s: %s innodb_buffer_pool_size to %s (%s); loading with "
                       "its %s", where,
                       "this account may not raise" if denied else "could not raise",
                       format_size(size), _reason(error), format_size(current))
        yield None
        return
    logger.info("raised innodb_buffer_pool_size of MariaDB at %s from %s to %s for the load "
                "(%s); set back to %d bytes afterwards", where, format_size(current),
                format_size(raised or size), why, current)
    try:
        yield raised
    finally:
        _set_back(session, where, current, logger)


def _set_back(session, where: str, size: int, logger: Logger) -> None:
    started = time.monotonic()
    try:
        try:
            _set(session, size)
        except pymysql.err.OperationalError:  # the session timed out over a long load
            session.ping(reconnect=True)
            _set(session, size)
    except pymysql.err.MySQLError as error:
        logger.warning("could not set innodb_buffer_pool_size of MariaDB at %s back to %d "
                       "bytes (%s): as an administrator run SET GLOBAL "
                       "innodb_buffer_pool_size = %d;", where, size, _reason(error), size)
        return
    logger.info("set innodb_buffer_pool_size of MariaDB at %s back to %s (%.1f s)", where,
                format_size(size), time.monotonic() - started)
