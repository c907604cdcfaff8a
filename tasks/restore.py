"""Prefect tasks of the restore: thin wrappers over :mod:`undercloud_backup.restore.files` and
:mod:`undercloud_backup.restore.databases`.

No retries and no caching: a restore that half happened must be looked at, not repeated
blindly (a second attempt would, rightly, refuse to overwrite what the first one wrote).
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.sources import DatabaseSource, SwiftSource
from undercloud_backup.core.manifest import Manifest
from undercloud_backup.restore import binlog as replaylog
from undercloud_backup.restore import databases as restoredb
from undercloud_backup.restore import files as restore
from undercloud_backup.store import reader
from undercloud_backup.store.session import open_store


@task(name="restore_files", cache_policy=NO_CACHE)
def restore_files(swift_source: SwiftSource, manifest: Manifest,
                  request: restore.RestoreRequest) -> restore.FilesResult:
    """Extract the archive into the target root, keeping owners, modes, ACLs and xattrs."""
    settings = swift_source.settings()
    with open_store(settings) as store:
        return restore.restore_files(store, settings.container, manifest, request,
                                     get_run_logger())


@task(name="restore_databases", cache_policy=NO_CACHE)
def restore_databases(swift_source: SwiftSource, db_source: DatabaseSource, manifest: Manifest,
                      databases: list[str] | None,
                      request: restore.RestoreRequest,
                      replay_plan: replaylog.ReplayPlan | None = None
                      ) -> restoredb.DatabasesRestored:
    """Load the dump (all of it, or some databases) into the target MariaDB and check it;
    then replay the shipped binary log, when there is a plan for it."""
    settings = swift_source.settings()
    with open_store(settings) as store:
        return restoredb.restore_databases(store, settings.container, manifest,
                                           db_source.settings(), databases, request,
                                           get_run_logger(), replay_plan)


@task(name="plan_replay", cache_policy=NO_CACHE)
def plan_replay(swift_source: SwiftSource, manifest: Manifest, until: str | None,
                until_gtid: str | None, allowed_signers: str | None, databases: bool
                ) -> tuple[replaylog.ReplayPlan | None, Manifest]:
    """Before anything is written: which full dump and which shipped binary logs bring the
    databases to ``until`` (or the nightly's end point), every manifest of the chain signed
    when signatures are checked and every log in Swift as recorded; and the backup whose
    files are restored (the newest one before ``until``)."""
    settings = swift_source.settings()
    logger = get_run_logger()
    with open_store(settings) as store:
        def load(backup_id: str) -> Manifest:
            return reader.load_manifest(store, settings.container, backup_id, allowed_signers)

        plan = None
        if until is not None or until_gtid is not None:
            when = replaylog.parse_until(until) if until is not None else None
            plan = replaylog.plan_until(store, settings.container, manifest.hostname, load,
                                        until=when, until_gtid=until_gtid)
            manifest = replaylog.files_backup(store, settings.container, manifest, when,
                                              load) or plan.base
            if manifest.paths is not None:
                logger.info("files as of backup %s, the newest before %s",
                            manifest.backup_id, plan.point)
        elif databases and manifest.mariadb is not None and \
                manifest.mariadb.kind == replaylog.BINLOG:
            plan = replaylog.plan_to_end(manifest, load)
        if plan is not None and databases:
            reader.precheck(store, settings.container, plan.objects())
            logger.info("databases: %s", plan.describe())
        return plan, manifest
