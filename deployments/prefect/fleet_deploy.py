"""A fleet's server and nodes on the Prefect server: what `install.sh` (UCB_ROLE=server or
node) and the dev fleet (deployments/dev/fleet.py) both make, from one place.

    python fleet_deploy.py database NAME          the PostgreSQL role and database NAME on the
                                                  local server (made, or its password reset);
                                                  prints the postgresql+asyncpg URL on stdout
    python fleet_deploy.py server --app APP [--uploads N]
    python fleet_deploy.py node --app APP --node NODE [--etc DIR] [--parameters FILE]

`server`: the pool "fleet" with the fleet's own deployments (fleet_backup/pre-upgrade,
fleet_status/hourly, its schedule inactive) and the global concurrency limit on uploads.
`node`: the pool ``undercloud-NODE`` (one run at a time) and the node's deployments
``<name>-NODE`` tagged ``node:NODE``, from APP's prefect.yaml, their parameters pointing at the
node's recipients, signing key and allowed signers in DIR, overridden per deployment by the
JSON of FILE; prints the node's policy (those parameters, JSON), which its installer keeps
in a root-owned file the node's worker holds every run to. Idempotent. The API from
PREFECT_API_URL and PREFECT_API_AUTH_STRING. Runs as root: `database` runs psql as the
postgres user, the SQL (and with it the password) on psql's stdin, never an argv.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

FLEET_POOL = "fleet"
DEFAULT_UPLOADS = 2
NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
Parameters = Callable[[str, dict], dict]  # (deployment base name, prefect.yaml's) -> the node's
_FLOWS: dict[str, tuple[str, dict]] = {}  # entrypoint -> flow name, parameter schema


def psql(sql: str) -> None:
    """SQL through psql's stdin as postgres (peer authentication on the local socket); a
    failure is raised with psql's error line alone (its context lines may quote the SQL)."""
    done = subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-q", "-X", "-v",
                           "ON_ERROR_STOP=1"], input=sql.encode(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, cwd="/")
    if done.returncode:
        lines = done.stderr.decode(errors="replace").splitlines()
        error = next((line for line in lines if "ERROR:" in line), "psql failed")
        raise RuntimeError(error.split("ERROR:", 1)[-1].strip())


def make_database(name: str, fresh: bool = False) -> str:
    """Role ``name`` (LOGIN, a new password) and its database ``name``; kept when they exist
    unless ``fresh`` (dropped first). Returns the server's connection URL."""
    if not NAME.match(name):
        raise SystemExit(f"database name {name!r}: lowercase letters, digits and '_'")
    password = secrets.token_urlsafe(24)  # URL-safe: goes into the URL as is
    # A failing statement is logged with its text unless log_min_error_statement says not:
    # the password must not reach PostgreSQL's log.
    sql = ["SET log_min_error_statement = panic;", "SET log_statement = 'none';"]
    if fresh:
        sql += [f"DROP DATABASE IF EXISTS {name} WITH (FORCE);", f"DROP ROLE IF EXISTS {name};"]
    # A database of that name that another role owns would let that role read and change the
    # server's data: refused, nothing changed.
    sql += [
        "DO $$ BEGIN IF EXISTS (SELECT FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba "
        f"WHERE d.datname = '{name}' AND r.rolname <> '{name}') THEN RAISE EXCEPTION "
        f"'database {name} exists and belongs to another role'; END IF; END $$;",
        f"SELECT 'CREATE ROLE {name} LOGIN' WHERE NOT EXISTS "
        f"(SELECT FROM pg_roles WHERE rolname = '{name}')\\gexec",
        f"ALTER ROLE {name} LOGIN PASSWORD '{password}';",
        f"SELECT 'CREATE DATABASE {name} OWNER {name}' WHERE NOT EXISTS "
        f"(SELECT FROM pg_database WHERE datname = '{name}')\\gexec",
    ]
    try:
        psql("\n".join(sql) + "\n")
    except RuntimeError as error:
        raise SystemExit(f"[install] ERROR: the PostgreSQL role and database {name} were not "
                         f"made: {str(error).replace(password, '***')}") from None
    return f"postgresql+asyncpg://{name}:{password}@127.0.0.1:5432/{name}"


def trusted(name: str) -> bool:
    """Whether pg_hba.conf lets some connection to database ``name`` in without a password
    (``trust``): then every local user is the server's role, whatever its password."""
    done = subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-XAt", "-c",
                           "SELECT count(*) FROM pg_hba_file_rules WHERE auth_method = 'trust' "
                           f"AND ('all' = ANY(database) OR '{name}' = ANY(database))"],
                          capture_output=True, text=True, cwd="/")
    return done.returncode == 0 and done.stdout.strip() not in ("", "0")


def drop_database(name: str) -> None:
    psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);\nDROP ROLE IF EXISTS {name};\n")


def merge(base: dict, override: dict) -> dict:
    """``override`` deep-merged over a copy of ``base``."""
    out = json.loads(json.dumps(base))
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def etc_parameters(etc: Path, overrides: dict[str, dict]) -> Parameters:
    """A real node's parameters: the installed defaults with the node's own keys in ``etc``
    (named, so that the policy pins them), then the operator's overrides per deployment."""
    def parameters(base: str, installed: dict) -> dict:
        p = json.loads(json.dumps(installed))
        if base in ("on-demand", "nightly", "weekly-full"):
            p.setdefault("advanced", {}).update(recipients_file=str(etc / "recipients"),
                                                signing_key=str(etc / "signing-key"))
        elif base == "weekly-verify":
            p["allowed_signers"] = str(etc / "allowed_signers")
        return merge(p, overrides.get(base, {}))
    return parameters


async def deploy_node(node: str, app: Path, parameters: Parameters) -> dict:
    """The node's pool (one run at a time) and deployments, from the installed prefect.yaml;
    returns the policy the node's worker holds every run to (its deployments' parameters)."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        DeploymentScheduleCreate,
        WorkPoolCreate,
        WorkPoolUpdate,
    )
    from prefect.client.schemas.objects import ConcurrencyOptions
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema
    from prefect.workers.process import ProcessWorker

    if str(app) not in sys.path:
        sys.path.insert(0, str(app))
    os.chdir(app)
    from flows.fleet_worker import NODE_DEPLOYMENTS

    project = yaml.safe_load((app / "prefect.yaml").read_text())
    pool = f"undercloud-{node}"
    policy: dict = {"parameters": {}}
    async with get_client() as client:
        template = ProcessWorker.get_default_base_job_template()
        try:
            await client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", concurrency_limit=1, base_job_template=template))
        except ObjectAlreadyExists:
            # Made by a worker that polled first, or changed since: one run at a time and the
            # stock template again (the node's worker refuses runs under any other).
            await client.update_work_pool(pool, WorkPoolUpdate(
                concurrency_limit=1, base_job_template=template))
        for d in project["deployments"]:
            base = d["name"]
            if base not in NODE_DEPLOYMENTS:
                continue
            if d["entrypoint"] not in _FLOWS:  # each module loaded once: many nodes faster
                flow = load_flow_from_entrypoint(str(app / d["entrypoint"]))
                _FLOWS[d["entrypoint"]] = (flow.name, parameter_schema(flow).model_dump())
            flow_name, schema = _FLOWS[d["entrypoint"]]
            flow_id = await client.create_flow_from_name(flow_name)
            values = parameters(base, d.get("parameters", {}))
            policy["parameters"][base] = values
            schedules = [DeploymentScheduleCreate(
                schedule=CronSchedule(cron=s["cron"], timezone=s.get("timezone", "UTC")),
                active=s.get("active", True)) for s in d.get("schedules") or []]
            await client.create_deployment(
                flow_id=flow_id, name=f"{base}-{node}", entrypoint=d["entrypoint"],
                description=d.get("description"), work_pool_name=pool,
                tags=[*d.get("tags", []), f"node:{node}"],
                parameters=values, parameter_openapi_schema=schema,
                job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}},
                path=str(app), pull_steps=[], schedules=schedules, concurrency_limit=1,
                concurrency_options=ConcurrencyOptions(collision_strategy="ENQUEUE"))
    return policy


async def deploy_server(app: Path, uploads: int = DEFAULT_UPLOADS) -> None:
    """The fleet's own pool and deployments, and the global limit on concurrent uploads."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        DeploymentScheduleCreate,
        GlobalConcurrencyLimitCreate,
        WorkPoolCreate,
    )
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    if str(app) not in sys.path:
        sys.path.insert(0, str(app))
    from flows.fleet_uploads import LIMIT_NAME

    async with get_client() as client:
        try:
            await client.create_work_pool(WorkPoolCreate(name=FLEET_POOL, type="process"))
        except ObjectAlreadyExists:
            pass
        try:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=LIMIT_NAME, limit=uploads))
        except ObjectAlreadyExists:
            pass
        for entrypoint, name, schedules in (
                ("flows/fleet.py:fleet_backup", "pre-upgrade", []),
                ("flows/fleet.py:fleet_status", "hourly", [DeploymentScheduleCreate(
                    schedule=IntervalSchedule(interval=3600), active=False)])):
            flow = load_flow_from_entrypoint(str(app / entrypoint))
            flow_id = await client.create_flow_from_name(flow.name)
            await client.create_deployment(
                flow_id=flow_id, name=name, entrypoint=entrypoint, work_pool_name=FLEET_POOL,
                tags=["fleet"], parameter_openapi_schema=parameter_schema(flow).model_dump(),
                path=str(app), pull_steps=[], schedules=schedules)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fleet_deploy.py")
    sub = parser.add_subparsers(dest="command", required=True)
    database = sub.add_parser("database")
    database.add_argument("name")
    server = sub.add_parser("server")
    server.add_argument("--app", type=Path, required=True)
    server.add_argument("--uploads", type=int, default=DEFAULT_UPLOADS)
    node = sub.add_parser("node")
    node.add_argument("--app", type=Path, required=True)
    node.add_argument("--node", required=True)
    node.add_argument("--etc", type=Path, default=Path("/etc/undercloud-backup"))
    node.add_argument("--parameters", type=Path)
    args = parser.parse_args(argv)
    if args.command == "database":
        print(make_database(args.name))
        if trusted(args.name):
            print(f"[install] WARNING: PostgreSQL's pg_hba.conf trusts some connections to "
                  f"{args.name} (auth method trust): any local user can then use the fleet's "
                  "database without its password; use scram-sha-256 (or peer) there",
                  file=sys.stderr)
    elif args.command == "server":
        asyncio.run(deploy_server(args.app, args.uploads))
    else:
        overrides: Any = {}
        if args.parameters:
            overrides = json.loads(args.parameters.read_text())
            if not isinstance(overrides, dict) or not all(
                    isinstance(v, dict) for v in overrides.values()):
                raise SystemExit(f"{args.parameters}: a JSON object of deployment name to "
                                 "parameters")
        policy = asyncio.run(deploy_node(args.node, args.app,
                                         etc_parameters(args.etc, overrides)))
        print(json.dumps(policy, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
