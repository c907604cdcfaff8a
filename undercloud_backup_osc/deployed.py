"""``openstack undercloud backup --deployment``: start a run of the installed deployment and
follow it, its state changes and log lines on stderr, until it ends.

The run is the worker's: its Swift and database credentials, its privileges, its deployment's
parameters (``privileged``, ``staging_dir``...), each field of which a flag given here
replaces; a group of fields is sent whole (the server replaces a group given, it does not
merge it). Exit statuses: the deployed run's own error's (the same as ``python -m
flows.backup``'s for it), else 76; 77 when the Prefect server cannot be reached.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from undercloud_backup.core.errors import BackupError, ConfigError

FLOW = "undercloud_backup"
DEFAULT_DEPLOYMENT = "on-demand"
INSTALLED_ENV = Path("/etc/undercloud-backup/worker.env")
POLL_S = 2.0
PAGE = 200
LATE_S = 5  # how far back each poll looks again for lines that arrived late
# The engine's last line of a run; a run's state turns final before its last logs arrive.
LAST_LINE = "Finished in state"
LAST_LINE_WAIT_S = 10.0
EXCEPTION = re.compile(r"exception: (\w+): (.*)$", re.S)


class DeployedRunFailed(BackupError):
    """the deployed run {run} ended {state}: {reason}"""

    exit_code = 76  # an error of ours exits with its own status (error_status)

    def __init__(self, status: int | None = None, **fields: object) -> None:
        super().__init__(**fields)
        if status is not None:
            self.exit_code = status


class PrefectUnreachable(BackupError):
    """the Prefect server at {url} did not answer ({reason}); is it running? (PREFECT_API_URL, PREFECT_API_AUTH_STRING)"""  # noqa: E501

    exit_code = 77


class NoSuchDeployment(ConfigError):
    """no deployment {name} on the Prefect server at {url} (deployed: {known})"""


def deployment_name(name: str) -> str:
    """``on-demand`` or ``undercloud_backup/on-demand``: the flow's name is implied."""
    return name if "/" in name else f"{FLOW}/{name}"


def server_settings(environ: dict[str, str]) -> dict[str, str]:
    """The API URL and auth string: Prefect's own settings, else the installed worker's file
    (readable by root) when this node has one."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return {}
    try:
        text = INSTALLED_ENV.read_text()
    except OSError:
        raise ConfigError(detail="no Prefect server to start the deployment on: set "
                                 "PREFECT_API_URL (and PREFECT_API_AUTH_STRING), or run as "
                                 f"root on an installed node ({INSTALLED_ENV})") from None
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING") and value:
            found[key] = value.strip().strip("'\"")
    if "PREFECT_API_URL" not in found:
        raise ConfigError(detail=f"{INSTALLED_ENV} names no PREFECT_API_URL")
    return found


def changed_fields(groups: dict[str, Any]) -> dict[str, dict[str, object]]:
    """The fields whose value is not the flow's default: what the operator asked for."""
    changed: dict[str, dict[str, object]] = {}
    for key, group in groups.items():
        for name, field in type(group).model_fields.items():
            value = getattr(group, name)
            if value != field.default:
                changed.setdefault(key, {})[name] = value
    return changed


def merged(deployed: dict[str, Any], changed: dict[str, dict[str, object]]
           ) -> dict[str, Any]:
    """The deployment's parameters with the changed fields over them, each group whole."""
    parameters: dict[str, Any] = {}
    for key, fields in changed.items():
        parameters[key] = {**dict(deployed.get(key) or {}), **fields}
    return parameters


def error_status(message: str) -> tuple[int, str]:
    """The exit status and line of a failed run from its state message: its error's, when
    the run ended with one of ours."""
    from flows import backup  # noqa: F401 - every error class of a backup is defined
    from flows.params import ui_language  # Prefect's: loaded when a command runs

    errors: list[type[BackupError]] = []
    pending: list[type[BackupError]] = [BackupError]
    while pending:
        for error in pending.pop().__subclasses__():
            errors.append(error)
            pending.append(error)
    found = EXCEPTION.search(message or "")
    if found:  # a run whose engine raised: "...exception: ClassName: message"
        for error in errors:
            if error.__name__ == found.group(1):
                return error.exit_code, " ".join(found.group(2).split())
    # A run whose flow returned its failure: the state's message is the error's line as the
    # form says it, so the class is the one whose template (in the form's words) it fills;
    # the template with the most fixed words wins over looser ones.
    line = " ".join((message or "").split())
    best: tuple[int, int] | None = None
    for error in errors:
        template = ui_language((error.__doc__ or "").strip().split("\n")[0])
        parts = re.split(r"\{\w+\}", template)
        fixed = sum(len(part) for part in parts)
        if fixed and re.fullmatch(".+?".join(map(re.escape, parts)), line, re.S) and (
                best is None or fixed > best[0]):
            best = (fixed, error.exit_code)
    if best is not None:
        return best[1], line
    return DeployedRunFailed.exit_code, line


async def trigger_and_follow(name: str, changed: dict[str, dict[str, object]],
                             dry_run: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Create the run, then say its states and log lines until it ends; its summary."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    from flows import fleet  # Prefect's too, as the imports above

    url = PREFECT_API_URL.value()
    started = time.monotonic()
    async with get_client() as client:
        try:
            deployment = await client.read_deployment_by_name(name)
        except ObjectNotFound:
            known = [f"{FLOW}/{d.name}" for d in await client.read_deployments()]
            raise NoSuchDeployment(name=name, url=url,
                                   known=", ".join(sorted(known)) or "none") from None
        parameters = merged(deployment.parameters or {}, changed)
        if dry_run:
            parameters["dry_run"] = True
        run = await client.create_flow_run_from_deployment(
            deployment.id, parameters=parameters, tags=["openstack-cli"])
        say(f"started run {run.name} ({run.id}) of deployment {name}; following it "
            "(Ctrl-C stops following, not the run)")
        run = await _follow(client, run, say)
        artifact = await fleet._backup_artifact(client, run.id)
    state = run.state.type.value if run.state else "UNKNOWN"
    found = fleet._from_artifact(artifact)
    summary = {"deployment": name, "flow_run_id": str(run.id), "flow_run": run.name,
               "state": state, "backup_id": found["backup_id"], "kind": found["kind"],
               "seconds": round(time.monotonic() - started, 1)}
    if state != "COMPLETED":
        status, line = error_status(run.state.message if run.state else "")
        raise DeployedRunFailed(status, run=run.name, state=state, reason=line or "no message")
    return summary


async def _follow(client: Any, run: Any, say: Callable[[str], None]) -> Any:
    """Say each new state and each new log line (by id: a batch may arrive late, so the
    window reaches back a little) until the run is final and its last line has arrived."""
    from prefect.client.schemas.filters import (
        LogFilter,
        LogFilterFlowRunId,
        LogFilterTimestamp,
    )
    from prefect.client.schemas.sorting import LogSort

    seen: set[Any] = set()
    since, last_state, ended_at, last_line = None, None, None, False
    while True:
        run = await client.read_flow_run(run.id)
        state = run.state.name if run.state else None
        if state != last_state:
            say(f"run {run.name}: {state}")
            last_state = state
        offset, newest = 0, None
        while True:  # every page of lines since the window's start
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]),
                                     timestamp=LogFilterTimestamp(after_=since)),
                sort=LogSort.TIMESTAMP_ASC, limit=PAGE, offset=offset)
            for log in logs:
                if log.id not in seen:
                    seen.add(log.id)
                    say(f"{log.timestamp:%H:%M:%S} {_level(log.level)} {log.message}")
                    last_line = last_line or log.message.startswith(LAST_LINE)
            newest = logs[-1].timestamp if logs else newest
            if len(logs) < PAGE:
                break
            offset += PAGE
        if newest is not None:
            since = newest - dt.timedelta(seconds=LATE_S)
        if run.state and run.state.is_final():
            ended_at = ended_at or time.monotonic()
            if last_line or time.monotonic() - ended_at > LAST_LINE_WAIT_S:
                return run
        await asyncio.sleep(POLL_S)


def _level(level: int) -> str:
    import logging

    return logging.getLevelName(level)


def start(name: str, changed: dict[str, dict[str, object]], dry_run: bool,
          say: Callable[[str], None]) -> dict[str, Any]:
    """:func:`trigger_and_follow`, a server that does not answer (or refuses us) exit 77."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    try:
        return asyncio.run(trigger_and_follow(name, changed, dry_run, say))
    except (httpx.HTTPError, OSError) as error:
        raise PrefectUnreachable(url=PREFECT_API_URL.value(),
                                 reason=" ".join(str(error).split())[:200] or
                                 type(error).__name__) from None
