"""The filesystem half: which paths, which exclusions, the tar command, and what tar complained of.

Every path is resolved under ``root`` (``/`` in production, a scratch directory in tests and
restores) and handed to tar relative to it, so the archive's member names never depend on root.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from undercloud_backup.core.errors import ConfigError, PathNotFound
from undercloud_backup.core.execute import Command

# What a restore of an undercloud needs (see docs/restore.md): configuration with Keystone's
# fernet and credential keys, certificates and the MariaDB config (/etc), root's and stack's
# homes, Swift's object data (with its xattrs) and Glance's images.
DEFAULT_PATHS: tuple[str, ...] = (
    "/etc",
    "/root",
    "/home/stack",
    "/srv/node",
    "/var/lib/glance/images",
)


def normalize(path: str) -> str:
    """``/etc/`` and ``//etc/./`` become ``/etc``; ``..`` is refused (it could leave root)."""
    if not path.startswith("/"):
        raise ConfigError(detail=f"path {path!r} must be absolute (it is resolved under --root)")
    parts = [p for p in PurePosixPath(path).parts[1:] if p not in ("", ".")]
    if ".." in parts:
        raise ConfigError(detail=f"path {path!r} must not contain '..'")
    return "/" + "/".join(parts)


def inside(path: str, parent: str) -> bool:
    """``path`` is ``parent`` or below it: both absolute, or both relative to one root ("" and
    "/" hold everything). The one helper for this; a bare ``startswith`` takes /etc2 for /etc."""
    parent = parent.rstrip("/")
    return not parent or path == parent or path.startswith(parent + "/")


def excludes(pattern: str, path: str) -> bool:
    """Whether tar (``--anchored --no-wildcards-match-slash``) leaves ``path`` out, with all it
    holds, for ``--exclude`` ``pattern``: the pattern matches the path or one of its parents."""
    if pattern == "/":
        return True
    pure = PurePosixPath(path)
    return any(candidate.match(pattern) for candidate in (pure, *pure.parents)
               if str(candidate) != "/")


@dataclass(frozen=True)
class PathPlan:
    """What tar will be asked for; JSON-able so it can go into the manifest."""

    root: str
    included: tuple[str, ...]
    absent: tuple[str, ...]
    excluded: tuple[str, ...]
    # What tar will write for the included paths (files.estimate), filled in by the planner.
    estimated_bytes: int = 0
    warnings: tuple[str, ...] = field(default=())
    # Present paths an exclusion leaves out entirely: not in ``included``, not in the archive.
    excluded_whole: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return {"root": self.root, "included": list(self.included), "absent": list(self.absent),
                "excluded": list(self.excluded)}


def candidate_paths(add_paths: Iterable[str] = (),
                    default_paths: Iterable[str] = DEFAULT_PATHS) -> tuple[str, ...]:
    """The defaults, then the added paths, normalized, each once."""
    return tuple(dict.fromkeys([normalize(p) for p in default_paths]
                               + [normalize(p) for p in add_paths]))


def plan_paths(root: str, add_paths: Iterable[str] = (), exclude_paths: Iterable[str] = (),
               default_paths: Iterable[str] = DEFAULT_PATHS,
               exists: Callable[[str], bool] | None = None) -> PathPlan:
    """Decide what to archive: an added path must exist, an absent default is only noted.

    ``exists(path)``: whether a path exists under root (default: as this process sees it; a
    privileged run asks the wrapper, which sees what only root can)."""
    root = os.path.realpath(root)
    if not os.path.isdir(root):
        raise ConfigError(detail=f"root {root!r} is not a directory")
    if exists is None:
        def exists(path: str) -> bool:
            return os.path.lexists(under(root, path))
    excluded = tuple(dict.fromkeys(normalize(p) for p in exclude_paths))
    added = [normalize(p) for p in add_paths]
    for path in added:
        if not exists(path):
            raise PathNotFound(path=path, root=root)
    candidates = candidate_paths(add_paths, default_paths)
    absent = tuple(p for p in candidates if not exists(p))
    present = [p for p in candidates if p not in absent]
    # A path inside another included path would be archived twice.
    top = tuple(p for p in present if not any(q != p and inside(p, q) for q in present))
    # An included path an exclusion matches (itself or a parent: /etc, /*, /) is left out of the
    # list, so that the manifest says what the archive holds.
    whole = tuple(p for p in top if any(excludes(x, p) for x in excluded))
    included = tuple(p for p in top if p not in whole)
    return PathPlan(root=root, included=included, absent=absent, excluded=excluded,
                    excluded_whole=whole)


def under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/")) if path != "/" else root


def tar_command(plan: PathPlan, *, prefix: tuple[str, ...] = (),
                extra_excludes: Iterable[str] = (), snapshot: str | None = None) -> Command:
    """``tar`` writing the plan's paths to stdout with owners, modes, ACLs, xattrs and labels.

    ``snapshot``: GNU tar's ``--listed-incremental`` file (absolute; empty for a level 0, the
    parent's snapshot for the next level), which tar rewrites for the level after this one."""
    argv: list[str] = [
        *prefix, "tar", "--create", "--file=-", f"--directory={plan.root}",
        "--numeric-owner", "--acls", "--xattrs", "--xattrs-include=*", "--selinux", "--sparse",
        "--anchored", "--no-wildcards-match-slash",
    ]
    if snapshot is not None:
        argv.append(f"--listed-incremental={snapshot}")
    # Exclusions are anchored at root, like the paths themselves.
    for pattern in (*plan.excluded, *extra_excludes):
        argv.append(f"--exclude={pattern.lstrip('/') or '.'}")
    argv.append("--")
    argv += [p.lstrip("/") or "." for p in plan.included]
    # Status 1 means "some files differed" (changed or vanished while read): the archive is
    # whole and the names are reported from stderr. Status 2 is judged from stderr too.
    return Command(argv=tuple(argv), name="tar", ok_statuses=frozenset({0, 1, 2}))


_TAR_PROBLEM = re.compile(r"^tar: (?P<path>.+?): (?P<what>[^:]+)(?:: (?P<why>.*))?$")
# What tar says about an entry it leaves out by design, or about its own bookkeeping: recorded
# in the manifest's ``other``, never the reason a run fails (a socket is no file to restore).
_ONLY_WARNINGS = ("socket ignored", "door ignored", "file is the archive; not dumped",
                  "file is unchanged; not dumped", "Directory is new",
                  "Directory has been renamed", "file is on a different filesystem; not dumped",
                  "Removing leading", "Removing drive spec")
_VANISHED = ("File removed before we read it", "file changed as we read it",
             "File shrank by", "file changed", "Cannot stat", "Cannot open", "Cannot readlink",
             "Read error", "Cannot savedir", "Cannot get xattr", "Cannot get ACL")


# Entries (and characters) kept of each kind of complaint: the manifest must stay far below
# what a reader takes (store.SMALL_OBJECT_LIMIT, 64 MiB: 4 kinds x 2 Mi characters, 6 bytes
# each at worst once JSON-escaped) however many files a mount gone bad makes tar complain about.
LISTED_AT_MOST = 10_000
LISTED_CHARS_AT_MOST = 2 << 20


@dataclass
class TarReport:
    """tar's per-file complaints, sorted into what changed under it and what it could not read
    (the first :data:`LISTED_AT_MOST` of each kind; the rest are counted)."""

    changed: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    unlisted: dict[str, int] = field(default_factory=dict)
    chars: dict[str, int] = field(default_factory=dict)

    def add(self, line: str) -> None:
        match = _TAR_PROBLEM.match(line)
        if not match:
            if line.startswith("tar: ") and "Exiting with failure status" not in line:
                self._keep("other", line)
            return
        path, what, why = match["path"], match["what"], match["why"] or ""
        if what.startswith("file changed") or what.startswith("File shrank"):
            self._keep("changed", path)
        elif what == "File removed before we read it" or why == "No such file or directory":
            self._keep("vanished", path)
        elif any(what.startswith(v) for v in _VANISHED):
            self._keep("unreadable", f"{path} ({why or what})")
        else:
            self._keep("other", line)

    def _keep(self, kind: str, entry: str) -> None:
        entries = getattr(self, kind)
        chars = self.chars.get(kind, 0) + len(entry)
        if len(entries) < LISTED_AT_MOST and chars <= LISTED_CHARS_AT_MOST:
            entries.append(entry)
            self.chars[kind] = chars
        else:
            self.unlisted[kind] = self.unlisted.get(kind, 0) + 1

    def fatal(self) -> list[str]:
        """The ``other`` lines that are not one of tar's warnings (:data:`_ONLY_WARNINGS`),
        without their ``tar: `` (the error that quotes them says it once)."""
        return [line.removeprefix("tar: ") for line in self.other
                if not any(warning in line for warning in _ONLY_WARNINGS)]

    def count(self, kind: str) -> int:
        return len(getattr(self, kind)) + self.unlisted.get(kind, 0)

    def listed(self, kind: str) -> list[str]:
        """The entries kept, and a last one saying how many were not."""
        more = self.unlisted.get(kind, 0)
        return [*getattr(self, kind), *([f"... and {more} more, not listed"] if more else [])]

    def to_dict(self) -> dict:
        return {"changed": self.changed, "vanished": self.vanished,
                "unreadable": self.unreadable, "other": self.other}
