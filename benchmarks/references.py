"""The reference pipelines: what an operator could do by hand with the standard tools."""

from __future__ import annotations

import shlex
from pathlib import Path

from context import Context
from sampledata import DUMP_OPTS, PATHS

ZSTD = "zstd -q -T0 -3"


def tar_cmd(root: Path) -> str:
    return f"tar -C {shlex.quote(str(root))} --xattrs --acls -cf - {' '.join(PATHS)}"


def dump_cmd(ctx: Context) -> str:
    return f"mariadb-dump --defaults-extra-file={shlex.quote(str(ctx.cnf))} {DUMP_OPTS}"


def stream(ctx: Context, c: str, producer: str, name: str) -> str:
    """``producer | zstd | swift upload C -``: one object, segmented, never staged."""
    return (f"{producer} | {ZSTD} | {ctx.swift} -q upload {c} - --object-name {name} "
            f"--segment-size {ctx.segment_bytes}")


def ref_sequential(ctx: Context, c: str) -> str:
    s = shlex.quote(str(ctx.staging))
    return (f"set -e; {dump_cmd(ctx)} | {ZSTD} > {s}/db.sql.zst\n"
            f"{tar_cmd(ctx.root)} | {ZSTD} > {s}/files.tar.zst\n"
            f"cd {s} && {ctx.swift} -q upload {c} db.sql.zst files.tar.zst "
            f"--segment-size {ctx.segment_bytes}")


def ref_streamed(ctx: Context, c: str) -> str:
    return (f"set -e; {stream(ctx, c, dump_cmd(ctx), 'db.sql.zst')}\n"
            f"{stream(ctx, c, tar_cmd(ctx.root), 'files.tar.zst')}")


def ref_streamed_parallel(ctx: Context, c: str) -> str:
    # What a careful operator could also do by hand: both streams at once.
    return (f"{stream(ctx, c, dump_cmd(ctx), 'db.sql.zst')} & a=$!\n"
            f"{stream(ctx, c, tar_cmd(ctx.root), 'files.tar.zst')} & b=$!\n"
            "wait $a; ra=$?; wait $b; rb=$?; exit $((ra | rb))")


def ref_db_only(ctx: Context, c: str) -> str:
    return stream(ctx, c, dump_cmd(ctx), "db.sql.zst")


def ref_restore(ctx: Context, c: str, target: Path) -> str:
    """Both objects of ``ref_sequential`` back: the files under ``target``, the dump into the
    scratch server."""
    t = shlex.quote(str(target))
    return (f"set -e; {ctx.swift} download {c} files.tar.zst -o - | zstd -dcq | "
            f"tar -x --xattrs --xattrs-include='*' --acls --numeric-owner -C {t}\n"
            f"{ctx.swift} download {c} db.sql.zst -o - | zstd -dcq | "
            f"mariadb --socket={shlex.quote(str(ctx.scratch_sock))}")
