"""The Prefect task of retention: a thin wrapper over ``undercloud_backup.store.retention.prune``.

Used by the ``prune_backups`` flow and, after each successful backup, by ``undercloud_backup``.
"""

from __future__ import annotations

import datetime as dt

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.sources import SwiftSource
from tasks.backup import RETRY_TRANSIENT
from undercloud_backup.store import retention
from undercloud_backup.store.session import open_store


# Retrying is safe: deleting is idempotent, and the manifest goes first.
@task(name="apply_retention", **RETRY_TRANSIENT, cache_policy=NO_CACHE)
def apply_retention(swift_source: SwiftSource, policy: retention.RetentionPolicy,
                    now: dt.datetime | None = None,
                    dry_run: bool = False) -> retention.PruneResult:
    """Delete the backups the policy does not keep (manifest first) and stale incomplete ones."""
    settings = swift_source.settings()
    with open_store(settings) as store:  # the run's session when a backup calls it
        result = retention.prune(store, settings.container, policy,
                                 now or dt.datetime.now(dt.UTC), dry_run=dry_run,
                                 logger=get_run_logger())
    return result
