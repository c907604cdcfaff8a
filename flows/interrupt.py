"""A backup run stopped by SIGTERM or SIGINT (Ctrl-C, ``kill``, a cancel from the UI).

Every child process is stopped, the stages are given a few seconds to abort their uploads,
then whatever this run stored under its backup id is deleted; :data:`outcome` is the one line
saying what is left, which the CLI prints last.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from blocks.sources import SwiftSource
from undercloud_backup.core import execute
from undercloud_backup.store.session import open_store

STAGE_GRACE_S = 15.0
# The line about what an interrupted run left; the CLI prints it.
outcome: str = ""


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """A second Ctrl-C must not cut the clean-up short (only the main thread can do this)."""
    saved = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            saved[sig] = signal.signal(sig, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _delete_prefix(swift_source: SwiftSource, backup_id: str) -> tuple[int, int, str]:
    """Delete every object and segment under ``backup_id/``: (deleted, left, container)."""
    settings = swift_source.settings()
    deleted = left = 0
    with open_store(settings) as store:  # on the run's session, still open
        for container in (settings.container, settings.segment_container):
            try:
                names = [o["name"] for o in store.list(container, prefix=f"{backup_id}/")]
            except Exception:  # noqa: BLE001 - a container the run never created
                continue
            for name in names:
                try:
                    store.delete(container, name)
                    deleted += 1
                except Exception:  # noqa: BLE001 - counted and said
                    left += 1
    return deleted, left, settings.container


def stop(why: str, futures: Iterable, swift_source: SwiftSource | None,
         backup_id: str | None) -> str:
    """Stop the run's children, let its stages abort, delete what it stored; say what is left."""
    global outcome
    with _signals_ignored():
        stopped = execute.kill_all()
        deadline = time.monotonic() + STAGE_GRACE_S
        for future in futures:
            future.wait(timeout=max(0.1, deadline - time.monotonic()))
        children = f"stopped {stopped} running command(s)" if stopped else "no command running"
        if swift_source is None or backup_id is None:
            outcome = f"interrupted by {why}: {children}; nothing was uploaded"
            return outcome
        try:
            deleted, left, container = _delete_prefix(swift_source, backup_id)
        except Exception as error:  # noqa: BLE001 - Swift may be why the run was stopped
            outcome = (f"interrupted by {why}: {children}; could not reach Swift to delete "
                       f"what backup {backup_id} uploaded ({type(error).__name__}); it has no "
                       "manifest: the next prune deletes it once this run has ended")
            return outcome
    if left:
        outcome = (f"interrupted by {why}: {children}; deleted {deleted} object(s) of backup "
                   f"{backup_id}, {left} left under {container}/{backup_id}/ without a "
                   "manifest (the next prune deletes them once this run has ended)")
    else:
        outcome = (f"interrupted by {why}: {children}; no manifest was written and nothing of "
                   f"backup {backup_id} is left in {container} ({deleted} object(s) deleted)")
    return outcome
