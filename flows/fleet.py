"""The fleet's own flows, run on the server's pool "fleet": back up every node, and report.

    python -m flows.fleet backup [--node NAME]... [--full] [--max-parallel N] [--json]
    python -m flows.fleet status [--json]

``fleet_backup`` (deployed as fleet_backup/pre-upgrade) runs each node's ``on-demand-<node>``
deployment, at most ``max_parallel`` at a time, waits for all (one node's failure never stops
the others), leaves the table artifact ``fleet-backup`` and ends Failed naming the failed nodes.
``fleet_status`` leaves the table artifact ``fleet-status``. Neither holds a node secret or a
download link: they only read run states, artifact descriptions and pool heartbeats.
Needs PREFECT_API_URL (and PREFECT_API_AUTH_STRING) of the fleet's server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import sys
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterTags,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment
from prefect.states import Completed, Failed

from flows.fleet_worker import deployment_base
from undercloud_backup.core.errors import BackupError
from undercloud_backup.core.sizes import format_size, parse_size

ON_DEMAND = "on-demand"
BACKUP_DEPLOYMENTS = ("on-demand", "nightly", "weekly-full")
WORKER_ONLINE_S = 60
FILES_KIND = re.compile(r"^- Files: (full|incremental|none)", re.M)
ENCRYPTION = re.compile(r"^- Encryption: (.*)$", re.M)
SIGNATURE = re.compile(r"^- Signature: (.*)$", re.M)
# A row of the backup artifact's objects table: | `name` | 1.5 MiB | segments | sha256 |
OBJECT_SIZE = re.compile(r"^\| `[^`]+` \| ([\d.]+ [KMGT]?i?B) \|", re.M)


class FleetBackupFailed(BackupError):
    """the backup failed on {count} node(s): {nodes}"""

    exit_code = 1


class NoSuchNode(BackupError):
    """no node named {node} in the fleet (its deployments are tagged node:NAME): {known}"""

    exit_code = 2


# The status table's columns, most telling first: a page one screen wide shows them all.
STATUS_COLUMNS = ("node", "worker online", "last backup", "age h", "kind", "size", "encrypted",
                  "signed", "last verify", "next run", "backup_id")


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%MZ")


def _line(text: str | None) -> str:
    return " ".join((text or "").split())[:300]


async def fleet_nodes(client: Any) -> dict[str, Any]:
    """node -> its on-demand deployment, from the tag node:<node>."""
    nodes = {}
    for deployment in await client.read_deployments():
        for tag in deployment.tags:
            if tag.startswith("node:") and deployment.name == f"{ON_DEMAND}-{tag[5:]}":
                nodes[tag[5:]] = deployment
    return nodes


async def _backup_artifact(client: Any, flow_run_id: Any) -> Any:
    artifacts = await client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["undercloud-backup"])),
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return artifacts[0] if artifacts else None


def backup_size(text: str) -> str | None:
    """The backup's stored size: its objects' sizes as the artifact's table lists them."""
    sizes = [parse_size(size.replace(" ", "")) for size in OBJECT_SIZE.findall(text)]
    return format_size(sum(sizes)) if sizes else None


def _from_artifact(artifact: Any) -> dict[str, str | bool | None]:
    if artifact is None:
        return {"backup_id": None, "kind": None, "size": None, "encrypted": None,
                "signed": None}
    text = str(artifact.data or "")
    kind = FILES_KIND.search(text)
    encryption = ENCRYPTION.search(text)
    signature = SIGNATURE.search(text)
    return {"backup_id": (artifact.description or "").removeprefix("Backup ").strip() or None,
            "kind": kind.group(1) if kind else None, "size": backup_size(text),
            "encrypted": encryption.group(1).startswith("age") if encryption else None,
            "signed": signature.group(1).startswith("`manifest.json.sig`") if signature else None}


async def _back_up_node(node: str, deployment: Any, full: bool,
                        gate: asyncio.Semaphore) -> dict[str, Any]:
    parameters = None
    if full:  # a group given is given whole: the deployment's own, with full set
        what = dict((deployment.parameters or {}).get("what") or {})
        parameters = {"what": {**what, "full": True}}
    started = time.monotonic()
    async with gate:
        try:
            run = await run_deployment(f"undercloud_backup/{deployment.name}",
                                       parameters=parameters, timeout=None, poll_interval=2,
                                       tags=["fleet"])
        except Exception as error:  # the run could not even be created
            return {"node": node, "state": "FAILED", "flow_run_id": None, "backup_id": None,
                    "kind": None, "size": None, "seconds": round(time.monotonic() - started, 1),
                    "error": _line(str(error))}
    state = run.state.type.value if run.state else "UNKNOWN"
    async with get_client() as client:
        found = _from_artifact(await _backup_artifact(client, run.id))
    return {"node": node, "state": state, "flow_run_id": str(run.id),
            "backup_id": found["backup_id"] if state == "COMPLETED" else None,
            "kind": found["kind"] if state == "COMPLETED" else None,
            "size": found["size"] if state == "COMPLETED" else None,
            "seconds": round(time.monotonic() - started, 1),
            "error": None if state == "COMPLETED" else _line(run.state and run.state.message)}


async def fan_out(nodes: list[str] | None, full: bool, max_parallel: int) -> list[dict]:
    async with get_client() as client:
        known = await fleet_nodes(client)
    for node in nodes or ():
        if node not in known:
            raise NoSuchNode(node=node, known=", ".join(sorted(known)) or "none")
    chosen = sorted(nodes or known)
    gate = asyncio.Semaphore(max(1, max_parallel))
    return list(await asyncio.gather(*(_back_up_node(n, known[n], full, gate)
                                       for n in chosen)))


@flow(name="fleet_backup", validate_parameters=True)
async def fleet_backup(nodes: list[str] | None = None, full: bool = False,
                       max_parallel: int = 2) -> Any:
    """Back up every node of the fleet (or the nodes named) through its on-demand deployment.

    Args:
        nodes: Only these nodes (default: every node with an on-demand deployment).
        full: A full backup of the files (tar level 0) on every node.
        max_parallel: How many nodes back up at once.
    """
    rows = await fan_out(nodes, full, max_parallel)
    await create_table_artifact(
        key="fleet-backup", description="Fleet backup: one row per node",
        table=[{"node": r["node"], "state": r["state"], "backup id": r["backup_id"] or "",
                "kind": r["kind"] or "", "size": r["size"] or "", "seconds": r["seconds"],
                "error": r["error"] or ""}
               for r in rows])
    failed = [r["node"] for r in rows if r["state"] != "COMPLETED"]
    if failed:
        error = FleetBackupFailed(count=len(failed), nodes=", ".join(failed))
        get_run_logger().error(str(error))
        return Failed(message=str(error), data=rows)
    return Completed(message=f"{len(rows)} node(s) backed up", data=rows)


async def node_status(client: Any, node: str, now: dt.datetime) -> dict[str, Any]:
    deployments = await client.read_deployments(deployment_filter=DeploymentFilter(
        tags=DeploymentFilterTags(all_=[f"node:{node}"])))
    by_name = {deployment_base(d.name, node): d for d in deployments}
    backup_ids = [by_name[n].id for n in BACKUP_DEPLOYMENTS if n in by_name]
    row: dict[str, Any] = {"node": node}
    completed = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=backup_ids),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
        sort=FlowRunSort.END_TIME_DESC, limit=1) if backup_ids else []
    last = completed[0] if completed else None
    row.update(_from_artifact(await _backup_artifact(client, last.id) if last else None))
    row["last backup"] = _when(last.end_time) if last else ""
    row["age h"] = round((now - last.end_time).total_seconds() / 3600, 1) if last else None
    verify = by_name.get("weekly-verify")
    verified = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[verify.id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.COMPLETED, StateType.FAILED, StateType.CRASHED]))),
        sort=FlowRunSort.END_TIME_DESC, limit=1) if verify else []
    row["last verify"] = (f"{verified[0].state.type.value} {_when(verified[0].end_time)}"
                          if verified else "")
    scheduled = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[d.id for d in deployments]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1) if deployments else []
    row["next run"] = _when(scheduled[0].expected_start_time) if scheduled else ""
    pool = deployments[0].work_pool_name if deployments else None
    beats = [w.last_heartbeat_time for w in
             (await client.read_workers_for_work_pool(pool) if pool else [])
             if w.last_heartbeat_time]
    row["worker online"] = bool(beats) and (now - max(beats)).total_seconds() < WORKER_ONLINE_S
    return {column: row[column] for column in STATUS_COLUMNS}


async def collect_status() -> list[dict]:
    now = dt.datetime.now(dt.UTC)
    async with get_client() as client:
        nodes = await fleet_nodes(client)
        return [await node_status(client, node, now) for node in sorted(nodes)]


@flow(name="fleet_status")
async def fleet_status() -> list[dict]:
    """For every node: its last complete backup and age, kind, size, encryption and signature,
    its last verify, its next scheduled run and whether its worker is online."""
    rows = await collect_status()
    await create_table_artifact(key="fleet-status", description="Fleet status: one row per node",
                                table=[{k: ("" if v is None else v) for k, v in r.items()}
                                       for r in rows])
    return rows


def _print_table(rows: list[dict], columns: tuple[str, ...]) -> None:
    for row in rows:
        print("  ".join(f"{c}={row.get(c)}" for c in columns if row.get(c) not in (None, "")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.fleet")
    sub = parser.add_subparsers(dest="command", required=True)
    backup = sub.add_parser("backup", help="back up every node (or those named) now")
    backup.add_argument("--node", action="append", dest="nodes", metavar="NAME")
    backup.add_argument("--full", action="store_true")
    backup.add_argument("--max-parallel", type=int, default=2, metavar="N")
    backup.add_argument("--json", action="store_true")
    status = sub.add_parser("status", help="every node's last backup, verify and worker")
    status.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "status":
            rows = asyncio.run(fleet_status())
            if args.json:
                print(json.dumps({"nodes": rows}, default=str))
            else:
                _print_table(rows, ("node", "backup_id", "age h", "kind", "size", "last verify",
                                    "next run", "worker online"))
            return 0
        state = asyncio.run(fleet_backup(nodes=args.nodes, full=args.full,
                                         max_parallel=args.max_parallel, return_state=True))
        rows = state.result(raise_on_failure=False)
        if asyncio.iscoroutine(rows):
            rows = asyncio.run(rows)
        if isinstance(rows, BaseException):
            raise rows
    except BackupError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    if args.json:
        keys = ("node", "state", "flow_run_id", "backup_id", "error")
        print(json.dumps({"nodes": [{k: r[k] for k in keys} for r in rows]}))
    else:
        _print_table(rows, ("node", "state", "backup_id", "size", "seconds", "error"))
    return 0 if all(r["state"] == "COMPLETED" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
