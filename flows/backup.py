"""The ``undercloud_backup`` flow, and ``python -m flows.backup`` to run it ad hoc.

The operator's procedure: plan what to back up, check there is room, dump the databases and
archive the files (both streamed into Swift, side by side), then write the manifest that makes
the backup complete, and leave a summary in the run's artifacts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.exceptions import TerminationSignal
from prefect.states import Failed, State

from blocks.sources import SwiftSource
from flows import cli, fleet_uploads, interrupt, logs, params
from flows.params import (
    AdvancedParams,
    DatabaseParams,
    RetentionParams,
    SwiftParams,
    WhatToBackUp,
)
from tasks import backup as stages
from tasks.prune import apply_retention
from undercloud_backup.backup import run as backup
from undercloud_backup.backup import stages as stages_lib
from undercloud_backup.backup.stages import Logger
from undercloud_backup.core import defaults, progress
from undercloud_backup.core.errors import BackupError, ConfigError
from undercloud_backup.core.manifest import Manifest, StoredObject
from undercloud_backup.core.sizes import format_size
from undercloud_backup.files.archive import PathPlan
from undercloud_backup.store import catalogue, tempurl
from undercloud_backup.store import session as swift_session
from undercloud_backup.store.retention import RetentionPolicy
from undercloud_backup.store.space import SpaceReport
from undercloud_backup.store.swift import SwiftSettings
from undercloud_backup.trust import crypto, signing

logs.quiet_expected_errors()


def _run_name() -> str:
    return f"backup-{socket.gethostname()}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}"


def _backup_identity() -> tuple[str, str]:
    """A backup id and time that stay the same when this flow run is retried."""
    run = get_run_context().flow_run
    created = (run.created or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    backup_id = backup.new_backup_id(socket.gethostname(), created, run.id.hex)
    return backup_id, created.isoformat(timespec="seconds")


@dataclass
class BackupSummary:
    """What a run did (or, dry, would do): the flow's result, which the CLI prints and the
    artifact shows; a dict (:meth:`to_dict`) only as JSON (the CLI's --json, the openstack
    command's columns)."""

    backup_id: str
    container: str
    dry_run: bool
    paths: list[str]
    absent: list[str]
    warnings: list[str]
    manifest: str | None = None
    objects: list[StoredObject] = field(default_factory=list)
    kind: str = "full"
    parent: str | None = None
    chain: list[str] | None = None
    level: int | None = None
    full_reason: str | None = None
    partial_database: str | None = None
    # The backups retention deleted; None when it did not run or failed (``prune_failed``).
    pruned: list[str] | None = None
    prune_failed: bool = False
    signing_key: str | None = None
    space: SpaceReport | None = None
    # "dump" (a full dump) or "binlog" (the binary log since the last backup); None: no
    # databases in this backup.
    database_kind: str | None = None

    def to_dict(self) -> dict:
        """As JSON: only the keys a run of this kind has always had."""
        data: dict = {"backup_id": self.backup_id, "container": self.container,
                      "manifest": self.manifest,
                      "objects": [o.to_dict() for o in self.objects], "dry_run": self.dry_run,
                      "paths": list(self.paths), "absent": list(self.absent),
                      "kind": self.kind, "parent": self.parent,
                      "warnings": list(self.warnings)}
        if self.chain is not None:
            data["chain"] = list(self.chain)
        if self.dry_run:
            data["space"] = self.space.to_dict() if self.space else None
            return data
        data.update(level=self.level, full_reason=self.full_reason,
                    partial_database=self.partial_database, signing_key=self.signing_key,
                    database_kind=self.database_kind)
        if self.pruned is not None or self.prune_failed:
            data["pruned"] = self.pruned
        return data


@flow(name="undercloud_backup", flow_run_name=_run_name, validate_parameters=True)
def undercloud_backup(
    dry_run: bool = False,
    what: WhatToBackUp = WhatToBackUp(),  # noqa: B008 - immutable defaults the UI shows
    database: DatabaseParams = DatabaseParams(),  # noqa: B008
    swift: SwiftParams = SwiftParams(),  # noqa: B008
    retention: RetentionParams = RetentionParams(),  # noqa: B008
    advanced: AdvancedParams = AdvancedParams(),  # noqa: B008
) -> BackupSummary | State:
    """Back up the undercloud's databases and files into Swift, manifest last.

    Args:
        dry_run: Plan and check space only; nothing is written.
        what: What to back up: the default paths, plus and minus yours; or the databases only.
        database: Which MariaDB, and how to log in (default: the option file ~/.my.cnf).
        swift: Where the backup goes: the Swift container, and how long Swift may take.
        retention: What to delete once the backup is complete (manifest first).
        advanced: Staging, privileges, compression and retries: the defaults suit most runs.
    """
    run = _Run()
    with run.sessions:  # the run's Swift session, closed after any clean-up that needs it
        try:
            return _backup(run, dry_run, what, database, swift, retention, advanced)
        except BackupError as error:
            if not cli.FROM_CLI:  # the UI's words: add_paths, not --add-path
                error.args = (params.ui_language(str(error)),)
            # The cause is the run's ERROR line and its state's message, as they are; the
            # caller (the CLI, the engine under a worker) gets the error raised all the same.
            get_run_logger().error("%s", error)
            return Failed(message=str(error), data=error)
        except (KeyboardInterrupt, TerminationSignal) as signalled:
            why = "SIGINT" if isinstance(signalled, KeyboardInterrupt) else "SIGTERM"
            get_run_logger().error(interrupt.stop(why, run.futures, run.swift_source,
                                                  run.backup_id))
            raise


class _Run:
    """What an interruption needs to clean up after this run."""

    def __init__(self) -> None:
        self.futures: list = []
        self.swift_source: SwiftSource | None = None
        self.backup_id: str | None = None
        self.sessions = contextlib.ExitStack()


def _request(what: WhatToBackUp, swift: SwiftParams,
             advanced: AdvancedParams) -> backup.BackupRequest:
    backup_id, created_at = _backup_identity()
    # Once install configured recipients, plain text needs --no-encryption REASON (58 / 2 here)
    encryption = crypto.require_encryption(advanced.recipients_file, advanced.no_encryption,
                                           crypto.installed_recipients(),
                                           crypto.installed_opt_out())
    return backup.BackupRequest(
        backup_id=backup_id, created_at=created_at, hostname=socket.gethostname(),
        root=what.root, add_paths=tuple(what.add_paths),
        exclude_paths=tuple(what.exclude_paths),
        include_files=not (what.db_only or what.binlogs_only), binlogs_only=what.binlogs_only,
        exclude_tables=tuple(what.exclude_tables),
        staging_dir=advanced.staging_dir, allow_unreadable=advanced.allow_unreadable,
        allow_partial_database=advanced.allow_partial_database,
        compression_level=advanced.compression_level,
        table_checksums=advanced.table_checksums, privileged=advanced.privileged,
        segment_size=params.segment_size_bytes(swift.segment_size),
        recipients_file=encryption.recipients_file, plain_reason=encryption.plain_reason,
        encryption_opted_out=encryption.opted_out,
        # Once install made a signing key, a run that names none is signed with it.
        signing_key=advanced.signing_key or signing.installed_signing_key(),
        full=what.full, full_every_s=params.duration_seconds(what.full_every))


def _swift_source(swift: SwiftParams) -> SwiftSource:
    return SwiftSource(block=swift.swift_block, container=swift.container,
                       segment_size=swift.segment_size, retries=swift.swift_retries,
                       timeout=swift.swift_timeout, retry_budget_s=swift.swift_retry_budget)


def _dry_run(summary: BackupSummary, request: backup.BackupRequest, plan: PathPlan,
             space: SpaceReport, settings: SwiftSettings, logger: Logger) -> BackupSummary:
    """What a dry run says: the level it would take, the space it would need; nothing written."""
    if plan.included:  # which level it would be, said in the log
        level, _ = stages_lib.decide_level(request, plan, settings, logger)
        summary.kind, summary.parent, summary.chain = level.kind, level.parent, list(level.chain)
    logger.info("dry run: would write %s/%s/ (%s of data), nothing written",
                settings.container, request.backup_id,
                format_size(space.database_bytes + space.files_bytes))
    summary.space = space
    return summary


def _backup(run: _Run, dry_run: bool, what: WhatToBackUp, database: DatabaseParams,
            swift: SwiftParams, retention: RetentionParams, advanced: AdvancedParams
            ) -> BackupSummary:
    logger = get_run_logger()
    started = time.monotonic()
    request = _request(what, swift, advanced)
    backup_id = request.backup_id
    warnings = _check_keys(request)  # a bad recipients file or signing key fails before anything
    db_source = database.source()
    swift_source = _swift_source(swift)
    settings = swift_source.settings()  # a bad container name fails here, before anything
    # One Keystone login and one check per container for every stage (tasks are threads of
    # this process); it logs in when the space check first needs Swift.
    run.sessions.enter_context(swift_session.shared(settings))
    retry = {"retries": advanced.task_retries}
    # An impossible policy fails now, before anything is written.
    policy = RetentionPolicy(keep_last=retention.keep_last, keep_daily=retention.keep_daily,
                             keep_weekly=retention.keep_weekly) if retention.prune else None

    plan = backup.plan_files(request)
    for path in plan.absent:
        logger.warning("not present, not archived: %s (under %s)", path, plan.root)
    space = stages.check_space.with_options(**retry)(request, plan, db_source, swift_source)
    request = request.with_space(space)  # the segment sizes, decided once
    summary = BackupSummary(backup_id=backup_id, container=settings.container, dry_run=dry_run,
                            paths=list(plan.included), absent=list(plan.absent),
                            warnings=warnings)
    if dry_run:
        return _dry_run(summary, request, plan, space, settings, logger)

    run.swift_source, run.backup_id = swift_source, backup_id
    # Fed by the streams with what they have stored (compressed), against the uncompressed
    # estimate: a lower bound until the end, which is 100 %.
    progress.start_run(space.database_bytes + space.files_bytes)
    with fleet_uploads.upload_slot():  # in a fleet: at most UCB_FLEET_UPLOADS nodes upload
        run.futures.append(stages.dump_databases.with_options(**retry).submit(
            request, db_source, swift_source))
        if request.include_files:
            run.futures.append(stages.archive_paths.with_options(**retry).submit(
                request, plan, swift_source))
        results = _results(run.futures)
    progress.finish_run()
    files = results[1] if request.include_files else None

    manifest = backup.build_manifest(request, space, results[0], files,
                                     flow_run_id=str(get_run_context().flow_run.id))
    name = stages.write_manifest.with_options(**retry)(manifest, swift_source,
                                                       request.signing_key)
    summary.manifest, summary.objects = name, list(manifest.objects)
    summary.kind, summary.parent = manifest.kind or "full", manifest.parent
    summary.chain, summary.level = list(manifest.chain), manifest.level
    summary.full_reason = manifest.full_reason
    summary.partial_database = manifest.mariadb.partial_note() if manifest.mariadb else None
    summary.database_kind = manifest.mariadb.kind if manifest.mariadb else None
    if policy is not None:
        summary.pruned = _prune(swift_source, policy, backup_id, retry)
        summary.prune_failed = summary.pruned is None
    summary.signing_key = request.signing_key
    _summary_artifact(summary, manifest, time.monotonic() - started,
                      _download_links(swift_source, manifest, swift.link_lifetime_hours))
    for warning in warnings:  # said again last, after the run's other lines
        logger.warning("%s", warning)
    return summary


def _results(futures: list) -> list:
    """Every stream's result once all have ended; if any failed, the error of the one that
    failed first (the other may only have followed it: the same Swift outage, a stage it
    was waiting on), whatever the order they were started in."""
    from prefect.futures import wait

    wait(futures)
    failed = [f for f in futures if not f.state.is_completed()]
    if failed:
        min(failed, key=lambda f: f.state.timestamp).result()
    return [future.result() for future in futures]


def _download_links(swift_source: SwiftSource, manifest: Manifest,
                    hours: float = defaults.LINK_LIFETIME_HOURS) -> str:
    """The artifact's TempURLs, valid ``hours``, for an encrypted backup; for one in plain text
    how to download it with credentials. A failure costs the links, never the backup."""
    settings = swift_source.settings()
    if not crypto.is_encrypted(manifest):
        return tempurl.plain_text_markdown(settings.container, manifest.backup_id)
    try:
        with swift_session.open_store(settings) as store:
            return tempurl.links_markdown(
                tempurl.download_links(store, settings.container, manifest,
                                       lifetime=max(1, round(hours * 3600))))
    except BackupError as error:
        get_run_logger().warning("no download links in the artifact: %s", error)
        return ""


def _check_keys(request: backup.BackupRequest) -> list[str]:
    """Parse the recipients file (exit 50) and sign a probe with the key (exit 57) now; the
    warnings the artifact and the CLI repeat: a break-glass identity still on the node."""
    logger = get_run_logger()
    if request.recipients_file is not None:
        crypto.load_recipients(request.recipients_file)
    else:
        logger.warning("this backup is stored in plain text: %s", request.plain_reason)
    if request.signing_key is not None:
        signing.sign_manifest(b"probe", request.signing_key)
    elif (why := signing.unsigned_warning()) is not None:
        logger.warning("%s", why)
    # Never fails the backup: the night's backup matters more than the reminder.
    warnings = [why] if (why := crypto.break_glass_warning()) else []
    for warning in warnings:
        logger.warning("%s", warning)
    return warnings


def _prune(swift_source: SwiftSource, policy: RetentionPolicy, backup_id: str,
           retry: dict) -> list[str] | None:
    """Apply retention after a complete backup; a failed prune does not fail the backup."""
    state = apply_retention.with_options(**retry)(swift_source, policy, return_state=True)
    if not state.is_completed():
        get_run_logger().error("backup %s is complete, but pruning older backups failed: %s",
                               backup_id, state.message)
        return None
    result = state.result()
    return result.removed


def _summary_artifact(summary: BackupSummary, manifest: Manifest, seconds: float,
                      downloads: str = "") -> None:
    container = summary.container
    rows = "\n".join(
        f"| `{o.name}` | {format_size(o.size)} | {len(o.segments) or 'plain'} "
        f"| `{o.sha256[:16]}…` |" for o in manifest.objects)
    paths, mariadb = manifest.paths, manifest.mariadb
    partial = f"\n- **{summary.partial_database}**" if summary.partial_database else ""
    warnings = "".join(f"\n**WARNING: {w}**\n" for w in summary.warnings)
    changed = len(paths.changed) + len(paths.vanished) if paths else 0
    markdown = f"""# Undercloud backup `{summary.backup_id}`

Complete: manifest `{container}/{summary.manifest}` written in {seconds:.0f} s.
{warnings}
| object | size | segments | sha256 |
|---|---|---|---|
{rows}

- Databases ({mariadb.version if mariadb else 'not dumped'}): \
{', '.join(mariadb.databases if mariadb else {})}{partial}
- Paths archived: {', '.join(paths.included if paths else []) or 'none'}
- Absent: {', '.join(paths.absent if paths else []) or 'none'}; excluded: \
{', '.join(paths.excluded if paths else []) or 'none'}
- Changed or vanished while read: {changed}
- Pruned: {_pruned_text([] if summary.pruned is None and not summary.prune_failed
                        else summary.pruned)}
- Encryption: {_encryption_text(manifest.encryption)}
- Signature: {_signature_text(summary.signing_key)}

- Files: {_kind_text(manifest)}

{_by_hand_text(container, summary.backup_id, manifest)}
"""
    create_markdown_artifact(key="undercloud-backup", markdown=markdown + "\n" + downloads,
                             description=f"Backup {summary.backup_id}")


def _kind_text(manifest: Manifest) -> str:
    if not manifest.paths:
        return "none (databases only)"
    if manifest.kind != "incremental":
        reason = manifest.full_reason
        return "full (tar level 0)" + (f": {reason}" if reason else "")
    return (f"incremental level {manifest.level} on `{manifest.parent}`; restores with "
            f"its chain {' > '.join(f'`{b}`' for b in manifest.chain)} first")


_TAR_OPTIONS = "--xattrs --xattrs-include='*' --acls --numeric-owner -p"


def _by_hand_text(container: str, backup_id: str, manifest: Manifest) -> str:
    """The artifact's restore without the tool: one download and tar per level of a chain."""
    if manifest.kind != "incremental":
        return ("Restore without this tool (docs/by-hand.md, \"The whole backup\"): "
                f"`swift download {container} --prefix {backup_id}/`, then, as root, "
                "`T=$(mktemp -d)` and `zstd -dc filesystem.tar.zst | confined_tar \"$T\" "
                f"{_TAR_OPTIONS}` (`confined_tar`, defined there, keeps a forged archive's "
                "device nodes and links inside the new directory; never plain `tar -x`, never a "
                "fixed name in /var/tmp) and "
                "`zstd -dc mariadb-all-databases.sql.zst | mariadb --sandbox --local-infile=0`, "
                "then the same for `mariadb-users-grants.sql.zst` (encrypted objects go through "
                "`age -d -i IDENTITY` first).")
    levels = [*manifest.chain, backup_id]
    steps = "\n".join(
        f"{n}. `swift download {container} {level}/filesystem.tar.zst -o - | zstd -dc | "
        f"confined_tar \"$T\" --listed-incremental=/dev/null {_TAR_OPTIONS} --same-owner`"
        for n, level in enumerate(levels, 1))
    return ("Restore without this tool (docs/by-hand.md): the files are an incremental, so "
            "extract the full and every level, in this order, into the same new empty target "
            "(`T=$(mktemp -d)`, as root; tar applies each level's deletions), each confined to "
            "the target: plain `tar -x` is not safe across levels (`confined_tar`: "
            "docs/by-hand.md, \"Incremental backups, by "
            f"hand\"):\n\n{steps}\n\nthen the database from this backup alone (a full dump "
            f"every time): `zstd -dc {backup_id}/mariadb-all-databases.sql.zst"
            " | mariadb --sandbox --local-infile=0`, then the same for "
            "mariadb-users-grants.sql.zst.")


def _encryption_text(section: dict[str, Any] | None) -> str:
    if not section or section.get("format") != "age":
        why = (section or {}).get("reason") or "no --recipients-file"
        return f"**NONE: stored in plain text** ({why})"
    return ("age, to " + ", ".join(f"`{r}`" for r in section["recipients"])
            + " (decrypt as docs/by-hand.md says)")


def _signature_text(signing_key: str | None) -> str:
    if not signing_key:
        return "**NONE**: the manifest is not signed (no signing key given or installed)"
    return (f"`manifest.json.sig` and `SHA256SUMS.sig`, signed with `{signing_key}` "
            "(ssh-keygen -Y verify against the allowed signers: docs/by-hand.md)")


def _pruned_text(pruned: list[str] | None) -> str:
    if pruned is None:
        return "FAILED (see the log); older backups were left in place"
    return ", ".join(f"`{b}`" for b in pruned) or "nothing"


# ------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.backup",
        description="Back up this undercloud (MariaDB and files) into Swift.")
    p.add_argument("--dry-run", action="store_true",
                   help="show the plan and check space; write nothing")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (backup_id, container, manifest, objects)")
    p.add_argument("--list", action="store_true", help="list complete backups and exit")
    for group in params.GROUPS.values():
        params.add_arguments(p, group)
    return p


def _list(args: argparse.Namespace) -> int:
    settings = SwiftSource(block=args.swift_block, container=args.container).settings()
    with swift_session.open_store(settings) as store:
        entries = catalogue.describe(store, settings.container,
                                     catalogue.list_backups(store, settings.container))
    if args.json:
        print(json.dumps({"container": settings.container,
                          "backups": [e.to_dict() for e in entries]}))
    else:
        for entry in entries:
            kind = entry.kind or "?"
            parent = f"  parent {entry.parent}" if entry.parent else ""
            database = f"  database {entry.database_kind}" if entry.database_kind else ""
            if entry.partial_database:  # only a dump can be partial: said once
                database = "  PARTIAL database dump"
            print(f"{entry.last_modified}  {entry.backup_id}  {kind}{parent}{database}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        _, status = cli.run("undercloud-backup", lambda: _list(args))
        return status
    try:  # a value out of range (--link-lifetime-hours 0): one line, as argparse's
        groups = {key: params.from_args(args, group) for key, group in params.GROUPS.items()}
    except ConfigError as error:
        print(f"undercloud-backup: error: {error}", file=sys.stderr)
        return error.exit_code
    summary, status = cli.run("undercloud-backup",
                              lambda: undercloud_backup(dry_run=args.dry_run, **groups))
    if summary is None:
        return status
    if args.json:
        data = summary.to_dict()
        print(json.dumps({**{k: data[k] for k in
                             ("backup_id", "container", "manifest", "objects", "dry_run",
                              "kind", "parent")},
                          "pruned": data.get("pruned"),
                          "partial_database": data.get("partial_database"),
                          "database_kind": data.get("database_kind"),
                          "warnings": data.get("warnings") or [],
                          # a dry run's plan: what would be archived, and the space check
                          **({k: data.get(k) for k in ("paths", "absent", "space")}
                             if args.dry_run else {})}))
    elif summary.manifest:
        kind = summary.kind if not summary.parent else f"incremental on {summary.parent}"
        print(f"backup {summary.backup_id} ({kind}) complete: "
              f"{summary.container}/{summary.manifest}")
        if summary.partial_database:  # loudly, last, with the logs
            sys.stdout.flush()
            print(f"WARNING: {summary.partial_database}", file=sys.stderr)
    else:
        print(f"dry run: backup {summary.backup_id} would go to {summary.container}")
    sys.stdout.flush()
    for warning in summary.warnings:  # last, whatever the output's form
        print(f"WARNING: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.entry_point(main)
