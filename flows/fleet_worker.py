"""The fleet node's worker: a process worker that runs only this node's installed flows.

In a fleet every node's worker holds the one API password, so any node (or anyone holding the
password) can create or change deployments and work pools on every other node's pool. A stock
process worker would then run whatever the deployment says: its pull steps, its entrypoint,
its command, environment and working directory. This worker refuses such a run before any of
its code loads, and the run it accepts starts ``python -m flows.fleet_worker engine``, which
loads the flow from the installed entrypoint of the deployment's name, never from the
deployment, and never runs pull steps: a deployment changed after the check changes nothing.

    python -m flows.fleet_worker worker --pool undercloud-NODE --name NODE
    python -m flows.fleet_worker engine         (started by the worker, one per flow run)

The installed entrypoints are those of prefect.yaml in the working directory (the root-owned
copy of the project the worker runs from). With UCB_FLEET_POLICY (a root-owned JSON file:
{"parameters": {deployment: its parameters}}) a run's parameters must also stay the node's,
except the harmless ones (FREE_PARAMETERS) and retention raised above the node's floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import anyio
import yaml
from prefect.client.orchestration import get_client
from prefect.utilities.dispatch import register_type
from prefect.workers import process as process_worker_module
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

from undercloud_backup.core.errors import BackupError

# The deployments a node runs; in the fleet their names end in "-<node>".
NODE_DEPLOYMENTS = ("on-demand", "nightly", "weekly-full", "weekly-verify", "prune")
# What a deployment's or a run's job variables may set: the heartbeat interval, nothing else.
ALLOWED_ENV = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY"}


class RunRefused(BackupError):
    """refused by node {node}'s worker: {reason}"""

    exit_code = 2


def deployment_base(name: str, node: str) -> str | None:
    """The node deployment a fleet deployment's name stands for (names are ``<base>-<node>``,
    and both bases and node names may hold "-"), or None when the name is not one of node's."""
    base = name.removesuffix(f"-{node}")
    return base if base != name and base in NODE_DEPLOYMENTS else None


def installed_entrypoints(app: str | os.PathLike[str]) -> dict[str, str]:
    """Deployment name (without the node suffix) -> entrypoint, from the installed prefect.yaml."""
    with open(Path(app) / "prefect.yaml", encoding="utf-8") as text:
        project = yaml.safe_load(text)
    return {d["name"]: d["entrypoint"] for d in project.get("deployments", [])
            if d["name"] in NODE_DEPLOYMENTS}


def _check_job_variables(where: str, variables: dict[str, Any] | None) -> str | None:
    for key, value in (variables or {}).items():
        if key != "env":
            return f"{where} sets job variable {key!r}"
        for name, setting in (value or {}).items():
            if name not in ALLOWED_ENV or not str(setting).isdigit():
                return f"{where} sets environment variable {name!r}"
    return None


# Parameters a run may change from the API (the rest is the node's, from its root-owned
# policy): none of them reaches another container, account, key, path or database.
FREE_PARAMETERS = {
    "dry_run", "what.full", "what.db_only", "what.full_every", "swift.segment_size",
    "swift.swift_retries", "swift.swift_timeout", "swift.swift_retry_budget",
    "swift.link_lifetime_hours", "retention.prune", "advanced.compression_level",
    "advanced.task_retries", "advanced.table_checksums", "check_database",
}
# Retention a run may raise but never lower below the node's (nothing more is deleted).
FLOOR_PARAMETERS = {"retention.keep_last", "retention.keep_daily", "retention.keep_weekly",
                    "keep_last", "keep_daily", "keep_weekly", "grace_hours"}


# What the worker itself puts in every run's environment besides its own (Prefect's attribution).
ATTRIBUTION_ENV = {"PREFECT__WORKER_ID", "PREFECT__WORKER_NAME", "PREFECT__FLOW_ID",
                   "PREFECT__FLOW_NAME", "PREFECT__DEPLOYMENT_ID", "PREFECT__DEPLOYMENT_NAME"}


def env_refusal(env: dict[str, str | None], flow_run_id: object) -> str | None:
    """The run's resolved environment may add nothing to the worker's own but Prefect's run
    and attribution variables and the heartbeat interval (whatever template or job variable
    put it there, whenever)."""
    from prefect.settings import get_current_settings

    own = get_current_settings().to_environment_variables(exclude_unset=True)
    for name, value in env.items():
        if name == "PREFECT__FLOW_RUN_ID":
            if value != str(flow_run_id):
                return "the job sets PREFECT__FLOW_RUN_ID"
        elif name in ALLOWED_ENV:
            if not str(value).isdigit():
                return f"the job sets environment variable {name!r}"
        elif name not in ATTRIBUTION_ENV and value not in (os.environ.get(name), own.get(name)):
            return f"the job sets environment variable {name!r}"
    return None


def _flat(values: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in (values or {}).items():
        if isinstance(value, dict):  # an empty group leaves each of its fields unset
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parameter_refusal(installed: dict, asked: dict) -> str | None:
    """Why the run's parameters leave the node's installed bounds, or None."""
    want, have = _flat(installed), _flat(asked)
    for name in sorted(set(want) | set(have)):
        value, allowed = have.get(name), want.get(name)
        if value == allowed or name in FREE_PARAMETERS:
            continue
        if name in FLOOR_PARAMETERS and isinstance(value, int) and isinstance(allowed, int):
            if value >= allowed:
                continue
            return f"parameter {name}={value} is below the node's floor of {allowed}"
        return f"parameter {name} may not be changed from the API (the node's policy sets it)"
    return None


def load_policy(path: str) -> dict:
    """The node's parameters per deployment, from a file root's alone (not the API's)."""
    info = os.stat(path)
    if info.st_uid != 0 or info.st_mode & 0o022:
        raise RunRefused(node=os.environ.get("UCB_NODE", "?"),
                         reason=f"the policy {path} must be root's and writable by root only")
    with open(path, encoding="utf-8") as text:
        return json.load(text)


def refusal(node: str, app: str, deployment: Any, flow_run: Any, base_job_template: dict,
            configuration: ProcessJobConfiguration, policy: dict | None = None) -> str | None:
    """Why this run must not start on this node, or None."""
    if deployment is None:
        return "the run belongs to no deployment (only this node's deployments run here)"
    base = deployment_base(deployment.name, node)
    installed = installed_entrypoints(app)
    if base is None or base not in installed:
        return f"deployment {deployment.name!r} is not one of this node's"
    if deployment.entrypoint != installed[base]:
        return f"entrypoint {deployment.entrypoint!r} is not the installed {installed[base]!r}"
    if deployment.pull_steps:
        return "the deployment has pull steps (the node runs its installed copy only)"
    if base_job_template != ProcessWorker.get_default_base_job_template():
        return "the work pool's base job template was changed"
    for where, variables in (("the deployment", deployment.job_variables),
                             ("the run", flow_run.job_variables)):
        reason = _check_job_variables(where, variables)
        if reason:
            return reason
    if configuration._command_configured:
        return "the job sets a command"
    if configuration.working_dir and Path(configuration.working_dir).resolve() != Path(app):
        return "the job sets a working directory"
    reason = env_refusal(configuration.env, flow_run.id)
    if reason:
        return reason
    if policy is not None:
        if base not in policy.get("parameters", {}):
            return f"the node's policy has no parameters for {base}"
        return parameter_refusal(policy["parameters"][base], flow_run.parameters or {})
    return None


# Defining it registers it as "process" over the stock class (re-registered below): expected.
warnings.filterwarnings("ignore", message="Type 'FleetNodeWorker'", category=UserWarning)


def installed_flow_loader(node: str, app: str) -> Any:
    """A load_flow_from_flow_run that reads only the deployment's name and loads the installed
    entrypoint of that name (no pull steps), for this node's deployments only."""
    async def load(flow_run: Any) -> Any:
        from prefect.flows import load_flow_from_entrypoint

        async with get_client() as client:
            name = (await client.read_deployment(flow_run.deployment_id)).name
        base = deployment_base(name, node)
        installed = installed_entrypoints(app)
        if base is None or base not in installed:
            raise RunRefused(node=node, reason=f"deployment {name!r} is not one of this node's")
        return load_flow_from_entrypoint(str(Path(app) / installed[base]))
    return load


class FleetNodeWorker(ProcessWorker):
    """A process worker that checks each run against the node's installation first.

    Its type stays "process" (the pool's); the stock class is registered again below, so that
    importing this module changes no other code's "process" worker."""

    type = "process"

    def __init__(self, *args: Any, node: str, app: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.node = node
        self.app = str(Path(app).resolve())
        # The process worker loads a run's flow in this process to run its on_crashed and
        # on_cancellation hooks, through the deployment as it is then (pull steps included):
        # here, only from the installed entrypoint.
        process_worker_module.load_flow_from_flow_run = installed_flow_loader(node, self.app)

    async def run(self, flow_run: Any, configuration: ProcessJobConfiguration,
                  task_status: anyio.abc.TaskStatus[int] | None = None) -> ProcessWorkerResult:
        # Read again: resolving the job configuration took the run's env out of this copy.
        flow_run = await self.client.read_flow_run(flow_run.id)
        deployment = None
        if flow_run.deployment_id:
            deployment = await self.client.read_deployment(flow_run.deployment_id)
        pool = await self.client.read_work_pool(self.work_pool.name)
        try:
            policy = load_policy(os.environ["UCB_FLEET_POLICY"])
        except KeyError:
            policy = None
        except (OSError, ValueError, RunRefused) as error:
            policy = {"parameters": {}}  # nothing runs on a node whose policy is unreadable
            self.get_flow_run_logger(flow_run).error("node policy unreadable: %s", error)
        reason = refusal(self.node, self.app, deployment, flow_run, pool.base_job_template,
                         configuration, policy)
        if reason:
            error = RunRefused(node=self.node, reason=reason)
            self.get_flow_run_logger(flow_run).error(str(error))
            await self._propose_failed_state(flow_run, error)
            if task_status is not None:
                task_status.started(0)
            return ProcessWorkerResult(status_code=0, identifier="refused")
        # Our engine, from the installed copy, with the worker's own environment plus the
        # run's checked additions: nothing of the deployment's code path is used.
        configuration.command = f"{sys.executable} -m flows.fleet_worker engine"
        configuration._command_configured = True
        configuration.working_dir = Path(self.app)
        return await super().run(flow_run, configuration, task_status)


with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # "process" registered twice, on purpose
    register_type(ProcessWorker)


async def _start_worker(pool: str, name: str, node: str, app: str) -> None:
    async with FleetNodeWorker(work_pool_name=pool, name=name, node=node, app=app) as worker:
        await worker.start()


def _engine() -> None:
    """Run the flow run named by PREFECT__FLOW_RUN_ID from the installed entrypoint."""
    from uuid import UUID

    from prefect.engine import handle_engine_signals
    from prefect.flow_engine import load_flow_run, run_flow
    from prefect.flows import load_flow_from_entrypoint

    flow_run_id = UUID(os.environ["PREFECT__FLOW_RUN_ID"])
    node = os.environ["UCB_NODE"]
    with handle_engine_signals(flow_run_id):
        flow_run = load_flow_run(flow_run_id=flow_run_id)

        async def deployment_name() -> str:
            async with get_client() as client:
                return (await client.read_deployment(flow_run.deployment_id)).name

        name = asyncio.run(deployment_name())
        base = deployment_base(name, node)
        installed = installed_entrypoints(os.getcwd())
        if base is None or base not in installed:
            raise SystemExit(f"refused: deployment {name} is not one of node {node}'s")
        # Checked again on the very parameters this process runs with: the run's parameters
        # can be changed through the API after the worker's check.
        policy_path = os.environ.get("UCB_FLEET_POLICY")
        if policy_path:
            installed_parameters = load_policy(policy_path).get("parameters", {}).get(base)
            reason = ("the node's policy has no parameters for " + base
                      if installed_parameters is None
                      else parameter_refusal(installed_parameters, flow_run.parameters or {}))
            if reason:
                _fail(flow_run_id, str(RunRefused(node=node, reason=reason)))
                return
        flow = load_flow_from_entrypoint(str(Path(os.getcwd()) / installed[base]))
        run_flow(flow, flow_run=flow_run)


def _fail(flow_run_id: object, message: str) -> None:
    from prefect.states import Failed

    async def fail() -> None:
        async with get_client() as client:
            await client.set_flow_run_state(flow_run_id, Failed(message=message), force=True)
    print(message, file=sys.stderr)
    asyncio.run(fail())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.fleet_worker")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="poll this node's pool")
    worker.add_argument("--pool", required=True)
    worker.add_argument("--name", required=True)
    sub.add_parser("engine", help="run one flow run (started by the worker)")
    args = parser.parse_args(argv)
    if args.command == "engine":
        _engine()
        return 0
    node = os.environ.get("UCB_NODE")
    if not node:
        print("UCB_NODE is not set: the node's name (worker.env)", file=sys.stderr)
        return 2
    asyncio.run(_start_worker(args.pool, args.name, node, os.getcwd()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
