"""What every ``python -m flows.<name>`` shares: database flags, and one-line errors with the
stable exit status of the error (a traceback helps no operator at 3 a.m.)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from undercloud_backup.errors import BackupError

T = TypeVar("T")


def add_database_arguments(parser: argparse.ArgumentParser, role: str = "") -> None:
    """``--db-block``, ``--db-defaults-file`` and the host/port/user/socket overrides."""
    parser.add_argument("--db-block", help=f"{role}saved MariaDB Connection block")
    parser.add_argument("--db-defaults-file",
                        help=f"{role}MariaDB option file (default ~/.my.cnf)")
    parser.add_argument("--db-host")
    parser.add_argument("--db-port", type=int)
    parser.add_argument("--db-user")
    parser.add_argument("--db-socket")


def database_arguments(args: argparse.Namespace) -> dict:
    """The flow parameters of :func:`add_database_arguments`."""
    return {"db_block": args.db_block, "db_defaults_file": args.db_defaults_file,
            "db_host": args.db_host, "db_port": args.db_port, "db_user": args.db_user,
            "db_socket": args.db_socket}


# Equal to PREFECT_FLOWS_HEARTBEAT_FREQUENCY of prefect.yaml's deployments and to HEARTBEAT_S
# of deployments/prefect/zombie_automation.py.
HEARTBEAT_S = 30


@contextmanager
def _heartbeats() -> Iterator[None]:
    """Heartbeats of an ad hoc run, unless PREFECT_FLOWS_HEARTBEAT_FREQUENCY says otherwise.

    Against a server, as often as deployment runs: the zombie automation marks a run CRASHED
    after three missed beats, and Prefect's default (180 s) would trip it on a healthy run.
    Against the ephemeral server, which dies with this process, none: nobody watches them and
    ending the heartbeat thread costs up to a second per run (benchmarks/RESULTS.md).
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    every = HEARTBEAT_S if PREFECT_API_URL.value() else None
    with temporary_settings(set_defaults={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: every}):
        yield


def run(prog: str, call: Callable[[], T], *, interrupted: str = "",
        on_backup_error: Callable[[BackupError], None] | None = None) -> tuple[T | None, int]:
    """Call ``call``; on failure print one line to stderr and return the exit status."""
    try:
        with _heartbeats():
            return call(), 0
    except BackupError as error:
        if on_backup_error is not None:
            on_backup_error(error)
        print(f"{prog}: error: {error}", file=sys.stderr)
        return None, error.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{'; ' + interrupted if interrupted else ''}", file=sys.stderr)
        return None, 130
    except Exception as error:  # noqa: BLE001 - one line, not a traceback, for the operator
        print(f"{prog}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return None, 1


def entry_point(main: Callable[[], int]) -> None:
    """``if __name__ == "__main__"``: Prefect's telemetry off (no network here), then exit."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(main())
