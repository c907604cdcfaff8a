"""Read a backup back and prove it restores.

Every object is read with the collecting reader (:mod:`undercloud_backup.store.reader`): segment by
segment, each checked against the SHA-256 the manifest recorded for it (Swift's MD5, its ETag,
for manifests older than per-segment SHA-256), then the whole object's size and SHA-256, every
problem recorded. The filesystem archive goes through ``zstd -d | tar --list`` (every entry
readable, every archived path present, nothing that would lead a restore out of its target:
for an incremental, its earlier levels' listings are read first); the dump, and the
users-and-grants object after it, through ``zstd -d | mariadb --sandbox`` into a throwaway server
(:mod:`undercloud_backup.db.scratch`), whose per-table row counts and checksums are then
compared with the manifest's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pymysql

from undercloud_backup.core.errors import BackupError
from undercloud_backup.core.manifest import (
    DB_OBJECT,
    FS_OBJECT,
    USERS_OBJECT,
    Manifest,
    StoredObject,
)
from undercloud_backup.core.sizes import format_size
from undercloud_backup.db import bufferpool, packets, scratch
from undercloud_backup.db.check import TableComparison, compare_schema_objects, compare_tables
from undercloud_backup.db.dumpstream import DumpGate
from undercloud_backup.db.packets import LongestLine
from undercloud_backup.db.rows import one_row
from undercloud_backup.db.scratch import ScratchServer, scratch_mariadb
from undercloud_backup.files import chain
from undercloud_backup.files.archive import inside
from undercloud_backup.files.tarlist import (
    ChainPaths,
    Entry,
    ListingUnreadable,
    level_renames,
    read_entries,
    tar_list_command,
)
from undercloud_backup.restore import binlog
from undercloud_backup.restore.target import database_bytes
from undercloud_backup.store import reader
from undercloud_backup.store.reader import ObjectCheck, read_collecting
from undercloud_backup.store.streams import Consumer, StreamOutcome, stream_object
from undercloud_backup.trust import crypto

# What a restore of an undercloud cannot do without (docs/restore.md); missing ones are warned
# about when the path that should hold them was archived.
ESSENTIALS: dict[str, str] = {
    "etc/keystone/fernet-keys": "Keystone fernet keys (issued tokens stop validating)",
    "etc/keystone/credential-keys": "Keystone credential keys (stored credentials unreadable)",
    "etc/pki": "certificates and CA anchors",
    "root/.my.cnf": "the MariaDB root password file",
    "home/stack/undercloud.conf": "undercloud.conf (needed to reinstall)",
}


class VerificationFailed(BackupError):
    """Backup {backup_id} failed verification: {summary}"""

    exit_code = 41


# ------------------------------------------------------------------------------- results
@dataclass(kw_only=True)
class Check:
    """What one check found: its problems fail the verification, its warnings do not."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def covers(self, name: str) -> list[str]:
        """The manifest's objects this check (run under ``name``) accounts for."""
        return [name]

    def object_checks(self) -> list[dict]:
        """Its objects' rows of the report's "objects"."""
        return []


@dataclass(kw_only=True)
class PlainCheck(Check):
    object: ObjectCheck

    def object_checks(self) -> list[dict]:
        return [self.object.to_dict()]

    def to_dict(self) -> dict:
        return {"object": self.object.to_dict(), "problems": self.problems,
                "warnings": self.warnings}


@dataclass(kw_only=True)
class ArchiveCheck(Check):
    """The archive read through ``tar --list``; ``object`` None when the listing itself was
    unreadable (then nothing but the entries before it is known)."""

    name: str
    object: ObjectCheck | None
    entries: int
    directories: int = 0
    paths_found: list[str] = field(default_factory=list)  # in the manifest's order
    essentials_found: list[str] = field(default_factory=list)
    seconds: float = 0

    @property
    def files(self) -> int:
        return self.entries - self.directories

    def object_checks(self) -> list[dict]:
        return [self.object.to_dict() if self.object else {"name": self.name, "ok": False}]

    def to_dict(self, with_object: bool = True) -> dict:
        """The JSON edge; the report's "archive" has no "object" (its row is in "objects")."""
        head = {"object": self.object_checks()[0]} if with_object else {}
        if self.object is None:
            return {**head, "problems": self.problems, "warnings": self.warnings,
                    "entries": self.entries, "seconds": self.seconds}
        return {**head, "entries": self.entries, "directories": self.directories,
                "files": self.files, "paths_found": self.paths_found,
                "essentials_found": self.essentials_found, "problems": self.problems,
                "warnings": self.warnings, "seconds": self.seconds}


@dataclass(kw_only=True)
class DatabaseCheck(Check):
    """The dump test-restored into a throwaway MariaDB and compared with the manifest."""

    objects: list[ObjectCheck]
    checked: list[str]
    loaded: bool
    load_seconds: float
    scratch_version: str
    databases: int
    comparison: TableComparison
    seconds: float
    max_allowed_packet: int | None = None  # what a restore's target server needs

    def covers(self, name: str) -> list[str]:
        return self.checked

    def object_checks(self) -> list[dict]:
        return [o.to_dict() for o in self.objects]

    def to_dict(self, with_objects: bool = True) -> dict:
        """The JSON edge; the report's "database" has no "objects" (they are its "objects")."""
        head = {"objects": self.object_checks()} if with_objects else {}
        return {**head, "checked": self.checked, "loaded": self.loaded,
                "load_seconds": self.load_seconds, "scratch_version": self.scratch_version,
                "databases": self.databases, **self.comparison.to_dict(),
                "problems": self.problems, "warnings": self.warnings, "seconds": self.seconds,
                "max_allowed_packet": self.max_allowed_packet}


@dataclass(kw_only=True)
class ChainCheck(Check):
    """An incremental's chain of ancestors (it reads no object of this backup)."""

    chain: list[str]

    def covers(self, name: str) -> list[str]:
        return []

    def to_dict(self) -> dict:
        return {"chain": self.chain, "problems": self.problems, "warnings": self.warnings,
                "checked": []}


# ------------------------------------------------------------------------------- archive
@dataclass
class ArchiveReport:
    """What ``tar --list`` found in the archive, compared with the manifest's path plan."""

    entries: int = 0
    directories: int = 0
    included: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)
    essentials_found: list[str] = field(default_factory=list)

    def add(self, member: str) -> None:
        self.entries += 1
        if member.endswith("/"):
            self.directories += 1
        bare = member.rstrip("/")
        for path in self.included:
            rel = path.lstrip("/")
            if path not in self.found and inside(bare, rel):
                self.found.append(path)
        for essential in ESSENTIALS:
            if essential not in self.essentials_found and inside(bare, essential):
                self.essentials_found.append(essential)

    def missing(self) -> list[str]:
        return [p for p in self.included if p not in self.found]

    def essentials_missing(self) -> list[str]:
        """Essentials whose parent was archived but that the archive does not hold."""
        archived = [p.lstrip("/") for p in self.found]
        return [e for e in ESSENTIALS if e not in self.essentials_found
                and any(inside(e, p) for p in archived)]


def check_archive(store, container: str, manifest: Manifest, obj: StoredObject, *,
                  timeout: float) -> ArchiveCheck:
    """Read the archive through ``tar --list``; every entry must be readable to the end, and
    nothing in it (after its chain's levels, for an incremental) may lead out of a restore's
    target: a member under a symlink an earlier level made, a hard link through one, a
    device node (:class:`tarlist.ChainPaths`)."""
    started = time.monotonic()
    report = ArchiveReport(included=list(manifest.paths.included if manifest.paths else []))
    paths = ChainPaths()
    problems = _list_ancestors(store, container, manifest, paths, timeout)
    paths.start_level(len(manifest.chain))
    if manifest.chain:
        problems += _feed_renames(store, container, obj, paths, timeout)
    tar_errors: list[str] = []

    def on_entry(entry: Entry) -> None:
        report.add(entry.name)
        paths.add(entry)

    try:
        outcome = stream_object(store, container, obj, Consumer(
            [tar_list_command()], read_output=lambda out: read_entries(out, on_entry),
            on_stderr={0: tar_errors.append}), timeout=timeout, strict=False)
    except ListingUnreadable as error:
        problems.append(f"{obj.name}: {error}")
        return ArchiveCheck(name=obj.name, object=None, entries=report.entries,
                            problems=problems)
    problems += list(outcome.check.problems)
    if outcome.first_failure is not None and outcome.check.ok:
        problems.append(f"{obj.name}: the archive is unreadable: {outcome.reason()}")
    elif outcome.first_failure is None:
        for path in report.missing():
            problems.append(f"{obj.name}: {path} was archived but is not in the archive")
    problems += [f"{obj.name}: a restore would lead out of its target: {p}"
                 for p in paths.problems]
    warnings = [f"{e} is not in the backup: {ESSENTIALS[e]}" for e in report.essentials_missing()]
    if paths.renaming:
        warnings.append(f"level(s) {', '.join(map(str, paths.renaming))} of the chain rename "
                        "directories: a restore into / refuses them; restore into a scratch "
                        "target and copy from it")
    return ArchiveCheck(
        name=obj.name, object=outcome.check, entries=report.entries,
        directories=report.directories,
        # in the manifest's order, whatever order tar wrote them in (incrementals differ)
        paths_found=[p for p in report.included if p in report.found],
        essentials_found=report.essentials_found, problems=problems, warnings=warnings,
        seconds=round(time.monotonic() - started, 2))


def _list_ancestors(store, container: str, manifest: Manifest, paths: ChainPaths,
                    timeout: float) -> list[str]:
    """Feed the listings of an incremental's earlier levels to ``paths`` (level 0 first): a
    later level is only dangerous with what they leave. A broken chain is the chain check's
    to report; here it is only not listed."""
    if not manifest.chain:
        return []
    ancestors, broken = chain.load_ancestors(store, container, manifest)
    if broken:
        return []
    problems = []
    for index, ancestor in enumerate(ancestors):
        paths.start_level(index)
        obj = chain.archive_of(ancestor)
        assert obj is not None  # load_ancestors checked it
        if index > 0:
            problems += _feed_renames(store, container, obj, paths, timeout)
        try:
            outcome = stream_object(store, container, obj, Consumer(
                [tar_list_command()], read_output=lambda out: read_entries(out, paths.add)),
                timeout=timeout, strict=False)
        except ListingUnreadable as error:
            problems.append(f"{obj.name}: {error}")
            continue
        if outcome.first_failure is not None or not outcome.check.ok:
            problems.append(f"{obj.name} (level {index} of the chain) could not be listed: "
                            f"{outcome.reason() or '; '.join(outcome.check.problems)}")
    return problems


def _feed_renames(store, container: str, obj: StoredObject, paths: ChainPaths,
                  timeout: float) -> list[str]:
    """Feed a later level's directory rename records (which ``tar --list`` does not show) to
    ``paths``, at the start of its level: tar applies them as it extracts the directory
    members, which come first. Their paths are read as well as tar's unquoted listing allows
    (:func:`tarlist.read_renames`); a restore into ``/`` refuses them all anyway."""
    renames, outcome = level_renames(store, container, obj, timeout=timeout, strict=False)
    for rename in renames:
        paths.add(rename)
    if outcome.first_failure is not None and outcome.check.ok:  # damage: the listing says it
        return [f"{obj.name}: its directory rename records could not be listed: "
                f"{outcome.reason()}"]
    return []


# ------------------------------------------------------------------------------ database
def _load(store, container: str, obj: StoredObject, server: ScratchServer,
          timeout: float, meter: LongestLine | None = None
          ) -> tuple[StreamOutcome, list[str]]:
    """Load one dump object into the scratch server: its outcome and the problems seen
    (``meter`` measures its longest statement on the way)."""
    outcome = stream_object(store, container, obj, Consumer(
        [server.client_command()], line_filter=DumpGate(obj.name, meter)), timeout=timeout,
        strict=False)
    problems = list(outcome.check.problems)
    if outcome.check.ok and outcome.decrypt_error is not None:  # age said why (key, tampering)
        problems.append(str(outcome.decrypt_error))
    elif outcome.check.ok and outcome.filter_error is not None:  # refused, not loaded at all
        problems.append(str(outcome.filter_error))
    elif outcome.check.ok and outcome.first_failure is not None:
        problems.append(f"loading {obj.leaf} into a scratch MariaDB failed: {outcome.reason()}")
    elif outcome.first_failure is not None:
        problems.append(f"{obj.leaf} was not loaded (damaged, see above)")
    return outcome, problems


def dump_objects(manifest: Manifest) -> list[StoredObject]:
    """The dump, then (format 2) the users-and-grants object, in the order they load."""
    objects = [o for o in manifest.objects if kind_of(o) == "database"]
    users = [o for o in manifest.objects if kind_of(o) == "users"]
    return objects + users


def check_database(store, container: str, manifest: Manifest, *, staging_dir: str,
                   timeout: float, ignore_tables: Sequence[str] = (),
                   logger: logging.Logger | logging.LoggerAdapter | None = None,
                   allowed_signers: str | None = None) -> DatabaseCheck:
    """Load the dump (and the users and grants) into a throwaway MariaDB and compare it
    table by table with the manifest. One result covers every dump object. With
    ``allowed_signers``, a nightly's full and every link to it are read only if signed."""
    log = logger or logging.getLogger(__name__)
    started = time.monotonic()
    recorded = manifest.mariadb.databases if manifest.mariadb else {}
    schema_objects = manifest.mariadb.schema_objects if manifest.mariadb else {}
    objects = dump_objects(manifest)
    checks: list[ObjectCheck] = []
    problems: list[str] = []
    replay_plan = None
    if manifest.mariadb is not None and manifest.mariadb.kind == binlog.BINLOG:
        # its chain's full dump, then the shipped logs replayed to this backup's end point
        try:
            replay_plan = binlog.plan_to_end(manifest, lambda backup_id: reader.load_manifest(
                store, container, backup_id, allowed_signers))
            objects = dump_objects(replay_plan.base)
        except BackupError as error:
            problems.append(str(error))
            objects = []
    loaded_in = 0.0
    comparison = TableComparison()
    meter = LongestLine()
    # the replay after a dump runs at the speed of the pool: room for the data
    pool = bufferpool.scratch_pool_size(
        scratch.BUFFER_POOL, database_bytes(replay_plan.base if replay_plan else manifest),
        bufferpool.mem_available())
    with scratch_mariadb(staging_dir, lifetime_s=timeout,
                         options=(f"--innodb-buffer-pool-size={pool}",)) as server:
        with server.session.cursor() as cursor:
            cursor.execute("SELECT VERSION()")
            scratch_version = one_row(cursor)[0]
        for obj in objects:
            if problems:  # not into a half-loaded server: only read and checksum the rest
                check = read_collecting(store, container, obj)
                checks.append(check)
                problems += check.problems
                continue
            log.info("loading %s (%s) into a %s on port %d", obj.name, format_size(obj.size),
                     server.where, server.port)
            load_started = time.monotonic()
            outcome, seen = _load(store, container, obj, server, timeout, meter)
            loaded_in += time.monotonic() - load_started
            problems += seen
            checks.append(outcome.check)
        if replay_plan is not None and objects and not problems:
            log.info("replaying %s into the %s", replay_plan.describe(), server.where)
            load_started = time.monotonic()
            try:
                binlog.replay(store, container, replay_plan,
                              lambda: (server.client_command(), ()), databases=None,
                              timeout=timeout, staging_dir=staging_dir)
            except BackupError as error:
                problems.append(f"replaying the binary log failed: {error}")
            loaded_in += time.monotonic() - load_started
        loaded = bool(objects) and not problems
        if loaded:
            log.info("loaded in %.1f s; comparing %d database(s) with the manifest",
                     loaded_in, len(recorded))
            try:
                comparison = compare_tables(server.session, recorded, ignore=ignore_tables)
                schema = compare_schema_objects(server.session, schema_objects)
            except pymysql.err.MySQLError as error:
                problems.append(f"comparing the loaded tables failed: {error}")
                schema = []
            problems += comparison.differences + schema
    warnings = [f"table {name} was loaded but the manifest has no record of it"
                for name in comparison.extra]
    # The throwaway server takes any statement (1G); a restore's target may not.
    packet = (manifest.mariadb.max_allowed_packet if manifest.mariadb else None) \
        or (packets.needed(meter.longest) if meter.longest else None)
    if packet and packet > packets.STOCK_MAX_ALLOWED_PACKET:
        warnings.append(
            f"the dump holds a statement of {format_size(packet - packets.PACKET_MARGIN)}: "
            f"a restore's target MariaDB needs max_allowed_packet of at least "
            f"{packets.setting(packet)} (a stock one allows "
            f"{packets.setting(packets.STOCK_MAX_ALLOWED_PACKET)}; the restore raises it "
            "where its account may, see docs/restore.md)")
    backup_version = manifest.mariadb.version if manifest.mariadb else ""
    if backup_version and backup_version.split(".")[:2] != scratch_version.split(".")[:2]:
        warnings.append(f"the dump comes from MariaDB {backup_version} and was loaded into "
                        f"{scratch_version}; checksums may differ between versions")
    replayed = [o.name for o in replay_plan.objects()] if replay_plan is not None else []
    return DatabaseCheck(objects=checks, checked=[o.name for o in objects] + replayed
                         + [o.name for o in manifest.objects if kind_of(o) == "database"
                            and o.name not in replayed], loaded=loaded,
                         load_seconds=round(loaded_in, 2), max_allowed_packet=packet,
                         scratch_version=scratch_version,
                         databases=len(recorded), comparison=comparison, problems=problems,
                         warnings=warnings, seconds=round(time.monotonic() - started, 2))


def check_plain(store, container: str, obj: StoredObject) -> PlainCheck:
    """Read an object we have no deeper check for: sizes and checksums only."""
    check = read_collecting(store, container, obj)
    return PlainCheck(object=check, problems=list(check.problems))


# ---------------------------------------------------------------------------- the report
@dataclass
class VerifyReport:
    """The verdict of a verification: every check's problems and warnings, and what each
    read; the flow adds what it knows of the signature, the decryption and the chain."""

    backup_id: str
    container: str
    created_at: str
    problems: list[str]
    warnings: list[str]
    checks: list[Check]  # in the order they were submitted
    database_partial: str | None
    seconds: float
    signature: str = ""
    allowed_signers: str | None = None
    decrypted: bool = False
    decryption: str = ""
    chain: list[str] | None = None  # an incremental's ids, full first

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def archive(self) -> ArchiveCheck | None:
        return next((c for c in self.checks if isinstance(c, ArchiveCheck)), None)

    @property
    def database(self) -> DatabaseCheck | None:
        return next((c for c in self.checks if isinstance(c, DatabaseCheck)), None)

    @property
    def objects(self) -> list[dict]:
        """Each object read, as its check says it (a row of the artifact's table)."""
        return [o for c in self.checks for o in c.object_checks()]

    def to_dict(self) -> dict:
        """The JSON edge (``python -m flows.verify --json``): its keys are a contract."""
        archive, database = self.archive, self.database
        return {"backup_id": self.backup_id, "container": self.container,
                "created_at": self.created_at, "ok": self.ok, "problems": self.problems,
                "warnings": self.warnings,
                "objects": self.objects,
                "archive": archive.to_dict(with_object=False) if archive else None,
                "database": database.to_dict(with_objects=False) if database else None,
                "database_partial": self.database_partial, "seconds": self.seconds,
                "signature": self.signature, "allowed_signers": self.allowed_signers,
                "decrypted": self.decrypted, "decryption": self.decryption,
                "chain": self.chain}


def summarize(manifest: Manifest, container: str, results: dict[str, Check],
              seconds: float) -> VerifyReport:
    """One verdict from the per-object checks; ``ok`` only if nothing differed."""
    problems = [p for r in results.values() for p in r.problems]
    warnings = [w for r in results.values() for w in r.warnings]
    partial = manifest.mariadb.partial_note() if manifest.mariadb else None
    if partial:  # complete as taken, but the dump's account could not see everything
        warnings.insert(0, f"{partial}: a restore brings back only what that account saw")
    checked = {n for name, r in results.items() for n in r.covers(name)}
    for obj in manifest.objects:
        if obj.name not in checked:
            problems.append(f"{obj.name}: not checked")
    return VerifyReport(manifest.backup_id, container, manifest.created_at, problems, warnings,
                        list(results.values()), partial, round(seconds, 1))


def short_summary(report: VerifyReport, limit: int = 3) -> str:
    problems = report.problems
    text = "; ".join(problems[:limit])
    if len(problems) > limit:
        text += f" (and {len(problems) - limit} more)"
    return text


def kind_of(obj: StoredObject) -> str:
    """Which check an object gets: ``archive``, ``database``, ``users`` or ``plain``."""
    # by content first; by name for older manifests (an encrypted one's name ends in .age)
    leaf = obj.leaf.removesuffix(crypto.SUFFIX)
    if obj.content == "tar" or leaf == FS_OBJECT:
        return "archive"
    if obj.content in ("mariadb-dump --system", "mariadb-users") or leaf == USERS_OBJECT:
        return "users"
    if obj.content == "mariadb-dump" or leaf == DB_OBJECT:
        return "database"
    if obj.content == binlog.BINLOG_CONTENT:  # replayed on its chain's dump
        return "database"
    return "plain"
