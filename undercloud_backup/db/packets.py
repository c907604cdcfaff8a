"""The largest packet a dump needs, and whether a server takes it.

A MariaDB server refuses a statement longer than its ``max_allowed_packet`` (16 MiB in a stock
install): the client says "ERROR 2006 ... server has gone away" or "Got a packet bigger than
'max_allowed_packet'", after everything before that statement was loaded. mariadb-dump writes
each statement on one line (values are escaped, blobs in hex), at most ``net_buffer_length``
per multi-row INSERT unless one row alone is longer: the dump's longest line is what the
server must take. The backup measures it on the way to the compressor (:func:`meter_command`,
a stage of the dump's pipe) and records what a server needs in the manifest; a restore checks
the target against it before anything is dropped or loaded.

``python -m undercloud_backup.db.packets`` is that stage: stdin to stdout unchanged, then one
line on stderr, ``longest line: N``.
"""

from __future__ import annotations

import os
import sys

from undercloud_backup.core.errors import BackupError
from undercloud_backup.core.execute import Command

STOCK_MAX_ALLOWED_PACKET = 16 << 20  # MariaDB 10.11's default
# The server counts a little more than the statement (measured: a 16,777,207-byte line fails
# at 16 MiB); and max_allowed_packet is a multiple of 1 KiB.
PACKET_MARGIN = 1024
REPORT_PREFIX = "longest line: "
_CHUNK = 1 << 20


class PacketTooSmall(BackupError):
    """MariaDB at {where} allows max_allowed_packet {allowed} but this dump holds a statement of {longest} (it needs {needed}), and {why}; as an administrator run SET GLOBAL max_allowed_packet = {needed_bytes}; (or set max_allowed_packet = {needed} under [mariadbd] and restart), then restore again. Nothing was dropped or loaded."""  # noqa: E501

    exit_code = 74


class LongestLine:
    """The longest line of a stream fed in chunks, without looking at every line: within
    a chunk, lines between its first and last newline are at most that far apart, and only
    a chunk whose span could beat the longest so far is scanned line by line."""

    def __init__(self) -> None:
        self.longest = 0
        self._current = 0  # bytes of the line not yet ended

    def feed(self, data: bytes) -> bytes:
        first = data.find(b"\n")
        if first < 0:
            self._current += len(data)
            return data
        self.longest = max(self.longest, self._current + first)
        last = data.rfind(b"\n")
        if last - first - 1 > self.longest:
            start = first + 1
            while start <= last:
                end = data.find(b"\n", start)
                self.longest = max(self.longest, end - start)
                start = end + 1
        self._current = len(data) - last - 1
        return data

    def finish(self) -> bytes:
        self.longest = max(self.longest, self._current)
        self._current = 0
        return b""


def needed(longest: int) -> int:
    """The ``max_allowed_packet`` a server needs for a statement of ``longest`` bytes."""
    return -(-(longest + PACKET_MARGIN) // 1024) * 1024


def setting(size: int) -> str:
    """``size`` bytes as a my.cnf value (``65M``, ``16385K``), never rounded down."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def meter_command() -> Command:
    """The dump pipe's stage that measures its longest line (see the module docstring)."""
    return Command(argv=(sys.executable, "-m", "undercloud_backup.db.packets"),
                   name="statement meter")


class MeterReport:
    """What the meter stage said on stderr: the longest line (None until it said)."""

    def __init__(self) -> None:
        self.longest: int | None = None

    def __call__(self, line: str) -> None:
        if line.startswith(REPORT_PREFIX):
            self.longest = int(line[len(REPORT_PREFIX):])


def _copy() -> int:
    meter = LongestLine()
    read, write = sys.stdin.fileno(), sys.stdout.fileno()
    try:
        while chunk := os.read(read, _CHUNK):
            view = memoryview(meter.feed(chunk))
            while view:
                view = view[os.write(write, view):]
    except BrokenPipeError:  # the compressor is gone: its own status says why
        return 1
    meter.finish()
    print(f"{REPORT_PREFIX}{meter.longest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_copy())
