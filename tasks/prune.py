"""The Prefect task of retention: a thin wrapper over ``undercloud_backup.store.retention.prune``.

Used by the ``prune_backups`` flow and, after each successful backup, by ``undercloud_backup``.
"""

from __future__ import annotations

import datetime as dt

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort

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
    running, ended = run_ids(LIVE_STATES), run_ids(ENDED_STATES)
    with open_store(settings) as store:  # the run's session when a backup calls it
        result = retention.prune(store, settings.container, policy,
                                 now or dt.datetime.now(dt.UTC), dry_run=dry_run,
                                 running=running, ended=ended, logger=get_run_logger())
    return result


# A run in one of these may still write: its backup's segments are not to be pruned.
LIVE_STATES = (StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING)
# A run in one of these writes no more: what it left without a manifest is garbage.
ENDED_STATES = (StateType.FAILED, StateType.CRASHED, StateType.CANCELLED)
ENDED_LOOKBACK = 200  # the latest ended runs looked at (older leftovers: the grace period)


def run_ids(states: tuple[StateType, ...]) -> list[str]:
    """The ids (hex) of the flow runs the Prefect server knows in ``states``, latest first:
    a backup id ends with the first 6 hex digits of its run's."""
    state = FlowRunFilterState(type=FlowRunFilterStateType(any_=list(states)))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=state),
                                     sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                                     limit=ENDED_LOOKBACK)
    return [run.id.hex for run in runs]
