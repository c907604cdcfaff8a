"""What a restore writes, decided before anything is written: the selection of archive
members, the host-identity files a reinstalled node keeps, and the plan a dry run prints.

A plan compares an archive's listing with what exists under the target; for an incremental
chain the levels' plans merge into one, each path as its last level has it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from undercloud_backup.core import defaults
from undercloud_backup.core.errors import BackupError
from undercloud_backup.core.manifest import Manifest
from undercloud_backup.files import archive as fs

# What identifies the installed host rather than the undercloud: a reinstalled node keeps its
# own (docs/restore.md says why each). Restored only when asked for with --path.
HOST_IDENTITY: dict[str, str] = {
    "/etc/fstab": "filesystem UUIDs change on reinstall",
    "/etc/crypttab": "LUKS UUIDs change on reinstall",
    "/etc/machine-id": "systemd and journald identity of this install",
    "/etc/passwd": "the reinstalled packages created their own users and UIDs",
    "/etc/passwd-": "backup copy of /etc/passwd",
    "/etc/group": "the reinstalled packages created their own groups and GIDs",
    "/etc/group-": "backup copy of /etc/group",
    "/etc/shadow": "goes with /etc/passwd",
    "/etc/shadow-": "backup copy of /etc/shadow",
    "/etc/gshadow": "goes with /etc/group",
    "/etc/gshadow-": "backup copy of /etc/gshadow",
    "/etc/subuid": "goes with /etc/passwd",
    "/etc/subgid": "goes with /etc/group",
    "/etc/hostname": "set by the reinstall; restore it only on purpose",
    "/etc/sysconfig/network-scripts": "interface names and MAC addresses of the old node",
    "/etc/NetworkManager/system-connections": "connections bound to the old interfaces",
    "/etc/netplan": "interface names of the old node",
    "/etc/network/interfaces": "interface names of the old node",
    "/etc/udev/rules.d/70-persistent-net.rules": "MAC addresses of the old node",
    "/etc/kernel/cmdline": "root and resume UUIDs of the old disks",
    "/etc/default/grub": "root and resume UUIDs of the old disks",
}


DRY_RUN_LIST_LIMIT = 100_000  # entries a dry run lists; beyond, it counts
CONFLICTS_LIMIT = 1_000

class NotInBackup(BackupError):
    """{what} not in backup {backup_id}: {names}; it holds {available}. Nothing was written."""

    exit_code = 47


@dataclass(frozen=True)
class RestoreRequest:
    """What to restore and where, without secrets (it is a Prefect task input)."""

    backup_id: str
    target: str
    paths: tuple[str, ...] = ()
    exclude_paths: tuple[str, ...] = ()
    reinstalled_host: bool = False
    overwrite: bool = False
    skip_existing: bool = False
    overwrite_empty: bool = False
    allow_root_target: bool = False
    explicit_target: bool = False  # created 0755 (a stand-in root); the default scratch 0700
    dry_run: bool = False
    checking: bool = False  # a dry run that checks a real restore first: it says "checked"
    staging_dir: str = defaults.STAGING_DIR
    timeout_s: float = defaults.RESTORE_TIMEOUT_HOURS * 3600
    # The target's InnoDB buffer pool for the load, MiB: None decides, 0 leaves it alone
    # (undercloud_backup.db.bufferpool).
    load_buffer_pool_mib: int | None = None


@dataclass(frozen=True)
class Selection:
    """Which archive members a restore writes: inside ``members`` and not ``excluded``."""

    members: tuple[str, ...]  # archive names ("etc/keystone"); empty: everything
    excluded: tuple[str, ...]  # anchored patterns as tar takes them ("etc/fstab")

    @property
    def _literal(self) -> list[tuple[str, str]]:
        """Each pattern with its text before the first wildcard: a cheap test first."""
        return [("/" + p, "/" + re.split(r"[*?\[]", p, maxsplit=1)[0]) for p in self.excluded]

    def wanted(self, member: str) -> bool:
        bare = member.rstrip("/")
        return not self.members or any(m == "." or fs.inside(bare, m) for m in self.members)

    def is_excluded(self, member: str, literal: list[tuple[str, str]]) -> bool:
        """As tar's ``--exclude`` (the backup's matcher, :func:`archive.excludes`) would."""
        path = "/" + member.rstrip("/")
        return any(path.startswith(prefix) and fs.excludes(pattern, path)
                   for pattern, prefix in literal)


def select(manifest: Manifest, request: RestoreRequest) -> Selection:
    """Requested paths as archive members (each inside an archived path), and exclusions."""
    included = manifest.paths.included if manifest.paths else []
    wanted = [fs.normalize(p) for p in request.paths]
    outside = [p for p in wanted if not any(fs.inside(p, q) for q in included)]
    if outside:
        raise NotInBackup(what="Path(s)", backup_id=manifest.backup_id,
                          names=", ".join(outside), available=", ".join(included) or "no files")
    excluded = [fs.normalize(p) for p in request.exclude_paths]
    if request.reinstalled_host:  # unless asked for: a --path at or under one restores it
        excluded += [p for p in HOST_IDENTITY if not any(fs.inside(w, p) for w in wanted)]
    return Selection(members=tuple(p.lstrip("/") or "." for p in wanted),
                     excluded=tuple(dict.fromkeys(p.lstrip("/") for p in excluded)))


@dataclass
class FilesPlan:
    """What extracting the archive into ``target`` would do, from the archive's listing."""

    target: str
    entries: int = 0
    creates: int = 0
    replaces: int = 0
    merges: int = 0
    kept: int = 0  # excluded: left as they are
    listed: list[dict] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    kept_paths: list[str] = field(default_factory=list)
    truncated: int = 0
    found: list[str] = field(default_factory=list)  # requested members the archive holds

    def action(self, member: str) -> str:
        path = os.path.join(self.target, member.rstrip("/"))
        if not os.path.lexists(path):
            self.creates += 1
            return "create"
        if member.endswith("/") and os.path.isdir(path):
            self.merges += 1  # an existing directory is kept; its owner and mode are reset
            return "merge"
        self.replaces += 1
        if len(self.conflicts) < CONFLICTS_LIMIT:
            self.conflicts.append(path)
        return "replace"

    def add(self, member: str, action: str) -> None:
        path = os.path.join(self.target, member.rstrip("/"))
        self.entries += 1
        if len(self.listed) < DRY_RUN_LIST_LIMIT:
            self.listed.append({"path": path, "kind": "dir" if member.endswith("/") else "file",
                                "action": action})
        else:
            self.truncated += 1

    def to_dict(self) -> dict:
        return asdict(self)


def require_found(manifest: Manifest, selection: Selection, found: list[str]) -> None:
    missing = [m for m in selection.members if m != "." and m not in found]
    if missing:
        raise NotInBackup(what="Path(s)", backup_id=manifest.backup_id,
                          names=", ".join("/" + m for m in missing),
                          available=", ".join(manifest.paths.included if manifest.paths
                                              else []))


def merge_plans(target: str, plans: list[FilesPlan]) -> FilesPlan:
    """One dry-run listing of a chain: each path once, as its last level has it."""
    merged = FilesPlan(target=target)
    listed: dict[str, dict] = {}
    for plan in plans:
        for entry in plan.listed:
            listed[entry["path"]] = entry
        merged.truncated += plan.truncated
        merged.kept_paths += [p for p in plan.kept_paths if p not in merged.kept_paths]
        merged.found += [m for m in plan.found if m not in merged.found]
    for entry in listed.values():
        merged.entries += 1
        action = entry["action"]
        if action == "create":
            merged.creates += 1
        elif action == "merge":
            merged.merges += 1
        elif action == "keep":
            merged.kept += 1
        else:
            merged.replaces += 1
            if len(merged.conflicts) < CONFLICTS_LIMIT:
                merged.conflicts.append(entry["path"])
    merged.listed = list(listed.values())[:DRY_RUN_LIST_LIMIT]
    return merged


def iter_plan_lines(plan: FilesPlan, chain: Sequence[str] | None = None) -> Iterator[str]:
    """A dry run's file list as the CLI prints it: action and destination (first, for an
    incremental, the chain it applies)."""
    if len(chain or []) > 1:
        yield f"chain    {' > '.join(chain or [])} (full first, each level in order)"
    for entry in plan.listed:
        suffix = "/" if entry["kind"] == "dir" else ""
        yield f"{entry['action']:<8} {entry['path']}{suffix}"
    if plan.truncated:
        yield f"... and {plan.truncated} more"
