"""A fleet on one machine, for tests and for trying it: the body of deployments/dev/fleet.sh.

    fleet.sh up N | down | status | worker NODE

`up`: a Prefect server on the local PostgreSQL (its own role and database, password on no
argv), then N simulated nodes, each with its own system user, state directory, sample
undercloud root, MariaDB (own datadir, socket, port), Keystone user and project (so its own
Swift account), work pool ``undercloud-<node>`` with the node's deployments, and a worker
(flows/fleet_worker.py) running as that user from a root-owned copy of the project. One JSON
line per node, then one for the server. `down` removes everything `up` recorded in
$STATE/fleet.json. `worker NODE` starts the node's worker again (after a test killed it).

Nodes are node1..nodeN, or the names in UCB_FLEET_NAMES (comma-separated; "-" allowed). With
UCB_ALERT_WEBHOOK_URL set, each node gets its alerts (deployments/prefect/fleet_alerts.py,
windows UCB_FLEET_SILENCE_HOURS [26] and UCB_FLEET_OFFLINE_HOURS [1]) through a webhook block;
runs without heartbeats for UCB_FLEET_ZOMBIE_AFTER seconds [90] are CRASHED. Runs as root,
with the loopback Keystone and Swift of deployments/dev/services.sh.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SRC = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(SRC / "deployments" / "prefect"))
import fleet_deploy  # noqa: E402 - the pieces install.sh's server and node roles share

STATE = Path(os.environ.get("UCB_FLEET_STATE", "/var/lib/ucb-fleet"))
VENV = Path(os.environ.get("UCB_FLEET_VENV", str(SRC / ".venv")))
DEV_STATE = Path(os.environ.get("UCB_DEV_STATE", "/var/lib/undercloud-backup-dev"))
PREFIX = os.environ.get("UCB_FLEET_PREFIX", "ucbf")
UPLOADS = int(os.environ.get("UCB_FLEET_UPLOADS", "2"))
MANIFEST = STATE / "fleet.json"
DB_NAME = f"{PREFIX}_prefect"
SERVER_USER = f"{PREFIX}-server"
FLEET_POOL = fleet_deploy.FLEET_POOL
SQLITE = os.environ.get("UCB_FLEET_DATABASE", "postgresql") == "sqlite"
ZOMBIE_AFTER = int(os.environ.get("UCB_FLEET_ZOMBIE_AFTER", "90"))
NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$")


def log(message: str) -> None:
    print(f"[fleet] {message}", file=sys.stderr, flush=True)


def load() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}


def save(state: dict) -> None:
    tmp = MANIFEST.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.chmod(0o600)
    tmp.replace(MANIFEST)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip().removeprefix("export ").strip()
        if line and not line.startswith("#") and "=" in line:
            for part in line.split():
                key, _, value = part.partition("=")
                values[key] = value.strip("'\"")
    return values


def write_env(path: Path, values: dict[str, str], group: str | None = None) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    os.chown(path, 0, pwd.getpwnam(group).pw_gid if group else 0)
    path.chmod(0o640 if group else 0o600)


def make_user(name: str, home: Path, state: dict) -> pwd.struct_passwd:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--home-dir", str(home),
                        "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    state.setdefault("users", [])
    if name not in state["users"]:
        state["users"].append(name)
        save(state)
    home.mkdir(mode=0o700, exist_ok=True)
    user = pwd.getpwnam(name)
    os.chown(home, user.pw_uid, user.pw_gid)
    return user


def start(name: str, argv: list[str], env: dict[str, str], user: pwd.struct_passwd,
          cwd: Path, state: dict) -> int:
    logfile = open(STATE / "log" / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
    process = subprocess.Popen(argv, env=env, cwd=cwd, user=user.pw_uid, group=user.pw_gid,
                               extra_groups=[], umask=0o077, start_new_session=True,
                               stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile)
    state.setdefault("pids", {})[name] = process.pid
    save(state)
    return process.pid


def api_env(url: str, auth: str, home: Path) -> dict[str, str]:
    return {"PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": auth, "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def wait_healthy(url: str, auth: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url + "/health")
    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    while True:
        try:
            urllib.request.urlopen(request, timeout=2)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise SystemExit(f"the server at {url} did not answer in {timeout:.0f} s: "
                                 f"see {STATE}/log/server.log") from None
            time.sleep(0.5)


# ------------------------------------------------------------------------------ Keystone
class Keystone:
    """The admin's session on the loopback Keystone (services.sh's keystone-admin.env)."""

    def __init__(self) -> None:
        from keystoneauth1 import session
        from keystoneauth1.identity import v3

        admin = env_file(DEV_STATE / "keystone-admin.env")
        self.url = admin["OS_AUTH_URL"].rstrip("/")
        self.session = session.Session(auth=v3.Password(
            auth_url=self.url, username=admin["OS_USERNAME"], password=admin["OS_PASSWORD"],
            project_name="admin", user_domain_name="Default", project_domain_name="Default"))

    def call(self, method: str, path: str, **kwargs):
        return self.session.request(self.url + path, method, raise_exc=False, **kwargs)

    def make(self, name: str) -> tuple[str, str, str]:
        """Project and user ``name`` (member of it); returns their ids and the password."""
        password = secrets.token_urlsafe(18)
        project = self.call("POST", "/projects", json={"project": {
            "name": name, "domain_id": "default"}}).json()["project"]["id"]
        user = self.call("POST", "/users", json={"user": {
            "name": name, "password": password, "domain_id": "default",
            "default_project_id": project}}).json()["user"]["id"]
        role = self.call("GET", "/roles?name=member").json()["roles"][0]["id"]
        self.call("PUT", f"/projects/{project}/users/{user}/roles/{role}")
        return project, user, password

    def remove(self, project: str, user: str) -> None:
        self.call("DELETE", f"/users/{user}")
        self.call("DELETE", f"/projects/{project}")


def empty_account(env: dict[str, str]) -> None:
    """Delete every container (and object) of the node's Swift account."""
    from keystoneauth1 import session
    from keystoneauth1.identity import v3
    from swiftclient import client as swc

    auth = v3.Password(auth_url=env["OS_AUTH_URL"], username=env["OS_USERNAME"],
                       password=env["OS_PASSWORD"], project_name=env["OS_PROJECT_NAME"],
                       user_domain_name="Default", project_domain_name="Default")
    conn = swc.Connection(session=session.Session(auth=auth),
                          os_options={"region_name": env["OS_REGION_NAME"]}, retries=1)
    for container in conn.get_account(full_listing=True)[1]:
        for obj in conn.get_container(container["name"], full_listing=True)[1]:
            conn.delete_object(container["name"], obj["name"])
        conn.delete_container(container["name"])


# ------------------------------------------------------------------------------ pieces
def copy_app() -> Path:
    """A root-owned copy of the project: what every worker runs, and cannot change."""
    app = STATE / "app"
    if app.exists():
        shutil.rmtree(app)
    app.mkdir(mode=0o755)
    files = subprocess.run(["git", "-C", str(SRC), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], check=True, capture_output=True).stdout
    subprocess.run(f"cd {SRC} && tar --null -T - -cf - | tar -xf - -C {app} --no-same-owner",
                   shell=True, input=files, check=True)
    subprocess.run(["chmod", "-R", "u+rwX,go+rX,go-w", str(app)], check=True)
    return app


def start_server(state: dict) -> tuple[str, str]:
    user = make_user(SERVER_USER, STATE / "server", state)
    if SQLITE:  # for comparison (benchmarks/fleet.py): the single-node install's database
        database = f"sqlite+aiosqlite:///{STATE / 'server' / 'prefect.db'}"
    else:
        state["database"] = DB_NAME
        save(state)
        database = fleet_deploy.make_database(DB_NAME, fresh=True)
    port = free_port()
    auth = "admin:" + secrets.token_urlsafe(18)
    env = {
        "PATH": "/usr/bin:/bin", "HOME": str(STATE / "server"), "LANG": "C.UTF-8",
        "PREFECT_HOME": str(STATE / "server"),
        "PREFECT_SERVER_UI_STATIC_DIRECTORY": str(STATE / "server" / "ui"),
        "PREFECT_API_DATABASE_CONNECTION_URL": database,
        "PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The UI asks the API where the server listens (not the default 4200).
        "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE":
            "prefect.server.concurrency.lease_storage.filesystem",
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "5",
    }
    write_env(STATE / "server.env", env)  # root's 0600: the database password
    start("server", [str(VENV / "bin/prefect"), "server", "start", "--host", "127.0.0.1",
                     "--port", str(port), "--analytics-off"], env, user, STATE / "server", state)
    url = f"http://127.0.0.1:{port}/api"
    state["server"] = url
    save(state)
    return url, auth


def start_mariadb(node: str, user: pwd.struct_passwd, home: Path, state: dict,
                  rows: int) -> tuple[int, str]:
    sys.path.insert(0, str(SRC / "tests"))
    from sample_undercloud import database_sql

    db = home / "mysql"
    db.mkdir(mode=0o700)
    (db / "tmp").mkdir(mode=0o700)
    for path in (db, db / "tmp"):
        os.chown(path, user.pw_uid, user.pw_gid)
    port, sock = free_port(), str(db / "mysqld.sock")
    as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "cwd": "/"}
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={db / 'data'}",
                    "--auth-root-authentication-method=socket",
                    f"--auth-root-socket-user={user.pw_name}",
                    "--skip-test-db", "--skip-name-resolve", f"--tmpdir={db / 'tmp'}"],
                   check=True, capture_output=True, **as_user)
    start(f"mariadb-{node}", ["/usr/sbin/mariadbd", "--no-defaults", f"--datadir={db / 'data'}",
                              f"--socket={sock}", f"--port={port}", "--bind-address=127.0.0.1",
                              f"--pid-file={db / 'mysqld.pid'}", f"--tmpdir={db / 'tmp'}",
                              f"--log-error={db / 'error.log'}", "--skip-name-resolve",
                              "--innodb-buffer-pool-size=32M", "--skip-log-bin",
                              "--performance-schema=OFF"],
          {"PATH": "/usr/bin:/bin"}, user, Path("/"), state)
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        if time.monotonic() > deadline:
            raise SystemExit(f"MariaDB of {node} did not start: {db / 'error.log'}")
        time.sleep(0.2)
    subprocess.run(["mariadb", "--no-defaults", f"--socket={sock}", f"--user={user.pw_name}"],
                   input=database_sql(rows).encode(), check=True, **as_user)
    return port, sock


def node_parameters(base: str, parameters: dict, node_dir: Path, home: Path) -> dict:
    """The installed deployment's defaults, with this node's paths."""
    p = json.loads(json.dumps(parameters))
    if base in ("on-demand", "nightly", "weekly-full"):
        p["what"]["root"] = str(node_dir / "root")
        p["database"] = {"db_defaults_file": str(home / ".my.cnf")}
        p["advanced"].update(staging_dir=str(home / "staging"), privileged=False,
                             recipients_file=str(node_dir / "recipients"),
                             signing_key=str(node_dir / "signing-key"))
    elif base == "weekly-verify":
        p.update(staging_dir=str(home / "staging"),
                 allowed_signers=str(node_dir / "allowed_signers"),
                 db_defaults_file=str(home / ".my.cnf"))
    return p


def set_up_alerts(app: Path, nodes: list[str]) -> None:
    """The zombie automation, and each node's alerts when a webhook URL is given."""
    sys.path.insert(0, str(app / "deployments" / "prefect"))
    import alerts
    import fleet_alerts
    import zombie_automation

    log(alerts.apply(zombie_automation.automation(ZOMBIE_AFTER)))
    url = os.environ.get(alerts.URL_ENV)
    if not url:
        return
    block_id = alerts.save_block("webhook", url, "fleet")
    silence = float(os.environ.get("UCB_FLEET_SILENCE_HOURS", "26"))
    offline = float(os.environ.get("UCB_FLEET_OFFLINE_HOURS", "1"))
    for node in nodes:
        for automation in fleet_alerts.node_automations(
                node, block_id, datetime.timedelta(hours=silence),
                datetime.timedelta(hours=offline)):
            log(alerts.apply(automation))


def start_worker(node: str, state: dict) -> int:
    """The node's worker, as the node's user, from the root-owned copy."""
    node_dir = STATE / "nodes" / node
    user = pwd.getpwnam(state["nodes"][node]["user"])
    env = env_file(node_dir / "worker.env")
    return start(f"worker-{node}", [str(VENV / "bin/python"), "-m", "flows.fleet_worker",
                                    "worker", "--pool", f"undercloud-{node}", "--name", node],
                 env, user, STATE / "app", state)


def node_names(count: int) -> list[str]:
    names = [n.strip() for n in os.environ.get("UCB_FLEET_NAMES", "").split(",") if n.strip()]
    names = names[:count] + [f"node{i}" for i in range(len(names) + 1, count + 1)]
    bad = [n for n in names if not NODE_NAME.match(n)]
    if bad or len(set(names)) != len(names):
        raise SystemExit(f"node names: lowercase letters, digits and '-', at most 20, unique: "
                         f"{', '.join(bad) or 'duplicates'}")
    return names


def keygen(node_dir: Path, user: pwd.struct_passwd, node: str) -> None:
    """The node's age recipients (identity root's, for tests) and its signing key."""
    subprocess.run(["age-keygen", "-o", str(node_dir / "identity")], check=True,
                   capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(node_dir / "identity")], check=True,
                            capture_output=True, text=True).stdout
    (node_dir / "recipients").write_text(public)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", node, "-f",
                    str(node_dir / "signing-key")], check=True, stdin=subprocess.DEVNULL)
    os.chown(node_dir / "signing-key", 0, user.pw_gid)
    (node_dir / "signing-key").chmod(0o640)
    key = (node_dir / "signing-key.pub").read_text().split()
    (node_dir / "allowed_signers").write_text(
        f'undercloud-backup@{socket.gethostname()} namespaces="undercloud-backup" '
        f"{key[0]} {key[1]}\n")


def up(count: int) -> None:
    if MANIFEST.exists():
        raise SystemExit(f"a fleet is up ({MANIFEST}): run 'fleet.sh down' first")
    started = time.monotonic()
    STATE.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chown(STATE, 0, 0)
    STATE.chmod(0o755)
    (STATE / "log").mkdir(mode=0o700, exist_ok=True)
    (STATE / "nodes").mkdir(mode=0o755, exist_ok=True)
    state: dict = {"nodes": {}}
    save(state)
    app = copy_app()
    url, auth = start_server(state)
    operator = api_env(url, auth, STATE / "operator-home")
    (STATE / "operator-home").mkdir(mode=0o700, exist_ok=True)
    write_env(STATE / "operator.env", operator)
    os.environ.update(operator)
    keystone = Keystone()
    sys.path.insert(0, str(SRC / "tests"))
    from sample_undercloud import SampleSize, make_files

    nodes = []
    for node in node_names(count):
        node_dir = STATE / "nodes" / node
        node_dir.mkdir(mode=0o755)
        user = make_user(f"{PREFIX}-{node}", node_dir / "home", state)
        home = node_dir / "home"
        record: dict = {"user": user.pw_name}
        state["nodes"][node] = record
        save(state)
        make_files(node_dir / "root", SampleSize(images_mib=(1,), swift_objects=4,
                                                 small_files=10))
        subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(node_dir / "root")],
                       check=True)
        (home / "staging").mkdir(mode=0o700)
        (home / "prefect").mkdir(mode=0o700)
        for path in (home / "staging", home / "prefect"):
            os.chown(path, user.pw_uid, user.pw_gid)
        port, sock = start_mariadb(node, user, home, state, rows=50)
        record.update(db_port=port, db_socket=sock)
        save(state)
        cnf = home / ".my.cnf"
        cnf.write_text(f"[client]\nsocket={sock}\nuser={user.pw_name}\n")
        os.chown(cnf, user.pw_uid, user.pw_gid)
        cnf.chmod(0o600)
        project, ks_user, password = keystone.make(f"{PREFIX}-{node}")
        record.update(project=project, keystone_user=ks_user)
        save(state)
        keygen(node_dir, user, node)
        env = {**api_env(url, auth, home / "prefect"),
               "PATH": f"{VENV}/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
               "UCB_NODE": node, "UCB_FLEET_POLICY": str(node_dir / "policy.json"),
               "PREFECT_WORKER_QUERY_SECONDS": "2",
               "PREFECT_WORKER_HEARTBEAT_SECONDS": "10",
               "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
               "OS_AUTH_URL": keystone.url, "OS_USERNAME": f"{PREFIX}-{node}",
               "OS_PASSWORD": password, "OS_PROJECT_NAME": f"{PREFIX}-{node}",
               "OS_USER_DOMAIN_NAME": "Default", "OS_PROJECT_DOMAIN_NAME": "Default",
               "OS_REGION_NAME": "RegionOne", "OS_INTERFACE": "public"}
        write_env(node_dir / "worker.env", env, user.pw_name)
        nodes.append((node, user, node_dir, home, env))
        print(json.dumps({"node": node, "user": user.pw_name, "pool": f"undercloud-{node}",
                          "root": str(node_dir / "root"), "db_port": port, "db_socket": sock,
                          "env": str(node_dir / "worker.env")}), flush=True)
    wait_healthy(url, auth)
    sys.path.insert(0, str(app))

    async def deploy_all() -> None:
        await fleet_deploy.deploy_server(app, UPLOADS)
        for node, _, node_dir, home, _ in nodes:
            policy = await fleet_deploy.deploy_node(
                node, app, lambda base, p, d=node_dir, h=home: node_parameters(base, p, d, h))
            # What the node's worker holds every run's parameters to: root's, not the API's.
            (node_dir / "policy.json").write_text(json.dumps(policy, indent=1))
            (node_dir / "policy.json").chmod(0o644)
    asyncio.run(deploy_all())
    set_up_alerts(app, [node for node, *_ in nodes])
    server = pwd.getpwnam(SERVER_USER)
    start("worker-fleet", [str(VENV / "bin/prefect"), "worker", "start", "--pool", FLEET_POOL,
                           "--type", "process", "--name", "fleet"],
          {**operator, "PATH": f"{VENV}/bin:/usr/bin:/bin", "HOME": str(STATE / "server"),
           "PREFECT_HOME": str(STATE / "server"), "PREFECT_WORKER_QUERY_SECONDS": "2"},
          server, app, state)
    for node, *_ in nodes:
        start_worker(node, state)
    print(json.dumps({"server": url, "env": str(STATE / "operator.env")}), flush=True)
    log(f"up: {count} nodes in {time.monotonic() - started:.1f} s")


def _running(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def stop_pids(pids: list[int]) -> None:
    """SIGTERM each process group, SIGKILL what still runs 10 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)


def down() -> None:
    state = load()
    started = time.monotonic()
    pids = state.get("pids", {})
    stop_pids([pid for name, pid in pids.items()
               if not name.startswith("mariadb") and name != "server"])
    keystone = None
    for node, record in state.get("nodes", {}).items():
        env_path = STATE / "nodes" / node / "worker.env"
        if env_path.exists():
            try:
                empty_account(env_file(env_path))
            except Exception as error:  # a half-made node: its account may not exist
                log(f"{node}: Swift account not emptied: {error}")
        if "project" in record:
            keystone = keystone or Keystone()
            keystone.remove(record["project"], record["keystone_user"])
    stop_pids([pid for name, pid in pids.items()
               if name.startswith("mariadb") or name == "server"])
    if state.get("database"):
        fleet_deploy.drop_database(DB_NAME)
    for user in state.get("users", []):
        subprocess.run(["pkill", "-KILL", "-u", user], check=False)
        subprocess.run(["userdel", user], check=False, capture_output=True)
        subprocess.run(["groupdel", user], check=False, capture_output=True)
    if STATE.exists():
        shutil.rmtree(STATE)
    log(f"down in {time.monotonic() - started:.1f} s")


def status() -> int:
    state = load()
    if not state:
        print(json.dumps({"up": False}))
        return 1
    alive = {name: _running(pid) for name, pid in state.get("pids", {}).items()}
    print(json.dumps({"up": True, "server": state.get("server"), "nodes": list(state["nodes"]),
                      "processes": alive}))
    return 0 if all(alive.values()) else 1


def main(argv: list[str]) -> int:
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    if argv[:1] == ["up"] and len(argv) == 2 and argv[1].isdigit() and int(argv[1]) > 0:
        up(int(argv[1]))
        return 0
    if argv == ["down"]:
        down()
        return 0
    if argv == ["status"]:
        return status()
    if argv[:1] == ["worker"] and len(argv) == 2:
        state = load()
        if argv[1] not in state.get("nodes", {}):
            raise SystemExit(f"no node {argv[1]} in the fleet")
        if _running(state.get("pids", {}).get(f"worker-{argv[1]}", 0)):
            raise SystemExit(f"the worker of {argv[1]} runs")
        start_worker(argv[1], state)
        return 0
    raise SystemExit("usage: fleet.sh up N | down | status | worker NODE")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
