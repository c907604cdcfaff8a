"""What every ``python -m flows.<name>`` shares besides its flags (those are made by
:mod:`flows.params`): a temporary Prefect server that dies with us, and one-line errors with the
stable exit status of the error, printed last (a traceback helps no operator at 3 a.m.).

Exit statuses besides the errors' own: 130 after SIGINT (Ctrl-C), 143 after SIGTERM, 1 for an
unexpected error.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import NoReturn, TypeVar

from flows import interrupt
from flows.server import temporary_server
from undercloud_backup.core.errors import BackupError

T = TypeVar("T")
# True while a flow is run from ``python -m flows.*``: its errors then name CLI flags
# (--add-path); a run from the UI or a deployment names parameters (add_paths).
FROM_CLI = False
SIGNAL_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


# Equal to PREFECT_FLOWS_HEARTBEAT_FREQUENCY of prefect.yaml's deployments and to HEARTBEAT_S
# of deployments/prefect/zombie_automation.py.
HEARTBEAT_S = 30


@contextmanager
def _heartbeats() -> Iterator[None]:
    """Heartbeats of an ad hoc run, unless PREFECT_FLOWS_HEARTBEAT_FREQUENCY says otherwise.

    Against a server, as often as deployment runs: the zombie automation marks a run CRASHED
    after three missed beats, and Prefect's default (180 s) would trip it on a healthy run.
    Against the ephemeral server, which dies with this process, none: nobody watches them and
    a heartbeat thread would only cost its start and stop.
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
        on_backup_error: Callable[[BackupError], None] | None = None,
        server: bool = True) -> tuple[T | None, int]:
    """Call ``call``; on failure print one line to stderr, last, and return the exit status.
    ``server``: a temporary Prefect server when none is configured (a call that runs no flow
    needs none)."""
    from prefect.exceptions import TerminationSignal

    global FROM_CLI
    FROM_CLI = True
    line, status = "", 0
    try:
        with _heartbeats(), (temporary_server() if server else nullcontext()):
            try:
                return call(), 0
            finally:
                _drain_prefect()  # its log and event workers speak before our last line
    except BackupError as error:
        if on_backup_error is not None:
            on_backup_error(error)
        line, status = f"error: {error}", error.exit_code
    except (KeyboardInterrupt, TerminationSignal) as signalled:
        signum = signal.SIGINT if isinstance(signalled, KeyboardInterrupt) else signal.SIGTERM
        line = interrupt.outcome or (f"interrupted by {signal.Signals(signum).name}"
                                     f"{'; ' + interrupted if interrupted else ''}")
        status = SIGNAL_STATUS[signum]
    except Exception as error:  # noqa: BLE001 - one line, not a traceback, for the operator
        line, status = f"error: {type(error).__name__}: {error}", 1
    finally:
        FROM_CLI = False
    sys.stdout.flush()
    print(f"{prog}: {line}", file=sys.stderr, flush=True)
    return None, status


def _drain_prefect() -> None:
    """Send what Prefect's log and event workers still hold, now rather than at exit."""
    try:
        from prefect._internal.concurrency.services import QueueService

        QueueService.drain_all(timeout=10)
    except Exception:  # noqa: BLE001 - best effort; the run's outcome does not depend on it
        pass


def _sigterm_as_exception(signum: int, frame: object) -> None:
    from prefect.exceptions import TerminationSignal

    raise TerminationSignal(signal=signum)


def entry_point(main: Callable[[], int]) -> None:
    """``if __name__ == "__main__"``: Prefect's telemetry off (no network here), SIGTERM an
    exception (outside a flow too, so that clean-up runs), then exit."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    signal.signal(signal.SIGTERM, _sigterm_as_exception)
    # Even when started in the background by a script (which ignores SIGINT for its jobs):
    # `kill -INT` is an operator asking for a stop.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status = main()
    except SystemExit as done:  # argparse: --help, a wrong flag
        if done.code is not None and not isinstance(done.code, int):
            raise
        status = done.code or 0
    _exit(status)


def _exit(status: int) -> NoReturn:
    """Exit the way the interpreter does, less the teardown of its modules one by one.

    What an exit runs in Python still runs, in the interpreter's order: the non-daemon threads
    are joined (thread pools shut down first), then the atexit handlers (logging's last flush,
    Prefect's log and event services), then stdout and stderr are flushed (a failed flush
    exits 120, as Python's own exit does). Skipped is only the clean-up of the 1600 modules
    Prefect imports, which nobody sees and which kept the process alive 0.6 to 2.3 s after
    its last line on 2 busy cores.
    """
    join_threads = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx calls first
    if join_threads is None:  # another interpreter: its own exit
        sys.exit(status)
    join_threads()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 120
    os._exit(status)
