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
from undercloud_backup.restore import databases as restoredb
from undercloud_backup.restore import files as restore
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
                      request: restore.RestoreRequest) -> restoredb.DatabasesRestored:
    """Load the dump (all of it, or some databases) into the target MariaDB and check it."""
    settings = swift_source.settings()
    with open_store(settings) as store:
        return restoredb.restore_databases(store, settings.container, manifest,
                                           db_source.settings(), databases, request,
                                           get_run_logger())
