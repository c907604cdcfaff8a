"""The manifest: what a complete backup holds, typed from reading to writing.

``<backup_id>/manifest.json`` is written last; its presence is what makes a backup complete.
Inside the code it is a :class:`Manifest`; it becomes JSON only where it leaves the process
(the object in Swift, ``--json``, Prefect results and artifacts).

Format versions: ``undercloud-backup/3`` is an incremental backup: its archive holds
only what changed since its parent and restores only after the full and every level before it
(``chain``), so tools that read at most version 2 refuse it rather than restore one level alone.
Fulls stay version 2, with ``kind``, ``level`` and ``snapshot`` as fields older tools keep.
``undercloud-backup/2`` adds the users-and-grants object, the privileges the
dump ran with and per-database counts of views, triggers, routines and events (and, later,
the account and what its grants left out: ``partial``, ``missing``, ``fix``). Version 1
manifests still read: their missing fields take the defaults below, and fields this code does
not know are kept in ``extra`` and written back unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

FORMAT = "undercloud-backup/2"
INCREMENTAL_FORMAT = "undercloud-backup/3"
READABLE_FORMATS = ("undercloud-backup/1", FORMAT, INCREMENTAL_FORMAT)

MANIFEST_NAME = "manifest.json"
DB_OBJECT = "mariadb-all-databases.sql.zst"
USERS_OBJECT = "mariadb-users-grants.sql.zst"
FS_OBJECT = "filesystem.tar.zst"
SNAPSHOT_OBJECT = "filesystem.snar.zst"  # GNU tar's --listed-incremental snapshot, zstd
FULL = "full"
INCREMENTAL = "incremental"


class ManifestError(ValueError):
    """The manifest cannot be read (raised as ValueError so JSON errors and ours are one)."""


def _known(cls: type, data: dict) -> tuple[dict, dict]:
    """Split ``data`` into the fields ``cls`` declares and the rest."""
    names = {f.name for f in fields(cls)}
    return ({k: v for k, v in data.items() if k in names},
            {k: v for k, v in data.items() if k not in names})


@dataclass
class Segment:
    """One segment of a Static Large Object, in ``<container>_segments``."""

    name: str
    size: int
    etag: str  # Swift's MD5 of what it stored
    sha256: str = ""  # ours, of what we read (absent in the oldest manifests)

    def slo_entry(self, segment_container: str) -> dict:
        return {"path": f"/{segment_container}/{self.name}", "etag": self.etag,
                "size_bytes": self.size}

    @classmethod
    def from_dict(cls, data: dict) -> Segment:
        known, _ = _known(cls, data)
        return cls(name=known["name"], size=int(known["size"]), etag=known.get("etag", ""),
                   sha256=known.get("sha256", ""))


@dataclass
class StoredObject:
    """One object of a backup: a plain object, or an SLO over ``segments``."""

    name: str
    size: int
    sha256: str
    compression: str
    content: str
    etag: str = ""
    segment_container: str | None = None
    segments: list[Segment] = field(default_factory=list)

    @property
    def leaf(self) -> str:
        """The name inside the backup (``filesystem.tar.zst``), without ``<backup_id>/``."""
        return self.name.partition("/")[2] or self.name

    @property
    def segmented(self) -> bool:
        return bool(self.segments)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StoredObject:
        known, _ = _known(cls, data)
        return cls(
            name=known["name"], size=int(known["size"]), sha256=known.get("sha256", ""),
            compression=known.get("compression", "zstd"), content=known.get("content", ""),
            etag=known.get("etag", ""), segment_container=known.get("segment_container"),
            segments=[Segment.from_dict(s) for s in known.get("segments") or []])


@dataclass(frozen=True)
class TableRecord:
    """A table's row count and ``CHECKSUM TABLE`` value (None: not taken) at backup time."""

    table: str
    engine: str | None
    rows: int
    checksum: int | None

    @classmethod
    def from_dict(cls, data: dict) -> TableRecord:
        return cls(table=data["table"], engine=data.get("engine"), rows=int(data["rows"]),
                   checksum=data.get("checksum"))


@dataclass
class DatabaseSection:
    """The database dump: where it is and what the server held when it was taken."""

    version: str
    object: str
    system_tables: list[str]
    databases: dict[str, list[TableRecord]]
    # Users, roles and grants in an object of their own, so that the databases' dump loads
    # with ``mariadb --one-database NAME``; None in version 1 (they are inside ``object``).
    users_object: str | None = None
    # The grants the dump ran with (SHOW GRANTS of its account).
    privileges: list[str] = field(default_factory=list)
    # Per database: {"views": n, "triggers": n, "routines": n, "events": n}.
    schema_objects: dict[str, dict[str, int]] = field(default_factory=dict)
    # The account the dump ran as and what its grants left out of the dump: a
    # partial dump exists only with --allow-partial-database (without it the run fails, exit
    # 25). ``missing`` as the check said it ("TRIGGER on nova, mysql"), ``fix`` the GRANT.
    account: str | None = None
    partial: bool = False
    missing: list[str] = field(default_factory=list)
    fix: str | None = None
    # The binary log (undercloud_backup/db/binlog.py). ``kind`` "dump" (a full dump: ``end``
    # is its snapshot's coordinates, ``start`` too) or "binlog" (no dump: ``binlogs`` are the
    # log files shipped, replayed from ``start`` to ``end`` on top of the chain that ends in
    # ``parent``; ``base`` is the backup holding the dump, and ``databases`` counts the rows
    # at ``end``). ``server``: server_id, GTID domain, binlog_format; ``full_reason``: why a
    # dump was taken where the log could have been shipped. Coordinates: {file, position,
    # gtid, time}; no coordinates when the server keeps no binary log.
    kind: str = "dump"
    start: dict[str, Any] | None = None
    end: dict[str, Any] | None = None
    binlogs: list[dict[str, Any]] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)
    base: str | None = None
    parent: str | None = None
    full_reason: str | None = None
    # ``db.table`` of tables dropped while the dump ran: listed when it began, gone when
    # their rows were counted (the dump may or may not hold them).
    vanished_tables: list[str] = field(default_factory=list)
    # ``db.name`` of the tables and views left out on purpose (``exclude_tables``).
    excluded_tables: list[str] = field(default_factory=list)
    # The max_allowed_packet (bytes) a server needs to load the dump: its longest statement
    # and a margin (undercloud_backup.db.packets). None: not measured (older backups).
    max_allowed_packet: int | None = None

    @property
    def has_checksums(self) -> bool:
        return any(t.checksum is not None for tables in self.databases.values() for t in tables)

    def partial_note(self) -> str | None:
        """One line saying this dump is partial and what it lacks; None for a complete one."""
        if not self.partial:
            return None
        return (f"PARTIAL database dump (--allow-partial-database): the account "
                f"{self.account or '(unknown)'} could not dump everything: "
                f"{'; '.join(self.missing) or 'not recorded'}"
                + (f"; fix: {self.fix}" if self.fix else ""))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["databases"] = {name: {"tables": [asdict(t) for t in tables]}
                             for name, tables in self.databases.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DatabaseSection:
        known, _ = _known(cls, data)
        databases = {name: [TableRecord.from_dict(t) for t in (entry or {}).get("tables", [])]
                     for name, entry in (known.get("databases") or {}).items()}
        return cls(version=known.get("version", ""), object=known.get("object", ""),
                   system_tables=list(known.get("system_tables") or []), databases=databases,
                   users_object=known.get("users_object"),
                   privileges=list(known.get("privileges") or []),
                   schema_objects=dict(known.get("schema_objects") or {}),
                   account=known.get("account"), partial=bool(known.get("partial")),
                   missing=[str(m) for m in known.get("missing") or []],
                   fix=known.get("fix"), kind=known.get("kind") or "dump",
                   start=known.get("start"), end=known.get("end"),
                   binlogs=list(known.get("binlogs") or []),
                   server=dict(known.get("server") or {}), base=known.get("base"),
                   parent=known.get("parent"), full_reason=known.get("full_reason"),
                   vanished_tables=[str(t) for t in known.get("vanished_tables") or []],
                   excluded_tables=[str(t) for t in known.get("excluded_tables") or []],
                   max_allowed_packet=known.get("max_allowed_packet"))


@dataclass
class PathsSection:
    """What the archive was asked for, and what tar said while reading it."""

    root: str
    included: list[str]
    absent: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PathsSection:
        known, _ = _known(cls, data)
        lists = {k: list(v or []) for k, v in known.items() if k != "root"}
        return cls(known["root"], **lists)


@dataclass
class Manifest:
    """A complete backup. ``extra`` keeps top-level fields this version does not know."""

    backup_id: str
    created_at: str
    completed_at: str = ""
    hostname: str = ""
    tool: dict[str, Any] = field(default_factory=dict)
    flow_run_id: str | None = None
    platform: dict[str, Any] = field(default_factory=dict)
    mariadb: DatabaseSection | None = None
    paths: PathsSection | None = None
    space: dict[str, Any] | None = None
    objects: list[StoredObject] = field(default_factory=list)
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)
    # {"format": "age", "recipients": [fingerprints]} or {"format": "none", "reason": ...};
    # None in manifests written before backups could be encrypted (all plain text). See
    # undercloud_backup/trust/crypto.py.
    encryption: dict[str, Any] | None = None
    # ``kind`` "full" (level 0) or "incremental"; ``parent`` the backup this level was taken
    # against; ``chain`` every backup from the level-0 full to the parent, in order;
    # ``snapshot`` the tar snapshot object after this level ({object, size, sha256 of the stored
    # bytes, plain_size, plain_sha256}); ``full_reason`` why a full was taken. None: a backup
    # from before incrementals existed (a full without a snapshot: no incremental can build
    # on it).
    kind: str | None = None
    parent: str | None = None
    chain: list[str] = field(default_factory=list)
    level: int | None = None
    snapshot: dict[str, Any] | None = None
    full_reason: str | None = None

    @property
    def incremental(self) -> bool:
        return self.kind == INCREMENTAL or bool(self.chain)

    def object(self, leaf: str) -> StoredObject | None:
        """The object named ``<backup_id>/<leaf>``, if the backup has one."""
        return next((o for o in self.objects if o.leaf == leaf), None)

    @property
    def name(self) -> str:
        return f"{self.backup_id}/{MANIFEST_NAME}"

    def to_dict(self) -> dict:
        data: dict[str, Any] = dict(self.extra)
        data.update(
            format=self.format, backup_id=self.backup_id, created_at=self.created_at,
            completed_at=self.completed_at, hostname=self.hostname, tool=self.tool,
            flow_run_id=self.flow_run_id, platform=self.platform,
            mariadb=self.mariadb.to_dict() if self.mariadb else None,
            paths=self.paths.to_dict() if self.paths else None, space=self.space,
            objects=[o.to_dict() for o in self.objects])
        if self.encryption is not None:
            data["encryption"] = self.encryption
        if self.kind is not None:
            data.update(kind=self.kind, parent=self.parent, chain=list(self.chain),
                        level=self.level, snapshot=self.snapshot)
            if self.full_reason is not None:
                data["full_reason"] = self.full_reason
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        if not isinstance(data, dict) or not data.get("backup_id"):
            raise ManifestError("not a backup manifest (no backup_id)")
        version = data.get("format", READABLE_FORMATS[0])
        if version not in READABLE_FORMATS:
            raise ManifestError(f"manifest format {version!r} is newer than this tool reads "
                                f"({', '.join(READABLE_FORMATS)}); upgrade undercloud-backup")
        known, extra = _known(cls, data)
        known.pop("extra", None)
        return cls(
            backup_id=known["backup_id"], created_at=known.get("created_at", ""),
            completed_at=known.get("completed_at", ""), hostname=known.get("hostname") or "",
            tool=dict(known.get("tool") or {}), flow_run_id=known.get("flow_run_id"),
            platform=dict(known.get("platform") or {}),
            mariadb=DatabaseSection.from_dict(known["mariadb"]) if known.get("mariadb") else None,
            paths=PathsSection.from_dict(known["paths"]) if known.get("paths") else None,
            space=known.get("space"),
            objects=[StoredObject.from_dict(o) for o in known.get("objects") or []],
            format=version, extra=extra, encryption=known.get("encryption"),
            kind=known.get("kind"), parent=known.get("parent"),
            chain=[str(b) for b in known.get("chain") or []], level=known.get("level"),
            snapshot=known.get("snapshot"), full_reason=known.get("full_reason"))

    @classmethod
    def from_json(cls, body: bytes | str) -> Manifest:
        try:
            data = json.loads(body)
        except ValueError as error:
            raise ManifestError(f"manifest is not JSON: {error}") from None
        return cls.from_dict(data)
