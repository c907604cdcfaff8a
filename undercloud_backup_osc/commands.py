"""``openstack undercloud backup [run|list|verify|restore]``: each its ``python -m flows.*``
twin's flags, flow and exit status, with the ``openstack`` client's login and output formats.

Output: the twin's ``--json`` object (or, for ``list``, its backups) as the client's columns,
so ``-f json`` prints the same keys; warnings and the one-line error go to stderr, the error
last, as the twins print them. The flows are imported when a command runs, not when
``openstack`` loads its plugins.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from cliff import columns
from osc_lib.command import command

from undercloud_backup.core.errors import BackupError, ConfigError
from undercloud_backup_osc import auth, deployed
from undercloud_backup_osc.deployed import DEFAULT_DEPLOYMENT

PROG = "openstack undercloud backup"
BACKUP_KEYS = ("backup_id", "container", "manifest", "objects", "dry_run", "kind", "parent",
               "pruned", "partial_database", "warnings")


class _Json(columns.FormattableColumn):
    """A list or dict: as is for ``-f json``/``yaml``, one JSON text in a table."""

    def human_readable(self) -> str:
        value = self._value
        if isinstance(value, dict):
            return "\n".join(f"{key}: {_text(item)}" for key, item in value.items())
        return "\n".join(_text(item) for item in value)


def _text(item: object) -> str:
    """One line: a string as is, an object by its name (and size) where it has one."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and "name" in item:
        size = f" ({item['size']} bytes)" if isinstance(item.get("size"), int) else ""
        return f"{item['name']}{size}"
    return json.dumps(item)


def row(data: dict[str, Any]) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    return tuple(data), tuple(_Json(v) if isinstance(v, list | dict) else v
                              for v in data.values())


@dataclass
class Outcome:
    """What a command shows (None: nothing, it failed), its exit status, and lines for
    stderr after the output (warnings, said last as the twins say them)."""

    shown: tuple[tuple[str, ...], Any] | None
    status: int
    after: list[str] = field(default_factory=list)


def _prepare_process() -> None:
    """What ``python -m flows.*`` does first (flows.cli.entry_point): no telemetry, SIGTERM
    an exception (so a run's clean-up runs), SIGINT a KeyboardInterrupt."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows import cli  # Prefect's: loaded when a command runs, after the setting above

    signal.signal(signal.SIGTERM, cli._sigterm_as_exception)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@contextmanager
def _login(client_manager: Any, swift_block: str | None) -> Iterator[None]:
    """The run's Swift target: a named block, else the openstack client's own session."""
    if swift_block:
        yield
        return
    from undercloud_backup.config import provided_swift  # pymysql's: when a command runs

    with provided_swift(auth.swift_settings(client_manager)):
        yield


def _print_error(prog: str, error: Exception) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    return error.exit_code if isinstance(error, BackupError) else 1


class _Runs:
    """cliff's display ``run``, with the command's own exit status and nothing shown on
    failure (cliff's returns 0 once it has shown something)."""

    app: Any
    formatter: Any
    _formatter_plugins: Any
    _run_before_hooks: Callable[[argparse.Namespace], argparse.Namespace]
    _run_after_hooks: Callable[..., Any]
    produce_output: Callable[..., Any]

    def run(self, parsed_args: argparse.Namespace) -> int:
        parsed_args = self._run_before_hooks(parsed_args)
        self.formatter = self._formatter_plugins[parsed_args.formatter].obj
        _prepare_process()
        outcome = self.act(parsed_args)
        if outcome.shown is not None:
            self.show(parsed_args, outcome.shown)
        for line in outcome.after:
            print(line, file=sys.stderr, flush=True)
        return outcome.status

    def show(self, parsed_args: argparse.Namespace, shown: tuple[tuple[str, ...], Any]) -> None:
        names, data = self._run_after_hooks(parsed_args, shown)
        self.produce_output(parsed_args, names, data)
        self.app.stdout.flush()

    def act(self, parsed_args: argparse.Namespace) -> Outcome:
        raise NotImplementedError

    def take_action(self, parsed_args: argparse.Namespace) -> Any:  # cliff's abstract method
        raise NotImplementedError("run() calls act()")


class BackupRun(_Runs, command.ShowOne):
    """Back up this undercloud (MariaDB and files) into Swift, as python -m flows.backup.

    The Swift target is the cloud the openstack client logs in to (OS_*, --os-cloud), or
    --swift-block. With --deployment, starts a run of the installed deployment instead (the
    worker's credentials and privileges) and follows it until it ends.
    """

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        from flows import params  # Prefect's: loaded when a command runs

        parser = super().get_parser(prog_name)
        parser.add_argument("--dry-run", action="store_true",
                            help="show the plan and check space; write nothing")
        parser.add_argument(
            "--deployment", nargs="?", const=DEFAULT_DEPLOYMENT, metavar="NAME",
            help="start a run of this deployment on the Prefect server (default "
                 f"{DEFAULT_DEPLOYMENT}; PREFECT_API_URL, or the installed worker's) and "
                 "follow it: the worker's credentials, its deployment's parameters with the "
                 "flags given here over them")
        for group in params.GROUPS.values():
            params.add_arguments(parser, group)
        return parser

    def act(self, parsed_args: argparse.Namespace) -> Outcome:
        from flows import params  # Prefect's: loaded when a command runs

        prog = PROG
        try:  # a value out of range: one line, as the twin's
            groups = {key: params.from_args(parsed_args, group)
                      for key, group in params.GROUPS.items()}
        except ConfigError as error:
            return Outcome(None, _print_error(prog, error))
        if parsed_args.deployment:
            return self._deployed(parsed_args, groups)
        return self._here(parsed_args, groups)

    def _here(self, parsed_args: argparse.Namespace, groups: dict[str, Any]) -> Outcome:
        from flows import backup, cli  # Prefect's: loaded when a command runs

        def call() -> backup.BackupSummary:
            with _login(self.app.client_manager, parsed_args.swift_block):
                return backup.undercloud_backup(dry_run=parsed_args.dry_run, **groups)

        result, status = cli.run(PROG, call)
        if result is None:
            return Outcome(None, status)
        summary = result.to_dict()  # the columns: the twin's --json keys
        shown = {key: summary.get(key) for key in BACKUP_KEYS}
        shown["warnings"] = summary.get("warnings") or []
        after = [f"WARNING: {summary['partial_database']}"] if summary.get(
            "partial_database") else []
        after += [f"WARNING: {warning}" for warning in shown["warnings"]]
        return Outcome(row(shown), 0, after)

    def _deployed(self, parsed_args: argparse.Namespace, groups: dict[str, Any]) -> Outcome:
        from prefect.settings import (
            PREFECT_API_AUTH_STRING,
            PREFECT_API_URL,
            temporary_settings,
        )

        from flows import cli  # Prefect's: loaded when a command runs

        try:
            found = deployed.server_settings(dict(os.environ))
        except ConfigError as error:
            return Outcome(None, _print_error(PROG, error))
        updates = {PREFECT_API_URL: found["PREFECT_API_URL"]} if found else {}
        if found.get("PREFECT_API_AUTH_STRING"):
            updates[PREFECT_API_AUTH_STRING] = found["PREFECT_API_AUTH_STRING"]
        name = deployed.deployment_name(parsed_args.deployment)

        def say(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        with temporary_settings(updates=updates) if updates else nullcontext():
            summary, status = cli.run(PROG, lambda: deployed.start(
                name, deployed.changed_fields(groups), parsed_args.dry_run, say))
        return Outcome(row(summary) if summary else None, status)


class BackupList(_Runs, command.Lister):
    """List the complete backups in the container, oldest first, as python -m flows.backup
    --list."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("--container", metavar="NAME",
                            help="Swift container (default undercloud-backups)")
        parser.add_argument("--swift-block", metavar="NAME",
                            help="saved Swift Backup Target block (default: the openstack "
                                 "client's login)")
        return parser

    def act(self, parsed_args: argparse.Namespace) -> Outcome:
        from blocks.sources import SwiftSource  # Prefect's: loaded when a command runs
        from flows import cli  # Prefect's, likewise
        from undercloud_backup.store import catalogue  # swiftclient's, likewise
        from undercloud_backup.store import session as swift_session  # swiftclient's, likewise

        def call() -> list[dict]:
            with _login(self.app.client_manager, parsed_args.swift_block):
                settings = SwiftSource(block=parsed_args.swift_block,
                                       container=parsed_args.container).settings()
                with swift_session.open_store(settings) as store:
                    entries = catalogue.describe(
                        store, settings.container,
                        catalogue.list_backups(store, settings.container))
            return [entry.to_dict() for entry in entries]

        entries, status = cli.run(f"{PROG} list", call, server=False)
        if entries is None:
            return Outcome(None, status)
        names = ("backup_id", "last_modified", "kind", "parent", "partial_database",
                 "manifest")
        return Outcome((names, [tuple(e[n] for n in names) for e in entries]), 0)


class _FlatFlow(_Runs, command.ShowOne):
    """A flow declared with flat parameters (flows.params.declared): its flags and its call."""

    flow_module = ""
    flow_function = ""
    prog = ""

    def _flow(self) -> tuple[Any, list]:
        import importlib

        module = importlib.import_module(self.flow_module)
        return getattr(module, self.flow_function), module.PARAMETERS

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        from flows import params  # Prefect's: loaded when a command runs

        parser = super().get_parser(prog_name)
        params.add_flow_arguments(parser, self._flow()[1])
        return parser

    def call(self, parsed_args: argparse.Namespace,
             on_backup_error: Callable[[Exception], None] | None = None,
             interrupted: str = "") -> tuple[Any, int]:
        from flows import cli, params  # Prefect's: loaded when a command runs

        flow, parameters = self._flow()

        def call() -> Any:
            with _login(self.app.client_manager, parsed_args.swift_block):
                return flow(**params.flow_arguments(parsed_args, parameters))

        return cli.run(self.prog, call, on_backup_error=on_backup_error,
                       interrupted=interrupted)


class BackupVerify(_FlatFlow):
    """Prove a backup restores, as python -m flows.verify: every object and segment read
    back, the archive listed, the dump loaded into a throwaway MariaDB and compared."""

    flow_module, flow_function, prog = "flows.verify", "verify_backup", f"{PROG} verify"

    def act(self, parsed_args: argparse.Namespace) -> Outcome:
        def show_report(error: Exception) -> None:  # what differed, before the error line
            report = getattr(error, "fields", {}).get("report")
            if isinstance(report, dict):
                self.show(parsed_args, row(report))

        report, status = self.call(parsed_args, on_backup_error=show_report)
        if report is None:
            return Outcome(None, status)
        return Outcome(row(report.to_dict()), 0, [f"warning: {w}" for w in report.warnings])


class BackupRestore(_FlatFlow):
    """Restore an undercloud backup, as python -m flows.restore: files into a target root (a
    new scratch directory by default), databases into a MariaDB server."""

    flow_module, flow_function, prog = "flows.restore", "undercloud_restore", f"{PROG} restore"

    def act(self, parsed_args: argparse.Namespace) -> Outcome:
        result, status = self.call(parsed_args,
                                   interrupted="what was written so far stays in place")
        if result is None:
            return Outcome(None, status)
        return Outcome(row(result.to_dict()), 0, [f"warning: {w}" for w in result.warnings])
