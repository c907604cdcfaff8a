"""Whether a restore fits its target, checked before anything is written, and which failure
it was when one happens anyway.

Before: the target MariaDB must take the dump's longest statement (``max_allowed_packet``,
recorded in the manifest by :mod:`undercloud_backup.db.packets`): where it does not and the
account may raise the server's value, it is raised for the load and set back after (the
session value is read-only in MariaDB, and the loading client's session takes the global one
when it connects); otherwise the restore refuses. The target file system must have room for
what the archive holds (the manifest's ``space``).

After: a file system that filled up, a server that went away mid-load and a backup found
damaged while restoring each end with a status of their own, saying what had already been
written or replaced.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pymysql

from undercloud_backup.core.errors import BackupError, InsufficientSpace
from undercloud_backup.core.manifest import Manifest
from undercloud_backup.core.sizes import format_size
from undercloud_backup.db import packets
from undercloud_backup.db.dumpstream import DatabaseFilter

Logger = logging.Logger | logging.LoggerAdapter
# Room left beside the archive's bytes: directories, ACLs and xattrs take blocks of their own.
SPACE_MARGIN = 1.05


class TargetFull(BackupError):
    """The file system of {target} filled up while restoring ({reason}): {written} entries had been written under {target}; free space (python -m flows.restore --dry-run lists what is restored) and restore again (with --overwrite over what was written)."""  # noqa: E501

    exit_code = 75


class TargetServerLost(BackupError):
    """MariaDB at {where} went away while loading {object} ({reason}): {progress}; start it, look at its error log, and restore the databases again with --overwrite."""  # noqa: E501

    exit_code = 78


class DamagedWhileRestoring(BackupError):
    """Restoring {what} stopped: {detail}; {progress}. Nothing of the damaged part was used; restore from another backup (python -m flows.backup --list)."""  # noqa: E501

    exit_code = 43


def damaged(error: BackupError) -> str:
    """An :class:`ObjectDamaged`'s finding, without its advice (the caller gives its own)."""
    fields = error.fields
    return f"{fields.get('target')} is missing or damaged: {fields.get('detail')}"


# ---------------------------------------------------------------------- the packet check
def _allowed(session) -> int:
    with session.cursor() as cursor:
        cursor.execute("SELECT @@global.max_allowed_packet")
        return int(cursor.fetchone()[0])


def _may_set_global(session) -> str | None:
    """None if the account may set the server's max_allowed_packet; else the server's
    refusal. Setting it to its own value changes nothing but asks for the privilege."""
    try:
        with session.cursor() as cursor:
            cursor.execute("SET GLOBAL max_allowed_packet = @@global.max_allowed_packet")
    except pymysql.err.MySQLError as error:
        return str(error.args[1] if len(error.args) > 1 else error)
    return None


@contextmanager
def packet_fits(session, manifest: Manifest, where: str, *, dry_run: bool,
                logger: Logger) -> Iterator[None]:
    """Check the server takes the dump's longest statement, before anything is dropped or
    loaded: raise :class:`PacketTooSmall`, or raise the server's value for the ``with`` (not
    in a dry run) and set it back after."""
    needed = manifest.mariadb.max_allowed_packet if manifest.mariadb else None
    if not needed:
        yield  # not recorded (an older backup): the load says it if the server refuses
        return
    allowed = _allowed(session)
    if allowed >= needed:
        yield
        return
    refused = _may_set_global(session)
    longest = format_size(needed - packets.PACKET_MARGIN)
    if refused is not None:
        raise packets.PacketTooSmall(
            where=where, allowed=packets.setting(allowed), longest=longest,
            needed=packets.setting(needed), needed_bytes=needed,
            why=f"this account may not raise it ({refused})")
    if dry_run:
        logger.info("MariaDB at %s allows max_allowed_packet %s, the dump needs %s: the "
                    "restore raises it for the load and sets it back", where,
                    packets.setting(allowed), packets.setting(needed))
        yield
        return
    logger.warning("raising max_allowed_packet of MariaDB at %s from %s to %s for the load "
                   "(the dump holds a statement of %s); set back afterwards", where,
                   packets.setting(allowed), packets.setting(needed), longest)
    _set_global(session, needed)
    try:
        yield
    finally:
        try:
            _set_global(session, allowed)
        except pymysql.err.MySQLError as error:  # the server went away: nothing to set back
            logger.warning("could not set max_allowed_packet back to %s: %s",
                           packets.setting(allowed), error)


def _set_global(session, value: int) -> None:
    with session.cursor() as cursor:
        cursor.execute("SET GLOBAL max_allowed_packet = %s", (value,))


def packet_refused(reason: str) -> bool:
    """Whether a client's error says the server refused a statement for its size."""
    return "max_allowed_packet" in reason or "packet bigger" in reason


# ------------------------------------------------------------------------ free space
def files_bytes(manifest: Manifest) -> int | None:
    """What the archive's files take, from the manifest's space check (None: not recorded)."""
    space = manifest.space or {}
    for key in ("files_allocated_bytes", "files_bytes"):
        value = space.get(key)
        if isinstance(value, int) and value >= 0:
            return value
    return None


def database_bytes(manifest: Manifest) -> int | None:
    """What the databases took on the backed-up server (InnoDB's data and indexes), from the
    manifest's space check (None: not recorded)."""
    value = (manifest.space or {}).get("database_bytes")
    return value if isinstance(value, int) and value > 0 else None


def check_free_space(target: str, manifest: Manifest) -> None:
    """Refuse (exit 14) a target whose file system cannot hold the archive's files, before
    anything is written. ``target`` may not exist yet: its nearest existing parent counts."""
    needed = files_bytes(manifest)
    if needed is None:
        return
    probe = target
    while not os.path.isdir(probe):
        probe = os.path.dirname(probe) or "/"
    stats = os.statvfs(probe)
    available = stats.f_bavail * stats.f_frsize
    if needed * SPACE_MARGIN > available:
        raise InsufficientSpace(location=f"the file system of {target}",
                                purpose=f"the files of backup {manifest.backup_id}",
                                needed=format_size(int(needed * SPACE_MARGIN)),
                                available=format_size(available))


def check_database_space(session, manifest: Manifest, where: str, *, replacing: bool) -> None:
    """Refuse (exit 14) loading every database into a server on this host whose data
    directory's file system cannot hold what the databases took on the backed-up server
    (``space.database_bytes``). Only a fresh load is judged: databases dropped to be
    replaced give their room back, and a remote server's disk is not ours to measure."""
    needed = database_bytes(manifest)
    if replacing or needed is None:
        return
    with session.cursor() as cursor:
        cursor.execute("SELECT @@datadir")
        datadir = str(cursor.fetchone()[0])
    if not os.path.isdir(datadir):  # another host's path
        return
    stats = os.statvfs(datadir)
    available = stats.f_bavail * stats.f_frsize
    if needed * SPACE_MARGIN > available:
        raise InsufficientSpace(location=f"the data directory {datadir} of MariaDB at {where}",
                                purpose=f"the databases of backup {manifest.backup_id}",
                                needed=format_size(int(needed * SPACE_MARGIN)),
                                available=format_size(available))


_NO_SPACE = re.compile(r"No space left on device|Disk quota exceeded")


def disk_full(stderr: Sequence[str]) -> str | None:
    """tar's line saying the file system (or the quota) filled up, if it said so."""
    return next((line for line in stderr if _NO_SPACE.search(line)), None)


# --------------------------------------------------------------- how far a load came
@dataclass
class LoadProgress:
    """Where each database's section starts in a dump stream on its way into the client (a
    line filter: the stream goes on unchanged, or through ``then``), by line number as the
    client counts them: its ``ERROR ... at line N`` then tells which database it was in;
    what went down the pipe is ahead of what the server has by a buffer or more."""

    then: DatabaseFilter | None = None
    starts: list[tuple[int, str]] = field(default_factory=list)  # (line, database)
    _tail: bytes = b""
    _lines: int = 0  # newlines before the tail

    _MARK = b"\n-- Current Database: `"

    def feed(self, data: bytes) -> bytes:
        out = self.then.feed(data) if self.then is not None else data
        text = self._tail + out
        start = 0
        while (found := text.find(self._MARK, start)) >= 0:
            end = text.find(b"`\n", found + len(self._MARK))
            if end < 0:
                break
            name = text[found + len(self._MARK):end].replace(b"``", b"`").decode(
                "utf-8", "replace")
            line = self._lines + text.count(b"\n", 0, found + 1) + 1
            if name not in (n for _, n in self.starts):
                self.starts.append((line, name))
            start = end
        cut = max(start, len(text) - 300)
        self._lines += text.count(b"\n", 0, cut)
        self._tail = text[cut:]
        return out

    def finish(self) -> bytes:
        return self.then.finish() if self.then is not None else b""

    def describe(self, planned: Sequence[str], replaced: Sequence[str],
                 reason: str = "") -> str:
        """What the server holds now: loaded, partly loaded, not loaded, and which existing
        databases had been dropped to be replaced. ``reason``: the client's error, whose
        line number places the failure; without one, the last section sent is the one."""
        match = re.search(r" at line (\d+)", reason)
        failed_at = int(match.group(1)) if match else None
        seen = [name for line, name in self.starts if failed_at is None or line <= failed_at]
        done, current = seen[:-1], seen[-1:]
        rest = [name for name in planned if name not in seen]
        parts = [f"loaded: {', '.join(done) or 'none'}"]
        if current:
            parts.append(f"partly loaded: {current[0]}")
        parts.append(f"not loaded: {', '.join(rest) or 'none'}")
        if replaced:
            parts.append(f"dropped to be replaced before the load: {', '.join(replaced)}")
        return "; ".join(parts)


def server_alive(connect) -> bool:
    """Whether a new connection to the target server answers."""
    try:
        with connect() as probe:
            probe.ping(reconnect=False)
        return True
    except (BackupError, pymysql.err.MySQLError, OSError):
        return False
