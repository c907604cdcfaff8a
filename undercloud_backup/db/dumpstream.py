"""What a mariadb-dump stream goes through between ``zstd -d`` and a ``mariadb`` client.

Whoever can write the Swift container can plant a "dump"; the client runs ``\\!`` and ``system``
lines as the user restoring it (root, in the documented restore), and sends the server any
file it can read when a ``LOAD DATA LOCAL INFILE`` asks. So a dump is only ever loaded by a
client started with ``--sandbox --local-infile=0`` (:func:`sandboxed`), and only if it begins the
way mariadb-dump's output begins (:class:`DumpGate`). The gate is belt and braces: the sandbox
is what stops a shell line; the gate turns a planted object into one clear refusal before a
single statement reaches the server.

:class:`DatabaseFilter` keeps only some databases' sections, for a restore of named databases.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from undercloud_backup.core.errors import BackupError
from undercloud_backup.store.streams import LineFilter


class NotADump(BackupError):
    """{name} does not begin the way mariadb-dump's output begins (it starts {start}); refusing to load it: it was not written by undercloud-backup, or it was replaced in the Swift container."""  # noqa: E501

    exit_code = 49


SANDBOX = "--sandbox"  # no \\!, system, source, tee or pager: nothing on the host runs or is read
NO_LOCAL_FILES = "--local-infile=0"  # LOAD DATA LOCAL INFILE would send the host's files

# mariadb-dump's first line: since 10.5.25/10.6.18/10.11.8/11.x the sandbox marker, before that
# the "-- MariaDB dump" banner (MySQL's client writes "-- MySQL dump").
_SANDBOX_LINE = b"/*M!999999\\- enable the sandbox mode */"
_BANNERS = (b"-- MariaDB dump ", b"-- MySQL dump ")


def sandboxed(argv: Sequence[str]) -> tuple[str, ...]:
    """A client argv that reaches nothing on the host but the server: ``--sandbox`` and
    ``--local-infile=0``, last (``--no-defaults`` and ``--defaults-extra-file`` must stay
    first, and the command line overrides any option file)."""
    return (*argv, NO_LOCAL_FILES, SANDBOX)


def dump_start_ok(head: bytes) -> bool:
    """True if ``head`` (the stream's first bytes) is how mariadb-dump's output begins."""
    lines = head.split(b"\n", 2)
    first = lines[0].rstrip()
    if first == _SANDBOX_LINE:
        if len(lines) < 2:
            return False
        first = lines[1]
    return first.startswith(_BANNERS)


class DumpGate:
    """Hold back the stream until its first lines show it is a dump, then pass it on.

    Raises :class:`NotADump` otherwise, before any byte reaches the client. ``then`` is a
    further filter (e.g. :class:`DatabaseFilter`) the accepted stream goes through.
    """

    HEAD = 512

    def __init__(self, name: str, then: LineFilter | None = None) -> None:
        self.name = name
        self.then = then
        self._head = bytearray()
        self._open = False

    def _pass(self, data: bytes) -> bytes:
        return self.then.feed(data) if self.then is not None else data

    def _judge(self) -> bytes:
        head = bytes(self._head)
        if not dump_start_ok(head):
            raise NotADump(name=self.name, start=repr(head.split(b"\n", 1)[0][:80].decode(
                "utf-8", "replace")) if head else "empty")
        self._open = True
        self._head.clear()
        return self._pass(head)

    def feed(self, data: bytes) -> bytes:
        if self._open:
            return self._pass(data)
        self._head += data
        # Two lines (sandbox marker, banner) or enough bytes to tell.
        if self._head.count(b"\n") >= 2 or len(self._head) >= self.HEAD:
            return self._judge()
        return b""

    def finish(self) -> bytes:
        out = b"" if self._open else self._judge()
        return out + (self.then.finish() if self.then is not None else b"")


# ----------------------------------------------------------------------- database filter
_NAME = rb"`((?:[^`]|``)+)`"
_DB_MARKERS = (
    re.compile(rb"^-- Current Database: " + _NAME + rb"\s*$"),
    re.compile(rb"^/\*!40000 DROP DATABASE IF EXISTS " + _NAME),
    re.compile(rb"^CREATE DATABASE /\*!32312 IF NOT EXISTS\*/ " + _NAME),
    re.compile(rb"^USE " + _NAME + rb";\s*$"),
)
# The first statement of mariadb-dump's --system section (plugins, users, roles, grants, UDFs,
# servers); it follows the last database and precedes the footer.
_SYSTEM_START = re.compile(
    rb"^(?:CREATE (?:USER|ROLE|SERVER|FUNCTION|AGGREGATE FUNCTION) |GRANT "
    rb"|INSTALL (?:PLUGIN|SONAME) |SELECT COALESCE\(CURRENT_ROLE\(\)"
    rb"|/\*!80001 CREATE ROLE|/\*M!100005 CREATE ROLE|/\*M!100401 UNINSTALL PLUGIN)")
_FOOTER_START = re.compile(rb"^/\*!40103 SET TIME_ZONE=@OLD_TIME_ZONE \*/;")
_HEADER, _SYSTEM, _FOOTER = object(), object(), object()


class DatabaseFilter:
    """Pass a mariadb-dump stream on, keeping only some databases' sections.

    Keeps the header and footer (session settings) and, for each chosen database, everything
    from its ``DROP DATABASE`` to the next database: tables, data, routines, events, triggers
    and views. Other databases are dropped, and so is the users-and-grants section of an
    older dump unless ``keep_system``. Lines are classified by their first bytes only, so
    memory stays bounded however long a line (an extended INSERT) is; bodies between
    ``DELIMITER ;;`` and ``DELIMITER ;`` are never mistaken for section starts.
    """

    HEAD = 1024

    def __init__(self, databases: Sequence[str], keep_system: bool = False) -> None:
        self.keep = set(databases)
        self.keep_system = keep_system
        self.section: object | str = _HEADER
        self.seen: list[str] = []
        self._head = bytearray()
        self._in_head = True
        self._passing = True
        self._delimited = False

    def _keeping(self) -> bool:
        if self.section is _HEADER or self.section is _FOOTER:
            return True
        if self.section is _SYSTEM:
            return self.keep_system
        return self.section in self.keep

    def _marker(self, start: bytes) -> str | None:
        for marker in _DB_MARKERS:
            match = marker.match(start)
            if match:
                return match.group(1).replace(b"``", b"`").decode("utf-8", "replace")
        return None

    def _classify(self, start: bytes) -> None:
        if self._delimited:
            if start.rstrip() == b"DELIMITER ;":
                self._delimited = False
        elif start.startswith(b"DELIMITER "):
            self._delimited = start.rstrip() != b"DELIMITER ;"
        elif self.section is not _FOOTER:
            name = self._marker(start)
            if name is not None:
                self.section = name
                if name not in self.seen:
                    self.seen.append(name)
            elif self.section is not _SYSTEM and _SYSTEM_START.match(start):
                self.section = _SYSTEM
            elif self.section is not _HEADER and _FOOTER_START.match(start):
                self.section = _FOOTER
        self._passing = self._keeping()

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        position, size = 0, len(data)
        while position < size:
            if self._in_head:
                limit = min(size, position + self.HEAD - len(self._head))
                newline = data.find(b"\n", position, limit)
                end = limit if newline < 0 else newline + 1
                self._head += data[position:end]
                position = end
                if newline >= 0 or len(self._head) >= self.HEAD:
                    self._classify(bytes(self._head))
                    if self._passing:
                        out += self._head
                    self._head.clear()
                    self._in_head = newline >= 0
            else:
                newline = data.find(b"\n", position)
                end = size if newline < 0 else newline + 1
                if self._passing:
                    out += data[position:end]
                position = end
                self._in_head = newline >= 0
        return bytes(out)

    def finish(self) -> bytes:
        """The last line, if the stream did not end with a newline."""
        if self._in_head and self._head:
            self._classify(bytes(self._head))
            tail = bytes(self._head) if self._passing else b""
            self._head.clear()
            return tail
        return b""
