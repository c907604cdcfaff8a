"""``python -m undercloud_backup.db.headtap``: pass a dump through, telling its coordinates.

Sits between ``mariadb-dump --master-data=2`` and the compressor. It copies stdin to stdout
unchanged and writes the dump's ``-- CHANGE MASTER TO MASTER_LOG_FILE=...`` comment, the
binary-log position of the dump's own snapshot, to stderr, where the pipeline's line reader
takes it. Only the head is looked at (the comment precedes the first database); the rest is
moved with ``splice(2)``, without a copy through Python.
"""

from __future__ import annotations

import os
import sys

HEAD_LIMIT = 64 * 1024
CHUNK = 1 << 20


def _copy_rest(source: int, sink: int) -> None:
    splice = getattr(os, "splice", None)
    while True:
        try:
            moved = splice(source, sink, CHUNK) if splice else 0
        except OSError:
            splice, moved = None, 0
        if splice is None:
            data = os.read(source, CHUNK)
            if not data:
                return
            os.write(sink, data)
            continue
        if moved == 0:
            return


def main() -> int:
    source, sink = sys.stdin.fileno(), sys.stdout.fileno()
    head = b""
    while len(head) < HEAD_LIMIT:
        data = os.read(source, HEAD_LIMIT - len(head))
        if not data:
            break
        head += data
    for line in head.splitlines():
        if line.startswith(b"-- CHANGE MASTER TO MASTER_LOG_FILE="):
            os.write(sys.stderr.fileno(), line + b"\n")
    view = memoryview(head)
    while view:
        view = view[os.write(sink, view):]
    _copy_rest(source, sink)
    return 0


if __name__ == "__main__":
    sys.exit(main())
