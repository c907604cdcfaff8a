#!/usr/bin/env python3
"""A/B runs of our flow from several source trees, against one Prefect server (ad hoc).

    python3 benchmarks/ab_runs.py SCALE NAME:MODE[:EXTRA,ARGS] ...   # run from a source tree

Each NAME runs ``python -m flows.backup`` of the tree it is started from (its ``benchmarks``
beside it) against the data ``bench.py --keep`` left at SCALE, timed and sampled like a variant,
and prints one JSON line (wall, CPU per command and server, timeline, kind, stored bytes).
MODE: ``plain``; ``spy`` (under py-spy, ``$PY_SPY``: a raw profile NAME.prof beside the logs,
for ``profile_summary.py``); ``incr`` (into the previous NAME's container, not emptied: the
nightly incremental after it). Run from copies of the tree with one change each, it measures
candidate changes one at a time (benchmarks/RESULTS.md, "Candidates measured"). Take the test
lock around it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from measure import measure, timeline  # noqa: E402
from sampledata import ensure_bench_db  # noqa: E402
from servers import prefect_server  # noqa: E402
from variants import ours_argv  # noqa: E402


def main(argv: list[str]) -> None:
    args = bench.parse_args(["--scale", argv[0], "--keep"])
    ctx = bench.make_context(args)
    with prefect_server(ctx.workdir / "prefect-server", ctx.python, ctx.env) as (url, sid):
        ctx.api_url, ctx.server_sid = url, sid
        container = ctx.container("ab")
        for spec in argv[1:]:
            name, mode, *extra = spec.split(":")
            extra = [e for e in ",".join(extra).split(",") if e]
            if mode != "incr":
                ctx.clean_container(container)
            ensure_bench_db(args.scale)
            cmd = ours_argv(ctx, container, *extra)
            if mode == "spy":
                cmd = [os.environ.get("PY_SPY", "py-spy"), "record", "-r", "100", "--threads",
                       "--idle", "--format", "raw", "-o", str(ctx.logs / f"{name}.prof"), "--",
                       *cmd]
            r = measure(name, 0, cmd, ctx.running_env(), ctx.logs / f"{name}.log",
                        ctx.server_sessions(), cwd=str(bench.REPO))
            kind = stored = None
            if r.ok:
                out = json.loads(r.stdout.splitlines()[-1])
                kind, stored = out.get("kind"), sum(o["size"] for o in out["objects"])
            print(json.dumps({"name": name, "ok": r.ok, "wall": r.wall_s, "cpu": r.cpu_s,
                              "rss_mib": r.rss_mib_tree, "by_cmd": r.cpu_by_command,
                              "servers": r.cpu_servers_s, "other": r.cpu_other_s,
                              "timeline": timeline(r) if r.ok else {}, "kind": kind,
                              "stored": stored, "tree": str(bench.REPO)}), flush=True)
        ctx.clean_container(container)


if __name__ == "__main__":
    main(sys.argv[1:])
