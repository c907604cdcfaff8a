"""Prefect tasks of the backup: thin wrappers over ``undercloud_backup``'s stages.

Stage results are typed (``SpaceReport``, ``DumpResult``, ``ArchiveResult``, the manifest);
Prefect persists them as JSON and gives them back typed to a retried flow run.
"""

from __future__ import annotations

from dataclasses import replace

from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from blocks.sources import DatabaseSource, SwiftSource
from undercloud_backup.backup import binlog, stages
from undercloud_backup.backup import run as backup
from undercloud_backup.backup.request import BackupRequest
from undercloud_backup.core.errors import BackupError
from undercloud_backup.core.manifest import Manifest
from undercloud_backup.db import database
from undercloud_backup.db.connection import ServerInfo
from undercloud_backup.files.archive import PathPlan
from undercloud_backup.store import space
from undercloud_backup.store.session import open_store


def transient(task, task_run, state) -> bool:
    """Retry only what can heal by itself: Swift 5xx/429, lost connections, timeouts."""
    try:
        state.result()
    except BackupError as error:
        return error.retryable
    except (ConnectionError, TimeoutError):
        return True
    except Exception:  # noqa: BLE001 - everything else is permanent
        return False
    return False


# Results are persisted (default storage under PREFECT_HOME) so that retrying a failed flow run
# reuses the stages that completed: the default cache key includes the flow run id, so a new
# run never reuses them, and the manifest step re-checks every reused object in Swift.
# Every stage that talks to Swift or MariaDB retries transient failures, and only those.
RETRY_TRANSIENT = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=10),
    "retry_jitter_factor": 0.2,
    "retry_condition_fn": transient,
}

_stage = {
    **RETRY_TRANSIENT,
    "persist_result": True,
    "result_serializer": "json",  # readable, and checkable for secrets
}


def database_access(request: BackupRequest,
                    db_source: DatabaseSource) -> database.DatabaseAccess:
    """How this run reaches MariaDB, chosen once (secrets read here, inside the task)."""
    return database.access(None if request.privileged else db_source.settings(),
                           request.privileged)


def check_database(request: BackupRequest, access: database.DatabaseAccess,
                   logger) -> ServerInfo:
    """What there is to dump, whether the account can dump all of it, and no table locked."""
    info = access.server_info()
    report = access.check_privileges(info.databases, request.allow_partial_database)
    for missing in report.missing:  # only when allowed: the run goes on, loudly
        logger.warning("INCOMPLETE database dump (allowed by allow_partial_database): %s; "
                       "fix: %s", missing, report.fix)
    access.check_locks(info.databases)
    return info


@task(name="check_space", **_stage)
def check_space(request: BackupRequest, plan: PathPlan, db_source: DatabaseSource,
                swift_source: SwiftSource) -> space.SpaceReport:
    """Estimate the backup's size, decide each stream's segment size, and fail before any
    work if the run cannot fit."""
    logger = get_run_logger()
    streams: dict[str, int] = {}
    version = None
    if request.include_databases:
        info = check_database(request, database_access(request, db_source), logger)
        streams[space.DATABASE_STREAM], version = info.size_bytes, info.version
    if plan.included:
        streams[space.FILES_STREAM] = plan.estimated_bytes  # what tar will write
    settings = swift_source.settings()
    with open_store(settings) as store:
        report = space.check_space(request.staging_dir, streams, request.segment_size
                                   or settings.segment_size, store.quota_left(), store.limits())
    for line in report.checks:
        logger.info("space: %s", line)
    return replace(report, server_version=version)


@task(name="dump_databases", **_stage)
def dump_databases(request: BackupRequest, db_source: DatabaseSource,
                   swift_source: SwiftSource) -> stages.DumpResult:
    """Dump every MariaDB database, users and grants consistently, streamed into Swift."""
    return binlog.back_up_databases(request, database_access(request, db_source),
                                    swift_source.settings(), get_run_logger())


@task(name="archive_paths", **_stage)
def archive_paths(request: BackupRequest, plan: PathPlan,
                  swift_source: SwiftSource) -> stages.ArchiveResult:
    """Archive the planned paths with owners, modes, ACLs and xattrs, streamed into Swift."""
    return stages.archive_paths(request, plan, swift_source.settings(), get_run_logger())


@task(name="write_manifest", **_stage)
def write_manifest(manifest: Manifest, swift_source: SwiftSource,
                   signing_key: str | None = None) -> str:
    """Verify every object and write the manifest (signed first, if a key is given), the
    commit point of the backup."""
    settings = swift_source.settings()
    with open_store(settings) as store:
        name = backup.write_manifest(store, settings.container, manifest, signing_key)
    get_run_logger().info("manifest written: %s/%s", settings.container, name)
    return name
