"""The ``undercloud_restore`` flow, and ``python -m flows.restore`` to run it ad hoc.

Restores a backup's files into a target root (by default a new scratch directory; ``/`` only
with an explicit flag), keeping numeric owners, modes, ACLs, xattrs and SELinux labels,
optionally only some paths; and its databases into a given MariaDB, all of them (with users
and grants) or named ones. Nothing existing is replaced unless asked, and a dry run says what
would be written where. The order of a full undercloud restore is in docs/restore.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from dataclasses import dataclass, replace
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait
from prefect.runtime import flow_run

from blocks.sources import DatabaseSource, SwiftSource
from flows import cli, logs, params
from flows.params import DatabaseParams, Flag, Param
from tasks import restore as steps
from tasks import verify as checks
from undercloud_backup.core import defaults
from undercloud_backup.core.errors import ConfigError
from undercloud_backup.core.manifest import Manifest
from undercloud_backup.files import confine
from undercloud_backup.restore import binlog as replaylog
from undercloud_backup.restore import databases as restoredb
from undercloud_backup.restore import files as restore
from undercloud_backup.restore import plan as restoreplan
from undercloud_backup.restore import target as restore_target
from undercloud_backup.store import session as swift_session
from undercloud_backup.trust import crypto, signing

logs.quiet_expected_errors()  # a refused signature is one line, not a traceback


def _run_name() -> str:
    backup_id = flow_run.parameters.get("backup_id") or "latest"
    mode = "dry-run-" if flow_run.parameters.get("dry_run") else ""
    return f"restore-{mode}{backup_id}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}"


FILES, EXISTING = "What to restore", "Existing files and databases"


@dataclass
class RestoreResult:
    """The flow's result: what was (or, in a dry run, would be) restored, and how."""

    backup_id: str
    container: str
    dry_run: bool
    decryption: str
    warnings: list[str]
    files: restore.FilesResult | None = None
    databases: restoredb.DatabasesRestored | None = None

    def to_dict(self) -> dict:
        """The JSON edge (``python -m flows.restore --json``): its keys are a contract."""
        return {"backup_id": self.backup_id, "container": self.container,
                "dry_run": self.dry_run, "files": self.files.to_dict() if self.files else None,
                "databases": self.databases.to_dict() if self.databases else None,
                "decryption": self.decryption, "warnings": self.warnings}


@flow(name="undercloud_restore", flow_run_name=_run_name, validate_parameters=True)
@params.described
def undercloud_restore(
    backup_id: Annotated[str | None, params.backup_id("restore")] = None,
    container: Annotated[str | None, params.container()] = None,
    files: Annotated[bool, Param("Restore the filesystem archive.",
                                 Flag("--no-files", invert=True, help="do not restore files"),
                                 FILES)] = True,
    target: Annotated[str | None, Param(
        "Directory to restore the files under (default: a new directory "
        "undercloud-restore-BACKUP_ID-RANDOM under staging_dir, created 0700; the result "
        "names it). / means the live system and needs allow_root_target. A named target that "
        "does not exist is created 0755, so services restored into a stand-in root can enter "
        "it; one that exists must be root's and writable by nobody else, and every directory "
        "on the way to it one only root can change.",
        Flag("--target", help="restore files under this directory (default: a new "
                              "<staging-dir>/undercloud-restore-<backup_id>-<random>)"),
        FILES)] = None,
    allow_root_target: Annotated[bool, Param(
        "Allow target / (writing into the live system).",
        Flag("--allow-root-target", help="allow --target / (write into the live system)"),
        FILES)] = False,
    paths: Annotated[list[str] | None, Param(
        "Only restore these absolute paths (as they were on the backed-up host), e.g. "
        "/etc/keystone; default: everything in the archive. Every one is looked up in the "
        "archive before anything is written.",
        Flag("--path", "PATH", help="only restore PATH, e.g. /etc/keystone (repeatable)"),
        FILES)] = None,
    exclude_paths: Annotated[list[str] | None, Param(
        "Leave these alone (absolute, anchored patterns as the backup's --exclude-path: * "
        "does not match /), e.g. /etc/fstab.",
        Flag("--exclude-path", "PATTERN",
             help="leave PATTERN alone (absolute, anchored like the backup's --exclude-path; "
                  "* does not match /; repeatable)"), FILES)] = None,
    reinstalled_host: Annotated[bool, Param(
        "Also leave the host-identity files alone (fstab, machine-id, passwd/group/shadow, "
        "hostname, network configuration; docs/restore.md), unless asked for with paths.",
        Flag("--reinstalled-host",
             help="leave the host-identity files of a reinstalled node alone (fstab, "
                  "machine-id, passwd/group/shadow, hostname, network configuration; see "
                  "docs/restore.md) unless named with --path"), FILES)] = False,
    all_databases: Annotated[bool, Param(
        "Load every database of the dump, with users, roles and grants, into the target "
        "MariaDB.",
        Flag("--all-databases", help="load every database, with users and grants, into the "
                                     "target MariaDB"), FILES)] = False,
    databases: Annotated[list[str] | None, Param(
        "Load only these databases (without users and grants).",
        Flag("--database", "NAME", help="load only this database (repeatable; without users "
                                        "and grants)"), FILES)] = None,
    until: Annotated[str | None, Param(
        "Restore the databases as they were at this UTC time (YYYY-MM-DD HH:MM:SS): the "
        "newest full dump before it, then the shipped binary log up to it; the files as of "
        "the newest backup before it. A time no shipped log reaches is refused before "
        "anything is written.",
        Flag("--until", "'YYYY-MM-DD HH:MM:SS'",
             help="restore the databases to this UTC time through the shipped binary log "
                  "(the files: the newest backup before it)"), FILES)] = None,
    until_gtid: Annotated[str | None, Param(
        "Restore the databases up to this GTID (inclusive), e.g. 0-1-4711.",
        Flag("--until-gtid", "GTID", help="restore the databases up to this GTID, "
                                          "inclusive"), FILES)] = None,
    overwrite: Annotated[bool, Param(
        "Replace existing files and drop and replace existing databases; without it the "
        "restore refuses and names them.",
        Flag("--overwrite", help="replace existing files and databases (otherwise refuse, "
                                 "naming them)"), EXISTING)] = False,
    skip_existing: Annotated[bool, Param(
        "Leave databases that already exist alone and load the others.",
        Flag("--skip-existing", help="leave databases that already exist alone; load the "
                                     "others"), EXISTING)] = False,
    overwrite_empty: Annotated[bool, Param(
        "Replace existing databases that are empty (no tables, views, routines or events), "
        "e.g. the test database of a fresh install.",
        Flag("--overwrite-empty", help="replace existing databases only if they are empty "
                                       "(e.g. test)"), EXISTING)] = False,
    dry_run: Annotated[bool, Param(
        "Say what would be written where (every file, every database); write nothing.",
        Flag("--dry-run", help="list what would be written where; write nothing"))] = False,
    database: Annotated[DatabaseParams, Param(
        "The target MariaDB and how to log in (the backup's Database group; its user needs "
        "to create databases, users and grants).", role="target MariaDB: ")
    ] = DatabaseParams(),  # noqa: B008 - a pydantic group (UI section)
    swift_block: Annotated[str | None, params.SWIFT_BLOCK] = None,
    staging_dir: Annotated[str, Param(
        "Where each segment is spooled and checked before it is used, and where the default "
        "target is created.",
        Flag("--staging-dir", help="where segments are checked before use, and the default "
                                   "target goes"))] = defaults.STAGING_DIR,
    timeout_hours: Annotated[float, params.timeout_hours(
        "Longest the files or the databases may take before the restore's processes are "
        "killed.")] = defaults.RESTORE_TIMEOUT_HOURS,
    load_buffer_pool_mib: Annotated[int | None, Param(
        "MiB of InnoDB buffer pool the target MariaDB gets while the databases load and the "
        "binary log replays, set back afterwards (never lowered; it needs the SUPER "
        "privilege, without which the load goes on with the server's own, said in one line). "
        "Unset: decided, for a server on this host only: the databases' size on the "
        "backed-up server and a quarter more, raising by at most a quarter of the memory "
        "available. 0: leave the server's alone.",
        Flag("--load-buffer-pool-mib", "MIB",
             help="InnoDB buffer pool of the target MariaDB during the load and replay, set "
                  "back after (default: decided from the data and this host's available "
                  "memory, for a local server; 0: leave it alone)"))] = None,
    allowed_signers: Annotated[str | None, params.allowed_signers("restore", (
        "ssh-keygen allowed-signers file: restore only from a manifest signed by a key in it "
        "(checked before anything is written). Unset: the one install configured "
        f"({signing.INSTALLED_ALLOWED_SIGNERS}), if any."))] = None,
    identity: Annotated[str | None, params.identity(
        "Path of the age identity file (private key; never its content) that decrypts an "
        "encrypted backup: the operator's or the break-glass key, on the machine that "
        "restores. Checked against the backup's recipients before anything is read or "
        "written.",
        "that decrypts an encrypted backup (exit 51 unusable, 52 not a recipient of the "
        "backup, 56 an object is not what the manifest says, 59 none given)")] = None,
    check_signature: Annotated[bool, params.CHECK_SIGNATURE] = True,
) -> RestoreResult:
    """Restore an undercloud backup: files into a target root, databases into a MariaDB."""
    want_databases = _check_choices(files, all_databases, databases, overwrite, skip_existing)
    if load_buffer_pool_mib is not None and load_buffer_pool_mib < 0:
        raise ConfigError(detail=f"load_buffer_pool_mib must be 0 or more, not "
                                 f"{load_buffer_pool_mib}")
    # spools, replayed logs and the default target are made in it, as root: never through
    # another user's link or in another user's directory
    staging_dir = confine.secure_staging(staging_dir)
    allowed_signers = signing.allowed_signers_for(allowed_signers, check_signature,
                                                  signing.installed_allowed_signers())
    swift_source = SwiftSource(block=swift_block, container=container)
    # one Keystone login and one check per container for every stage of the run
    with swift_session.shared(swift_source.settings()):
        db_source = database.source()
        manifest = checks.load_manifest(swift_source, backup_id, allowed_signers)
        if until and until_gtid:
            raise ConfigError(detail="choose until or until_gtid, not both")
        # the full dump and the shipped logs to replay, decided before anything is written
        replay_plan, manifest = steps.plan_replay(swift_source, manifest, until, until_gtid,
                                                  allowed_signers, want_databases)
        backup_id = manifest.backup_id
        decryption = crypto.prepare_identity(identity, manifest, required=True)  # exit 51/52/59
        warnings = _warnings(decryption, allowed_signers)
        for warning in warnings:
            get_run_logger().warning("%s", warning)
        request = restore.RestoreRequest(
            backup_id=backup_id, target=target or "",  # empty: a new directory, made when used
            paths=tuple(paths or ()), exclude_paths=tuple(exclude_paths or ()),
            reinstalled_host=reinstalled_host, overwrite=overwrite, skip_existing=skip_existing,
            overwrite_empty=overwrite_empty, allow_root_target=allow_root_target,
            explicit_target=bool(target), dry_run=dry_run, staging_dir=staging_dir,
            timeout_s=timeout_hours * 3600, load_buffer_pool_mib=load_buffer_pool_mib)
        fresh_target = not files or _fresh(request)
        names = None if all_databases else list(databases or [])
        result = RestoreResult(backup_id, swift_source.settings().container, dry_run,
                               decryption.describe() if decryption else "not encrypted", warnings)
        # Every object it will use is in Swift as recorded (HEAD) before anything is written.
        checks.check_stored_objects(swift_source, manifest,
                                    _objects_used(manifest, files, False, all_databases))
        if want_databases:
            dumped = replay_plan.base if replay_plan is not None else manifest
            checks.check_stored_objects(swift_source, dumped,
                                        _objects_used(dumped, False, True, all_databases))
        with crypto.decrypting(decryption):
            _restore(swift_source, db_source, manifest, names, request, result, files=files,
                     want_databases=want_databases, paths=paths, overwrite=overwrite,
                     fresh_target=fresh_target, replay_plan=replay_plan)
        _report_artifact(result)
        _log_done(result)
        return result


# The flow's parameters as declared: its CLI's flags, and the call they make.
PARAMETERS = params.declared(undercloud_restore.fn)


def _restore(swift_source: SwiftSource, db_source: DatabaseSource, manifest: Manifest,
             names: list[str] | None, request: restore.RestoreRequest,
             result: RestoreResult, *,
             files: bool, want_databases: bool, paths: list[str] | None, overwrite: bool,
             fresh_target: bool, replay_plan: replaylog.ReplayPlan | None = None) -> None:
    """Files and databases, side by side where they can be; ``result`` filled in."""
    dry_run = request.dry_run
    if files and not paths and fresh_target:  # room for every file, before anything else
        restore_target.check_free_space(request.target or request.staging_dir, manifest)
    if want_databases and not dry_run:
        # Check the databases can be loaded (and would not be replaced unasked) before any
        # file is written.
        steps.restore_databases.with_options(task_run_name="check-target-databases")(
            swift_source, db_source, manifest, names,
            replace(request, dry_run=True, checking=True), replay_plan)
    if files and want_databases and not paths and (fresh_target or overwrite or dry_run):
        _side_by_side(swift_source, db_source, manifest, names, request, result, replay_plan)
    else:
        if files:
            result.files = steps.restore_files(swift_source, manifest, request)
        if want_databases:
            result.databases = steps.restore_databases(swift_source, db_source, manifest,
                                                       names, request, replay_plan)


def _objects_used(manifest: Manifest, files: bool, want_databases: bool,
                  all_databases: bool) -> list[str]:
    used = [restore.archive_object(manifest)] if files else []
    if want_databases:
        used.append(restoredb.dump_object(manifest))
        users = restoredb.users_object(manifest) if all_databases else None
        used += [users] if users else []
    return [o.name for o in used]


def _warnings(decryption: crypto.Decryption | None, allowed_signers: str | None) -> list[str]:
    warnings = crypto.identity_warnings(decryption)
    if decryption is not None and not allowed_signers:
        warnings.append("the manifest's signature was not checked (no --allowed-signers, "
                        "none installed, or --no-signature-check): anyone who knows the "
                        "public recipients could have written this backup")
    return warnings


def _fresh(request: restore.RestoreRequest) -> bool:
    """Whether the target is missing or empty (refusing / before anything else)."""
    if not request.target:
        return True  # the default one does not exist yet
    real = restore.check_target(request.target, request.allow_root_target)
    return not os.path.isdir(real) or not any(os.scandir(real))


def _log_done(result: RestoreResult) -> None:
    get_run_logger().info(
        "%s backup %s%s%s", "dry run of" if result.dry_run else "restored", result.backup_id,
        f"; files under {result.files.target}" if result.files else "",
        f"; databases {', '.join(result.databases.databases)} into "
        f"{result.databases.where}" if result.databases else "")


def _side_by_side(swift_source: SwiftSource, db_source: DatabaseSource, manifest: Manifest,
                  names: list[str] | None, request: restore.RestoreRequest,
                  result: RestoreResult, replay_plan: replaylog.ReplayPlan | None = None
                  ) -> None:
    """Files and databases at once; if one fails, the other's result is kept and logged.

    tar is mostly I/O, loading the dump mostly MariaDB's CPU; one after the other took their
    sum (benchmarks/RESULTS.md). Only where the files cannot be refused (an empty target, or
    --overwrite): the refusal comes after reading the archive, and must still come before
    any database is loaded; so must the check that every requested path is in the archive.
    """
    futures = {"files": steps.restore_files.submit(swift_source, manifest, request),
               "databases": steps.restore_databases.submit(
                   swift_source, db_source, manifest, names, request, replay_plan)}
    wait(list(futures.values()))
    failed = [part for part, future in futures.items()
              if not future.state.is_completed()]  # failed or crashed
    for part, future in futures.items():
        if part in failed:
            continue
        setattr(result, part, future.result())
        if failed:
            get_run_logger().warning("the %s were restored; the %s failed", part, failed[0])
    if failed:
        futures[failed[0]].result()  # raises that part's error


def _check_choices(files: bool, all_databases: bool, databases: list[str] | None,
                   overwrite: bool, skip_existing: bool) -> bool:
    """Refuse contradictory choices; True when databases are to be restored."""
    if all_databases and databases:
        raise ConfigError(detail="choose all_databases or named databases, not both")
    if overwrite and skip_existing:
        raise ConfigError(detail="choose overwrite or skip_existing, not both")
    want_databases = all_databases or bool(databases)
    if not files and not want_databases:
        raise ConfigError(detail="nothing to restore: enable files, all_databases or databases")
    return want_databases


def _report_artifact(result: RestoreResult) -> None:
    files, databases = result.files, result.databases
    title = "Dry run of the restore" if result.dry_run else "Restore"
    lines = [f"# {title} of `{result.backup_id}`", ""]
    if isinstance(files, restore.FilesPlanned):
        plan = files.plan
        lines.append(f"- Files: {plan.entries} entries would be written under "
                     f"`{files.target}`: {plan.creates} new, {plan.replaces} "
                     f"replacing existing files, {plan.merges} existing directories kept")
        lines += [f"  - would replace `{path}`" for path in plan.conflicts[:20]]
        lines += [f"  - excluded, left alone: `{path}`" for path in plan.kept_paths[:20]]
    elif files:
        lines.append(f"- Files: {files.entries} entries restored under `{files.target}` "
                     f"in {files.seconds} s" + (f" (only {', '.join(files.paths)})"
                                                if files.paths else ""))
    if databases:
        verb = "would load" if databases.dry_run else "loaded"
        lines.append(f"- Databases: {verb} {', '.join(databases.databases)} into MariaDB at "
                     f"`{databases.where}`"
                     + (" with users and grants" if databases.users_and_grants else "")
                     + (f"; replacing {', '.join(databases.existing)}"
                        if databases.existing else "")
                     + (f"; leaving {', '.join(databases.skipped)} as they are"
                        if databases.skipped else ""))
        if databases.comparison is not None:  # loaded: not a dry run
            comparison = databases.comparison
            lines.append(f"- After the load {comparison.matching} of {comparison.compared} "
                         "table(s) match the manifest (rows and checksum)")
            lines += [f"  - {d}" for d in comparison.differences]
    lines.append(f"- Encryption: {result.decryption}")
    lines += [f"- Warning: {w}" for w in result.warnings]
    create_markdown_artifact(key="undercloud-restore", markdown="\n".join(lines) + "\n",
                             description=f"{title} of {result.backup_id}")


# ------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.restore",
        description="Restore an undercloud backup: files into a target root (a new scratch "
                    "directory by default), databases into a MariaDB server.")
    params.add_flow_arguments(p, PARAMETERS)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result, status = cli.run("undercloud-restore", lambda: undercloud_restore(
        **params.flow_arguments(args, PARAMETERS)),
        interrupted="what was written so far stays in place")
    if result is None:
        return status
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    files, databases = result.files, result.databases
    for warning in result.warnings:
        print(f"warning: {warning}")
    if isinstance(files, restore.FilesPlanned):
        for line in restoreplan.iter_plan_lines(files.plan, files.chain):
            print(line)
    elif files:
        print(f"restored {files.entries} entries under {files.target}")
    if databases:
        verb = "would load" if databases.dry_run else "loaded"
        print(f"{verb} database(s) {', '.join(databases.databases) or '(none)'} into "
              f"{databases.where}" + (f" (replacing {', '.join(databases.existing)})"
                                      if databases.existing else "")
              + (f" (left alone: {', '.join(databases.skipped)})"
                 if databases.skipped else ""))
    if result.dry_run:
        print(dry_run_summary(result))
    return 0


def dry_run_summary(result: RestoreResult) -> str:
    """A dry run's last line: what a restore would write where, in one line."""
    parts = []
    files, databases = result.files, result.databases
    if isinstance(files, restore.FilesPlanned):
        plan = files.plan
        parts.append(f"{plan.entries} entries would be written under {files.target} "
                     f"({plan.creates} new, {plan.replaces} replacing existing files, "
                     f"{plan.kept} left alone)")
    if databases:
        parts.append(f"database(s) {', '.join(databases.databases) or '(none)'} would be "
                     f"loaded into {databases.where}"
                     + (f", replacing {', '.join(databases.existing)}"
                        if databases.existing else ""))
    return f"dry run of backup {result.backup_id}: nothing was written; " + "; ".join(parts)


if __name__ == "__main__":
    cli.entry_point(main)
