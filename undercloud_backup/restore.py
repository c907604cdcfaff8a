"""Restore a backup: files into a target root, databases into a MariaDB server.

Everything streams: Swift -> one checked segment at a time -> ``zstd -d`` -> ``tar -x`` or
``mariadb``. Each segment is spooled to an anonymous file and its SHA-256 (Swift's MD5 in older
manifests) checked before any of its bytes go on, so a damaged backup stops the restore before
it writes damaged data.

Nothing existing is replaced unless asked: files that would be overwritten, and databases that
would be dropped, are named and the restore refuses (``overwrite``). Writing over ``/`` takes an
explicit flag of its own. A dry run reads the archive's listing and says what would be written
where, and writes nothing.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import pymysql

from undercloud_backup import archive as fs
from undercloud_backup import database as db
from undercloud_backup.errors import BackupError, ConfigError
from undercloud_backup.execute import Command
from undercloud_backup.sizes import format_size
from undercloud_backup.verify import (
    ObjectDamaged,
    TableComparison,
    compare_tables,
    kind_of,
    read_members,
    stream_object,
    tar_list_command,
)

DRY_RUN_LIST_LIMIT = 100_000  # entries a dry run lists; beyond, it counts
CONFLICTS_LIMIT = 1_000
EXAMPLES = 5


class RootTargetRefused(BackupError):
    """Refusing to restore files over / without --allow-root-target: restore into a scratch --target first and compare, or pass the flag to write into the live system."""  # noqa: E501

    exit_code = 44


class WouldOverwrite(BackupError):
    """{count} existing file(s) under {target} would be overwritten, e.g. {examples}; pass --overwrite to replace them, or restore into an empty --target."""  # noqa: E501

    exit_code = 45


class DatabasesExist(BackupError):
    """Database(s) {names} already exist in MariaDB at {where} and would be dropped and replaced; pass --overwrite to replace them, or drop them first."""  # noqa: E501

    exit_code = 46


class NotInBackup(BackupError):
    """{what} not in backup {backup_id}: {names}; it holds {available}."""

    exit_code = 47


class RestoreFailed(BackupError):
    """Restoring {what} failed: {reason}"""

    exit_code = 48


@dataclass(frozen=True)
class RestoreRequest:
    """What to restore and where, without secrets (it is a Prefect task input)."""

    backup_id: str
    target: str
    paths: tuple[str, ...] = ()
    overwrite: bool = False
    allow_root_target: bool = False
    dry_run: bool = False
    staging_dir: str = "/var/tmp"
    timeout_s: float = 12 * 3600


def default_target(staging_dir: str, backup_id: str) -> str:
    """A predictable scratch root, so the operator knows where to look."""
    return os.path.join(staging_dir, f"undercloud-restore-{backup_id}")


def check_target(target: str, allow_root_target: bool) -> str:
    """The real target directory; ``/`` only with the explicit flag."""
    if not os.path.isabs(target):
        raise ConfigError(detail=f"restore target {target!r} must be an absolute path")
    real = os.path.realpath(target)
    if real == "/" and not allow_root_target:
        raise RootTargetRefused()
    if os.path.exists(real) and not os.path.isdir(real):
        raise ConfigError(detail=f"restore target {real} exists and is not a directory")
    return real


def member_paths(manifest: dict, paths: Sequence[str]) -> tuple[str, ...]:
    """Requested paths as archive member names; each must lie inside an archived path."""
    included = (manifest.get("paths") or {}).get("included", [])
    members = []
    outside = []
    for path in paths:
        normal = fs.normalize(path)
        if not any(normal == p or normal.startswith(p.rstrip("/") + "/") or p == "/"
                   for p in included):
            outside.append(normal)
        members.append(normal.lstrip("/") or ".")
    if outside:
        raise NotInBackup(what="Path(s)", backup_id=manifest["backup_id"],
                          names=", ".join(outside), available=", ".join(included) or "no files")
    return tuple(members)


def _selected(member: str, members: Sequence[str]) -> bool:
    bare = member.rstrip("/")
    return not members or any(bare == m or bare.startswith(m + "/") for m in members)


# --------------------------------------------------------------------------------- files
@dataclass
class FilesPlan:
    """What extracting the archive into ``target`` would do, from the archive's listing."""

    target: str
    entries: int = 0
    creates: int = 0
    replaces: int = 0
    merges: int = 0
    listed: list[dict] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    truncated: int = 0

    def add(self, member: str) -> None:
        is_dir = member.endswith("/")
        path = os.path.join(self.target, member.rstrip("/"))
        if not os.path.lexists(path):
            action = "create"
            self.creates += 1
        elif is_dir and os.path.isdir(path):
            action = "merge"  # an existing directory is kept; its owner and mode are reset
            self.merges += 1
        else:
            action = "replace"
            self.replaces += 1
            if len(self.conflicts) < CONFLICTS_LIMIT:
                self.conflicts.append(path)
        self.entries += 1
        if len(self.listed) < DRY_RUN_LIST_LIMIT:
            self.listed.append({"path": path, "kind": "dir" if is_dir else "file",
                                "action": action})
        else:
            self.truncated += 1

    def as_dict(self) -> dict:
        return asdict(self)


def plan_files(conn, container: str, manifest: dict, request: RestoreRequest) -> FilesPlan:
    """Read the archive's listing and compare it with what exists under the target."""
    record = _object(manifest, "archive", "a filesystem archive")
    members = member_paths(manifest, request.paths)
    target = check_target(request.target, request.allow_root_target)
    plan = FilesPlan(target=target)
    errors: list[str] = []

    def on_member(member: str) -> None:
        if _selected(member, members):
            plan.add(member)

    outcome = stream_object(conn, container, record, [tar_list_command()],
                            timeout=request.timeout_s, spool_dir=request.staging_dir,
                            read_output=lambda out: read_members(out, on_member),
                            on_stderr={0: errors.append})
    if outcome.first_failure is not None:
        raise RestoreFailed(what=f"the listing of {record['name']}", reason=outcome.reason())
    return plan


def extract_command(target: str, members: Sequence[str], overwrite: bool) -> Command:
    """``tar -x`` keeping numeric owners, modes, ACLs, xattrs and SELinux labels."""
    argv = ["tar", "--extract", "--file=-", f"--directory={target}", "--verbose",
            "--xattrs", "--xattrs-include=*", "--acls", "--selinux", "--numeric-owner",
            "--same-permissions", "--keep-directory-symlink"]
    if os.geteuid() == 0:
        argv.append("--same-owner")
    if not overwrite:
        argv.append("--keep-old-files")  # belt and braces: the plan already checked
    argv.append("--")
    argv += list(members)
    return Command(argv=tuple(argv), name="tar --extract")


_NOT_FOUND = re.compile(r"^tar: (?P<path>.+): Not found in archive$")


def restore_files(conn, container: str, manifest: dict, request: RestoreRequest,
                  logger: logging.Logger | logging.LoggerAdapter) -> dict:
    """Extract the archive (or some paths of it) into the target; refuse to overwrite."""
    started = time.monotonic()
    record = _object(manifest, "archive", "a filesystem archive")
    members = member_paths(manifest, request.paths)
    target = check_target(request.target, request.allow_root_target)
    occupied = os.path.isdir(target) and bool(os.listdir(target))
    plan: FilesPlan | None = None
    if request.dry_run or (occupied and not request.overwrite):
        logger.info("reading the listing of %s to see what exists under %s", record["name"],
                    target)
        plan = plan_files(conn, container, manifest, request)
        if plan.conflicts and not request.overwrite and not request.dry_run:
            raise WouldOverwrite(count=plan.replaces, target=target, examples=", ".join(
                os.path.relpath(p, target) for p in plan.conflicts[:EXAMPLES]))
    if request.dry_run:
        assert plan is not None
        logger.info("dry run: %d entries would be written under %s (%d new, %d replacing "
                    "existing files, %d existing directories kept)", plan.entries, target,
                    plan.creates, plan.replaces, plan.merges)
        return {"target": target, "dry_run": True, **plan.as_dict()}

    os.makedirs(target, mode=0o700, exist_ok=True)  # the restored tree holds secrets
    if os.geteuid() != 0:
        logger.warning("not running as root: owners and trusted/security xattrs cannot be "
                       "restored")
    written = [0]
    stderr: list[str] = []

    def count(stream) -> None:
        for _ in iter(stream.readline, b""):
            written[0] += 1

    logger.info("extracting %s (%s) into %s%s", record["name"], format_size(record["size"]),
                target, f" (only {', '.join(members)})" if members else "")
    try:
        outcome = stream_object(conn, container, record,
                                [extract_command(target, members, request.overwrite)],
                                timeout=request.timeout_s, spool_dir=request.staging_dir,
                                read_output=count, on_stderr={0: stderr.append})
    except ObjectDamaged as error:
        raise RestoreFailed(what=f"files into {target}",
                            reason=f"{error} ({written[0]} entries had been written)") from None
    missing = [m["path"] for line in stderr if (m := _NOT_FOUND.match(line))]
    if missing:
        raise NotInBackup(what="Path(s)", backup_id=manifest["backup_id"],
                          names=", ".join(missing),
                          available=", ".join(manifest["paths"]["included"]))
    if outcome.first_failure is not None:
        raise RestoreFailed(what=f"files into {target}", reason=outcome.reason())
    seconds = time.monotonic() - started
    logger.info("restored %d entries into %s in %.1f s", written[0], target, seconds)
    return {"target": target, "dry_run": False, "entries": written[0], "paths": list(members),
            "object": outcome.check.as_dict(), "seconds": round(seconds, 2)}


def _object(manifest: dict, kind: str, what: str) -> dict:
    record = next((o for o in manifest.get("objects", []) if kind_of(o) == kind), None)
    if record is None:
        held = [o["name"].rsplit("/", 1)[-1] for o in manifest.get("objects", [])]
        raise NotInBackup(what="Object", backup_id=manifest["backup_id"], names=what,
                          available=", ".join(held) or "nothing")
    return record


# ----------------------------------------------------------------------------- databases
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
    and views. Other databases and the users-and-grants section are dropped. Lines are
    classified by their first bytes only, so memory stays bounded however long a line
    (an extended INSERT) is; bodies between ``DELIMITER ;;`` and ``DELIMITER ;`` (routines,
    triggers, events) are never mistaken for section starts.
    """

    HEAD = 1024

    def __init__(self, databases: Sequence[str]) -> None:
        self.keep = set(databases)
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
            return False
        return self.section in self.keep

    def _classify(self, start: bytes) -> None:
        if self._delimited:
            if start.rstrip() == b"DELIMITER ;":
                self._delimited = False
        elif start.startswith(b"DELIMITER "):
            self._delimited = start.rstrip() != b"DELIMITER ;"
        elif self.section is not _FOOTER:
            for marker in _DB_MARKERS:
                match = marker.match(start)
                if match:
                    name = match.group(1).replace(b"``", b"`").decode("utf-8", "replace")
                    self.section = name
                    if name not in self.seen:
                        self.seen.append(name)
                    break
            else:
                if self.section is not _SYSTEM and _SYSTEM_START.match(start):
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


def client_command(options_fd: int) -> Command:
    """``mariadb`` reading the connection (and password) from an inherited pipe."""
    tool = shutil.which("mariadb") or shutil.which("mysql") or "mariadb"
    return Command(argv=(tool, f"--defaults-extra-file=/dev/fd/{options_fd}", "--batch",
                         "--max-allowed-packet=1G"), name="mariadb")


def _databases_in(session) -> set[str]:
    with session.cursor() as cursor:
        cursor.execute("SHOW DATABASES")
        return {row[0] for row in cursor.fetchall()}


def restore_databases(conn, container: str, manifest: dict, settings: db.DatabaseSettings,
                      databases: Sequence[str] | None, request: RestoreRequest,
                      logger: logging.Logger | logging.LoggerAdapter) -> dict:
    """Load the dump (all of it, or only ``databases``) into the MariaDB of ``settings``.

    All databases means users, roles and grants too (accounts that exist keep existing, but
    a GRANT with a password resets it to the backup's). Named databases load without them.
    Refuses to drop an existing database unless ``request.overwrite``. Afterwards every
    restored table's row count and checksum is compared with the manifest.
    """
    started = time.monotonic()
    record = _object(manifest, "database", "a database dump")
    recorded: dict[str, dict] = (manifest.get("mariadb") or {}).get("databases", {})
    if databases:
        unknown = [d for d in databases if d not in recorded]
        if unknown:
            raise NotInBackup(what="Database(s)", backup_id=manifest["backup_id"],
                              names=", ".join(unknown), available=", ".join(recorded) or "none")
        selected = list(dict.fromkeys(databases))
    else:
        selected = list(recorded)
    # One session from before the load to after it: loading every account may change the
    # authentication of the very user we connect as.
    with db.connect(settings) as session:
        existing = sorted(set(selected) & _databases_in(session))
        plan = {"where": settings.where, "databases": selected, "existing": existing,
                "users_and_grants": not databases, "object": record["name"]}
        if existing and not request.overwrite:
            raise DatabasesExist(names=", ".join(existing), where=settings.where)
        if request.dry_run:
            logger.info("dry run: would load %s into MariaDB at %s%s%s", ", ".join(selected),
                        settings.where, " with users and grants" if not databases else "",
                        f", dropping and replacing {', '.join(existing)}" if existing else "")
            return {**plan, "dry_run": True}
        logger.info("loading %s into MariaDB at %s%s", ", ".join(selected) or "(no databases)",
                    settings.where, " with users and grants" if not databases else "")
        read_fd, write_fd = os.pipe()
        with os.fdopen(write_fd, "w") as options:  # a 64 KiB pipe holds it all
            options.write(settings.option_file_text())
        try:
            outcome = stream_object(
                conn, container, record, [client_command(read_fd)],
                timeout=request.timeout_s, spool_dir=request.staging_dir,
                line_filter=DatabaseFilter(selected) if databases else None,
                secrets=[settings.password], pass_fds=(read_fd,),
                after_start=lambda: os.close(read_fd))
            read_fd = -1
        except ObjectDamaged as error:
            raise RestoreFailed(what=f"databases into {settings.where}",
                                reason=str(error)) from None
        finally:
            if read_fd >= 0:
                os.close(read_fd)
        if outcome.first_failure is not None:
            raise RestoreFailed(what=f"databases into {settings.where}",
                                reason=outcome.reason())
        loaded_in = time.monotonic() - started
        try:
            session.ping(reconnect=False)
            comparison = compare_tables(session, {d: recorded[d] for d in selected})
        except pymysql.err.MySQLError as error:  # e.g. a load longer than wait_timeout
            logger.warning("restored, but the tables could not be compared: %s", error)
            comparison = TableComparison()
    for difference in comparison.differences:
        logger.warning("after the restore: %s", difference)
    logger.info("restored %d database(s) in %.1f s; %d of %d table(s) match the manifest",
                len(selected), loaded_in, comparison.matching, comparison.compared)
    return {**plan, "dry_run": False, "object_check": outcome.check.as_dict(),
            **comparison.as_dict(), "seconds": round(time.monotonic() - started, 2)}


def iter_plan_lines(plan: dict) -> Iterator[str]:
    """A dry run's file list as the CLI prints it: action and destination."""
    for entry in plan.get("listed", []):
        suffix = "/" if entry["kind"] == "dir" else ""
        yield f"{entry['action']:<8} {entry['path']}{suffix}"
    if plan.get("truncated"):
        yield f"... and {plan['truncated']} more"

