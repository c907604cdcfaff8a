"""``openstack <args>`` called in the test process (tests/test_osc.py): the client's shell with
our plugin's commands, without a process that loads the client's plugins and imports Prefect."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

from conftest import REPO, _LogLines

OPENSTACK = Path(sys.prefix) / "bin" / "openstack"


class _ClientConsole(_LogLines):
    """The console of an ``openstack`` process, for a command run in this one. Once the client
    has set up its own (a handler on the root logger writing to the same sink): the records
    that one does not show, as _LogLines shows them (the flows' INFO lines, which Prefect's
    console shows in a process). Before: what a process with no handler on its root logger
    shows, logging's last resort (WARNING and above, unless a handler below the root, such as
    stevedore's NullHandler, takes the record)."""

    def emit(self, record: logging.LogRecord) -> None:
        consoles = [handler for handler in logging.getLogger().handlers
                    if handler is not self and getattr(handler, "stream", None) is self.sink]
        if not consoles:
            if record.levelno >= logging.WARNING and not _handled_below_root(record.name):
                self.sink.write(f"{record.getMessage()}\n")
        elif all(record.levelno < handler.level for handler in consoles):
            super().emit(record)  # else the client's console handler writes it already


def _handled_below_root(name: str) -> bool:
    logger: logging.Logger | None = logging.getLogger(name)
    while logger is not None and logger is not logging.getLogger():
        if logger.handlers:
            return True
        logger = logger.parent if logger.propagate else None
    return False


def _as_a_process_filters_warnings() -> None:
    """Python's default filters, which pytest's replace: deprecations in libraries unseen (the
    client's own, osc_lib's, would be reported as this session's)."""
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=PendingDeprecationWarning)


def openstack_in_process(*args: str, env: dict[str, str], cwd: Path | None = None,
                         ) -> subprocess.CompletedProcess:
    """``openstack <args>`` (python-openstackclient's shell, with our plugin's commands) called
    in this process, for tests of what a command does rather than of the ``openstack``
    process: the same parsing, login, flow run, exit status and printed lines, without a
    process that loads the client's plugins and imports Prefect (about 7 CPU-s each).

    ``env`` replaces os.environ meanwhile; ``cwd`` (default REPO) is the current directory
    and the first place clouds.yaml is looked for, as in a process started there. What the
    client changes in this process is put back afterwards: the root logger's handlers and
    every logger's level, the warnings filters (Python's defaults meanwhile), the locale
    (cliff sets LC_ALL from the environment), SIGTERM and SIGINT (the commands install the
    flows' handlers), cliff's program name (this process's argv[0] otherwise: "pytest
    undercloud backup ..." in usage lines). stdin is empty and stdout not a terminal, as
    under capture_output.

    The root logger keeps its level: the client sets it to DEBUG, but in a process Prefect's
    import (the command's get_parser) puts it back to WARNING before anything of ours runs,
    and until then the client's console handler shows WARNING and above only; left at DEBUG
    here, every library's debug records would go through pytest's and Prefect's handlers (and
    httpx's INFO lines from Prefect's services threads onto stderr, after the error line).
    Prefect reads its settings once per process, and the user's configuration directories
    for clouds.yaml are found at import: an ``env`` that differs from os.environ in either is
    refused (run such a call as a process)."""
    import locale
    import signal
    import traceback
    import warnings

    with warnings.catch_warnings():
        _as_a_process_filters_warnings()
        from cliff import app as cliff_app
        from openstack.config import loader
        from openstackclient import shell

    differs = sorted(key for key in set(env) | set(os.environ)
                     if (key.startswith("PREFECT_") or key in ("HOME", "XDG_CONFIG_HOME"))
                     and env.get(key) != os.environ.get(key))
    if differs:
        raise ValueError(f"run this call as a process: {', '.join(differs)} would differ")
    where = str(cwd or REPO)
    # loader's lists start with the files in the directory it was imported from
    here = len(loader.YAML_SUFFIXES + loader.JSON_SUFFIXES)

    def from_cwd(files: list[str]) -> list[str]:
        return [os.path.join(where, os.path.basename(f)) for f in files[:here]] + files[here:]

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers = root.handlers[:]
    # every logger's level; those the client sets (osc_lib.logs) unset if they are new
    levels = dict.fromkeys(("requests", "cliff", "stevedore", "iso8601"), logging.NOTSET)
    levels.update({name: logger.level for name, logger
                   in logging.Logger.manager.loggerDict.items()
                   if isinstance(logger, logging.Logger)})
    signals = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    saved_locale = locale.setlocale(locale.LC_ALL)
    console = _ClientConsole(err)
    name = OPENSTACK.stem
    previous = os.getcwd()
    status: object = 1
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, env, clear=True))
        stack.enter_context(mock.patch.object(sys, "argv", [str(OPENSTACK), *args]))
        stack.enter_context(mock.patch.object(sys, "stdin", io.StringIO()))
        stack.enter_context(mock.patch.multiple(cliff_app.App, NAME=name,
                                                LOG=logging.getLogger(name)))
        stack.enter_context(mock.patch.multiple(
            loader, CONFIG_FILES=from_cwd(loader.CONFIG_FILES),
            SECURE_FILES=from_cwd(loader.SECURE_FILES),
            VENDOR_FILES=from_cwd(loader.VENDOR_FILES)))
        # stdout is a pipe: help and tables as wide as a process's under capture_output
        stack.enter_context(mock.patch("os.get_terminal_size", side_effect=OSError))
        stack.enter_context(mock.patch.object(root, "setLevel", lambda level: None))
        stack.enter_context(warnings.catch_warnings())
        _as_a_process_filters_warnings()
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        root.addHandler(console)
        try:
            os.chdir(where)
            status = shell.main(list(args))
        except SystemExit as done:  # argparse: --help, a wrong flag
            status = done.code
        except Exception:  # as the interpreter shows what reaches it: a traceback, status 1
            traceback.print_exc()
            status = 1
        finally:
            os.chdir(previous)
            for added in [h for h in root.handlers if h not in handlers]:
                root.removeHandler(added)  # the client's console, and ours
            for logger_name, level in levels.items():
                logging.getLogger(logger_name).setLevel(level)
            for signum, handler in signals.items():
                signal.signal(signum, handler)
            locale.setlocale(locale.LC_ALL, saved_locale)
        if status is not None and not isinstance(status, int):
            print(status, file=sys.stderr)  # sys.exit("text"), as the interpreter prints it
            status = 1
    return subprocess.CompletedProcess([str(OPENSTACK), *args], status or 0, out.getvalue(),
                                       err.getvalue())
