"""A fleet of three simulated underclouds on one Prefect server (deployments/dev/fleet.sh): the
fan-out before an upgrade, one node failing alone, a compromised node's attacks on another, the
status page in a browser, and a node whose worker is killed mid-run (crashed run, slots freed,
alerts naming the node).

The fleet is brought up once for the module and removed at its end, whatever happened. Its third
node's name holds a "-" (deployment names are "<deployment>-<node>").
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from swiftclient import client as swc
from test_alerts import Receiver

REPO = Path(__file__).resolve().parents[1]
FLEET = REPO / "deployments" / "dev" / "fleet.sh"
STATE = Path("/var/lib/ucb-fleet")
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
NODE3 = "edge-3"
SILENCE_S, OFFLINE_S, ZOMBIE_S = 20, 10, 35  # the fleet's alert windows, shortened for tests
SHOTS = Path(os.environ.get("UCB_UI_SCREENSHOTS", "/var/tmp/ucb-ui-screenshots"))

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="fleet.sh needs root")


def env_file(path: str | Path) -> dict[str, str]:
    values = {}
    for line in Path(path).read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key] = value
    return values


class Api:
    """The Prefect REST API with one holder's password: the operator's or a node's."""

    def __init__(self, env: dict[str, str]) -> None:
        self.url = env["PREFECT_API_URL"].rstrip("/")
        token = base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()
        self.headers = {"Authorization": f"Basic {token}"}

    def __call__(self, method: str, route: str, /, **body: object) -> object:
        answer = requests.request(method, self.url + route, headers=self.headers,
                                  json=body if method != "GET" else None, timeout=30)
        assert answer.ok, f"{method} {route}: {answer.status_code} {answer.text[:300]}"
        return answer.json() if answer.content else None

    def wait(self, run_id: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self("GET", f"/flow_runs/{run_id}")
            if run["state"] and run["state"]["type"] in FINAL:
                return run
            assert time.monotonic() < deadline, f"run {run_id} still {run['state']}"
            time.sleep(1)


@pytest.fixture(scope="module")
def fleet(services):
    if (STATE / "fleet.json").exists():  # a previous session's, killed before its `down`
        subprocess.run([str(FLEET), "down"], capture_output=True, timeout=300)
    started = time.monotonic()
    receiver = Receiver()
    env = {**os.environ, "UCB_FLEET_NAMES": f"node1,node2,{NODE3}",
           "UCB_ALERT_WEBHOOK_URL": receiver.url, "UCB_FLEET_ZOMBIE_AFTER": str(ZOMBIE_S),
           "UCB_FLEET_SILENCE_HOURS": str(SILENCE_S / 3600),
           "UCB_FLEET_OFFLINE_HOURS": str(OFFLINE_S / 3600)}
    up = subprocess.run([str(FLEET), "up", "3"], capture_output=True, text=True, timeout=300,
                        env=env)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        lines = [json.loads(line) for line in up.stdout.splitlines()]
        nodes = {line["node"]: line for line in lines[:-1]}
        server = lines[-1]
        print(f"fleet up: {time.monotonic() - started:.1f} s", file=sys.stderr)
        status = subprocess.run([str(FLEET), "status"], capture_output=True, text=True,
                                timeout=60)
        assert status.returncode == 0 and json.loads(status.stdout)["up"], status.stdout
        yield {"nodes": nodes, "server": server, "operator": env_file(server["env"]),
               "alerts": receiver}
    finally:
        receiver.close()
        started = time.monotonic()
        down = subprocess.run([str(FLEET), "down"], capture_output=True, text=True,
                              timeout=300)
        print(f"fleet down: {time.monotonic() - started:.1f} s", file=sys.stderr)
        assert down.returncode == 0, down.stderr[-3000:]
        users = {n["user"] for n in nodes.values()} if up.returncode == 0 else set()
        leftovers = [u for u in users if subprocess.run(["id", u], capture_output=True)
                     .returncode == 0]
        assert not STATE.exists() and not leftovers
        databases = subprocess.run(
            ["runuser", "-u", "postgres", "--", "psql", "-Atc",
             "SELECT datname FROM pg_database UNION ALL SELECT rolname FROM pg_roles"],
            capture_output=True, text=True, cwd="/", check=True).stdout.split()
        assert not [name for name in databases if name.startswith("ucbf")]


def fleet_cli(fleet: dict, *args: str) -> tuple[int, dict, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": fleet["operator"]["PREFECT_HOME"],
           **fleet["operator"]}
    done = subprocess.run([sys.executable, "-m", "flows.fleet", *args, "--json"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    return done.returncode, json.loads(done.stdout or "{}"), done.stderr


def artifact_rows(api: Api, key: str) -> list[dict]:
    found = api("POST", "/artifacts/latest/filter", artifacts={"key": {"any_": [key]}},
                limit=1)
    data = found[0]["data"]
    return json.loads(data) if isinstance(data, str) else data


@pytest.mark.slow
@needs_root
def test_fan_out_backs_up_every_node(fleet):
    started = time.monotonic()
    rc, out, err = fleet_cli(fleet, "backup", "--max-parallel", "3")
    seconds = time.monotonic() - started
    print(f"fan-out of 3 nodes: {seconds:.1f} s", file=sys.stderr)
    assert rc == 0, err[-2000:]
    assert {n["node"]: n["state"] for n in out["nodes"]} == dict.fromkeys(fleet["nodes"],
                                                                          "COMPLETED")
    assert all(n["backup_id"] and n["flow_run_id"] and n["error"] is None
               for n in out["nodes"])
    api = Api(fleet["operator"])
    rows = artifact_rows(api, "fleet-backup")
    assert {r["node"]: r["state"] for r in rows} == dict.fromkeys(fleet["nodes"], "COMPLETED")
    assert all(r["size"].endswith(("KiB", "MiB")) for r in rows), rows
    rc, status, err = fleet_cli(fleet, "status")
    assert rc == 0, err[-2000:]
    ids = {n["node"]: n["backup_id"] for n in out["nodes"]}
    assert {r["node"]: r["backup_id"] for r in status["nodes"]} == ids
    assert all(r["worker online"] and r["age h"] < 1 for r in status["nodes"])
    assert {r["node"]: r["size"] for r in status["nodes"]} == {r["node"]: r["size"] for r in rows}
    assert {r["node"] for r in artifact_rows(api, "fleet-status")} == set(fleet["nodes"])


@pytest.mark.slow
@needs_root
def test_a_node_whose_mariadb_is_down_fails_alone(fleet):
    pid = json.loads((STATE / "fleet.json").read_text())["pids"]["mariadb-node2"]
    os.killpg(pid, signal.SIGKILL)
    # An unreachable MariaDB is retried (10 s, then 20 s): not what this test is about.
    api = Api(fleet["operator"])
    deployment = api("GET", "/deployments/name/undercloud_backup/on-demand-node2")
    parameters = deployment["parameters"]
    api("PATCH", f"/deployments/{deployment['id']}", parameters={
        **parameters, "advanced": {**parameters["advanced"], "task_retries": 0}})
    try:
        rc, out, err = fleet_cli(fleet, "backup", "--max-parallel", "3")
    finally:
        api("PATCH", f"/deployments/{deployment['id']}", parameters=parameters)
    assert rc == 1, err[-2000:]
    states = {n["node"]: n for n in out["nodes"]}
    assert states["node2"]["state"] == "FAILED" and states["node2"]["backup_id"] is None
    error = states["node2"]["error"]
    assert error and "\n" not in error, error
    print(f"node2's error line: {error}", file=sys.stderr)
    assert states["node1"]["state"] == states[NODE3]["state"] == "COMPLETED"
    assert "node2" in err.splitlines()[-1] or "node2" in err


# ------------------------------------------------------------------- a compromised node1
def node_api(fleet: dict, node: str) -> Api:
    return Api(env_file(fleet["nodes"][node]["env"]))


@pytest.fixture
def evil(tmp_path):
    """A flow, and a directory node2's user could write a marker in."""
    top = Path("/tmp") / f"ucb-fleet-evil-{uuid.uuid4().hex}"
    top.mkdir(mode=0o755)
    marker = top / "marker"
    (top / "evil.py").write_text(
        "from pathlib import Path\nfrom prefect import flow\n"
        f"Path({str(marker)!r}).touch()\n@flow\ndef evil():\n    Path({str(marker)!r}).touch()\n")
    top.chmod(0o777)
    yield top, marker
    subprocess.run(["rm", "-rf", str(top)], check=True)


def refused_all(api: Api, runs: dict[str, str], reasons: dict[str, str]) -> None:
    for what, run_id in runs.items():
        run = api.wait(run_id)
        message = run["state"]["message"] or ""
        assert run["state"]["type"] == "FAILED", (what, run["state"])
        assert message.count("\n") == 0 and "refused by node node2's worker" in message, message
        assert reasons[what] in message, (what, message)


@pytest.mark.slow
@needs_root
def test_node_cannot_run_code_on_another_node(fleet, evil):
    """With node1's API password: a deployment on node2's pool, changes to each of node2's own
    deployments, a run's own job variables and node2's pool's base job template, each meant to
    touch a marker as node2's user. Every run is refused on node2 before any of its code loads:
    Failed, one line saying why, no marker."""
    api = node_api(fleet, "node1")
    top, marker = evil
    pool = "undercloud-node2"
    deployments = {d["name"].removesuffix("-node2"): d for d in api(
        "POST", "/deployments/filter", deployments={"tags": {"all_": ["node:node2"]}})}
    keep = ("entrypoint", "pull_steps", "job_variables", "path")
    originals = {base: {k: d[k] for k in keep} for base, d in deployments.items()}
    template = api("GET", f"/work_pools/{pool}")["base_job_template"]
    touch = {"prefect.deployments.steps.run_shell_script": {"script": f"touch {marker}"}}
    flow_id = api("POST", "/flows/", name="evil")["id"]
    attacks = {  # deployment -> (the change, what the refusal says)
        "on-demand": ({"entrypoint": f"{top}/evil.py:evil"}, "is not the installed"),
        "nightly": ({"pull_steps": [touch]}, "has pull steps"),
        "weekly-full": ({"job_variables": {"command": f"touch {marker}"}},
                        "sets job variable 'command'"),
        "weekly-verify": ({"job_variables": {"env": {"PYTHONPATH": str(top)}}},
                          "sets environment variable 'PYTHONPATH'"),
        "prune": ({"job_variables": {"working_dir": str(top)}},
                  "sets job variable 'working_dir'"),
    }
    reasons = {base: reason for base, (_, reason) in attacks.items()}
    runs: dict[str, str] = {}
    try:
        new = api("POST", "/deployments/", name="evil-node2", flow_id=flow_id,
                  work_pool_name=pool, entrypoint=f"{top}/evil.py:evil", path=str(top),
                  pull_steps=[touch])
        runs["new"], reasons["new"] = (api("POST", f"/deployments/{new['id']}/create_flow_run")
                                       ["id"], "is not one of this node's")
        for base, (change, _) in attacks.items():
            api("PATCH", f"/deployments/{deployments[base]['id']}", **change)
            runs[base] = api("POST", f"/deployments/{deployments[base]['id']}/create_flow_run")[
                "id"]
        refused_all(api, runs, reasons)
        for base, original in originals.items():
            api("PATCH", f"/deployments/{deployments[base]['id']}", **original)
        on_demand = deployments["on-demand"]["id"]
        second = {"run env": api("POST", f"/deployments/{on_demand}/create_flow_run",
                                 job_variables={"env": {"PYTHONPATH": str(top)}})["id"]}
        refused_all(api, second, {"run env": "the run sets environment variable"})
        bad = json.loads(json.dumps(template))
        bad["job_configuration"]["command"] = f"touch {marker}"
        api("PATCH", f"/work_pools/{pool}", base_job_template=bad)
        third = {"pool": api("POST", f"/deployments/{on_demand}/create_flow_run")["id"]}
        refused_all(api, third, {"pool": "base job template was changed"})
    finally:
        for base, original in originals.items():
            api("PATCH", f"/deployments/{deployments[base]['id']}", **original)
        api("PATCH", f"/work_pools/{pool}", base_job_template=template)
    assert not marker.exists()


def node2_objects(fleet: dict) -> list[tuple[str, str]]:
    conn = swift_as(env_file(fleet["nodes"]["node2"]["env"]))
    return [(o["name"], o["hash"]) for o in conn.get_container("undercloud-backups",
                                                               full_listing=True)[1]]


@pytest.mark.slow
@needs_root
def test_node_cannot_ask_another_node_for_destructive_parameters(fleet):
    """With node1's API password, runs of node2's own deployments with retention below the
    node's floor, another container, or its own recipients: refused on node2, one line,
    nothing deleted or written."""
    api = node_api(fleet, "node1")
    before = node2_objects(fleet)
    assert before, "node2 has no backup yet"
    deployments = {d["name"].removesuffix("-node2"): d for d in api(
        "POST", "/deployments/filter", deployments={"tags": {"all_": ["node:node2"]}})}
    on_demand = deployments["on-demand"]
    asked = {
        "prune": ("prune", {"keep_last": 0, "keep_daily": 0, "keep_weekly": 0,
                            "grace_hours": 0}, "below the node's floor"),
        "retention": ("on-demand", {"retention": {**on_demand["parameters"]["retention"],
                                                  "keep_last": 0}},
                      "retention.keep_last=0 is below"),
        "container": ("on-demand", {"swift": {"container": "stolen"}},
                      "parameter swift.container may not be changed"),
        "recipients": ("on-demand", {"advanced": {**on_demand["parameters"]["advanced"],
                                                  "recipients_file": "/tmp/attacker"}},
                       "advanced.recipients_file may not be changed"),
    }
    runs = {what: api("POST", f"/deployments/{deployments[base]['id']}/create_flow_run",
                      parameters=parameters)["id"] for what, (base, parameters, _) in asked.items()}
    refused_all(api, runs, {what: reason for what, (_, _, reason) in asked.items()})
    assert node2_objects(fleet) == before


@pytest.mark.slow
@needs_root
def test_no_node_secret_is_stored_on_the_server(fleet):
    api = Api(fleet["operator"])
    secrets = [env_file(n["env"])["OS_PASSWORD"] for n in fleet["nodes"].values()]
    database = env_file(STATE / "server.env")["PREFECT_API_DATABASE_CONNECTION_URL"]
    secrets.append(urlsplit(database).password)
    for node in fleet["nodes"]:
        key = (STATE / "nodes" / node / "signing-key").read_text().splitlines()[1]
        secrets.append(key)
        secrets.append((STATE / "nodes" / node / "identity").read_text().split()[-1])
    stored = json.dumps([
        api("POST", "/block_documents/filter", include_secrets=True),
        api("POST", "/variables/filter"),
        api("POST", "/deployments/filter"),
        api("POST", "/work_pools/filter"),
        api("POST", "/artifacts/filter"),
        api("POST", "/flow_runs/filter"),
        api("POST", "/logs/filter", limit=200),
    ])
    assert len(secrets) == 3 * 3 + 1
    assert not [s for s in secrets if s in stored]


def swift_as(env: dict[str, str]) -> swc.Connection:
    from keystoneauth1 import session
    from keystoneauth1.identity import v3

    auth = v3.Password(auth_url=env["OS_AUTH_URL"], username=env["OS_USERNAME"],
                       password=env["OS_PASSWORD"], project_name=env["OS_PROJECT_NAME"],
                       user_domain_name="Default", project_domain_name="Default")
    return swc.Connection(session=session.Session(auth=auth), retries=0,
                          os_options={"region_name": env["OS_REGION_NAME"],
                                      "interface": "public"})


@pytest.mark.slow
@needs_root
def test_a_node_cannot_touch_another_nodes_backups(fleet):
    """node1's Swift token is refused on edge-3's objects."""
    mine = swift_as(env_file(fleet["nodes"]["node1"]["env"]))
    theirs = swift_as(env_file(fleet["nodes"][NODE3]["env"]))
    url, _ = theirs.get_auth()
    objects = theirs.get_container("undercloud-backups")[1]
    assert objects, f"{NODE3} has no backup to attack"
    name = objects[0]["name"]
    my_url, token = mine.get_auth()
    assert my_url != url
    attempts = {
        "list": lambda: swc.get_container(url, token, "undercloud-backups"),
        "read": lambda: swc.get_object(url, token, "undercloud-backups", name),
        "overwrite": lambda: swc.put_object(url, token, "undercloud-backups", name, b"x"),
        "delete": lambda: swc.delete_object(url, token, "undercloud-backups", name),
    }
    for what, attempt in attempts.items():
        with pytest.raises(swc.ClientException) as refused:
            attempt()
        assert refused.value.http_status == 403, what
    assert theirs.head_object("undercloud-backups", name)["etag"] == objects[0]["hash"]


@pytest.mark.slow
@needs_root
def test_no_artifact_links_to_a_plain_text_backup(fleet):
    """The node runs' artifacts give TempURLs only to age-encrypted objects and the manifest
    (names, sizes, checksums: no file content); the fleet's artifacts hold none at all."""
    import re

    api = Api(fleet["operator"])
    links = []
    for artifact in api("POST", "/artifacts/filter"):
        found = re.findall(r"https?://\S+?temp_url_sig=\S+?(?=[\s)\]>`'\"]|$)",
                           str(artifact["data"]))
        if artifact["key"] in ("fleet-backup", "fleet-status"):
            assert not found and "temp_url" not in str(artifact["data"])
        links += [link.split("?")[0] for link in found]
    assert links
    assert all(link.endswith(".age") or link.endswith("/manifest.json") for link in links), \
        [x for x in links if not x.endswith(".age")]


# ------------------------------------------------------------------- the node's policy
def _policy_case(**change: object) -> str | None:
    from types import SimpleNamespace

    from prefect.workers.process import ProcessJobConfiguration, ProcessWorker

    from flows.fleet_worker import refusal

    deployment = SimpleNamespace(
        name="on-demand-node2", entrypoint="flows/backup.py:undercloud_backup", pull_steps=[],
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}})
    flow_run = SimpleNamespace(job_variables={}, id="run-1")
    template = ProcessWorker.get_default_base_job_template()
    configuration = ProcessJobConfiguration(command=None, env={
        "PREFECT__FLOW_RUN_ID": "run-1", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"})
    for key, value in change.items():
        if key == "template":
            template = value
        elif key == "run_job_variables":
            flow_run.job_variables = value
        elif key == "env":
            configuration.env.update(value)
        elif key == "command":
            configuration = ProcessJobConfiguration(command=value, env={})
            configuration._command_configured = True
        else:
            setattr(deployment, key, value)
    return refusal("node2", str(REPO), deployment, flow_run, template, configuration)


@pytest.mark.unit
def test_the_node_policy_accepts_only_its_installed_deployments():
    assert _policy_case() is None
    refused = {
        "another node's": _policy_case(name="on-demand-node1"),
        "unknown name": _policy_case(name="evil-node2"),
        "entrypoint": _policy_case(entrypoint="/tmp/evil.py:evil"),
        "pull steps": _policy_case(pull_steps=[{"prefect.deployments.steps.run_shell_script":
                                                {"script": "true"}}]),
        "job variables": _policy_case(job_variables={"command": "true"}),
        "env": _policy_case(job_variables={"env": {"PYTHONPATH": "/tmp"}}),
        "run env": _policy_case(run_job_variables={"env": {"LD_PRELOAD": "/tmp/x.so"}}),
        "template": _policy_case(template={"job_configuration": {"command": "true"},
                                           "variables": {}}),
        "command": _policy_case(command="true"),
        "resolved env": _policy_case(env={"PYTHONPATH": "/tmp"}),
        "another run": _policy_case(env={"PREFECT__FLOW_RUN_ID": "run-2"}),
    }
    assert all(refused.values()), [k for k, v in refused.items() if not v]


@pytest.mark.unit
def test_node_names_may_hold_a_dash():
    from flows.fleet import backup_size
    from flows.fleet_worker import deployment_base

    assert deployment_base("weekly-full-edge-3", "edge-3") == "weekly-full"
    assert deployment_base("on-demand-edge-3", "3") is None  # "on-demand-edge" is no deployment
    assert deployment_base("on-demand-edge-3", "edge") is None
    assert deployment_base("prune-node1", "node1") == "prune"
    assert deployment_base("evil-node1", "node1") is None
    assert _policy_case(name="on-demand-edge-3") is not None  # node2's worker: not its own
    table = "| `a/db.sql.zst.age` | 1.5 MiB | plain | `ab…` |\n| `a/m.json` | 512 B | plain | x |"
    assert backup_size(table) == "1.5 MiB" and backup_size("no table") is None


@pytest.mark.unit
def test_the_upload_slot_is_free_outside_a_fleet(monkeypatch):
    from flows import fleet_uploads

    monkeypatch.delenv("UCB_NODE", raising=False)
    with fleet_uploads.upload_slot():  # no API call, no limit needed
        pass


@pytest.mark.unit
def test_the_node_policy_bounds_parameters():
    from flows.fleet_worker import parameter_refusal

    installed = {"what": {"root": "/r", "full": False}, "swift": {"container": "c"},
                 "retention": {"prune": True, "keep_last": 3}, "advanced": {"staging_dir": "/s"}}
    same = json.loads(json.dumps(installed))
    assert parameter_refusal(installed, same) is None
    same["what"]["full"], same["retention"]["keep_last"] = True, 5
    assert parameter_refusal(installed, same) is None
    assert "below" in parameter_refusal(installed, {**installed, "retention": {"keep_last": 1}})
    assert "swift.container" in parameter_refusal(installed, {**installed, "swift": {}})
    assert "what.root" in parameter_refusal(installed, {**installed, "what": {"root": "/"}})
    assert "advanced.recipients_file" in parameter_refusal(installed, {**installed, "advanced": {
        "staging_dir": "/s", "recipients_file": "/x"}})


HOLD_SLOTS = """
import threading, time
from flows import fleet_uploads
held, peak, lock = [0], [0], threading.Lock()
def upload():
    with fleet_uploads.upload_slot():
        with lock:
            held[0] += 1
            peak[0] = max(peak[0], held[0])
        time.sleep(1.5)
        with lock:
            held[0] -= 1
threads = [threading.Thread(target=upload) for _ in range(3)]
for t in threads: t.start()
for t in threads: t.join()
print(peak[0])
"""


@pytest.mark.slow
@needs_root
def test_uploads_take_a_fleet_wide_slot(fleet):
    """Three uploads at once, as a node would take them (flows/fleet_uploads.py): at most
    UCB_FLEET_UPLOADS (2) hold a slot of the global limit at the same time."""
    env = {"PATH": "/usr/bin:/bin", **env_file(fleet["nodes"]["node1"]["env"]),
           "PREFECT_HOME": fleet["operator"]["PREFECT_HOME"]}
    done = subprocess.run([sys.executable, "-c", HOLD_SLOTS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "2"


@pytest.mark.slow
@needs_root
def test_the_engine_checks_parameters_again(fleet):
    """Parameters changed after the worker's check (a run's parameters can be updated through
    the API) are checked again by the engine the worker starts, on the very values it would run
    with: a run with node2's on-demand and another container, handed straight to node2's
    engine as node2's user, ends Failed with the refusal and writes nothing."""
    import pwd

    api = node_api(fleet, "node1")
    before = node2_objects(fleet)
    deployment = api("GET", "/deployments/name/undercloud_backup/on-demand-node2")
    later = "2099-01-01T00:00:00Z"  # never picked up by node2's worker: only the engine sees it
    run = api("POST", f"/deployments/{deployment['id']}/create_flow_run",
              parameters={"swift": {"container": "stolen"}},
              state={"type": "SCHEDULED", "state_details": {"scheduled_time": later}})
    user = pwd.getpwnam(fleet["nodes"]["node2"]["user"])
    env = {**env_file(fleet["nodes"]["node2"]["env"]), "PREFECT__FLOW_RUN_ID": run["id"]}
    done = subprocess.run([sys.executable, "-m", "flows.fleet_worker", "engine"],
                          cwd=STATE / "app", env=env, user=user.pw_uid, group=user.pw_gid,
                          extra_groups=[], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    state = api("GET", f"/flow_runs/{run['id']}")["state"]
    assert state["type"] == "FAILED", state
    assert "parameter swift.container may not be changed" in state["message"], state
    assert node2_objects(fleet) == before


@pytest.mark.slow
@needs_root
def test_a_cancelled_run_loads_no_changed_deployment(fleet, evil):
    """The process worker loads a cancelled or crashed run's flow in the worker itself (for its
    hooks), through the deployment as it is then. With node1's API password: a pull step put
    on edge-3's on-demand while its accepted run is running, then the run cancelled: edge-3's
    worker loads only the installed flow, the pull step never runs."""
    api = node_api(fleet, "node1")
    top, marker = evil
    deployment = api("GET", f"/deployments/name/undercloud_backup/on-demand-{NODE3}")
    original = {k: deployment[k] for k in ("pull_steps",)}
    run_id = api("POST", f"/deployments/{deployment['id']}/create_flow_run")["id"]
    deadline = time.monotonic() + 120
    while api("GET", f"/flow_runs/{run_id}")["state"]["type"] != "RUNNING":
        assert time.monotonic() < deadline, f"{NODE3}'s run never started"
        time.sleep(0.5)
    touch = {"prefect.deployments.steps.run_shell_script": {"script": f"touch {marker}"}}
    try:
        api("PATCH", f"/deployments/{deployment['id']}", pull_steps=[touch])
        api("POST", f"/flow_runs/{run_id}/set_state", state={"type": "CANCELLING"}, force=True)
        final = api.wait(run_id)
        time.sleep(3)  # hooks run after the state is final
    finally:
        api("PATCH", f"/deployments/{deployment['id']}", **original)
    assert final["state"]["type"] in ("CANCELLED", "COMPLETED"), final["state"]
    assert not marker.exists()


CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.mark.slow
@needs_root
def test_the_status_page_in_a_browser(fleet):
    """The operator logs in to the fleet server's UI and opens the fleet-status artifact: one row
    per node with its last backup, size, verify, next run and worker."""
    from playwright import sync_api

    rc, status, err = fleet_cli(fleet, "status")
    assert rc == 0, err[-2000:]
    api = Api(fleet["operator"])
    [artifact] = api("POST", "/artifacts/latest/filter",
                     artifacts={"key": {"any_": ["fleet-status"]}}, limit=1)
    base = fleet["server"]["server"].removesuffix("/api")
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / "fleet-status.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1920, "height": 1000})
            page.goto(base + "/dashboard")
            page.locator("input[placeholder='admin:pass']").fill(
                fleet["operator"]["PREFECT_API_AUTH_STRING"])
            page.locator("button[type=submit]").click()
            page.wait_for_load_state("networkidle")
            page.goto(f"{base}/artifacts/artifact/{artifact['latest_id']}")
            page.get_by_text(NODE3, exact=True).first.wait_for()
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(shot), full_page=True)
            text = page.locator("body").inner_text()
            table = page.locator("div.p-table").first  # no column hidden to the right
            hidden = table.evaluate("e => e.scrollWidth - e.clientWidth")
        finally:
            browser.close()
    print(f"fleet-status screenshot: {shot}", file=sys.stderr)
    assert hidden <= 0, f"{hidden} px of the table scroll out of a 1920 px wide page: {shot}"
    for column in ("node", "worker online", "last backup", "age h", "kind", "size",
                   "encrypted", "signed", "last verify", "next run", "backup_id"):
        assert column in text, column
    for row in status["nodes"]:
        assert row["node"] in text and row["backup_id"] in text and row["size"] in text, row
        assert row["encrypted"] is True and row["signed"] is True, row


def node_processes(user: str) -> list[int]:
    """The node's processes but its MariaDB: its worker and whatever the worker started."""
    import pwd

    uid = pwd.getpwnam(user).pw_uid
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid and \
                    (entry / "comm").read_text().strip() != "mariadbd":
                found.append(int(entry.name))
        except FileNotFoundError:
            pass
    return found


def alerts_for(fleet: dict, node: str, what: str) -> list[dict]:
    return [b for b in fleet["alerts"].bodies
            if b["subject"].startswith(f"[undercloud-backup] {node}: {what}")]


def wait_upload_slots_free(api: Api) -> None:
    deadline = time.monotonic() + 120
    while api("GET", "/v2/concurrency_limits/fleet-uploads")["active_slots"]:
        assert time.monotonic() < deadline, api("GET", "/v2/concurrency_limits/fleet-uploads")
        time.sleep(1)


@pytest.mark.slow
@needs_root
def test_a_killed_worker_leaves_a_crashed_run_frees_its_slots_and_alerts(fleet):
    """edge-3's worker and its run SIGKILLed while the run holds a fleet upload slot: the run
    ends CRASHED (no heartbeat), the upload slot and the node's own slot are freed (the worker
    started again backs up at once), and the operator gets one alert for the crashed run and
    one for the worker offline, each naming edge-3, plus edge-3's no-backup alert."""
    api = Api(fleet["operator"])
    deployment = api("GET", f"/deployments/name/undercloud_backup/on-demand-{NODE3}")
    # An upload slot an earlier run's lease still holds would pass for this run's below.
    wait_upload_slots_free(api)
    run_id = api("POST", f"/deployments/{deployment['id']}/create_flow_run")["id"]
    deadline = time.monotonic() + 120
    while api("GET", "/v2/concurrency_limits/fleet-uploads")["active_slots"] < 1:
        assert time.monotonic() < deadline, api("GET", f"/flow_runs/{run_id}")["state"]
        time.sleep(0.05)
    victims = node_processes(fleet["nodes"][NODE3]["user"])
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    assert api("GET", f"/flow_runs/{run_id}")["state"]["type"] == "RUNNING"

    run = api.wait(run_id, timeout=ZOMBIE_S + 120)
    assert run["state"]["type"] == "CRASHED", run["state"]
    crashed_s = time.monotonic() - killed
    deadline = time.monotonic() + 120
    # The silence windows follow each other (not the last backup): a dead node is sure to get
    # its alert once two windows passed since its last backup.
    while not (alerts_for(fleet, NODE3, "worker offline") and alerts_for(fleet, NODE3, "backup")
               and alerts_for(fleet, NODE3, "no backup completed")):
        assert time.monotonic() < deadline, fleet["alerts"].bodies
        time.sleep(1)
    alerted_s = time.monotonic() - killed
    [crash] = alerts_for(fleet, NODE3, "backup")
    assert "Crashed" in crash["subject"] and run["name"] in crash["subject"], crash
    assert f"Host: {NODE3}" in crash["body"] and "No heartbeat" in crash["body"], crash
    [offline] = alerts_for(fleet, NODE3, "worker offline")
    assert f"undercloud-{NODE3}" in offline["body"], offline
    assert not alerts_for(fleet, "node1", "worker offline")  # its worker never stopped

    # The node's own slot: its worker started again backs it up at once (while the dead run's
    # upload slot still waits for its lease to run out: one of two is enough).
    done = subprocess.run([str(FLEET), "worker", NODE3], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    again = api("POST", f"/deployments/{deployment['id']}/create_flow_run")["id"]
    assert api.wait(again, timeout=120)["state"]["type"] == "COMPLETED"
    wait_upload_slots_free(api)
    print(f"killed {len(victims)} processes; CRASHED after {crashed_s:.0f} s, alerted after "
          f"{alerted_s:.0f} s, upload slot back after {time.monotonic() - killed:.0f} s",
          file=sys.stderr)
    for body in fleet["alerts"].bodies:  # every alert names one node, the same in both places
        node = body["subject"].split("] ", 1)[1].split(":", 1)[0]
        assert f"Host: {node}\n" in body["body"], body
