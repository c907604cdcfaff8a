"""What one backup run was asked to do: the input every stage receives, without secrets."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass, replace

from undercloud_backup.core import defaults
from undercloud_backup.store.space import SpaceReport


@dataclass(frozen=True)
class BackupRequest:
    """Everything a stage needs to know, without secrets (it is a Prefect task input).

    The segment sizes are filled in once, by the space check (:meth:`with_space`); a stage
    uses them as they are.
    """

    backup_id: str
    created_at: str
    hostname: str
    root: str = "/"
    add_paths: tuple[str, ...] = ()
    exclude_paths: tuple[str, ...] = ()
    include_files: bool = True
    include_databases: bool = True
    # ``db.name`` of tables and views left out of the dump (a view whose table is gone).
    exclude_tables: tuple[str, ...] = ()
    staging_dir: str = defaults.STAGING_DIR
    allow_unreadable: bool = False
    # Back up what a database account can see when it cannot see everything (warned, recorded).
    allow_partial_database: bool = False
    compression_level: int = defaults.COMPRESSION_LEVEL
    # CHECKSUM TABLE of every table besides its row count (verify compares both).
    table_checksums: bool = True
    dump_timeout_s: float = 6 * 3600
    archive_timeout_s: float = 12 * 3600
    # Run tar and the dump as root through the sudo wrappers of deployments/ (worker mode).
    privileged: bool = False
    # Asked for (None: per stream, from its estimated size); then decided by the space check.
    segment_size: int | None = None
    database_segment_size: int | None = None
    files_segment_size: int | None = None
    # An age recipients file (public keys; None: stored in plain text, said so in
    # the manifest) and the SSH key that signs the manifest (paths only, never key text).
    recipients_file: str | None = None
    signing_key: str | None = None
    # Why a backup without recipients is plain text (the manifest's encryption.reason), and
    # whether the run opted out on purpose (--no-encryption REASON).
    plain_reason: str | None = None
    encryption_opted_out: bool = False
    # Force a level-0 full; otherwise an incremental against this host's newest
    # complete backup while its chain's full is younger than full_every_s (0: always full).
    full: bool = False
    full_every_s: float = defaults.FULL_EVERY_DAYS * 86400
    # Only the binary log since the last backup (no files); refused when it cannot be shipped.
    binlogs_only: bool = False

    def object_name(self, leaf: str) -> str:
        return f"{self.backup_id}/{leaf}"

    def with_space(self, space: SpaceReport) -> BackupRequest:
        """This request with the segment sizes the space check decided."""
        return replace(self, database_segment_size=space.database_segment_size,
                       files_segment_size=space.files_segment_size)


def new_backup_id(hostname: str, when: dt.datetime, unique: str | None = None) -> str:
    """``<host>-<UTC time>-<6 hex>``: readable, sortable per host, unique per run."""
    stamp = when.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{hostname}-{stamp}-{(unique or secrets.token_hex(3))[:6]}"
