"""The ``prune_backups`` flow, and ``python -m flows.prune`` to run it ad hoc.

Keeps, for each backed-up host, the last N backups, the newest of each of the last D days and
of the last W ISO weeks that have backups (UTC), and always the newest complete one; deletes
the others manifest first, so an interrupted prune leaves only complete backups or clearly
incomplete ones; and removes incomplete backups (no manifest) once nothing was written to them
for a grace period.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from blocks.sources import SwiftSource
from flows import cli, params
from flows.params import Flag, Param
from tasks.prune import apply_retention
from undercloud_backup.core import defaults
from undercloud_backup.store.retention import PruneResult, RetentionPolicy


def _run_name() -> str:
    mode = "dry-run-" if flow_run.parameters.get("dry_run") else ""
    return f"prune-{mode}{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}"


def _when(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@flow(name="prune_backups", flow_run_name=_run_name, validate_parameters=True)
@params.described
def prune_backups(
    container: Annotated[str | None, params.container(
        "; their segments are in the container of that name followed by _segments")] = None,
    swift_block: Annotated[str | None, params.SWIFT_BLOCK] = None,
    keep_last: Annotated[int, Param(params.KEEP_LAST, Flag("--keep-last", "N"))
                         ] = defaults.KEEP_LAST,
    keep_daily: Annotated[int, Param(params.KEEP_DAILY, Flag("--keep-daily", "D"))
                          ] = defaults.KEEP_DAILY,
    keep_weekly: Annotated[int, Param(params.KEEP_WEEKLY, Flag("--keep-weekly", "W"))
                           ] = defaults.KEEP_WEEKLY,
    grace_hours: Annotated[float, Param(
        "Remove an incomplete backup (no manifest) only when nothing was written to it for "
        "this long; a backup still uploading is never touched.",
        Flag("--grace-hours", help="age of the last write before an incomplete backup is "
                                   "removed"))] = defaults.GRACE_HOURS,
    dry_run: Annotated[bool, Param("List what would be deleted; delete nothing.",
                                   Flag("--dry-run", help="list what would be deleted"))
                       ] = False,
    now: Annotated[dt.datetime | None, Param(
        "Evaluate the grace period as of this time (default: now), to see what a later prune "
        "would do.", Flag("--now", type=_when,
                          help="evaluate as of this ISO 8601 time (default: now)"))] = None,
) -> PruneResult:
    """Delete the backups a retention policy does not keep, manifest first (for each host)."""
    policy = RetentionPolicy(keep_last=keep_last, keep_daily=keep_daily,
                             keep_weekly=keep_weekly, grace=dt.timedelta(hours=grace_hours))
    result = apply_retention(SwiftSource(block=swift_block, container=container), policy, now,
                             dry_run)
    _report_artifact(result)
    get_run_logger().info(
        "%s: %d complete backup(s) kept, %d %s, %d incomplete %s", result.container,
        len(result.kept), len(result.deleted),
        "would be deleted" if dry_run else "deleted", len(result.incomplete_deleted),
        "would be removed" if dry_run else "removed")
    return result


# The flow's parameters as declared: its CLI's flags, and the call they make.
PARAMETERS = params.declared(prune_backups.fn)


def _report_artifact(result: PruneResult) -> None:
    verb = "would delete" if result.dry_run else "deleted"
    policy = result.policy
    lines = [f"# Prune of `{result.container}`" + (" (dry run)" if result.dry_run else ""),
             "", f"Policy: keep last {policy.keep_last}, daily {policy.keep_daily}, "
             f"weekly {policy.keep_weekly}; incomplete backups after "
             f"{policy.grace_hours:g} h. As of {result.now}.", "",
             "| backup | created | kept because |", "|---|---|---|"]
    lines += [f"| `{b.backup_id}` | {b.created_at} | {', '.join(b.reasons or ())} |"
              for b in result.kept]
    lines += [""] + [f"- {verb} `{b.backup_id}` (created {b.created_at})"
                     for b in result.deleted]
    lines += [f"- {verb} incomplete `{b.backup_id}` (last written {b.last_modified})"
              for b in result.incomplete_deleted]
    lines += [f"- kept incomplete `{b.backup_id}` (within the grace period)"
              for b in result.incomplete_kept]
    create_markdown_artifact(key="backup-retention", markdown="\n".join(lines) + "\n",
                             description=f"Prune of {result.container}")


# ------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.prune",
        description="Delete the backups a retention policy does not keep (manifest first).")
    params.add_flow_arguments(p, PARAMETERS)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result, status = cli.run("undercloud-prune", lambda: prune_backups(
        **params.flow_arguments(args, PARAMETERS)),
        interrupted="every backup is complete or clearly incomplete; the next prune finishes "
                    "deleting what this one started to")
    if result is None:
        return status
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for backup in result.kept:
        print(f"{'keep':<12} {backup.backup_id}  ({', '.join(backup.reasons or ())})")
    for backup in result.deleted:
        print(f"{verb:<12} {backup.backup_id}")
    for backup in result.incomplete_deleted:
        print(f"{verb:<12} {backup.backup_id}  (incomplete)")
    return 0


if __name__ == "__main__":
    cli.entry_point(main)
