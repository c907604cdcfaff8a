#!/usr/bin/env python3
"""Summarise a py-spy raw profile of our flow: seconds per thread, and where in our code.

    .venv/bin/pip install py-spy        # a measuring tool, not a project dependency
    .venv/bin/py-spy record -r 100 --threads --idle --format raw -o prof.txt -- \\
        .venv/bin/python -m flows.backup --root ... --json
    python3 benchmarks/profile_summary.py prof.txt [--rate 100] [--top 8]

With ``--idle`` every thread is sampled whether it runs or waits, so per thread the seconds add
up to its lifetime: a thread waiting on a pipe or a socket shows where the stream is held up.
Each sample is attributed to the innermost frame of the project (undercloud_backup, flows,
tasks, blocks) and the leaf function below it.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

PROJECT = re.compile(r"\((?:.*/)?(undercloud_backup|flows|tasks|blocks)/[^)]*\)")
SITE = re.compile(r"\(.*?/(?:site-packages|lib/python3\.\d+)/")


def summarise(path: str, rate: float, top: int) -> str:
    per_thread: dict[str, Counter[str]] = defaultdict(Counter)
    for line in open(path, encoding="utf-8", errors="replace"):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread (")), "?")
        thread = re.sub(r"thread \(\w+\):? ?", "", thread) or "?"
        thread = re.sub(r"upload-.*/", "upload-", thread)  # one name per stream, not per run
        ours = [f for f in frames if PROJECT.search(f)]
        where = re.sub(r"\(/[^)]*/(?=(undercloud_backup|flows|tasks|blocks)/)", "(", ours[-1]) \
            if ours else "(outside our code)"
        if any("importlib" in f for f in frames):
            where = "(imports)"
        leaf = SITE.sub("(", frames[-1])[:70]
        per_thread[thread][f"{where}  >  {leaf}"] += int(count)
    out = []
    for thread, counter in sorted(per_thread.items(), key=lambda kv: -sum(kv[1].values())):
        out.append(f"== {thread}: {sum(counter.values()) / rate:.2f} s")
        for key, n in counter.most_common(top):
            out.append(f"   {n / rate:6.2f} s  {key}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile")
    p.add_argument("--rate", type=float, default=100.0, help="py-spy's -r (samples/s)")
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    print(summarise(args.profile, args.rate, args.top))


if __name__ == "__main__":
    main()
