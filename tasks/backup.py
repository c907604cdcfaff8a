"""Prefect tasks of the backup: thin wrappers over ``undercloud_backup.backup``."""

from __future__ import annotations

from dataclasses import replace

from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from blocks.sources import DatabaseSource, SwiftSource
from undercloud_backup import backup, database, swift
from undercloud_backup.archive import PathPlan
from undercloud_backup.errors import BackupError


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


@task(name="check_space", **_stage)
def check_space(request: backup.BackupRequest, plan: PathPlan, db_source: DatabaseSource,
                swift_source: SwiftSource) -> dict:
    """Estimate the backup's size and fail before any work if it cannot fit."""
    logger = get_run_logger()
    database_bytes = 0
    server_version = None
    if request.include_databases:
        if request.privileged:
            from undercloud_backup import privileged

            info = privileged.server_info()
        else:
            with database.connect(db_source.settings()) as connection:
                info = database.server_info(connection)
        database_bytes, server_version = info.size_bytes, info.version
    settings = swift_source.settings()
    conn = swift.connect(settings)
    report = backup.check_space(request, plan, database_bytes, settings.segment_size,
                                backup.swift_quota_left(conn), backup.swift_limits(conn))
    for line in report.checks:
        logger.info("space: %s", line)
    return {**report.as_dict(), "server_version": server_version}


def _swift_settings(swift_source: SwiftSource, segment_size: int | None) -> swift.SwiftSettings:
    settings = swift_source.settings()
    return replace(settings, segment_size=segment_size) if segment_size else settings


@task(name="dump_databases", **_stage)
def dump_databases(request: backup.BackupRequest, db_source: DatabaseSource,
                   swift_source: SwiftSource, segment_size: int | None = None) -> dict:
    """Dump every MariaDB database, users and grants consistently, streamed into Swift."""
    settings = None if request.privileged else db_source.settings()
    return backup.dump_databases(request, settings, _swift_settings(swift_source, segment_size),
                                 get_run_logger())


@task(name="archive_paths", **_stage)
def archive_paths(request: backup.BackupRequest, plan: PathPlan,
                  swift_source: SwiftSource, segment_size: int | None = None) -> dict:
    """Archive the planned paths with owners, modes, ACLs and xattrs, streamed into Swift."""
    return backup.archive_paths(request, plan, _swift_settings(swift_source, segment_size),
                                get_run_logger())


@task(name="write_manifest", **_stage)
def write_manifest(manifest: dict, swift_source: SwiftSource) -> str:
    """Verify every object and write the manifest, the commit point of the backup."""
    settings = swift_source.settings()
    name = backup.write_manifest(swift.connect(settings), settings.container, manifest)
    get_run_logger().info("manifest written: %s/%s", settings.container, name)
    return name
