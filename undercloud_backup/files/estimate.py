"""How big the archive will be, before it is written: what tar writes, not what files claim.

``tar --sparse`` reads only the data of a sparse file, so each regular file counts the smaller
of its apparent and its allocated size (``st_blocks``): a 1 TiB image holding 3 MB counts 3 MB.
Every member adds a header, a hard-linked file counts once, and excluded trees are not walked.

The installed worker cannot read root-only trees: for a privileged run the same count comes
from the wrapper (``ucb-archive ROOT --estimate``, :func:`db.privileged.estimate_paths`), which
also says which paths exist and refuses what the policy refuses; a test compares the two counts
on one tree.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from undercloud_backup.files.archive import inside, under

BLOCK = 512  # tar's block: data is padded to whole blocks
# Each member's headers: the archive is POSIX (pax) because of --xattrs/--acls/--selinux, and
# every member gets an extended header (its block and one of records: atime, ctime, xattrs).
MEMBER = 3 * BLOCK


def tar_bytes(st: os.stat_result) -> int:
    """About what tar writes for one member (GNU tar's ``ucb-archive`` counts alike)."""
    if not stat.S_ISREG(st.st_mode):
        return MEMBER
    data = min(st.st_size, st.st_blocks * 512)
    return MEMBER + -(-data // BLOCK) * BLOCK


class _Excludes:
    """tar's anchored ``--exclude`` patterns (``--no-wildcards-match-slash``): one leaves out a
    member (relative to root), with all it holds, when it matches the member's first
    components. Kept by number of components: below a walked directory an entry can only be
    matched by one as deep as itself (a shorter one would have matched the directory)."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.by_depth: dict[int, list[list[str]]] = {}
        for pattern in patterns:
            wanted = pattern.strip("/").split("/")
            self.by_depth.setdefault(len(wanted), []).append(wanted)

    def match(self, member: str, walked: bool = True) -> bool:
        parts = member.strip("/").split("/")
        depths = [len(parts)] if walked else range(1, len(parts) + 1)
        return any(all(fnmatchcase(part, want) for part, want in zip(parts, wanted, strict=False))
                   for depth in depths for wanted in self.by_depth.get(depth, ()))


@dataclass(frozen=True)
class PathSizes:
    """Which of the asked paths exist, and the bytes of each that is not inside another."""

    present: dict[str, bool]
    sizes: dict[str, int] = field(default_factory=dict)
    # Directories that could not be opened (their content is not counted).
    unreadable: int = 0

    def exists(self, path: str) -> bool:
        return self.present.get(path, False)

    def total(self, paths: Iterable[str]) -> int:
        return sum(self.sizes.get(path, 0) for path in paths)

    @classmethod
    def from_answer(cls, answer: dict) -> PathSizes:
        """The wrapper's JSON: ``{"paths": [{"path", "exists", "bytes", "in"}], ...}``."""
        paths = answer["paths"]
        return cls(present={p["path"]: bool(p["exists"]) for p in paths},
                   sizes={p["path"]: int(p["bytes"]) for p in paths
                          if p["exists"] and p["in"] is None},
                   unreadable=int(answer.get("unreadable", 0)))


def measure(root: str, paths: Iterable[str], excludes: Iterable[str] = ()) -> PathSizes:
    """What exists of ``paths`` under ``root`` and its tar bytes, as the running user sees it.

    ``excludes``: absolute patterns, anchored at root (``/home/stack/.cache``, ``/srv/*/tmp``).
    A path inside another present one is counted in that one (tar archives it once).
    """
    asked = list(dict.fromkeys(paths))
    patterns = _Excludes(excludes)
    present = {p: os.path.lexists(under(root, p)) for p in asked}
    found = [p for p in asked if present[p]]
    tops = [p for p in found if not any(q != p and inside(p, q) for q in found)]
    seen: set[tuple[int, int]] = set()
    unreadable = [0]

    def member(path: str) -> tuple[int, bool]:
        try:
            st = os.lstat(path)
        except OSError:
            return 0, False
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            if (st.st_dev, st.st_ino) in seen:
                return MEMBER, False  # tar stores a hard link as headers only
            seen.add((st.st_dev, st.st_ino))
        return tar_bytes(st), stat.S_ISDIR(st.st_mode)

    def failed(_error: OSError) -> None:
        unreadable[0] += 1

    sizes: dict[str, int] = {}
    for top in tops:
        if patterns.match(top, walked=False):
            sizes[top] = 0
            continue
        total, is_dir = member(under(root, top))
        if is_dir:
            for directory, dirnames, filenames in os.walk(under(root, top), onerror=failed):
                relative = "/" + os.path.relpath(directory, root)
                kept = []
                for name in dirnames:
                    if not patterns.match(f"{relative}/{name}"):
                        total += member(os.path.join(directory, name))[0]
                        # os.walk lists a symlink to a directory here: tar stores the link
                        if not os.path.islink(os.path.join(directory, name)):
                            kept.append(name)
                dirnames[:] = kept
                total += sum(member(os.path.join(directory, name))[0] for name in filenames
                             if not patterns.match(f"{relative}/{name}"))
        sizes[top] = total
    return PathSizes(present=present, sizes=sizes, unreadable=unreadable[0])
