"""Expected errors in a run's log: one clear line, not a traceback per layer.

Prefect logs a failing task or flow with the exception's traceback, and the flow once more as
"Encountered exception during execution" before its final state line. For our own errors
(:class:`~undercloud_backup.core.errors.BackupError`: a wrong password, a missing path, no space)
the traceback says nothing the one-line message does not; unexpected errors keep theirs.
The flow logs such an error itself, at ERROR, as its one line (what the UI's level filter
shows); the engine's "Engine execution exited with unexpected exception" would only hide it.
"""

from __future__ import annotations

import logging

from undercloud_backup.core.errors import BackupError

LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class ExpectedErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, BackupError):
            return True
        if record.name.startswith("prefect.flow_runs") and any(
                said in str(record.msg) for said in ("Encountered exception",
                                                     "Engine execution exited")):
            return False  # the flow logged the cause at ERROR; its final state says it too
        record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_errors() -> None:
    """Install the filter on Prefect's run loggers (once)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExpectedErrors) for f in logger.filters):
            logger.addFilter(ExpectedErrors())
