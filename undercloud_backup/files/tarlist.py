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
from undercloud_backup.core.manifest import StoredObject
from undercloud_backup.store.streams import Consumer, StreamOutcome, stream_object

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


class RenamesIntoRoot(BackupError):
    """Refusing to restore {backup_id} into /: level(s) {levels} of its chain rename directories (GNU tar dumpdir rename records), which cannot be checked from the listings. Restore into a scratch target (--target DIR, where the extraction is confined) and copy what you need from there."""  # noqa: E501

    exit_code = 84


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
_HOPS = 40  # as the kernel's ELOOP: more symlinks than that on one path is a loop


@dataclass(frozen=True)
class _Way:
    """Where a path leads lexically within the target root: ``path`` (None when it climbs
    out of the root or loops), and the first symlink an earlier level made on the way."""

    path: str | None
    through: str | None = None
    level: int = 0  # the level that made ``through``


@dataclass
class ChainPaths:
    """The levels' listings in order, one entry at a time (bounded memory: the symlinks only);
    :attr:`problems` names every member that extracting them in order would send out of the
    target: one whose path, resolved lexically through every symlink known so far (an
    earlier level's, this level's own, links to links), passes through a symlink an earlier
    level left (the later level's tar follows it) or climbs out of the root; a hard link to
    such a place; a directory rename record (kind ``R``, :func:`read_renames`) whose source or
    destination does; and any device node (an overlay whiteout aside). :attr:`renaming` lists
    the levels after the first that hold rename records."""

    limit: int = 20
    problems: list[str] = field(default_factory=list)
    count: int = 0
    renaming: list[int] = field(default_factory=list)
    _links: dict[str, tuple[str, int]] = field(default_factory=dict)  # path -> (target, level)
    _level: int = 0

    def start_level(self, index: int) -> None:
        """Entries from now on are level ``index``'s."""
        self._level = index

    def _problem(self, text: str) -> None:
        self.count += 1
        if len(self.problems) < self.limit:
            self.problems.append(text)

    def _resolve(self, path: str, follow_last: bool) -> _Way:
        """``path`` (relative to the target root) resolved lexically through every known
        symlink, each of this level's counted as already there (tar delays its absolute and
        ``..`` ones, which only makes this stricter than tar). An absolute link target starts
        again at the target root: for ``/`` that is where it leads."""
        todo = [p for p in reversed(path.split("/")) if p not in ("", ".")]
        done: list[str] = []
        through: str | None = None
        made = hops = 0
        while todo:
            part = todo.pop()
            if part == "..":
                if not done:
                    return _Way(None, through, made)
                done.pop()
                continue
            done.append(part)
            if not todo and not follow_last:
                break
            known = self._links.get("/".join(done))
            if known is None:
                continue
            target, level = known
            if through is None and level < self._level:
                through, made = "/".join(done), level
            hops += 1
            if hops > _HOPS:
                return _Way(None, through, made)
            done.pop()
            if target.startswith("/"):
                done = []
            todo += [p for p in reversed(target.split("/")) if p not in ("", ".")]
        return _Way("/".join(done), through, made)

    def _check(self, verb: str, path: str, way: _Way) -> None:
        if way.through is not None:
            self._problem(f"level {self._level} {verb} {path} through the symlink "
                          f"{way.through} level {way.level} made")
        elif way.path is None:
            self._problem(f"level {self._level} {verb} {path} through symlinks (or ..) that "
                          f"loop or climb out of the target")

    def add(self, entry: Entry) -> None:
        path = entry.path
        if entry.kind == "R":
            self._rename(path, _clean(entry.link))
            return
        if entry.kind in ("b", "c") and entry.device != WHITEOUT:
            self._problem(f"level {self._level} holds a device node {path} ({entry.device})")
        if not path:
            return
        # a directory entry at a symlink is followed (--keep-directory-symlink); anything
        # else replaces what it lands on
        way = self._resolve(path, follow_last=entry.kind == "d")
        self._check("writes", path, way)
        alias = None
        if entry.kind == "h":  # stricter than link(2), which does not follow the last name
            self._check(f"hard-links {path} to", entry.link,
                        self._resolve(_clean(entry.link), follow_last=True))
            source = self._resolve(_clean(entry.link), follow_last=False).path
            if source is not None and source in self._links:  # a symlink's second name
                alias = self._links[source]
        if way.path is None or entry.kind == "d":
            return
        if entry.kind == "l":
            self._links[way.path] = (entry.link, self._level)
        elif alias is not None:
            self._links[way.path] = alias
        else:
            self._links.pop(way.path, None)

    def _rename(self, source: str, destination: str) -> None:
        """GNU tar's dumpdir rename record: source and destination must stay clear of an
        earlier level's links; what was under the source (its symlinks) is then under the
        destination."""
        if self._level > 0 and self._level not in self.renaming:
            self.renaming.append(self._level)
        old = self._resolve(source, follow_last=False)
        new = self._resolve(destination, follow_last=False)
        self._check(f"renames {source} to {destination}:", source, old)
        self._check(f"renames {source} to {destination}:", destination, new)
        if old.path is None or new.path is None or not old.path or not new.path:
            return
        prefix = old.path + "/"
        for link in [k for k in self._links if k == old.path or k.startswith(prefix)]:
            self._links[new.path + link[len(old.path):]] = self._links.pop(link)


def leading_out(levels: Sequence[Iterable[Entry]]) -> list[str]:
    """The problems of :class:`ChainPaths` for whole listings (level 0 first)."""
    paths = ChainPaths()
    for index, entries in enumerate(levels):
        paths.start_level(index)
        for entry in entries:
            paths.add(entry)
    return paths.problems


# ----------------------------------------------------------------------- dumpdir renames
def tar_renames_command() -> Command:
    """A listing that shows GNU incremental dumpdirs (which plain ``--list`` hides): each
    directory member is followed by its records, one a line, ``R``/``T``/``X`` ones naming
    directories tar renames when it extracts that member."""
    return Command(argv=("tar", "--list", "--incremental", "--verbose", "--verbose",
                         "--file=-", "--numeric-owner"), name="tar --list --incremental")


def read_renames(stream: IO[bytes]) -> list[Entry]:
    """The rename records of a level's dumpdirs, as entries of kind ``R`` (name: source,
    link: destination; a temporary directory of an ``X`` record stands for an empty name).

    tar prints dumpdir names raw (not quoted), so a name holding a newline can make a line
    look like a record: a record is never missed (each starts a line), but a path may be
    cut short; that is why a restore into ``/`` refuses every level that has any record at
    all, and these paths only serve verify's report."""
    renames: list[Entry] = []
    source: str | None = None
    temp = ""
    for raw in iter(stream.readline, b""):
        code, text = raw[:2], os.fsdecode(raw[2:].rstrip(b"\n"))
        if source is not None and code != b"T ":  # an R without its T renames all the same
            renames.append(Entry(name=source, kind="R", link=temp))
            source = None
        if code == b"X ":
            temp = f"{text}/tar.XXXXXX"
        elif code == b"R ":
            source = text or temp
        elif code == b"T ":
            renames.append(Entry(name=temp if source is None else source, kind="R",
                                 link=text or temp))
            source = None
    if source is not None:
        renames.append(Entry(name=source, kind="R", link=temp))
    return renames


def level_renames(store, container: str, obj: StoredObject, *, timeout: float, strict: bool,
                  spool_dir: str | None = None) -> tuple[list[Entry], StreamOutcome]:
    """The rename records of one level's archive (a second reading of it: the listing that
    shows them cannot be told apart from names safely, :func:`read_renames`)."""
    renames: list[Entry] = []

    def read(out: IO[bytes]) -> None:
        renames.extend(read_renames(out))

    outcome = stream_object(store, container, obj, Consumer([tar_renames_command()],
                                                            read_output=read),
                            timeout=timeout, strict=strict, spool_dir=spool_dir)
    return renames, outcome
