#!/usr/bin/env python3
"""Time each candidate optimisation of our backup against the unpatched flow, alternating.

    python benchmarks/experiments.py [--scale N] [--runs K] [--json FILE] [--keep]

Uses bench.py's data, sampler and reference pipelines, and ``patched_backup.py`` to apply one
change at a time to ``python -m flows.backup`` (running Prefect server) without editing the
project. Prints the same table as bench.py, one row per patch set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402

PATCH_SETS = {
    "ours_unpatched": "none",
    "ours_stats_concurrent": "stats-concurrent",
    "ours_zstd_single_thread": "zstd-st",
    "ours_zstd_level_1": "zstd-1",
    "ours_no_md5": "no-md5",
    "ours_no_heartbeat": "no-heartbeat",
    "ours_pipe_1m": "pipe-1m",
    "ours_all_but_level": "stats-concurrent,zstd-st,no-md5,no-heartbeat,pipe-1m",
    "ours_all": "stats-concurrent,zstd-st,zstd-1,no-md5,no-heartbeat,pipe-1m",
    "ours_no_checksum": "no-checksum",
    "ours_cpu_cuts": "no-checksum,zstd-st,zstd-1,no-md5,no-heartbeat",
}
SEGMENTS = {"ours_segment_1GiB_default": 1024, "ours_segment_256MiB": 256}


def patched_variant(name: str, patches: str, segment_mib: int | None = None) -> bench.Variant:
    def build(ctx: bench.Context, _round: int) -> tuple[list[str], dict[str, str]]:
        argv = bench.ours_argv(ctx, ctx.container(name))[3:]  # drop python -m flows.backup
        if segment_mib:
            argv[argv.index("--segment-size") + 1] = f"{segment_mib}MiB"
        return ([str(ctx.python), str(HERE / "patched_backup.py"), patches, "--", *argv],
                ctx.running_env())

    def prepare(ctx: bench.Context) -> None:
        bench.clean_container(ctx, ctx.container(name))
        bench.ensure_bench_db(ctx)

    def after(ctx: bench.Context, result: bench.RunResult) -> None:
        if result.ok:
            result.timeline = bench.timeline(result)

    return bench.Variant(name, f"{name} ({patches}"
                         + (f", {segment_mib} MiB segments)" if segment_mib else ")"), "backup",
                         build, prepare, after,
                         sessions=lambda ctx: {ctx.server_sid: "prefect-server"})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated variant names")
    args, rest = p.parse_known_args()
    bargs = bench.parse_args(rest)
    bench._exit_on_sigterm()
    workdir = bargs.workdir.resolve()
    ctx = bench.Context(args=bargs, workdir=workdir, root=workdir / "root",
                        staging=workdir / "staging", logs=workdir / "logs",
                        python=bargs.python,
                        swift=shutil.which("swift", path="/usr/bin:/bin") or "swift",
                        cnf=bargs.db_defaults_file,
                        env=bench.base_env(bench.read_env_file(bargs.os_env)))
    for d in (ctx.staging, ctx.logs):
        d.mkdir(parents=True, exist_ok=True)
    variants = [v for v in bench.BACKUPS if v.name in ("reference_sequential",
                                                        "reference_streamed_parallel")]
    variants += [patched_variant(n, ps) for n, ps in PATCH_SETS.items()]
    variants += [patched_variant(n, "none", mib) for n, mib in SEGMENTS.items()]
    if args.only:
        variants = [v for v in variants if v.name in args.only.split(",")]
    results: dict[str, list[bench.RunResult]] = {}
    t0 = time.monotonic()
    try:
        with bench.prefect_server(workdir / "prefect-server", ctx.python, ctx.env) as (url, sid):
            ctx.api_url, ctx.server_sid = url, sid
            files, entries, dump = bench.prepare_data(ctx)
            ctx.source_bytes = files + dump
            bench.rounds(ctx, variants, bargs.runs, results)
            for v in variants:
                bench.clean_container(ctx, ctx.container(v.name))
    finally:
        if not bargs.keep:
            bench.run(["mariadb", "-e", f"DROP DATABASE IF EXISTS {bench.BENCH_DB}"],
                      check=False)
            shutil.rmtree(ctx.root, ignore_errors=True)
            (workdir / "data.json").unlink(missing_ok=True)
    labels = {v.name: v.label for v in variants}
    summary = bench.summarize(results, labels, {v.name: ctx.source_bytes for v in variants})
    names = [v.name for v in variants]
    print(f"\n## experiments, scale {bargs.scale}, {bargs.runs} run(s) each, source "
          f"{ctx.source_bytes / 1e6:.0f} MB ({files / 1e6:.0f} MB files + {dump / 1e6:.0f} MB "
          "dump)\n")
    print(bench.table(summary, names, "ours_unpatched"))
    print()
    print(bench.cpu_table(summary, names))
    print()
    print(bench.memory_table(summary, names))
    print()
    print(bench.timeline_table(summary, names))
    print(f"\ntotal {time.monotonic() - t0:.0f} s")
    if bargs.json:
        with contextlib.suppress(OSError):
            bargs.json.write_text(json.dumps({"scale": bargs.scale, "variants": summary},
                                             indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
