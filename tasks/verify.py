"""Prefect tasks of the verification: thin wrappers over ``undercloud_backup.restore.verify``.

Every task opens its own Swift store (a swiftclient connection is not shared between threads)
and resolves credentials itself, so none ever becomes a parameter or a result. Nothing is
cached: a verification that reused an earlier verdict would prove nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.sources import SwiftSource
from tasks.backup import RETRY_TRANSIENT
from undercloud_backup.core.errors import BackupNotFound
from undercloud_backup.core.manifest import Manifest, StoredObject
from undercloud_backup.files import chain
from undercloud_backup.restore import binlog as replaylog
from undercloud_backup.restore import verify
from undercloud_backup.store import reader
from undercloud_backup.store.connection import SwiftStore
from undercloud_backup.store.session import open_store

_check = {**RETRY_TRANSIENT, "cache_policy": NO_CACHE}


@contextmanager
def _store(swift_source: SwiftSource) -> Iterator[tuple[SwiftStore, str]]:
    """The task's store (closed when the ``with`` ends) and the container."""
    settings = swift_source.settings()
    with open_store(settings) as store:
        yield store, settings.container


@task(name="load_manifest", **_check)
def load_manifest(swift_source: SwiftSource, backup_id: str | None,
                  allowed_signers: str | None = None) -> Manifest:
    """Fetch the manifest of the backup (default: the latest complete one); with an
    allowed-signers file, only if its ssh-keygen -Y signature passes."""
    with _store(swift_source) as (store, container):
        manifest = reader.load_manifest(store, container, backup_id, allowed_signers)
        if allowed_signers is not None:
            # An incremental is restored with its chain: every ancestor's manifest must be
            # signed too, or a Swift-side writer could swap in a level of its own (53-55).
            for ancestor in manifest.chain:
                reader.load_manifest(store, container, ancestor, allowed_signers)
            linked = len(manifest.chain) + len(_binlog_links(store, container, manifest,
                                                             allowed_signers))
            get_run_logger().info("manifest signature%s good (allowed signers %s)",
                                  f"s of {linked + 1} chained backups"
                                  if linked else "", allowed_signers)
        get_run_logger().info("backup %s of %s (created %s): %d object(s)", manifest.backup_id,
                              manifest.hostname, manifest.created_at, len(manifest.objects))
        return manifest


def _binlog_links(store: SwiftStore, container: str, manifest: Manifest,
                  allowed_signers: str) -> list[Manifest]:
    """A binary-log nightly's full dump and the nightlies between, each read only if signed:
    verify replays their logs, so a forged link would be loaded as if it were the node's."""
    if manifest.mariadb is None or manifest.mariadb.kind != replaylog.BINLOG:
        return []
    try:
        return replaylog.chain_to(manifest, lambda backup_id: reader.load_manifest(
            store, container, backup_id, allowed_signers))[:-1]
    except (replaylog.LogChainBroken, BackupNotFound):
        return []  # a broken chain is the database check's problem to report, as unsigned


@task(name="verify_archive", **_check)
def verify_archive(swift_source: SwiftSource, manifest: Manifest, obj: StoredObject,
                   timeout_s: float) -> verify.ArchiveCheck:
    """Stream the filesystem archive through zstd and tar --list; check every segment."""
    with _store(swift_source) as (store, container):
        result = verify.check_archive(store, container, manifest, obj, timeout=timeout_s)
        _log(result, f"archive: {result.entries} entries readable in {result.seconds} s")
        return result


@task(name="verify_database", **_check)
def verify_database(swift_source: SwiftSource, manifest: Manifest, staging_dir: str,
                    timeout_s: float, ignore_tables: list[str],
                    allowed_signers: str | None = None) -> verify.DatabaseCheck:
    """Load the dump and the users and grants into a throwaway MariaDB; compare every table."""
    with _store(swift_source) as (store, container):
        result = verify.check_database(store, container, manifest, staging_dir=staging_dir,
                                       timeout=timeout_s, ignore_tables=ignore_tables,
                                       logger=get_run_logger(),
                                       allowed_signers=allowed_signers)
        _log(result, f"database: {result.comparison.matching} of "
                     f"{result.comparison.compared} table(s) match the manifest after a test "
                     f"restore in {result.seconds} s")
        return result


@task(name="verify_object", **_check)
def verify_object(swift_source: SwiftSource, obj: StoredObject) -> verify.PlainCheck:
    """Read an object back and check its size, segments and SHA-256."""
    with _store(swift_source) as (store, container):
        result = verify.check_plain(store, container, obj)
        _log(result, f"{obj.name}: size and checksums as recorded")
        return result


def _log(result: verify.Check, success: str) -> None:
    logger = get_run_logger()
    for problem in result.problems:
        logger.error("%s", problem)
    for warning in result.warnings:
        logger.warning("%s", warning)
    if not result.problems:
        logger.info("%s", success)


@task(name="check_stored_objects", **_check)
def check_stored_objects(swift_source: SwiftSource, manifest: Manifest,
                         names: list[str]) -> None:
    """HEAD every object a restore will use (and each segment) against the manifest, before
    anything is written: a truncated or swapped object is refused naming it."""
    with _store(swift_source) as (store, container):
        reader.precheck(store, container, [o for o in manifest.objects if o.name in names])
        get_run_logger().info("%d object(s) in Swift as the manifest records them", len(names))


@task(name="verify_chain", **_check)
def verify_chain(swift_source: SwiftSource, manifest: Manifest) -> verify.ChainCheck:
    """An incremental's chain: every ancestor's manifest complete, of this host and chain,
    its archive and snapshot present with their recorded sizes (nothing for a full)."""
    with _store(swift_source) as (store, container):
        problems = chain.check_links(store, container, manifest)
        result = verify.ChainCheck(chain=list(manifest.chain), problems=problems)
        _log(result, f"chain {' > '.join([*manifest.chain, manifest.backup_id])}: every link "
                     "present")
        return result
