"""`install.sh`'s fleet roles on one machine: a management host (UCB_ROLE=server: the Prefect
server on PostgreSQL, the fleet's own flows) and two underclouds (UCB_ROLE=node) beside it, each
install with its own users, state, configuration, run and log directories and port, so that
they stay clear of the single-node installation the other tests make. A backup started on the
central server runs on the node it names, through that node's worker; a hostile local user and
the other node find nothing of the new secrets (the PostgreSQL password, the API password) on
an argv or in a file they can read, and cannot change the policy a node's worker holds runs to.
Everything made is removed at the end: users, groups, processes, the PostgreSQL role and
database, directories, the Swift container.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import free_port, remove_container, swift_store
from deploy_helpers import (
    INSTALL,
    REPO,
    VENV,
    Api,
    accounts_removed,
    as_user,
    descendants,
    ensure_nosudo_user,
    grant_traverse,
    remove_tree,
    revoke_traverse,
    scratch_dir,
)
from sample_undercloud import SampleSize, make_files

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="install.sh needs root")

API_USER = "ucbr-api"
# A local user of no role, this module's own: test_deploy and test_security, run beside it
# in another shard, remove the shared ucb-nosudo when they end.
OUTSIDER = "ucbr-other"
NODES = ("r-node1", "r-node2")
DB = "ucbr_prefect"


def env_values(path: Path) -> dict[str, str]:
    """KEY=value lines of a systemd-style environment file (the last of a key wins)."""
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def user_of(node: str) -> str:
    return f"ucbr-{node.removeprefix('r-')}"


class Install:
    """One install.sh installation of a role, in its own scratch directory."""

    def __init__(self, role: str, **extra: str) -> None:
        self.top = scratch_dir(f"ucbr-{role}-")
        self.etc, self.run_dir = self.top / "etc", self.top / "run"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("OS_", "UCB_", "PREFECT_"))}
        self.env = {**env, "UCB_ROLE": role, "UCB_STATE": str(self.top / "state"),
                    "UCB_ETC": str(self.etc), "UCB_RUN_DIR": str(self.run_dir),
                    "UCB_LOG_DIR": str(self.top / "log"), "UCB_APP": str(REPO),
                    "UCB_VENV": str(VENV), **extra}
        self.traces: list[Path] = []
        self.output = ""

    def run(self, *steps: str, trace: bool = False) -> str:
        argv = ["bash", str(INSTALL), *steps]
        if trace:  # every execve (argv) of the steps and their children
            self.traces.append(self.top / f"trace-{len(self.traces)}")
            argv = ["strace", "-f", "--seccomp-bpf", "-e", "trace=execve", "-s", "65535",
                    "-o", str(self.traces[-1]), *argv]
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        self.output += done.stdout + done.stderr
        return done.stdout + done.stderr

    def pid(self, name: str) -> int:
        return int((self.run_dir / f"{name}.pid").read_text())

    def traced(self) -> bytes:
        return b"".join(path.read_bytes() for path in self.traces)


def pg(sql: str, database: str = "postgres") -> list[str]:
    return subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-XAt", "-d", database,
                           "-c", sql],
                          capture_output=True, text=True, cwd="/", check=True).stdout.split()


@pytest.fixture(scope="module")
def fleet(os_env, db_cnf):
    users = (API_USER, *map(user_of, NODES), OUTSIDER)
    container = f"ucbtest-role-{uuid.uuid4().hex[:8]}"
    installs: list[Install] = []
    granted: dict[str, list[Path]] = {}
    with accounts_removed(users=users, groups=users):
        try:
            started = time.monotonic()
            port = free_port()
            server = Install("server", UCB_API_USER=API_USER, UCB_PORT=str(port),
                             UCB_HOST="127.0.0.1", UCB_DB_NAME=DB, UCB_ZOMBIE_AFTER="35")
            installs.append(server)
            server.run("user", trace=True)
            granted[API_USER] = grant_traverse(API_USER, [REPO, VENV])
            server.run("config", trace=True)
            server.run("services")
            server.run("prefect", trace=True)
            server_seconds = time.monotonic() - started
            url = f"http://127.0.0.1:{port}/api"
            auth = env_values(server.etc / "worker.env")["PREFECT_API_AUTH_STRING"]
            nodes = {}
            for node in NODES:
                user = user_of(node)
                install = Install("node", UCB_NODE=node, UCB_SERVER_URL=url, UCB_USER=user,
                                  UCB_GROUP=user, UCB_NODE_PARAMETERS="",
                                  PREFECT_API_AUTH_STRING=auth)
                installs.append(install)
                install.run("user", trace=True)
                granted[user] = grant_traverse(user, [REPO, VENV])
                home = install.top / "state" / "worker"
                entry = pwd.getpwnam(user)
                root = make_files(install.top / "root", SampleSize(
                    images_mib=(1,), swift_objects=2, small_files=5, db_rows=10))
                cnf = home / "my.cnf"
                shutil.copyfile(db_cnf, cnf)
                for path in (root, *root.rglob("*"), cnf):
                    os.chown(path, entry.pw_uid, entry.pw_gid)
                cnf.chmod(0o600)
                (install.top / "parameters.json").write_text(json.dumps({
                    base: {"what": {"root": str(root)}, "swift": {"container": container},
                           "database": {"db_defaults_file": str(cnf)},
                           "advanced": {"staging_dir": str(home), "privileged": False}}
                    for base in ("on-demand", "nightly", "weekly-full")}))
                install.env["UCB_NODE_PARAMETERS"] = str(install.top / "parameters.json")
                install.run("config", trace=True)
                with open(install.etc / "worker.env", "a") as env_file:  # as an operator would
                    env_file.writelines(f"{k}={v}\n" for k, v in os_env.items())
                    env_file.write("PREFECT_WORKER_QUERY_SECONDS=1\n")
                install.run("prefect", trace=True)
                install.run("services")
                nodes[node] = install
            print(f"\nserver role: {server_seconds:.1f} s; with {len(NODES)} nodes: "
                  f"{time.monotonic() - started:.1f} s", file=sys.stderr)
            ensure_nosudo_user(OUTSIDER)
            yield {"server": server, "nodes": nodes, "api": Api(url, auth), "auth": auth,
                   "container": container}
        finally:
            for install in reversed(installs):
                subprocess.run(["bash", str(INSTALL), "stop"], env=install.env,
                               capture_output=True, timeout=120)
            for user, paths in granted.items():
                revoke_traverse(user, paths)
            subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-Xq"], cwd="/",
                           input=f"DROP DATABASE IF EXISTS {DB} WITH (FORCE);\n"
                                 f"DROP ROLE IF EXISTS {DB};\n", text=True, check=False)
            remove_container(container)
            for install in installs:
                remove_tree(install.top)
    # Nothing of it is left.
    assert not [u for u in users if subprocess.run(["id", u], capture_output=True)
                .returncode == 0]
    assert DB not in pg("SELECT datname FROM pg_database UNION ALL SELECT rolname FROM pg_roles")
    assert not any(install.top.exists() for install in installs)


def deployments(api: Api) -> dict[str, dict]:
    return {d["name"]: d for d in api("POST", "/deployments/filter", {})}


def test_the_server_is_on_postgresql_and_runs_only_the_fleets_flows(fleet):
    server, api = fleet["server"], fleet["api"]
    env = server.etc / "server.env"
    url = env_values(env)["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith(f"postgresql+asyncpg://{DB}:") and url.endswith(f"@127.0.0.1:5432/{DB}")
    stat = env.stat()
    assert (stat.st_uid, grp.getgrgid(stat.st_gid).gr_name, stat.st_mode & 0o777) == (
        0, API_USER, 0o640)
    assert DB in pg(f"SELECT datname FROM pg_database WHERE datname = '{DB}'")
    # The server's tables are in that database: Prefect migrated it.
    assert "flow_run" in pg(f"SELECT tablename FROM pg_tables WHERE tableowner = '{DB}'", DB)
    # No backup worker here: one worker, the fleet's, as the server's user; no sudo rule.
    worker = server.pid("worker")
    assert pwd.getpwuid(os.stat(f"/proc/{worker}").st_uid).pw_name == API_USER
    assert b"--pool\0fleet\0" in Path(f"/proc/{worker}/cmdline").read_bytes()
    assert not Path(f"/etc/sudoers.d/{API_USER}").exists()
    pools = {p["name"]: p for p in api("POST", "/work_pools/filter", {})}
    assert set(pools) == {"fleet", *(f"undercloud-{n}" for n in NODES)}
    names = deployments(api)
    assert {"pre-upgrade", "hourly"} <= set(names)
    assert all(names[n]["work_pool_name"] == "fleet" for n in ("pre-upgrade", "hourly"))
    limits = api("POST", "/v2/concurrency_limits/filter", {})
    assert [(c["name"], c["limit"]) for c in limits
            if not c["name"].startswith("deployment:")] == [("fleet-uploads", 2)]


def test_each_node_has_its_pool_deployments_and_policy(fleet):
    api = fleet["api"]
    names = deployments(api)
    pools = {p["name"]: p for p in api("POST", "/work_pools/filter", {})}
    for node, install in fleet["nodes"].items():
        assert pools[f"undercloud-{node}"]["concurrency_limit"] == 1
        for base in ("on-demand", "nightly", "weekly-full", "weekly-verify", "prune"):
            deployment = names[f"{base}-{node}"]
            assert deployment["work_pool_name"] == f"undercloud-{node}"
            assert f"node:{node}" in deployment["tags"]
        policy = json.loads((install.etc / "policy.json").read_text())
        assert policy["parameters"]["on-demand"] == names[f"on-demand-{node}"]["parameters"]
        assert policy["parameters"]["on-demand"]["advanced"]["recipients_file"] == str(
            install.etc / "recipients")
        env = env_values(install.etc / "worker.env")
        assert env["UCB_NODE"] == node and env["PREFECT_API_URL"] == api.url
        worker = install.pid("worker")
        assert pwd.getpwuid(os.stat(f"/proc/{worker}").st_uid).pw_name == user_of(node)
        assert b"flows.fleet_worker\0worker\0" in Path(f"/proc/{worker}/cmdline").read_bytes()


def test_a_backup_started_on_the_server_runs_on_its_node(fleet):
    api, node = fleet["api"], NODES[1]
    deployment = deployments(api)[f"on-demand-{node}"]
    started = time.monotonic()
    run = api("POST", f"/deployments/{deployment['id']}/create_flow_run", {})
    final = api.wait_final(run["id"], timeout=180)
    print(f"\nbackup through the server on {node}: {time.monotonic() - started:.1f} s",
          file=sys.stderr)
    assert final["state"]["type"] == "COMPLETED", final["state"]
    # The node's worker took it (no other polls that pool), and its objects are in Swift,
    # encrypted to the node's recipients.
    workers = api("POST", f"/work_pools/undercloud-{node}/workers/filter", {})
    assert [w["name"] for w in workers] == [node]
    names = [o["name"] for o in swift_store().list(fleet["container"])]
    assert any(n.endswith(".age") for n in names), names
    # The other node ran nothing (its nightly and weekly runs are only scheduled).
    other = api("POST", "/flow_runs/filter", {"work_pools": {"name": {"any_": [
        f"undercloud-{NODES[0]}"]}}})
    assert other and {r["state_type"] for r in other} == {"SCHEDULED"}


def test_no_new_secret_on_an_argv_or_readable_by_another_user(fleet):
    server = fleet["server"]
    database = env_values(server.etc / "server.env")["PREFECT_API_DATABASE_CONNECTION_URL"]
    db_password = database.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    api_password = fleet["auth"].split(":", 1)[1]
    assert len(db_password) >= 20 and len(api_password) >= 20
    for install in (server, *fleet["nodes"].values()):
        traced = install.traced()
        assert b"execve(" in traced and b"installfs.py" in traced
        assert db_password.encode() not in traced and api_password.encode() not in traced
        for process in (install.pid("worker"), *descendants(install.pid("worker"))):
            cmdline = Path(f"/proc/{process}/cmdline").read_bytes()
            assert db_password.encode() not in cmdline and api_password.encode() not in cmdline
    assert b'fleet_deploy.py", "database"' in server.traced()  # where the password is made
    for process in (server.pid("server"), *descendants(server.pid("server"))):
        assert db_password.encode() not in Path(f"/proc/{process}/cmdline").read_bytes()
    # Neither a local user nor a node's worker user reads the server's secrets, nor another
    # node's worker.env; none can change the policy its node's worker holds runs to.
    node1, node2 = (fleet["nodes"][n] for n in NODES)
    for user, path in ((OUTSIDER, server.etc / "server.env"),
                       (OUTSIDER, server.etc / "worker.env"),
                       (user_of(NODES[0]), server.etc / "server.env"),
                       (user_of(NODES[0]), node2.etc / "worker.env"),
                       (OUTSIDER, node1.etc / "worker.env")):
        assert as_user(user, ["cat", str(path)]).returncode != 0, (user, path)
    for install, node in ((node1, NODES[0]), (node2, NODES[1])):
        policy = install.etc / "policy.json"
        before = policy.read_bytes()
        for attempt in (["sh", "-c", f"echo '{{}}' > {policy}"], ["mv", str(policy), "/tmp/x"],
                        ["ln", "-sf", "/dev/null", str(policy)]):
            assert as_user(user_of(node), attempt).returncode != 0
        assert policy.read_bytes() == before and not policy.is_symlink()
        stat = policy.stat()
        assert (stat.st_uid, stat.st_gid, stat.st_mode & 0o777) == (0, 0, 0o644)
    # The PostgreSQL role has a password; whether it keeps local users out is pg_hba.conf's
    # say: where a rule trusts them (as on this test bed) the installer says so.
    assert pg(f"SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = '{DB}'") == ["t"]
    trust = pg("SELECT count(*) FROM pg_hba_file_rules WHERE auth_method = 'trust'")
    argv = ["psql", "-XAtw", "-h", "127.0.0.1", "-U", DB, "-d", DB, "-c", "SELECT 1"]
    let_in = as_user(OUTSIDER, argv).returncode == 0
    assert let_in == (trust != ["0"])
    assert ("pg_hba.conf trusts" in server.output) == let_in


def test_a_database_of_the_name_owned_by_another_role_is_refused():
    """Whoever owns a database of the server's name could read and change the fleet's runs:
    the server role's installer refuses it in one line, and makes no role of that name."""
    taken, other = "ucbr_taken", "ucbr_other"
    setup = f"CREATE ROLE {other};\nCREATE DATABASE {taken} OWNER {other};\n"
    subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-Xq", "-v", "ON_ERROR_STOP=1"],
                   input=setup, text=True, cwd="/", check=True, capture_output=True)
    try:
        done = subprocess.run([sys.executable, "-I",
                               str(REPO / "deployments/prefect/fleet_deploy.py"), "database",
                               taken], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and done.stdout == "", done.stdout
        assert done.stderr == (f"[install] ERROR: the PostgreSQL role and database {taken} were"
                               f" not made: database {taken} exists and belongs to another "
                               "role\n")
        assert taken not in pg("SELECT rolname FROM pg_roles")
        assert pg(f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{taken}'"
                  ) == [other]
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-Xq"], cwd="/",
                       input=f"DROP DATABASE IF EXISTS {taken};\nDROP ROLE IF EXISTS {other};\n"
                             f"DROP ROLE IF EXISTS {taken};\n", text=True, check=False)
