#!/usr/bin/env python3
"""Benchmark undercloud-backup against the plain-tools pipelines.

    python benchmarks/bench.py [--scale N] [--runs K] [--json FILE]

Generates a sample undercloud (files under a scratch root, database ``ucb_bench`` in the local
MariaDB), then runs every variant K times, alternating, against the local Swift behind
Keystone: the reference sequential and streamed pipelines, our flow against a running Prefect
server and with Prefect's ephemeral server, and the restores (ours when ``flows/restore.py``
exists, and ``swift download | zstd -d | tar -x`` plus ``mariadb``) into a scratch MariaDB
server. For each variant it reports the median wall time, throughput, the peak RSS of the
variant's whole process tree (servers excluded), and where the CPU went.

Standard library only (plus the project's venv for our flow); loopback services only. The
pieces: shell (commands, sessions), servers (Prefect, scratch MariaDB), sampledata, proctree
(/proc sampling), measure (one timed run), references (the plain-tools pipelines), variants,
runner, report (medians, ratios, tables).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import binlogbench as blb
import incremental as incr
from context import Context
from report import ratios, render, summarize, table
from runner import Results, rounds, run_variant
from sampledata import drop_bench_db, prepare_data, remove_files
from servers import prefect_server, scratch_mariadb
from shell import REPO, STATE, base_env, exit_on_sigterm, log, read_env_file
from variants import BACKUPS, OVERHEAD, RESTORE_SOURCES, RESTORES, Variant, first_run_variant

TOOLS = ("mariadb", "mariadb-dump", "zstd", "tar", "swift")
PARTS = ("overhead", "backup", "restore", "incremental", "binlog", "timeline")  # --only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0,
                   help="data size: 1 = ~1 GB of files + a ~500 MB dump (default 1)")
    p.add_argument("--runs", type=int, default=3, help="runs of each variant (default 3)")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/ucb-bench"),
                   help="data, staging, restores and logs (default /var/tmp/ucb-bench)")
    p.add_argument("--segment-mib", type=int,
                   help="Swift segment size for every variant, MiB (default: 64 for the "
                        "reference, our own choice for ours)")
    p.add_argument("--keep", action="store_true",
                   help="keep the generated files and the ucb_bench database for the next run")
    p.add_argument("--only", default="",
                   help="comma-separated subset: overhead,backup,restore,incremental,"
                        "binlog,timeline (default all)")
    p.add_argument("--variants", default="",
                   help="comma-separated variant names: run only these of the parts chosen "
                        "(e.g. reference_sequential,ours_running_server; default all)")
    p.add_argument("--skip", default="",
                   help="comma-separated variant names to leave out of the backup, restore and "
                        "overhead parts (e.g. ours_ephemeral_server: a shorter smoke run)")
    p.add_argument("--python", type=Path, default=REPO / ".venv/bin/python",
                   help="interpreter with the project installed (default the repo's .venv)")
    p.add_argument("--os-env", type=Path, default=STATE / "keystone.env",
                   help="OS_* file of the Swift user (default: services.sh's keystone.env)")
    p.add_argument("--db-defaults-file", type=Path, default=STATE / "mariadb-backup.cnf",
                   help="option file of the MariaDB backup user (default: services.sh's)")
    args = p.parse_args(argv)
    args.variants = set(filter(None, args.variants.split(",")))
    args.skip = set(filter(None, args.skip.split(",")))
    if args.runs < 1 or args.scale <= 0:
        p.error("--runs must be >= 1 and --scale > 0")
    unknown = args.skip - {v.name for v in BACKUPS + RESTORES + OVERHEAD} - {
        first_run_variant(Path()).name}
    if unknown:
        p.error(f"--skip: no such variant: {','.join(sorted(unknown))}")
    if set(filter(None, args.only.split(","))) - set(PARTS):
        p.error(f"--only takes a comma-separated subset of {','.join(PARTS)}")
    return args


def make_context(args: argparse.Namespace) -> Context:
    for tool in TOOLS:
        if shutil.which(tool, path="/usr/bin:/bin:/usr/sbin") is None:
            sys.exit(f"bench: {tool} is not installed (deployments/dev/services.sh installs it)")
    if not os.access(args.python, os.X_OK):
        sys.exit(f"bench: --python {args.python} is not an executable (deployments/dev/venv.sh)")
    try:
        os_env = read_env_file(args.os_env)
    except OSError as error:
        sys.exit(f"bench: --os-env: {error}")
    if "OS_AUTH_URL" not in os_env:
        sys.exit(f"bench: --os-env {args.os_env} sets no OS_AUTH_URL (not a Swift user's file)")
    workdir = args.workdir.resolve()
    ctx = Context(args=args, workdir=workdir, root=workdir / "root",
                  staging=workdir / "staging", logs=workdir / "logs", python=args.python,
                  swift=shutil.which("swift", path="/usr/bin:/bin") or "swift",
                  cnf=args.db_defaults_file, env=base_env(os_env))
    for d in (ctx.staging, ctx.logs):
        d.mkdir(parents=True, exist_ok=True)
    if (REPO / "flows/restore.py").exists():
        help_ = subprocess.run([str(ctx.python), "-m", "flows.restore", "--help"], cwd=REPO,
                               capture_output=True, env=ctx.env, check=False)
        ctx.restore_available = help_.returncode == 0
        ctx.restore_help = help_.stdout.decode()
    ctx.recipients_file = age_recipients(ctx)
    ctx.incremental = incr.available(ctx)
    return ctx


def age_recipients(ctx: Context) -> Path | None:
    """A throwaway age key pair under the workdir (as tests/test_crypto.py makes them) for
    the encrypted variant; None without age-keygen or --recipients-file in our CLI."""
    keygen = shutil.which("age-keygen", path="/usr/bin:/bin")
    help_ = subprocess.run([str(ctx.python), "-m", "flows.backup", "--help"], cwd=REPO,
                           capture_output=True, env=ctx.env, check=False)
    ctx.no_encryption_flag = "--no-encryption" in help_.stdout.decode()
    if keygen is None or "--recipients-file" not in help_.stdout.decode():
        return None
    keys = ctx.workdir / "age"
    shutil.rmtree(keys, ignore_errors=True)
    keys.mkdir(mode=0o700)
    identity = keys / "identity.txt"  # never used: the benchmark does not decrypt
    subprocess.run([keygen, "-o", str(identity)], check=True, capture_output=True)
    public = subprocess.run([keygen, "-y", str(identity)], check=True, capture_output=True)
    recipients = keys / "recipients.txt"
    recipients.write_bytes(public.stdout)
    return recipients


def chosen(variants: list[Variant], names: set[str], skip: set[str] = frozenset()
           ) -> list[Variant]:
    """The variants --variants names (all of them without --variants), but those --skip
    names."""
    return [v for v in variants if (not names or v.name in names) and v.name not in skip]


def run_overhead(ctx: Context, results: Results, labels: dict[str, str]) -> None:
    """Prefect's fixed cost on a tiny --db-only backup, first with a fresh PREFECT_HOME."""
    first_home = ctx.workdir / "prefect-first-run"
    shutil.rmtree(first_home, ignore_errors=True)
    first = first_run_variant(first_home)
    labels[first.name] = first.label
    log("Prefect overhead on a tiny --db-only backup")
    if chosen([first], ctx.args.variants, ctx.args.skip):
        run_variant(ctx, first, 0, results)
    rounds(ctx, chosen(OVERHEAD, ctx.args.variants, ctx.args.skip), ctx.args.runs, results)
    for v in OVERHEAD[:3]:
        ctx.clean_container(ctx.container(v.name))
    shutil.rmtree(first_home, ignore_errors=True)


def run_backups(ctx: Context, only: set[str], results: Results, report: dict) -> None:
    """The data, then the backups, each round followed by the restores of its backups."""
    log(f"preparing data at scale {ctx.args.scale} under {ctx.root}")
    incr.Changes.recover(ctx.workdir, ctx.root)
    files, entries, dump = prepare_data(ctx.workdir, ctx.root, ctx.args.scale, ctx.cnf,
                                        ctx.python)
    ctx.source_bytes = files + dump
    report["data"] = {"files_bytes": files, "file_entries": entries,
                      "dump_bytes": dump, "source_bytes": files + dump}
    log(f"data: {files / 1e6:.0f} MB in {entries} entries, dump {dump / 1e6:.0f} MB")
    with contextlib.ExitStack() as stack:
        names = ctx.args.variants
        restores = chosen(RESTORES, names, ctx.args.skip) if "restore" in only else []
        if restores:
            ctx.scratch_sock = stack.enter_context(scratch_mariadb(ctx.workdir))
        # The restores read these two; with --only restore they are the only backups run.
        backups = BACKUPS if "backup" in only else [
            v for v in BACKUPS if v.name in RESTORE_SOURCES and restores]
        backups = [v for v in backups if not names or v.name in names
                   or (v.name in RESTORE_SOURCES and restores)]
        backups = [v for v in backups if v.name not in ctx.args.skip
                   or (v.name in RESTORE_SOURCES and restores)]
        chain = None
        if "incremental" in only and (not names or names & {v.name for v in incr.VARIANTS}):
            if ctx.incremental is None:
                chain = lambda r: incr.incremental_round(ctx, r, results)  # noqa: E731
            else:
                log(f"incremental: not available: {ctx.incremental}")
        rounds(ctx, backups, ctx.args.runs, results, then=restores, after=chain)
    # The other backups' containers were emptied right after each run (variants._backup); each
    # swift CLI call is a Python start and a token, about half a second.
    for name in RESTORE_SOURCES:
        ctx.clean_container(ctx.container(name))


def run_binlog(ctx: Context, only: set[str], results: Results, report: dict) -> None:
    """The binary-log chain and the sampled full (binlogbench.py), on the same data."""
    if not ctx.source_bytes:
        incr.Changes.recover(ctx.workdir, ctx.root)
        files, entries, dump = prepare_data(ctx.workdir, ctx.root, ctx.args.scale, ctx.cnf,
                                            ctx.python)
        ctx.source_bytes = files + dump
        report["data"] = {"files_bytes": files, "file_entries": entries,
                          "dump_bytes": dump, "source_bytes": files + dump}
    if "timeline" in only:
        log("timeline: a full of ours with its streams sampled, the reference once")
        blb.timeline_part(ctx, results, report)
    if "binlog" in only:
        log("binlog: a full and 6 nightlies with the binary log on, restores, --binlogs-only")
        blb.binlog_part(ctx, results, report)


def run_all(ctx: Context, only: set[str], results: Results, labels: dict[str, str],
            report: dict) -> None:
    """Every variant asked for, around the benchmark's own Prefect server; the data removed
    afterwards unless --keep."""
    try:
        # Prefect's fixed cost first, while the server holds no bench database: --db-only dumps
        # every database there is.
        drop_bench_db()
        with prefect_server(ctx.workdir / "prefect-server", ctx.python, ctx.env) as (url, sid):
            ctx.api_url, ctx.server_sid = url, sid
            if "overhead" in only:
                run_overhead(ctx, results, labels)
            if only & {"backup", "restore", "incremental"}:
                run_backups(ctx, only, results, report)
            if only & {"binlog", "timeline"}:
                run_binlog(ctx, only, results, report)
    finally:
        if not ctx.args.keep:
            drop_bench_db(check=False)
            remove_files(ctx.workdir, ctx.root)
        shutil.rmtree(ctx.workdir / "restore", ignore_errors=True)


def restore_status(ctx: Context, variants: dict[str, dict]) -> str:
    if "restore_ours" in variants:
        return "measured"
    failed_help = (REPO / "flows/restore.py").exists() and not ctx.restore_available
    return "ours: not available" + (" (flows.restore --help failed)" if failed_help else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    only = set(filter(None, args.only.split(","))) or set(PARTS)
    ctx = make_context(args)
    results: Results = {}
    labels = {v.name: v.label for v in BACKUPS + RESTORES + OVERHEAD + incr.VARIANTS}
    labels.update(blb.LABELS)
    report: dict = {"scale": args.scale, "runs": args.runs, "segment_mib": args.segment_mib,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": {
                        "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()[0]}}
    t0 = time.monotonic()
    run_all(ctx, only, results, labels, report)
    # Throughput is of the source data: only the variants that read it (not the overhead's).
    sources = {v.name: ctx.source_bytes for v in BACKUPS + RESTORES if ctx.source_bytes}
    variants = report["variants"] = summarize(results, labels, sources)
    report["ratios"] = ratios(variants)
    report["ratios"].update({k: v for k, v in blb.ratios(variants, report).items() if v})
    report["restore_ours"] = restore_status(ctx, variants)
    report["incremental"] = ("measured" if any(v.name in variants for v in incr.VARIANTS)
                             else f"not available: {ctx.incremental}" if ctx.incremental
                             else "not run")
    report["encrypted"] = ("measured" if "ours_encrypted" in variants else
                           "not available: no age-keygen or no --recipients-file"
                           if ctx.recipients_file is None else "not run")
    report["total_s"] = round(time.monotonic() - t0, 1)
    print(render(report, [v.name for v in BACKUPS + RESTORES], ctx.logs,
                 [v.name for v in incr.VARIANTS]))
    if any(n in variants for n in blb.VARIANT_NAMES + blb.TIMELINE_NAMES):
        print("\n" + table(variants, blb.TIMELINE_NAMES, "timeline_reference"))
        print("\n" + table(variants, blb.VARIANT_NAMES, "binlog_full"))
        print(f"\nbinary log: {json.dumps(report.get('binlog', {}))}")
    if "timeline" in report:
        print("\n" + blb.render_timeline(report["timeline"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"JSON written to {args.json}")
    # Exit 1 only when a variant never succeeded: times are reported, never asserted.
    return 1 if any("wall_s_median" not in v for v in variants.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
