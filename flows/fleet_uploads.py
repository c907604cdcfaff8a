"""The fleet's limit on concurrent uploads to Swift, taken around a backup's upload stages.

A fleet whose nightlies start at the same minute queues on the global concurrency limit
``fleet-uploads`` (UCB_FLEET_UPLOADS slots, set up with the server) instead of saturating the
Swift cluster. Outside a fleet (no UCB_NODE in the worker's environment) it takes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

LIMIT_NAME = "fleet-uploads"
# A slot is held for a whole upload; its lease is renewed while the run lives, and a run that
# dies frees it when the lease runs out (Prefect's shortest lease, plus its 15 s sweep).
LEASE_SECONDS = 60


@contextmanager
def upload_slot() -> Iterator[None]:
    """Hold one of the fleet's upload slots (a no-op on a single-node install)."""
    if not os.environ.get("UCB_NODE"):
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(LIMIT_NAME, occupy=1, lease_duration=LEASE_SECONDS, strict=True):
        yield
