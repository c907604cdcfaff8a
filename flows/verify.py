"""The ``verify_backup`` flow, and ``python -m flows.verify`` to run it ad hoc.

A backup is worth what its restore is worth. This flow reads a backup back the way a restore
would: every object and every segment from Swift against the checksums the manifest recorded,
every entry of the filesystem archive through ``tar``, and the database dump loaded into a
throwaway MariaDB whose tables are compared, row counts and checksums, with the manifest.
It passes or fails with the list of what differed, and leaves a report in the run's artifacts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from blocks.sources import SwiftSource
from flows import cli, logs, params
from flows.params import Flag, Param
from tasks import verify as checks
from undercloud_backup.core import defaults
from undercloud_backup.core.errors import BackupError
from undercloud_backup.core.manifest import Manifest
from undercloud_backup.core.sizes import format_size
from undercloud_backup.files import confine
from undercloud_backup.restore import verify
from undercloud_backup.store import session as swift_session
from undercloud_backup.trust import crypto, signing

logs.quiet_expected_errors()  # a refused signature is one line, not a traceback

def _run_name() -> str:
    backup_id = flow_run.parameters.get("backup_id") or "latest"
    return f"verify-{backup_id}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}"


@flow(name="verify_backup", flow_run_name=_run_name, validate_parameters=True)
@params.described
def verify_backup(
    backup_id: Annotated[str | None, params.backup_id("verify")] = None,
    container: Annotated[str | None, params.container()] = None,
    swift_block: Annotated[str | None, params.SWIFT_BLOCK] = None,
    check_database: Annotated[bool, Param(
        "Load the dump into a throwaway MariaDB and compare every table's row count and "
        "checksum with the manifest; off, the dump is only read and checksummed.",
        Flag("--skip-database", invert=True,
             help="only read and checksum the dump; do not test-restore it"))] = True,
    ignore_tables: Annotated[list[str] | None, Param(
        "db.table patterns (e.g. nova.services) not to compare: tables a live undercloud "
        "writes to all the time may change between the manifest's snapshot and the dump's.",
        Flag("--ignore-table", "DB.TABLE",
             help="do not compare this table (pattern; repeatable)"))] = None,
    staging_dir: Annotated[str, Param(
        "Where the throwaway MariaDB keeps its data while the dump is loaded (about the size "
        "of the databases; removed afterwards).",
        Flag("--staging-dir", help="where the throwaway MariaDB keeps its data (removed "
                                   "afterwards)"))] = defaults.STAGING_DIR,
    timeout_hours: Annotated[float, params.timeout_hours(
        "Longest a single check may run before its processes are killed.")
    ] = defaults.VERIFY_TIMEOUT_HOURS,
    task_retries: Annotated[int, Param(
        "Retries of a check after a transient failure (Swift unreachable).",
        Flag("--task-retries", "N"))] = defaults.TASK_RETRIES,
    allowed_signers: Annotated[str | None, params.allowed_signers("verify", (
        "ssh-keygen allowed-signers file: the manifest must be signed by a key in it "
        "(manifest.json.sig), or nothing is checked. Unset: the one install configured "
        "(/etc/undercloud-backup/allowed_signers), if any."))] = None,
    identity: Annotated[str | None, params.identity(
        "Path of an age identity file (private key; never its content) that decrypts an "
        "encrypted backup, on a verify host or an operator's machine: with it the archive is "
        "listed and the dump test-restored; without it an encrypted backup's objects are "
        "only checked (presence, sizes, SHA-256), and the report says so.",
        "to decrypt an encrypted backup and test-restore it; without it only the stored "
        "objects are checked (exit 51 unusable, 52 not a recipient)")] = None,
    check_signature: Annotated[bool, params.CHECK_SIGNATURE] = True,
) -> verify.VerifyReport:
    """Prove a backup restores: objects, segments, archive entries and a test restore of the
    databases compared table by table with the manifest."""
    logger = get_run_logger()
    started = time.monotonic()
    # the throwaway server's directory is made in it, as root: never through another's link
    staging_dir = confine.secure_staging(staging_dir)
    allowed_signers = signing.allowed_signers_for(allowed_signers, check_signature,
                                                  signing.installed_allowed_signers())
    swift_source = SwiftSource(block=swift_block, container=container)
    # one Keystone login and one check per container for every stage of the run
    with swift_session.shared(swift_source.settings()):
        retry = {"retries": task_retries}
        timeout_s = timeout_hours * 3600
        manifest = checks.load_manifest.with_options(**retry)(swift_source, backup_id,
                                                              allowed_signers)
        # Checked before anything is read: a missing or unusable identity 51, another key's 52.
        decryption = crypto.prepare_identity(identity, manifest, required=False)
        # Encrypted and no identity: presence, sizes and SHA-256 of the stored bytes only.
        undecryptable = crypto.is_encrypted(manifest) and decryption is None
        futures = {}
        # every link of its chain must be there, each missing one a problem
        if manifest.incremental:
            futures["chain"] = checks.verify_chain.with_options(**retry).submit(swift_source,
                                                                               manifest)
        with crypto.decrypting(decryption):  # the submitted tasks run in a copy of this context
            for obj in manifest.objects:
                kind = "encrypted" if undecryptable else verify.kind_of(obj)
                if kind == "archive":
                    futures[obj.name] = checks.verify_archive.with_options(**retry).submit(
                        swift_source, manifest, obj, timeout_s)
                elif kind in ("database", "users") and check_database:
                    if "database" not in futures:  # one throwaway server loads both, in order
                        futures["database"] = checks.verify_database.with_options(**retry).submit(
                            swift_source, manifest, staging_dir, timeout_s,
                            list(ignore_tables or []), allowed_signers)
                else:
                    futures[obj.name] = checks.verify_object.with_options(**retry).submit(
                        swift_source, obj)
            results = {name: future.result() for name, future in futures.items()}
        report = verify.summarize(manifest, swift_source.settings().container, results,
                                  time.monotonic() - started)
        _add_trust(report, manifest, allowed_signers, check_signature, decryption)
        _report_artifact(report, manifest)
        if not report.ok:  # the error carries the report as --json prints it
            raise verify.VerificationFailed(backup_id=report.backup_id,
                                            summary=verify.short_summary(report),
                                            report=report.to_dict())
        logger.info("backup %s verified in %.0f s%s", report.backup_id, report.seconds,
                    f" ({len(report.warnings)} warning(s))" if report.warnings else "")
        return report


# The flow's parameters as declared: its CLI's flags, and the call they make.
PARAMETERS = params.declared(verify_backup.fn)


def _add_trust(report: verify.VerifyReport, manifest: Manifest, allowed_signers: str | None,
               check_signature: bool, decryption: crypto.Decryption | None) -> None:
    """What the report says of the signature, the decryption and the chain."""
    report.signature = "good" if allowed_signers else (
        "not checked (no allowed_signers)" if check_signature else
        "not checked (turned off: check_signature)")
    report.allowed_signers = allowed_signers
    report.decrypted = decryption is not None
    report.decryption = _decryption_text(manifest, decryption)
    report.chain = [*manifest.chain, manifest.backup_id] if manifest.chain else None
    report.warnings += crypto.identity_warnings(decryption)
    if crypto.is_encrypted(manifest) and decryption is None:
        report.warnings.append(f"encrypted backup: {report.decryption}")


def _decryption_text(manifest: Manifest, decryption: crypto.Decryption | None) -> str:
    if not crypto.is_encrypted(manifest):
        return "not encrypted"
    if decryption is None:
        return ("objects, sizes and SHA-256 checked, NOT decrypted (no identity: no archive "
                "listing, no test restore); run verify with --identity FILE where an identity "
                "is (docs/restore.md)")
    return decryption.describe() + ": archive listed and dump test-restored"


def _report_artifact(report: verify.VerifyReport, manifest: Manifest) -> None:
    verdict = "**PASSED**" if report.ok else "**FAILED**"
    rows = "\n".join(
        f"| `{o['name']}` | "
        + (f"{format_size(o['size'])} of {format_size(o['expected_size'])} "
           f"| {o['segments_read']}" if "size" in o else "unreadable | -")  # a lost listing
        + f" | {'ok' if o['ok'] else 'DIFFERS'} |"
        for o in report.objects)
    archive, database = report.archive, report.database
    lines = [f"# Verification of `{report.backup_id}`: {verdict}", "",
             f"Backup created {report.created_at} on {manifest.hostname}, "
             f"container `{report.container}`, checked in {report.seconds:.0f} s.", "",
             "| object | read | segments | sha256, size, segment MD5s |", "|---|---|---|---|",
             rows, ""]
    if archive:
        lines.append(f"- Archive: {archive.entries} entries read by `tar` "
                     f"({archive.files} files, {archive.directories} directories); "
                     f"archived paths present: {', '.join(archive.paths_found) or 'none'}")
    if database:
        comparison = database.comparison
        lines.append(f"- Databases: dump {'loaded' if database.loaded else 'NOT loaded'} "
                     f"into a throwaway MariaDB {database.scratch_version} in "
                     f"{database.load_seconds} s; {comparison.matching} of "
                     f"{comparison.compared} table(s) match the manifest ("
                     + ("rows and checksum)" if comparison.checksums else
                        "row counts only: the backup recorded no checksums)")
                     + (f"; ignored: {', '.join(comparison.ignored)}"
                        if comparison.ignored else ""))
    else:
        lines.append("- Databases: not test-restored")
    if report.chain:
        lines.append(f"- Chain (incremental, full first): {' > '.join(report.chain)}")
    lines.append(f"- Encryption: {report.decryption}")
    lines.append(f"- Signature: {report.signature}" + (
        f" (allowed signers `{report.allowed_signers}`)" if report.allowed_signers else ""))
    if report.problems:
        lines += ["", "## What differed", ""] + [f"- {p}" for p in report.problems]
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    create_markdown_artifact(key="backup-verification", markdown="\n".join(lines) + "\n",
                             description=f"Verification of {report.backup_id}")


# ------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.verify",
        description="Prove a backup restores: read every object and segment back, list the "
                    "archive, load the dump into a throwaway MariaDB and compare every table.")
    params.add_flow_arguments(p, PARAMETERS)
    p.add_argument("--json", action="store_true",
                   help="print the report as one JSON object (also when verification fails)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    def print_report(error: BackupError) -> None:  # what differed, even when it fails
        report = error.fields.get("report")
        if isinstance(report, dict):  # not every failure carries one
            if args.json:
                print(json.dumps(report))
            else:
                for problem in report.get("problems", []):
                    print(f"DIFFERS  {problem}")

    report, status = cli.run("undercloud-verify", lambda: verify_backup(
        **params.flow_arguments(args, PARAMETERS)),
        on_backup_error=print_report)
    if report is None:
        return status
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        for warning in report.warnings:
            print(f"warning: {warning}")
        parts = [f"{len(report.objects)} object(s) intact"]
        if report.archive:
            parts.append(f"{report.archive.entries} archive entries readable")
        if report.database:
            parts.append(f"{report.database.comparison.matching} table(s) match the manifest "
                         "after a test restore")
        print(f"backup {report.backup_id} verified: {', '.join(parts)}")
    return 0


if __name__ == "__main__":
    cli.entry_point(main)
