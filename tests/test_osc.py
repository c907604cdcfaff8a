"""``openstack undercloud backup``: the project's commands in the real ``openstack`` client
(python-openstackclient, the osc extra), against the real Keystone, Swift, MariaDB and Prefect.

What an operator who still types TripleO's command checks: it backs up with the client's own
login (``--os-cloud``, no ``OS_*`` at all), takes the twin's flags (``--add-path``,
``--exclude-path``, ``--container``...), prints ``-f json``, lists, verifies and restores what
it made, exits with the twin's statuses, starts and follows the installed deployment, and
says which command runs when python-tripleoclient defines ``undercloud backup`` too.

Most calls run the client in this process (tests/openstack_in_process.py: its shell, our
commands, the same output and status), each saving the ~7 CPU-s a process spends loading the
client's plugins and importing Prefect; those that stay ``openstack`` processes say why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO
from deploy_helpers import Api, stop
from openstack_in_process import OPENSTACK, openstack_in_process

CLOUD = "ucb-backup-target"


def openstack(*args: str, env: dict[str, str], timeout: float = 240,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The ``openstack`` program in a process of its own."""
    return subprocess.run([str(OPENSTACK), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd or REPO)


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def cloud_env(os_env, tmp_path_factory) -> dict[str, str]:
    """No OS_* variable at all: the backup user only in a clouds.yaml, reached by --os-cloud."""
    config = tmp_path_factory.mktemp("osc") / "clouds.yaml"
    config.write_text(json.dumps({"clouds": {CLOUD: {
        "auth": {"auth_url": os_env["OS_AUTH_URL"], "username": os_env["OS_USERNAME"],
                 "password": os_env["OS_PASSWORD"],
                 "project_name": os_env.get("OS_PROJECT_NAME", "backup"),
                 "user_domain_name": "Default", "project_domain_name": "Default"},
        "region_name": os_env.get("OS_REGION_NAME", "RegionOne"),
        "identity_api_version": 3, "interface": "public"}}}))
    config.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    env["OS_CLIENT_CONFIG_FILE"] = str(config)
    return env


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A tiny undercloud: /etc with a Keystone key, and a path only --add-path brings."""
    root = tmp_path_factory.mktemp("osc-root")
    for path, text in {"etc/keystone/fernet-keys/0": "key\n", "etc/app.conf": "[a]\n",
                       "etc/cache/big.tmp": "skip\n", "opt/extra/notes.txt": "added\n"}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


@pytest.fixture(scope="module")
def backed_up(cloud_env, tree, db_cnf):
    """One backup made by `openstack --os-cloud ... undercloud backup` (TripleO's flags)."""
    container = f"ucbtest-osc-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    result = openstack_in_process(
        "--os-cloud", CLOUD, "undercloud", "backup", "--root", str(tree), "--add-path",
        "/opt/extra", "--exclude-path", "/etc/cache", "--db-defaults-file", db_cnf,
        "--no-table-checksums", "--container", container, "-f", "json", env=cloud_env)
    seconds = time.monotonic() - started
    yield container, result, seconds
    from conftest import remove_container

    remove_container(container)


def test_openstack_undercloud_backup_backs_up_with_the_clients_own_login(
        backed_up, cloud_env, os_env):
    container, result, seconds = backed_up
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    # the keys of `python -m flows.backup --json`, nothing else on stdout
    assert set(summary) == {"backup_id", "container", "manifest", "objects", "dry_run", "kind",
                            "parent", "pruned", "partial_database", "warnings"}
    assert summary["container"] == container and summary["dry_run"] is False
    assert summary["manifest"] == f"{summary['backup_id']}/manifest.json"
    assert {o["name"].split("/", 1)[1] for o in summary["objects"]} >= {
        "mariadb-all-databases.sql.zst", "filesystem.tar.zst"}
    assert os_env["OS_PASSWORD"] not in result.stdout + result.stderr
    print(f"openstack undercloud backup (in this process): {seconds:.1f} s")

    # the other way the client logs in: the OS_* variables of an rc file
    rc_env = dict(cloud_env, **os_env)
    del rc_env["OS_CLIENT_CONFIG_FILE"]
    listed = openstack_in_process("undercloud", "backup", "list", "--container", container,
                                  "-f", "json", env=rc_env)
    assert listed.returncode == 0, listed.stderr
    assert [b["backup_id"] for b in json.loads(listed.stdout)] == [summary["backup_id"]]
    assert json.loads(listed.stdout)[0]["kind"] == "full"


def test_verify_and_restore_take_their_twins_flags_and_print_json(backed_up, cloud_env,
                                                                   tmp_path):
    container, result, _ = backed_up
    backup_id = json.loads(result.stdout)["backup_id"]
    verified = openstack_in_process("--os-cloud", CLOUD, "undercloud", "backup", "verify",
                                    "--container", container, "--backup-id", backup_id,
                                    "--skip-database", "-f", "json", env=cloud_env)
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert report["ok"] is True and report["backup_id"] == backup_id
    assert report["archive"]["paths_found"] == ["/etc", "/opt/extra"]

    target = tmp_path / "restored"
    restored = openstack_in_process("--os-cloud", CLOUD, "undercloud", "backup", "restore",
                                    "--container", container, "--target", str(target),
                                    "-f", "json", env=cloud_env)
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["backup_id"] == backup_id  # the latest: this one
    assert (target / "opt/extra/notes.txt").read_text() == "added\n"
    assert (target / "etc/keystone/fernet-keys/0").read_text() == "key\n"
    assert not (target / "etc/cache").exists()  # --exclude-path, anchored


def test_errors_are_one_line_with_the_twins_exit_statuses(backed_up, cloud_env, os_env, tree):
    container, _, _ = backed_up
    # Processes, one per command (verify, list, backup): the status the program exits with
    # and the last line it writes, interpreter exit and all, are the contract here.
    missing = openstack("--os-cloud", CLOUD, "undercloud", "backup", "verify", "--container",
                        container, "--backup-id", "nope", "-f", "json", env=cloud_env)
    assert missing.returncode == 40, missing.stderr  # BackupNotFound, as python -m flows.verify
    assert last_line(missing.stderr) == ("openstack undercloud backup verify: error: No "
                                         f"complete backup nope in container {container}.")
    assert "Traceback" not in missing.stderr and missing.stdout == ""

    bad = openstack("--os-cloud", CLOUD, "undercloud", "backup", "list", "--container", "a/b",
                    env=cloud_env)
    assert bad.returncode == 2, bad.stderr
    assert last_line(bad.stderr).startswith("openstack undercloud backup list: error: Invalid "
                                            "configuration: Swift container name 'a/b'")

    missing_path = openstack("--os-cloud", CLOUD, "undercloud", "backup", "--root",
                             str(tree), "--add-path", "/no/such/path", "--container",
                             container, "--dry-run", env=cloud_env)
    assert missing_path.returncode == 3, missing_path.stderr  # PathNotFound

    # A verify that fails shows its report (-f json: the twin's --json) before the error line.
    from conftest import swift_store

    backup_id = json.loads(backed_up[1].stdout)["backup_id"]
    swift_store().delete(container, f"{backup_id}/mariadb-all-databases.sql.zst")
    failed = openstack_in_process("--os-cloud", CLOUD, "undercloud", "backup", "verify",
                                  "--container", container, "--skip-database", "-f", "json",
                                  env=cloud_env)
    assert failed.returncode == 41, failed.stderr  # VerificationFailed
    report = json.loads(failed.stdout)
    assert report["ok"] is False and any("missing" in p for p in report["problems"])
    assert last_line(failed.stderr).startswith(
        f"openstack undercloud backup verify: error: Backup {backup_id} failed verification")

    # A refused login is the client's own (its message, its status); no secret printed. A
    # process: what the client logs of it goes through its own console set-up, not ours.
    env = dict(cloud_env, OS_PASSWORD="not-the-password")
    refused = openstack("--os-cloud", CLOUD, "--os-password", "not-the-password",
                        "undercloud", "backup", "list", env=env)
    assert refused.returncode == 1
    assert "not-the-password" not in refused.stdout + refused.stderr
    assert os_env["OS_PASSWORD"] not in refused.stdout + refused.stderr


# ----------------------------------------------------------------------- the tripleoclient clash
FAKE_TRIPLEOCLIENT = {
    "fake_tripleoclient/__init__.py": "",
    "fake_tripleoclient/plugin.py": """
        API_NAME = "tripleoclient"
        API_VERSION_OPTION = "os_tripleoclient_api_version"
        API_VERSIONS = ("2",)
        DEFAULT_API_VERSION = "2"

        def make_client(instance):
            return instance

        def build_option_parser(parser):
            return parser
        """,
    "fake_tripleoclient/undercloud_backup.py": """
        from osc_lib.command import command

        class BackupUndercloud(command.Command):
            \"\"\"Backup the undercloud with ReaR\"\"\"

            auth_required = False

            def get_parser(self, prog_name):
                parser = super().get_parser(prog_name)
                parser.add_argument("--db-only", action="store_true")
                parser.add_argument("--setup-rear", action="store_true")
                return parser

            def take_action(self, parsed_args):
                print(f"tripleoclient backup db_only={parsed_args.db_only}")
        """,
    "python_tripleoclient-16.5.0.dist-info/METADATA":
        "Metadata-Version: 2.1\nName: python-tripleoclient\nVersion: 16.5.0\n",
    # as python-tripleoclient registers it: a plugin, and the command in its own group
    "python_tripleoclient-16.5.0.dist-info/entry_points.txt": """
        [openstack.cli.extension]
        tripleoclient = fake_tripleoclient.plugin

        [openstack.tripleoclient.v2]
        undercloud_backup = fake_tripleoclient.undercloud_backup:BackupUndercloud
        """,
}


@pytest.fixture
def tripleoclient(tmp_path) -> Path:
    """A distribution named python-tripleoclient defining `openstack undercloud backup`."""
    for path, text in FAKE_TRIPLEOCLIENT.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(textwrap.dedent(text).lstrip())
    return tmp_path


def test_with_tripleoclient_installed_its_command_runs_and_says_how_to_reach_ours(
        tripleoclient):
    alone = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    ours_alone = openstack_in_process("undercloud", "backup", "--help", env=alone)
    assert ours_alone.returncode == 0 and "--add-path PATH" in ours_alone.stdout
    assert "note:" not in ours_alone.stdout + ours_alone.stderr

    # Processes from here: the other distribution is found on the PYTHONPATH a process
    # starts with (entry points are read, and cached by stevedore, from sys.path).
    both = dict(alone, PYTHONPATH=str(tripleoclient))
    theirs = openstack("undercloud", "backup", "--db-only", env=both)
    assert theirs.returncode == 0, theirs.stderr
    assert theirs.stdout == "tripleoclient backup db_only=True\n"
    assert theirs.stderr.splitlines()[0] == (
        "note: 'openstack undercloud backup' is python-tripleoclient's here; "
        "undercloud-backup's is 'openstack undercloud backup run' (or set "
        "UCB_OPENSTACK_UNDERCLOUD_BACKUP=undercloud-backup)")
    helped = openstack("undercloud", "backup", "--help", env=both)
    assert "'openstack undercloud backup run'" in " ".join(helped.stdout.split())

    ours = openstack("undercloud", "backup", "run", "--help", env=both)
    assert ours.returncode == 0 and "--exclude-path PATTERN" in ours.stdout

    chosen = openstack("undercloud", "backup", "--help", env=dict(
        both, UCB_OPENSTACK_UNDERCLOUD_BACKUP="undercloud-backup"))
    assert chosen.returncode == 0 and "--add-path PATH" in chosen.stdout
    assert "python-tripleoclient also defines it" in " ".join(chosen.stdout.split())


# ----------------------------------------------------------------------- --deployment
@pytest.fixture
def served(tree, db_cnf, container, os_env, prefect_server, tmp_path):
    """A deployment of the backup flow in a process work pool of its own, and a real worker:
    its parameters name the sample root, the database and the container, as an install's
    name `/` and the node's."""
    name = f"osc-{uuid.uuid4().hex[:8]}"
    prefect, api = str(Path(sys.executable).parent / "prefect"), Api(prefect_server)
    env = dict(os.environ, **os_env, PREFECT_WORKER_QUERY_SECONDS="1")
    created = subprocess.run([prefect, "--no-prompt", "work-pool", "create", name, "--type",
                              "process"], env=env, capture_output=True, text=True)
    assert created.returncode == 0, created.stdout + created.stderr
    (tmp_path / "prefect.yaml").write_text(json.dumps({
        "name": "osc-test", "build": None, "push": None, "deployments": [{
            "name": name, "entrypoint": "flows/backup.py:undercloud_backup",
            "work_pool": {"name": name},
            "parameters": {"what": {"root": str(tree)},
                           "database": {"db_defaults_file": db_cnf},
                           "swift": {"container": container},
                           "retention": {"prune": False},
                           "advanced": {"table_checksums": False}}}]}))
    log = open(tmp_path / "worker.log", "wb")
    worker = None
    try:
        deployed = subprocess.run([prefect, "--no-prompt", "deploy", "--prefect-file",
                                   str(tmp_path / "prefect.yaml"), "--name", name],
                                  cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=120)
        assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", name], env=env,
                                  stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        yield name, container
    finally:
        if worker is not None:
            stop(worker)
        log.close()
        for deployment in api("POST", "/deployments/filter", {  # type: ignore[union-attr]
                "work_pools": {"name": {"any_": [name]}}}):
            api("DELETE", f"/deployments/{deployment['id']}")
        api("DELETE", f"/work_pools/{name}")


def test_deployment_starts_the_deployed_flow_and_follows_it(served, cloud_env):
    name, container = served
    started = time.monotonic()
    # Only the changed fields go over the deployment's: its root and database stay.
    result = openstack_in_process("--os-cloud", CLOUD, "undercloud", "backup", "--deployment",
                                  name, "--add-path", "/opt/extra", "-f", "json",
                                  env=cloud_env)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["deployment"] == f"undercloud_backup/{name}"
    assert summary["state"] == "COMPLETED" and summary["backup_id"]
    followed = result.stderr
    assert f"({summary['flow_run_id']}) of deployment undercloud_backup/{name}" in followed
    assert f"run {summary['flow_run']}: Completed\n" in followed, followed
    assert "Finished in state Completed()" in followed  # the run's own log lines
    print(f"openstack undercloud backup --deployment (in this process): {seconds:.1f} s")

    listed = openstack_in_process("--os-cloud", CLOUD, "undercloud", "backup", "list",
                                  "--container", container, "-f", "json", env=cloud_env)
    assert [b["backup_id"] for b in json.loads(listed.stdout)] == [summary["backup_id"]]
    verified = openstack_in_process("--os-cloud", CLOUD, "undercloud", "backup", "verify",
                                    "--container", container, "--skip-database", "-f", "json",
                                    env=cloud_env)
    assert json.loads(verified.stdout)["archive"]["paths_found"] == ["/etc", "/opt/extra"]

    # A deployed run that fails exits with its error's status, as the twin would (3).
    failed = openstack_in_process("--os-cloud", CLOUD, "undercloud", "backup", "--deployment",
                                  name, "--add-path", "/no/such/path", env=cloud_env)
    assert failed.returncode == 3, failed.stderr
    assert last_line(failed.stderr).startswith("openstack undercloud backup: error: the "
                                               "deployed run ")
    assert "/no/such/path does not exist" in last_line(failed.stderr)

    # A process: the status and last line of --deployment's own path (Prefect's async client,
    # whatever it leaves to the interpreter's exit) as the program ends with them.
    unknown = openstack("--os-cloud", CLOUD, "undercloud", "backup", "--deployment",
                        "no-such-deployment", env=cloud_env)
    assert unknown.returncode == 2
    assert f"undercloud_backup/{name}" in last_line(unknown.stderr)


@pytest.mark.unit
def test_only_the_flags_given_go_over_the_deployments_own_parameters():
    from flows import params
    from undercloud_backup_osc import deployed

    groups = {key: value for key, value in params.grouped(add_paths=["/opt/x"],
                                                           keep_last=9).items()
              if key != "dry_run"}
    changed = deployed.changed_fields(groups)
    assert changed == {"what": {"add_paths": ["/opt/x"]}, "retention": {"keep_last": 9}}
    installed = {"what": {"root": "/"}, "retention": {"prune": True, "keep_last": 3},
                 "advanced": {"privileged": True, "staging_dir": "/var/tmp"}}
    # a group is sent whole (the server replaces it): the deployment's fields stay in it
    assert deployed.merged(installed, changed) == {
        "what": {"root": "/", "add_paths": ["/opt/x"]},
        "retention": {"prune": True, "keep_last": 9}}


@pytest.mark.unit
def test_a_deployed_runs_error_exits_with_the_status_the_twin_would():
    from undercloud_backup_osc import deployed

    status, line = deployed.error_status(
        "Flow run encountered an exception: PathNotFound: Path /x does not exist under root "
        "/: fix or drop --add-path /x.")
    assert (status, line) == (3, "Path /x does not exist under root /: fix or drop "
                                 "--add-path /x.")
    assert deployed.error_status("Run crashed: worker died")[0] == 76
    # the state message of a run whose flow returned its failure: the cause alone, as the
    # form says it: the error whose template it fills
    assert deployed.error_status("Path /x does not exist under root /: fix or drop "
                                 "add_paths /x.")[0] == 3
