"""Reading the one row of a query that always returns one."""

from __future__ import annotations

from typing import Any

import pymysql


def one_row(cursor: pymysql.cursors.Cursor) -> tuple[Any, ...]:
    """The row of the query just executed on ``cursor`` that always returns one
    (``SELECT VERSION()``, an aggregate); a missing one is a database error like any other."""
    row = cursor.fetchone()
    if row is None:
        raise pymysql.err.InterfaceError("the query returned no row")
    return row
