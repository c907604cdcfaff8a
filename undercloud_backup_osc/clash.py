"""Who answers ``openstack undercloud backup`` when python-tripleoclient defines it too.

cliff keeps one command per name, the last one loaded, and logs the clash at a level
``openstack`` does not show: left alone, which of the two runs would depend on the order of
the installed distributions, and nobody would be told. So the bare name is ours to decide: it
is registered in ``openstack.extension``, the group ``openstack`` loads after every plugin's,
and resolves to:

- ours (:class:`~undercloud_backup_osc.commands.BackupRun`) when nothing else defines it;
- when another distribution does (python-tripleoclient), that one: a vendor command and the
  cron lines written for it keep doing what they did. Each run and its ``--help`` first say
  so, and how to reach ours: ``openstack undercloud backup run`` (always ours), or
  ``UCB_OPENSTACK_UNDERCLOUD_BACKUP=undercloud-backup`` to make the bare name ours, which then
  says that the other one exists.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Any

NAME = "undercloud_backup"  # cliff turns it into "undercloud backup"
CHOICE = "UCB_OPENSTACK_UNDERCLOUD_BACKUP"
OURS = "undercloud-backup"
OUR_MODULE = "undercloud_backup_osc"


def others() -> list[tuple[str, metadata.EntryPoint]]:
    """(distribution, entry point) of every other ``undercloud backup`` of ``openstack``."""
    found = []
    for entry in metadata.entry_points().select(name=NAME):
        if not entry.group.startswith("openstack.") or \
                entry.value.split(".")[0].split(":")[0] == OUR_MODULE:
            continue
        dist = entry.dist.name if entry.dist is not None else entry.value
        found.append((dist, entry))
    return found


def note_theirs(dist: str) -> str:
    return (f"note: 'openstack undercloud backup' is {dist}'s here; undercloud-backup's is "
            f"'openstack undercloud backup run' (or set {CHOICE}={OURS})")


def note_ours(dists: list[str]) -> str:
    return (f"note: 'openstack undercloud backup' is undercloud-backup's ({CHOICE}={OURS}); "
            f"{', '.join(dists)} also defines it: unset {CHOICE} to run that one")


def _theirs(dist: str, entry: metadata.EntryPoint) -> type:
    base: Any = entry.load()
    note = note_theirs(dist)

    class Theirs(base):  # type: ignore[misc, valid-type]
        def get_description(self) -> str:
            return f"{note}\n\n{super().get_description()}"

        def run(self, parsed_args: Any) -> Any:
            print(note, file=sys.stderr, flush=True)
            return super().run(parsed_args)

    Theirs.__name__ = Theirs.__qualname__ = base.__name__
    Theirs.__module__ = base.__module__
    return Theirs


def _ours(dists: list[str]) -> type:
    # Only when the bare name is ours: the other distribution's command, when it is the one
    # chosen, runs without our commands' imports.
    from undercloud_backup_osc.commands import BackupRun

    if not dists:
        return BackupRun
    note = note_ours(dists)

    class Ours(BackupRun):
        def get_description(self) -> str:
            return f"{note}\n\n{super().get_description()}"

        def run(self, parsed_args: Any) -> int:
            print(note, file=sys.stderr, flush=True)
            return super().run(parsed_args)

    return Ours


def chosen() -> type:
    """The command class ``openstack undercloud backup`` runs (see the module's docstring)."""
    found = others()
    if found and os.environ.get(CHOICE) != OURS:
        return _theirs(*found[0])
    return _ours([dist for dist, _ in found])


def __getattr__(name: str) -> type:
    """``UndercloudBackup``, the entry point's target, decided when cliff loads it."""
    if name == "UndercloudBackup":
        return chosen()
    raise AttributeError(name)
