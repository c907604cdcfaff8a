"""Comparing a server's tables and schema objects with what a manifest recorded.

Verify loads a dump into a throwaway server and asks: does every table hold the rows (and
checksum) it held at backup time, and does every database hold as many views, triggers,
routines and events? Rows alone would pass a dump taken by an account that could not see the
triggers.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from undercloud_backup.core.manifest import TableRecord
from undercloud_backup.db import connection as db
from undercloud_backup.db.preflight import schema_object_counts


@dataclass
class TableComparison:
    """Per-table row counts and checksums, as recorded in a manifest and as found."""

    compared: int = 0
    matching: int = 0
    # False when the backup recorded row counts only (--no-table-checksums)
    checksums: bool = True
    differences: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self, name: str, table: TableRecord, found: tuple[int, int | None]) -> None:
        rows, checksum = found
        if rows != table.rows:
            self.differences.append(f"table {name}: {rows} rows, the manifest records "
                                    f"{table.rows}")
        elif table.checksum is not None and checksum != table.checksum:
            self.differences.append(f"table {name}: checksum {checksum}, the manifest "
                                    f"records {table.checksum}")
        else:
            self.matching += 1


def compare_tables(session, recorded: dict[str, list[TableRecord]], *,
                   ignore: Sequence[str] = ()) -> TableComparison:
    """Compare every table the manifest recorded with what ``session`` sees now.

    ``ignore`` holds ``db.table`` patterns (fnmatch) of tables known to change between the
    manifest's snapshot and the dump's on a live server (heartbeats, for instance).
    """
    result = TableComparison(checksums=any(t.checksum is not None
                                           for tables in recorded.values() for t in tables))
    with session.cursor() as cursor:
        cursor.execute("SHOW DATABASES")
        present = {row[0] for row in cursor.fetchall()}
    found = {f"{t.database}.{t.table}": (t.rows, t.checksum) for t in db.table_stats(
        session, tuple(d for d in recorded if d in present), result.checksums)}
    expected: set[str] = set()
    for database, tables in sorted(recorded.items()):
        if database not in present:
            result.differences.append(f"database {database}: missing after the load")
            continue
        for table in tables:
            name = f"{database}.{table.table}"
            expected.add(name)
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore):
                result.ignored.append(name)
                continue
            result.compared += 1
            if name not in found:
                result.differences.append(f"table {name}: missing after the load")
            else:
                result.check(name, table, found[name])
    result.extra = sorted(set(found) - expected)
    return result


def compare_schema_objects(session, recorded: dict[str, dict[str, int]]) -> list[str]:
    """What differs between the views, triggers, routines and events per database that the
    manifest recorded and what ``session`` sees now (nothing for manifests that recorded
    none: format 1)."""
    found = schema_object_counts(session, tuple(recorded))
    return [f"database {database}: {found[database].get(kind, 0)} {kind} after the load, "
            f"the manifest records {count}"
            for database, kinds in sorted(recorded.items())
            for kind, count in sorted(kinds.items())
            if found[database].get(kind, 0) != count]
