"""The ``undercloud_backup`` flow, and ``python -m flows.backup`` to run it ad hoc.

The operator's procedure: plan what to back up, check there is room, dump the databases and
archive the files (both streamed into Swift, side by side), then write the manifest that makes
the backup complete, and leave a summary in the run's artifacts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context

from blocks.sources import DatabaseSource, SwiftSource
from flows import cli
from tasks import backup as stages
from tasks.prune import apply_retention
from undercloud_backup import backup
from undercloud_backup.retention import RetentionPolicy
from undercloud_backup.sizes import format_size, parse_size


def _run_name() -> str:
    return f"backup-{socket.gethostname()}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}"


def _backup_identity() -> tuple[str, str]:
    """A backup id and time that stay the same when this flow run is retried."""
    run = get_run_context().flow_run
    created = (run.created or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    backup_id = backup.new_backup_id(socket.gethostname(), created, run.id.hex)
    return backup_id, created.isoformat(timespec="seconds")


@flow(name="undercloud_backup", flow_run_name=_run_name, validate_parameters=True)
def undercloud_backup(
    container: str | None = None,
    add_paths: list[str] | None = None,
    exclude_paths: list[str] | None = None,
    db_only: bool = False,
    root: str = "/",
    segment_size: str | None = None,
    db_block: str | None = None,
    db_defaults_file: str | None = None,
    db_host: str | None = None,
    db_port: int | None = None,
    db_user: str | None = None,
    db_socket: str | None = None,
    swift_block: str | None = None,
    staging_dir: str = "/var/tmp",
    allow_unreadable: bool = False,
    compression_level: int = 3,
    table_checksums: bool = True,
    swift_retries: int | None = None,
    task_retries: int = 2,
    privileged: bool = False,
    prune: bool = True,
    keep_last: int = 3,
    keep_daily: int = 7,
    keep_weekly: int = 4,
    dry_run: bool = False,
) -> dict:
    """Back up the undercloud's databases and files into Swift, manifest last.

    Args:
        container: Swift container for the backup (default: the Swift block's, or
            undercloud-backups); segments go to <container>_segments.
        add_paths: Extra absolute paths to archive, besides /etc, /root, /home/stack,
            /srv/node and /var/lib/glance/images. A missing added path is an error.
        exclude_paths: Absolute paths or patterns (anchored at root) to leave out,
            e.g. /home/stack/.cache or /srv/node/*/tmp.
        db_only: Only dump the databases; archive no files.
        root: Directory the paths are resolved under: / on the undercloud, a scratch tree
            in tests.
        segment_size: Objects larger than this become Static Large Objects of segments this
            big, e.g. 64MiB or 1GiB (default: the Swift block's, or chosen per stream from
            its estimated size: 64MiB, more for a stream that would need over 900 segments).
        db_block: Name of a saved MariaDB Connection block (otherwise the option file).
        db_defaults_file: MariaDB option file with a [client] group (default ~/.my.cnf).
        db_host: Database host, over the block or option file.
        db_port: Database TCP port, over the block or option file.
        db_user: Database user, over the block or option file.
        db_socket: Database unix socket, over the block or option file.
        swift_block: Name of a saved Swift Backup Target block (otherwise the OS_* environment).
        staging_dir: Where segments are spooled on their way to Swift (two per stream).
        allow_unreadable: Complete the backup even if some files could not be read; they are
            listed in the manifest.
        compression_level: zstd level (1-19) of both streams; 3 is the zstd default, 1 takes
            about half the CPU for 10-20 % more bytes on text (images do not compress).
        table_checksums: Record CHECKSUM TABLE of every table besides its row count, read
            while the dump runs (on a second connection: the database user needs two);
            verify then compares both. Off: row counts only.
        swift_retries: Retries of one Swift request before a stage fails (default 5).
        task_retries: Retries of a stage after a transient failure (Swift or database down).
        privileged: Run tar and the dump as root through the project's sudo wrappers (a
            worker running as an unprivileged user); the database is then reached as root
            through its unix socket.
        prune: Once the backup is complete, delete the backups the retention policy below
            no longer keeps (manifest first), and incomplete ones untouched for a day.
        keep_last: Retention: keep the N most recent complete backups.
        keep_daily: Retention: keep the newest backup of each of the last N days that have
            backups (UTC).
        keep_weekly: Retention: keep the newest backup of each of the last N ISO weeks that
            have backups.
        dry_run: Plan and check space only; nothing is written.
    """
    logger = get_run_logger()
    started = time.monotonic()
    backup_id, created_at = _backup_identity()
    request = backup.BackupRequest(
        backup_id=backup_id, created_at=created_at, hostname=socket.gethostname(),
        root=root, add_paths=tuple(add_paths or ()), exclude_paths=tuple(exclude_paths or ()),
        include_files=not db_only, staging_dir=staging_dir, allow_unreadable=allow_unreadable,
        compression_level=compression_level, table_checksums=table_checksums,
        privileged=privileged)
    db_source = DatabaseSource(block=db_block, defaults_file=db_defaults_file, host=db_host,
                               port=db_port, user=db_user, socket=db_socket)
    swift_source = SwiftSource(block=swift_block, container=container,
                               segment_size=segment_size, retries=swift_retries)
    retry = {"retries": task_retries}
    # An impossible policy fails now, before anything is written.
    policy = RetentionPolicy(keep_last=keep_last, keep_daily=keep_daily,
                             keep_weekly=keep_weekly) if prune else None

    plan = backup.plan_files(request)
    for path in plan.absent:
        logger.warning("not present, not archived: %s (under %s)", path, plan.root)
    space = stages.check_space.with_options(**retry)(request, plan, db_source, swift_source)
    settings = swift_source.settings()
    summary = {"backup_id": backup_id, "container": settings.container,
               "manifest": None, "objects": [], "dry_run": dry_run,
               "paths": list(plan.included), "absent": list(plan.absent)}
    if dry_run:
        logger.info("dry run: would write %s/%s/ (%s of data), nothing written",
                    settings.container, backup_id,
                    format_size(space["database_bytes"] + space["files_bytes"]))
        summary["space"] = space
        return summary

    db_future = stages.dump_databases.with_options(**retry).submit(
        request, db_source, swift_source, space.get("database_segment_size"))
    fs_future = (stages.archive_paths.with_options(**retry).submit(
        request, plan, swift_source, space.get("files_segment_size"))
        if request.include_files else None)
    database = db_future.result()
    files = fs_future.result() if fs_future is not None else None

    manifest = backup.build_manifest(request, plan, backup.SpaceReport(
        **{k: v for k, v in space.items() if k != "server_version"}), database, files,
        flow_run_id=str(get_run_context().flow_run.id))
    name = stages.write_manifest.with_options(**retry)(manifest, swift_source)
    summary.update(manifest=name, objects=manifest["objects"])
    if policy is not None:
        summary["pruned"] = _prune(swift_source, policy, backup_id, retry)
    _summary_artifact(summary, manifest, time.monotonic() - started)
    return summary


def _prune(swift_source: SwiftSource, policy: RetentionPolicy, backup_id: str,
           retry: dict) -> list[str] | None:
    """Apply retention after a complete backup; a failed prune does not fail the backup."""
    state = apply_retention.with_options(**retry)(swift_source, policy, return_state=True)
    if not state.is_completed():
        get_run_logger().error("backup %s is complete, but pruning older backups failed: %s",
                               backup_id, state.message)
        return None
    result = state.result()
    return [b["backup_id"] for b in result["deleted"] + result["incomplete_deleted"]]


def _summary_artifact(summary: dict, manifest: dict, seconds: float) -> None:
    container = summary["container"]
    rows = "\n".join(
        f"| `{o['name']}` | {format_size(o['size'])} | {len(o['segments']) or 'plain'} "
        f"| `{o['sha256'][:16]}…` |" for o in manifest["objects"])
    paths = manifest["paths"] or {}
    mariadb = manifest["mariadb"] or {}
    markdown = f"""# Undercloud backup `{summary['backup_id']}`

Complete: manifest `{container}/{summary['manifest']}` written in {seconds:.0f} s.

| object | size | segments | sha256 |
|---|---|---|---|
{rows}

- Databases ({mariadb.get('version', 'not dumped')}): {', '.join(mariadb.get('databases', {}))}
- Paths archived: {', '.join(paths.get('included', [])) or 'none'}
- Absent: {', '.join(paths.get('absent', [])) or 'none'}; excluded: \
{', '.join(paths.get('excluded', [])) or 'none'}
- Changed or vanished while read: {len(paths.get('changed', [])) + len(paths.get('vanished', []))}
- Pruned: {_pruned_text(summary.get('pruned', []))}

Restore without this tool (see README): `swift download {container} --prefix \
{summary['backup_id']}/`, then `zstd -dc filesystem.tar.zst | tar -x --xattrs \
--xattrs-include='*' --acls --numeric-owner -C /target` and \
`zstd -dc mariadb-all-databases.sql.zst | mariadb`.
"""
    create_markdown_artifact(key="undercloud-backup", markdown=markdown,
                             description=f"Backup {summary['backup_id']}")


def _pruned_text(pruned: list[str] | None) -> str:
    if pruned is None:
        return "FAILED (see the log); older backups were left in place"
    return ", ".join(f"`{b}`" for b in pruned) or "nothing"


# ------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.backup",
        description="Back up this undercloud (MariaDB and files) into Swift.")
    p.add_argument("--add-path", action="append", default=[], metavar="PATH",
                   help="also archive PATH (repeatable; must exist)")
    p.add_argument("--exclude-path", action="append", default=[], metavar="PATTERN",
                   help="leave out PATH or pattern, anchored at --root (repeatable)")
    p.add_argument("--db-only", action="store_true", help="only dump the databases")
    p.add_argument("--container", help="Swift container (default undercloud-backups)")
    p.add_argument("--segment-size", type=_size,
                   help="SLO segment size, e.g. 64MiB, 1GiB (default: per stream, 64MiB or more "
                        "so that no object needs over 900 segments)")
    p.add_argument("--root", default="/", help="resolve every path under this directory")
    p.add_argument("--dry-run", action="store_true",
                   help="show the plan and check space; write nothing")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (backup_id, container, manifest, objects)")
    p.add_argument("--list", action="store_true", help="list complete backups and exit")
    cli.add_database_arguments(p)
    p.add_argument("--swift-block", help="saved Swift Backup Target block (default: OS_* env)")
    p.add_argument("--staging-dir", default="/var/tmp", help="where segments are spooled")
    p.add_argument("--allow-unreadable", action="store_true",
                   help="complete even if some files cannot be read (they are listed)")
    p.add_argument("--compression-level", type=int, default=3, choices=range(1, 20),
                   metavar="1-19", help="zstd level of both streams (default 3)")
    p.add_argument("--no-table-checksums", action="store_true",
                   help="record row counts only, not CHECKSUM TABLE (less database CPU; "
                        "verify then compares counts only)")
    p.add_argument("--swift-retries", type=int, help="retries of one Swift request")
    p.add_argument("--task-retries", type=int, default=2,
                   help="retries of a stage after a transient failure")
    p.add_argument("--no-prune", action="store_true",
                   help="do not apply the retention policy after the backup")
    p.add_argument("--keep-last", type=int, default=3, metavar="N",
                   help="retention: keep the N most recent backups (default 3)")
    p.add_argument("--keep-daily", type=int, default=7, metavar="D",
                   help="retention: keep the newest backup of each of the last D days (7)")
    p.add_argument("--keep-weekly", type=int, default=4, metavar="W",
                   help="retention: keep the newest backup of each of the last W weeks (4)")
    p.add_argument("--privileged", action="store_true",
                   help="run tar and the dump through the sudo wrappers (unprivileged worker)")
    return p


def _size(text: str) -> str:
    parse_size(text)  # reject bad sizes at parse time, with argparse's message
    return text


def _list(args: argparse.Namespace) -> int:
    from undercloud_backup import swift

    settings = SwiftSource(block=args.swift_block, container=args.container).settings()
    entries = swift.list_backups(swift.connect(settings), settings.container)
    if args.json:
        print(json.dumps({"container": settings.container,
                          "backups": [e.as_dict() for e in entries]}))
    else:
        for entry in entries:
            print(f"{entry.last_modified}  {entry.backup_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        _, status = cli.run("undercloud-backup", lambda: _list(args))
        return status
    summary, status = cli.run("undercloud-backup", lambda: undercloud_backup(
        container=args.container, add_paths=args.add_path, exclude_paths=args.exclude_path,
        db_only=args.db_only, root=args.root, segment_size=args.segment_size,
        **cli.database_arguments(args), swift_block=args.swift_block,
        staging_dir=args.staging_dir, allow_unreadable=args.allow_unreadable,
        compression_level=args.compression_level, table_checksums=not args.no_table_checksums,
        swift_retries=args.swift_retries, task_retries=args.task_retries,
        privileged=args.privileged, prune=not args.no_prune, keep_last=args.keep_last,
        keep_daily=args.keep_daily, keep_weekly=args.keep_weekly, dry_run=args.dry_run),
        interrupted="nothing was committed")
    if summary is None:
        return status
    if args.json:
        print(json.dumps({**{k: summary[k] for k in
                             ("backup_id", "container", "manifest", "objects", "dry_run")},
                          "pruned": summary.get("pruned")}))
    elif summary["manifest"]:
        print(f"backup {summary['backup_id']} complete: "
              f"{summary['container']}/{summary['manifest']}")
    else:
        print(f"dry run: backup {summary['backup_id']} would go to {summary['container']}")
    return 0


if __name__ == "__main__":
    cli.entry_point(main)
