"""Reading an archive's listing as ``tar --list --verbose`` prints it (verify and restore), and
deciding from the listings of a chain's levels whether extracting them leads out of the target.

Each line names a member with its type (``-`` file, ``d`` directory, ``l`` symlink, ``h`` hard
link, ``b``/``c`` device, ``p`` fifo) and, for links, where it points; names are C-quoted
(``--quoting-style=c``) so that no name can pass for ``-> target`` or ``link to``. A line that
does not parse is refused, never guessed at.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO

from undercloud_backup.core.errors import BackupError
from undercloud_backup.core.execute import Command

_ESCAPE = re.compile(rb"\\([0-7]{3}|[\\abfnrtv?\"])")
_SIMPLE = {b"\\": b"\\", b"a": b"\a", b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r",
           b"t": b"\t", b"v": b"\v", b"?": b"?", b'"': b'"'}
_QUOTED = rb'"((?:[^"\\]|\\.)*)"'
# mode owner size-or-device date [time] "name" [-> "target" | link to "target"] (a date
# tar cannot show is one number)
_LINE = re.compile(rb"^(\S)\S*\s+\S+\s+(\S+)\s+(?:\S+\s+){1,2}" + _QUOTED
                   + rb"(?: (->|link to) " + _QUOTED + rb")?$")
WHITEOUT = "0,0"  # an overlay whiteout: a character device that reaches no device


class ListingUnreadable(BackupError):
    """tar listed a line this tool cannot read: {line!r}; refusing rather than guessing."""

    exit_code = 48


class ChainLeadsOut(BackupError):
    """Refusing to restore {backup_id} into {target}: its archives would lead out of it: {problems}. Nothing was written. This backup (or chain) is forged or broken: verify it, and restore an earlier one."""  # noqa: E501

    exit_code = 64


def unescape_member(raw: bytes) -> str:
    """A member name as ``tar --quoting-style=escape`` (or ``c``, without its quotes) prints
    it, back to the real name."""
    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        return bytes([int(code, 8)]) if len(code) == 3 else _SIMPLE[code]

    return os.fsdecode(_ESCAPE.sub(one, raw))


@dataclass(frozen=True)
class Entry:
    """One member of a listing: its name (directories end in ``/``), type and link."""

    name: str
    kind: str
    link: str = ""
    device: str = ""

    @property
    def path(self) -> str:
        """The name as a relative path without ``./`` or a trailing ``/``."""
        return _clean(self.name)


def _clean(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


def parse_line(raw: bytes) -> Entry:
    match = _LINE.match(raw.rstrip(b"\n"))
    if match is None:
        raise ListingUnreadable(line=raw[:200].decode("utf-8", "replace"))
    kind, size, name, how, link = match.groups()
    return Entry(name=unescape_member(name), kind=kind.decode(),
                 link=unescape_member(link) if how else "",
                 device=size.decode() if kind in b"bc" else "")


def tar_list_command() -> Command:
    return Command(argv=("tar", "--list", "--verbose", "--file=-", "--quoting-style=c",
                         "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls",
                         "--selinux"), name="tar --list")


def read_entries(stream: IO[bytes], on_entry: Callable[[Entry], None]) -> None:
    """Feed every member tar lists, typed."""
    for raw in iter(stream.readline, b""):
        on_entry(parse_line(raw))


# ------------------------------------------------------------------- leading out of a target
def _under(path: str, links: dict[str, int]) -> str | None:
    """The symlink of ``links`` that ``path`` lies under (or is), if any."""
    parts = path.split("/")
    for end in range(1, len(parts) + 1):
        prefix = "/".join(parts[:end])
        if prefix in links:
            return prefix
    return None


@dataclass
class ChainPaths:
    """The levels' listings in order, one entry at a time (bounded memory: the symlinks only);
    :attr:`problems` names every member that extracting them in order would send out of the
    target: under a symlink an earlier level left (the later level's tar follows it), a hard
    link to such a place, and any device node (an overlay whiteout aside)."""

    limit: int = 20
    problems: list[str] = field(default_factory=list)
    count: int = 0
    _links: dict[str, int] = field(default_factory=dict)  # path -> level that made it
    _level: int = 0
    _made: dict[str, int] = field(default_factory=dict)

    def start_level(self, index: int) -> None:
        """Entries from now on are level ``index``'s; what the previous level left counts."""
        self._links.update(self._made)
        self._made = {}
        self._level = index

    def _problem(self, text: str) -> None:
        self.count += 1
        if len(self.problems) < self.limit:
            self.problems.append(text)

    def add(self, entry: Entry) -> None:
        path = entry.path
        if entry.kind in "bc" and entry.device != WHITEOUT:
            self._problem(f"level {self._level} holds a device node {path} ({entry.device})")
        link = _under(path, self._links) if path else None
        if link is not None and (link != path or entry.kind == "d"):
            self._problem(f"level {self._level} writes {path} through the symlink {link} "
                          f"level {self._links[link]} made")
        if entry.kind == "h":
            target = _under(_clean(entry.link), self._links)
            if target is not None:
                self._problem(f"level {self._level} hard-links {path} to {entry.link} through "
                              f"the symlink {target} level {self._links[target]} made")
        if entry.kind == "l":
            self._made[path] = self._level
        elif entry.kind != "d":  # a file (or link) replaces a symlink; a directory does not
            self._links.pop(path, None)
            self._made.pop(path, None)


def leading_out(levels: Sequence[Iterable[Entry]]) -> list[str]:
    """The problems of :class:`ChainPaths` for whole listings (level 0 first)."""
    paths = ChainPaths()
    for index, entries in enumerate(levels):
        paths.start_level(index)
        for entry in entries:
            paths.add(entry)
    return paths.problems
