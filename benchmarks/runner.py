"""Runs the variants: alternating, the order rotated each round, failed runs retried."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from context import Context
from measure import RunResult, measure
from sampledata import ATTEMPTS
from servers import SCRATCH_SESSIONS
from shell import REPO, log
from variants import Variant

T = TypeVar("T")
Results = dict[str, list[RunResult]]  # variant -> every run, failed ones too


def rotated(items: Sequence[T], r: int) -> list[T]:
    """``items`` starting at the r-th (modulo its length): round r's order."""
    items = list(items)
    return items[r % len(items):] + items[:r % len(items)] if items else []


def run_variant(ctx: Context, variant: Variant, round_: int, results: Results) -> None:
    built = variant.build(ctx, round_)
    if built is None:
        return
    argv, env = built
    # Retries: on a shared server another user's test can drop a database or kill a
    # connection in the middle of an --all-databases dump. Failures stay in the JSON.
    for attempt in range(ATTEMPTS):
        variant.prepare(ctx)
        sessions = {**{sid: "mariadb" for sid in SCRATCH_SESSIONS}, **variant.sessions(ctx)}
        result = measure(variant.name, round_, argv, env, ctx.logs / f"{variant.name}.log",
                         sessions, cwd=str(REPO))
        variant.after(ctx, result)
        results.setdefault(variant.name, []).append(result)
        status = ("ok" if result.ok else f"FAILED rc={result.returncode}") + (
            f" ({result.note})" if result.note else "")
        log(f"  {variant.name:<30} {result.wall_s:7.2f} s  tree {result.rss_mib_tree:6.1f} MiB"
            f"  cpu {result.cpu_s:6.2f} s  other {result.cpu_other_s:5.2f} s  {status}")
        if result.ok:
            return
        if attempt + 1 < ATTEMPTS:
            log(f"  retrying {variant.name} (see {ctx.logs / variant.name}.log)")


def rounds(ctx: Context, variants: Sequence[Variant], runs: int, results: Results,
           then: Sequence[Variant] = (), after: Callable[[int], None] | None = None) -> None:
    """Alternate: every variant once per round, the order rotated from round to round; then
    the ``then`` variants (the restores of that round's backups), rotated too; then
    ``after(round)`` (the incremental chain, whose steps have an order of their own)."""
    for r in range(runs):
        log(f"round {r + 1}/{runs}")
        for variant in rotated(variants, r) + rotated(then, r):
            run_variant(ctx, variant, r, results)
        if after is not None:
            after(r)
