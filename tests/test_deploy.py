"""The deployment on an undercloud, end to end: the installation `install.sh` made with every
step (shared with test_security and test_ui, conftest's full_system): its Prefect server
configured as deployments/env/server.env says (filesystem lease storage, API basic auth, from
the start), the work pool, queue, `prefect deploy` of the undercloud's deployments in
prefect.yaml and the zombie automation, a process worker running as an unprivileged user with
the project's sudoers; runs created the way the UI creates them, and the backups checked in
Swift with plain swiftclient, age, zstd and tar. The installation was given no recipients, so
it made a break-glass key pair: every run is encrypted to it and warns while its identity is on
the node (the tests decrypt with a copy install_helpers kept). Installed recipients, the
explicit plain-text install (UCB_NO_ENCRYPTION) and the signing key are checked through
deployed runs (encrypted, signed, verified by weekly-verify, an altered manifest refused; plain
text without download links). The last test kills the worker and restarts the server.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sample_undercloud as sample
import swiftclient
from deploy_helpers import (
    API_USER,
    GROUP,
    NOSUDO,
    REPO,
    WORKER,
    as_user,
    descendants,
    remove_tree,
    sample_root,
    scratch_dir,
    scratch_mariadb,
)
from install_helpers import LOG_DIR, ZOMBIE_AFTER_S, FullInstall
from keystoneauth1 import session
from keystoneauth1.identity import v3

from undercloud_backup.db import privileged
from undercloud_backup.trust import crypto, signing

pytestmark = pytest.mark.slow

DEPLOYMENT = "undercloud_backup/{}"  # weekly-verify's flow is verify_backup
FLOWS = {"weekly-verify": "verify_backup/{}"}
# The shared installation's test-only speed-ups (install_helpers): a waiting run retries for the
# deployment's slot every 2 s instead of 30; the automation crashes a run 35 s after its last
# heartbeat instead of 90 (heartbeats stay at 30 s, as in prefect.yaml); the worker polls every
# second.


class Deployment:
    """The running installation: server, worker, API, and where the samples are."""

    def __init__(self, install: FullInstall, roots: dict[str, Path]) -> None:
        self.install = install
        self.roots = roots
        self.url = install.url
        self.api = install.api()
        # `install.sh prefect` as the installation ran it (pool, queue, deploy, automations)
        self.install_seconds = install.first_step_seconds["prefect"]

    def worker_log_tail(self) -> str:
        return (LOG_DIR / "worker.log").read_text(errors="replace")[-3000:]

    def deployment(self, name: str) -> dict:
        return self.api("GET", "/deployments/name/"  # type: ignore[return-value]
                        + FLOWS.get(name, DEPLOYMENT).format(name))

    def create_run(self, name: str, **parameters: object) -> str:
        """POST /deployments/{id}/create_flow_run, as the UI's Run > Custom run does."""
        deployment = self.deployment(name)
        run = self.api("POST", f"/deployments/{deployment['id']}/create_flow_run",
                       {"parameters": parameters, "tags": ["ui"]})
        return run["id"]  # type: ignore[index]

    def task_runs(self, run_id: str) -> list[dict]:
        return self.api("POST", "/task_runs/filter",  # type: ignore[return-value]
                        {"flow_runs": {"id": {"any_": [run_id]}}})


@pytest.fixture(scope="module")
def deployed(full_system):
    """The shared installation, its privileged policy allowing two sample roots (small, large)
    and dumping a private MariaDB; the policy put back afterwards."""
    config = Path(privileged.CONFIG_FILE)
    shipped = config.read_text()
    roots = {"small": sample_root((1,)), "large": sample_root((48,))}
    try:
        with scratch_mariadb() as db_socket:
            subprocess.run(["mariadb", f"--socket={db_socket}"], input=sample.database_sql(),
                           text=True, check=True)
            # The shipped policy with the sample roots in place of `/`.
            config.write_text("".join(line for line in shipped.splitlines(keepends=True)
                                      if not line.startswith("root ="))
                              + "".join(f"root = {root}\n" for root in roots.values())
                              + f"socket = {db_socket}\n")
            yield Deployment(full_system, roots)
    finally:
        config.write_text(shipped)
        for path in roots.values():
            remove_tree(path)


def swift_connection(os_env: dict[str, str]) -> swiftclient.Connection:
    auth = v3.Password(
        auth_url=os_env["OS_AUTH_URL"], username=os_env["OS_USERNAME"],
        password=os_env["OS_PASSWORD"], project_name=os_env["OS_PROJECT_NAME"],
        user_domain_name=os_env.get("OS_USER_DOMAIN_NAME", "Default"),
        project_domain_name=os_env.get("OS_PROJECT_DOMAIN_NAME", "Default"))
    return swiftclient.Connection(session=session.Session(auth=auth),
                                  os_options={"region_name": os_env.get("OS_REGION_NAME")})


def manifests(os_env: dict[str, str], container: str) -> list[str]:
    try:
        _, objects = swift_connection(os_env).get_container(container, full_listing=True)
    except swiftclient.ClientException as error:
        if error.http_status == 404:
            return []
        raise
    return sorted(o["name"] for o in objects if o["name"].endswith("/manifest.json"))


def decrypted(os_env: dict[str, str], container: str, name: str, identity: Path) -> bytes:
    """An encrypted object as stored, through `age -d -i IDENTITY | zstd -dc`."""
    _, body = swift_connection(os_env).get_object(container, name)
    return subprocess.run(f"age -d -i {identity} | zstd -dc", shell=True, input=body,
                          capture_output=True, check=True).stdout


def archive_members(os_env: dict[str, str], container: str, backup_id: str,
                    identity: Path) -> list[str]:
    tar = decrypted(os_env, container, f"{backup_id}/filesystem.tar.zst.age", identity)
    listing = subprocess.run(["tar", "-t"], input=tar, capture_output=True, check=True)
    return listing.stdout.decode().splitlines()


def run_messages(deployed: Deployment, run_id: str, level: int = 0) -> list[str]:
    """The run's log lines at `level` or above, once its last line ("Finished in state ...")
    has reached the server: a run's state turns final before its process has sent its last
    batch of logs, so reading at once can miss the warnings it logged."""
    deadline = time.monotonic() + 30
    while True:
        logs = deployed.api("POST", "/logs/filter", {"logs": {
            "flow_run_id": {"any_": [run_id]}}, "limit": 200, "sort": "TIMESTAMP_ASC"})
        entries: list[dict] = logs  # type: ignore[assignment]
        if any(e["message"].startswith("Finished in state") for e in entries) \
                or time.monotonic() > deadline:
            return [e["message"] for e in entries if e["level"] >= level]
        time.sleep(0.5)


def run_artifact(deployed: Deployment, run_id: str) -> str:
    [artifact] = deployed.api("POST", "/artifacts/filter", {"artifacts": {
        "flow_run_id": {"any_": [run_id]}, "key": {"any_": ["undercloud-backup"]}}})
    return artifact["data"]


def run_parameters(root: Path, container: str) -> dict:
    """The run form's sections as the UI posts them (flows/params.py); the groups left out
    keep the deployment's values (advanced: privileged)."""
    return {"what": {"root": str(root)},
            "swift": {"container": container, "segment_size": "1MiB"}}


# --------------------------------------------------------------------------------- the tests
def test_deployments_carry_schedule_limits_and_defaults(deployed):
    nightly = deployed.deployment("nightly")
    on_demand = deployed.deployment("on-demand")
    assert [s["schedule"] for s in nightly["schedules"]] == [
        {"cron": "30 2 * * *", "timezone": "UTC", "day_or": True}]
    assert nightly["schedules"][0]["active"] is True
    assert on_demand["schedules"] == []
    for deployment in (nightly, on_demand):
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        assert deployment["parameters"]["advanced"]["privileged"] is True
        assert deployment["work_pool_name"] == "undercloud"
        assert deployment["work_queue_name"] == "backups"
        assert deployment["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
        assert {"undercloud", "backup"} <= set(deployment["tags"])
        assert deployment["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                             {"directory": str(REPO)}}]
    deployments = deployed.api("POST", "/deployments/filter", {})
    assert sorted(d["name"] for d in deployments) == sorted(  # not the verify host's
        ["on-demand", "nightly", "weekly-full", "weekly-verify", "prune", "binlog-ship"])
    # through the wrapper, and paused: the machine's MariaDB keeps no binary log
    binlog_ship = deployed.deployment("binlog-ship")
    assert binlog_ship["parameters"]["advanced"]["privileged"] is True
    assert [s["active"] for s in binlog_ship["schedules"]] == [False]
    queue = deployed.api("GET", "/work_pools/undercloud/queues/backups")
    assert queue["concurrency_limit"] == 1
    automations = deployed.api("POST", "/automations/filter", {})
    zombie = [a for a in automations if a["name"].startswith("undercloud-backup: crash")]
    assert len(zombie) == 1 and zombie[0]["trigger"]["within"] == float(ZOMBIE_AFTER_S)
    # measured, not asserted: a time depends on the machine and what else runs on it
    print(f"\ninstall.sh prefect: {deployed.install_seconds:.1f} s")


def test_run_from_the_ui_backs_up_root_only_files(deployed, os_env, container):
    root = deployed.roots["small"]
    secret = root / "root/.my.cnf"
    assert os.stat(secret).st_uid == 0 and os.stat(secret).st_mode & 0o077 == 0
    hidden = root / "root/root-only.bin"  # in /root (0700): the worker cannot even stat it
    hidden.write_bytes(os.urandom(3 << 20))
    started = time.monotonic()
    try:
        run_id = deployed.create_run("on-demand", **run_parameters(root, container))
        run = deployed.api.wait_final(run_id, timeout=120)
    finally:
        hidden.unlink()
    assert run["state"]["type"] == "COMPLETED", (run["state"]["message"],
                                                 deployed.worker_log_tail())
    assert time.monotonic() - started < 90

    [manifest] = manifests(os_env, container)
    backup_id = manifest.split("/")[0]
    # Planned from what root reads (the space check, segment sizes and progress estimate)
    space = json.loads(swift_connection(os_env).get_object(container, manifest)[1])["space"]
    assert space["files_bytes"] > 3 << 20, space
    identity = deployed.install.identity
    members = archive_members(os_env, container, backup_id, identity)
    assert "root/.my.cnf" in members and "root/root-only.bin" in members
    assert "etc/keystone/fernet-keys/0" in members and "etc/keystone/fernet-keys/1" in members
    sql = decrypted(os_env, container, f"{backup_id}/mariadb-all-databases.sql.zst.age",
                    identity)
    assert b"CREATE DATABASE /*!32312 IF NOT EXISTS*/ `ucb_sample_nova`" in sql
    assert sql.rstrip().splitlines()[-1].startswith(b"-- Dump completed")


def test_runs_created_at_once_run_one_after_the_other(deployed, os_env, container):
    root = deployed.roots["small"]
    run_ids = [deployed.create_run(name, **run_parameters(root, container))
               for name in ("on-demand", "on-demand", "nightly")]
    runs = [deployed.api.wait_final(run_id, timeout=180) for run_id in run_ids]
    assert [r["state"]["type"] for r in runs] == ["COMPLETED"] * 3, [r["state"] for r in runs]
    spans = sorted((r["start_time"], r["end_time"]) for r in runs)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start, f"runs overlapped: {spans}"
    assert len(manifests(os_env, container)) == 3


def alive(pids: list[int]) -> list[str]:
    """Those of ``pids`` still running (not zombies), with their command lines."""
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat_file:
                if stat_file.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                line = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{pid}: {line}")
        except OSError:
            continue
    return found


def wait_for_archiving(deployed: Deployment, run_id: str) -> None:
    deadline = time.monotonic() + 90
    # (a task run's state is null for a moment after it is created)
    while not any((t["state"] or {}).get("type") == "RUNNING"
                  and t["name"].startswith("archive_paths")
                  for t in deployed.task_runs(run_id)):
        assert time.monotonic() < deadline, "the backup never got to archiving"
        time.sleep(0.2)


def test_a_run_cancelled_from_the_ui_stops_its_children_and_leaves_nothing(
        deployed, os_env, container):
    """The UI's Cancel: the worker stops the run, which stops tar, zstd and the sudo wrappers,
    deletes what it had uploaded, and frees the slot for the next backup."""
    run_id = deployed.create_run("on-demand", **run_parameters(deployed.roots["large"],
                                                               container))
    wait_for_archiving(deployed, run_id)
    deadline = time.monotonic() + 30
    while True:  # the run, sudo, the wrapper's tar, zstd
        children = descendants(deployed.install.pid("worker"))
        if any("ucb-archive" in line for line in alive(children)):
            break
        assert time.monotonic() < deadline, alive(children)
        time.sleep(0.1)
    cancelled_at = time.monotonic()
    deployed.api("POST", f"/flow_runs/{run_id}/set_state",
                 {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True})
    run = deployed.api.wait_final(run_id, timeout=90)
    assert run["state"]["type"] == "CANCELLED", (run["state"], deployed.worker_log_tail())
    assert time.monotonic() - cancelled_at < 60
    deadline = time.monotonic() + 10
    while alive(children):
        assert time.monotonic() < deadline, alive(children)
        time.sleep(0.2)
    logs = deployed.api("POST", "/logs/filter",
                        {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    said = [entry["message"] for entry in logs if "interrupted by" in entry["message"]]
    assert said and "deleted" in said[-1], [e["message"] for e in logs][-10:]
    conn = swift_connection(os_env)
    for name in (container, f"{container}_segments"):
        try:
            _, objects = conn.get_container(name, full_listing=True)
        except swiftclient.ClientException as error:
            assert error.http_status == 404
            continue
        assert not [o["name"] for o in objects if f"{run_id[:6]}/" in o["name"]], name
    # the slot is free: the next backup runs at once
    next_id = deployed.create_run("on-demand", **run_parameters(deployed.roots["small"],
                                                                container))
    assert deployed.api.wait_final(next_id, timeout=120)["state"]["type"] == "COMPLETED"


SIGNING_KEY = Path(signing.INSTALLED_SIGNING_KEY)
ALLOWED_SIGNERS = Path(signing.INSTALLED_ALLOWED_SIGNERS)
PRINCIPAL = f"undercloud-backup@{socket.gethostname()}"


def owner(path: Path) -> tuple[str, str, int]:
    st = os.lstat(path)
    return (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name,
            stat.S_IMODE(st.st_mode))


def check_installed_signing_key(install: FullInstall) -> None:
    """The key the install made: root:undercloud-backup 0640, so the worker signs with it and
    no other user can read it; never on an argv of the install; its public half in
    allowed_signers (0644). Root signs with it too (ssh-keygen ignores a key of its own user
    that the group may read: signing.py hands it a private copy in memory)."""
    assert owner(SIGNING_KEY) == ("root", GROUP, 0o640)
    assert owner(ALLOWED_SIGNERS) == ("root", "root", 0o644)
    [line] = ALLOWED_SIGNERS.read_text().splitlines()
    assert line.split()[:3] == [PRINCIPAL, 'namespaces="undercloud-backup"', "ssh-ed25519"]
    sign = ["ssh-keygen", "-Y", "sign", "-f", str(SIGNING_KEY), "-n", signing.NAMESPACE]
    signed = as_user(WORKER, sign, input="probe")
    assert signed.returncode == 0 and "BEGIN SSH SIGNATURE" in signed.stdout, signed.stderr
    for user in (NOSUDO, API_USER):
        read = as_user(user, ["cat", str(SIGNING_KEY)])
        assert read.returncode != 0 and "Permission denied" in read.stderr, user
    body = [row for row in SIGNING_KEY.read_text().splitlines() if not row.startswith("-")]
    traced = b"".join(trace.read_bytes() for trace in install.traces  # the install's, and
                      if trace.exists())  # those of other tests' steps that are still there
    assert b"ssh-keygen" in traced and not [row for row in body if row.encode() in traced]
    as_root = signing.sign_manifest(b"probe", str(SIGNING_KEY))
    assert signing.verify_signature(b"probe", as_root, backup_id="probe",
                                    allowed_signers=str(ALLOWED_SIGNERS)) == PRINCIPAL


def check_signed_by_hand(conn: swiftclient.Connection, container: str, backup_id: str) -> None:
    """The manifest and SHA256SUMS verify with ssh-keygen and the installed allowed_signers,
    as an ordinary user checks them by hand (docs/by-hand.md)."""
    where = scratch_dir("ucb-signed-")
    try:
        for leaf in ("manifest.json", "SHA256SUMS"):
            body = conn.get_object(container, f"{backup_id}/{leaf}")[1]
            sig = where / f"{leaf}.sig"
            sig.write_bytes(conn.get_object(container, f"{backup_id}/{leaf}.sig")[1])
            sig.chmod(0o644)
            done = as_user(NOSUDO, ["ssh-keygen", "-Y", "verify", "-f", str(ALLOWED_SIGNERS),
                                    "-I", PRINCIPAL, "-n", "undercloud-backup", "-s", str(sig)],
                           input=body.decode())
            assert done.returncode == 0, done.stderr
            assert f'Good "undercloud-backup" signature for {PRINCIPAL}' in done.stdout
    finally:
        remove_tree(where)


def weekly_verify_checks_the_signature(deployed: Deployment, container: str) -> None:
    """weekly-verify as deployed (no allowed_signers parameter) checks the installed ones."""
    run_id = deployed.create_run("weekly-verify", container=container)
    run = deployed.api.wait_final(run_id, timeout=120)
    assert run["state"]["type"] == "COMPLETED", (run["state"], deployed.worker_log_tail())
    [report] = deployed.api("POST", "/artifacts/filter", {"artifacts": {
        "flow_run_id": {"any_": [run_id]}, "key": {"any_": ["backup-verification"]}}})
    assert f"- Signature: good (allowed signers `{ALLOWED_SIGNERS}`)" in report["data"]


def an_altered_manifest_is_refused(conn: swiftclient.Connection, container: str,
                                   backup_id: str) -> None:
    """A Swift-side writer swaps an object's recorded SHA-256: verify and restore, given no
    --allowed-signers, refuse the manifest (55) with the installed allowed signers."""
    name = f"{backup_id}/manifest.json"
    manifest = json.loads(conn.get_object(container, name)[1])
    manifest["objects"][0]["sha256"] = "0" * 64
    conn.put_object(container, name, json.dumps(manifest).encode())
    common = ["--container", container, "--backup-id", backup_id]
    runs = [subprocess.Popen([sys.executable, "-m", module, *common, *extra], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for module, extra in (("flows.verify", []), ("flows.restore", ["--dry-run"]))]
    for run in runs:
        _, stderr = run.communicate(timeout=180)
        assert run.returncode == 55, stderr[-2000:]
        assert "does not match its signature" in stderr.strip().splitlines()[-1]


RECIPIENTS = Path(crypto.INSTALLED_RECIPIENTS)
BREAK_GLASS = Path(crypto.INSTALLED_BREAK_GLASS)
NO_ENCRYPTION = Path(crypto.INSTALLED_NO_ENCRYPTION)


def run_backup(deployed: Deployment, os_env: dict[str, str], container: str,
               ) -> tuple[str, str]:
    """A UI-style run of on-demand on the small sample; its run id and backup id."""
    run_id = deployed.create_run("on-demand", **run_parameters(deployed.roots["small"],
                                                               container))
    run = deployed.api.wait_final(run_id, timeout=120)
    assert run["state"]["type"] == "COMPLETED", (run["state"], deployed.worker_log_tail())
    [backup_id] = [m.split("/")[0] for m in manifests(os_env, container)
                   if m.split("/")[0].endswith(run_id[:6])]
    return run_id, backup_id


def test_a_default_install_encrypts_every_backup_to_a_break_glass_key_it_shows_once(
        deployed, os_env, container):
    """install.sh given no recipients made an age key pair: the identity root's 0600 in
    break-glass.agekey, shown once on the installer's stdout, on no argv; its public key the
    recipients. A re-run keeps both and shows nothing. Every deployed run is encrypted to it
    and warns (log WARNING, artifact) while the identity is on the node; once it is moved off,
    no run warns, and the identity kept off the node decrypts the backups."""
    install = deployed.install
    assert install.identity is not None, install.config_output
    assert owner(BREAK_GLASS) == ("root", "root", 0o600)
    [secret] = [row for row in BREAK_GLASS.read_text().splitlines()
                if row.startswith("AGE-SECRET-KEY-")]
    assert install.config_output.count(secret) == 1
    assert f"shred -u {BREAK_GLASS}" in install.config_output
    public = subprocess.run(["age-keygen", "-y", str(BREAK_GLASS)], check=True,
                            capture_output=True, text=True).stdout.strip()
    assert owner(RECIPIENTS) == ("root", "root", 0o644)
    assert [row for row in RECIPIENTS.read_text().splitlines()
            if not row.startswith("#")] == [public]
    traced = b"".join(trace.read_bytes() for trace in install.traces if trace.exists())
    assert b"age-keygen" in traced and secret.encode() not in traced
    for user in (WORKER, NOSUDO, API_USER):
        assert as_user(user, ["cat", str(BREAK_GLASS)]).returncode != 0, user
    kept = (BREAK_GLASS.read_bytes(), RECIPIENTS.read_bytes())
    again = install.run("config")
    assert again.returncode == 0, again.stderr
    assert secret not in again.stdout + again.stderr
    assert f"break-glass identity {BREAK_GLASS} is still on this node" in again.stdout
    assert (BREAK_GLASS.read_bytes(), RECIPIENTS.read_bytes()) == kept

    warning = f"the break-glass identity {BREAK_GLASS} is still on this node"
    run_id, backup_id = run_backup(deployed, os_env, container)
    manifest = json.loads(swift_connection(os_env).get_object(
        container, f"{backup_id}/manifest.json")[1])
    assert manifest["encryption"] == {"format": "age",
                                      "recipients": [crypto.fingerprint(public)]}
    assert {o["name"].rsplit(".", 1)[-1] for o in manifest["objects"]} == {"age"}
    assert any(warning in m for m in run_messages(deployed, run_id, level=30))
    artifact = run_artifact(deployed, run_id)
    assert f"**WARNING: {warning}" in artifact and secret not in artifact
    assert "temp_url_sig=" in artifact  # links: the objects are encrypted
    moved = install.identity.parent / "moved-off-the-node"
    BREAK_GLASS.rename(moved)
    try:
        run_id, _ = run_backup(deployed, os_env, container)
        assert not [m for m in run_messages(deployed, run_id) if "break-glass" in m]
        assert "break-glass" not in run_artifact(deployed, run_id)
        # the full taken before (the later run is an incremental on it)
        assert "root/.my.cnf" in archive_members(os_env, container, backup_id, moved)
    finally:
        moved.rename(BREAK_GLASS)


def test_an_install_that_opts_out_stores_plain_text_and_gives_no_download_links(
        deployed, os_env, container):
    """UCB_NO_ENCRYPTION=REASON: refused while recipients are installed (one line); without
    them, recorded in no-encryption, and every deployed run is plain text with that reason in
    its manifest, log and artifact, which gives no TempURL, only the credentialed download.
    Installing recipients again ends the opt-out."""
    saved = RECIPIENTS.read_bytes()
    refused = deployed.install.run("config", UCB_NO_ENCRYPTION="lab node")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "recipients are installed" in refused.stderr and not NO_ENCRYPTION.exists()
    RECIPIENTS.unlink()
    try:
        done = deployed.install.run("config", UCB_NO_ENCRYPTION="lab  node,\nno secrets")
        assert done.returncode == 0, done.stderr
        assert "encryption: NONE (UCB_NO_ENCRYPTION)" in done.stdout
        assert NO_ENCRYPTION.read_text() == "lab node, no secrets\n"
        assert owner(NO_ENCRYPTION) == ("root", "root", 0o644) and not RECIPIENTS.exists()
        run_id, backup_id = run_backup(deployed, os_env, container)
        manifest = json.loads(swift_connection(os_env).get_object(
            container, f"{backup_id}/manifest.json")[1])
        reason = "opted out at install: lab node, no secrets"
        assert manifest["encryption"] == {"format": "none", "recipients": [],
                                          "reason": reason, "opted_out": True}
        assert not [o for o in manifest["objects"] if o["name"].endswith(".age")]
        assert any(f"stored in plain text: {reason}" in m
                   for m in run_messages(deployed, run_id, level=30))
        artifact = run_artifact(deployed, run_id)
        assert "temp_url_sig" not in artifact and "no links: stored in plain text" in artifact
        assert f"swift download {container} --prefix {backup_id}/" in artifact
    finally:
        RECIPIENTS.write_bytes(saved)
        RECIPIENTS.chmod(0o644)
    done = deployed.install.run("config")
    assert done.returncode == 0, done.stderr
    assert not NO_ENCRYPTION.exists() and RECIPIENTS.read_bytes() == saved


def test_installed_recipients_and_signing_key_protect_the_deployed_runs(
        deployed, os_env, container, tmp_path):
    """install.sh with UCB_RECIPIENTS_FILE: every run from then on is encrypted to them; a file
    that is not an age recipients file is refused in one line and changes nothing. The
    signing key the install made (kept when it runs again) signs every run, weekly-verify
    checks that signature, and the default verify and restore refuse a manifest altered in
    Swift."""
    identity, recipients, bad = tmp_path / "identity", tmp_path / "recipients", tmp_path / "bad"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    recipients.write_text(subprocess.run(["age-keygen", "-y", str(identity)], check=True,
                                         capture_output=True, text=True).stdout)
    bad.write_text("not a key\n")
    installed = RECIPIENTS
    before = installed.read_bytes()  # the break-glass key's, made by the installation
    env_files = [Path("/etc/undercloud-backup") / n for n in ("worker.env", "server.env")]
    saved = {p: p.read_bytes() for p in env_files if p.exists()}
    check_installed_signing_key(deployed.install)
    keys = (SIGNING_KEY.read_bytes(), ALLOWED_SIGNERS.read_bytes())
    try:
        done = deployed.install.run("config", UCB_RECIPIENTS_FILE=str(bad))
        assert done.returncode != 0
        assert "not an age recipients file" in done.stderr.strip().splitlines()[-1]
        assert installed.read_bytes() == before
        done = deployed.install.run("config", UCB_RECIPIENTS_FILE=str(recipients))
        assert done.returncode == 0, done.stderr
        st = installed.stat()
        assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o644)
        assert installed.read_text() == recipients.read_text()
        # Re-running the install kept the signing key, its allowed_signers and their modes.
        assert (SIGNING_KEY.read_bytes(), ALLOWED_SIGNERS.read_bytes()) == keys
        assert owner(SIGNING_KEY) == ("root", GROUP, 0o640)
        assert f"keep a copy of {ALLOWED_SIGNERS} off this node" in done.stdout

        run_id = deployed.create_run("on-demand", **run_parameters(deployed.roots["small"],
                                                                   container))
        run = deployed.api.wait_final(run_id, timeout=120)
        assert run["state"]["type"] == "COMPLETED", (run["state"], deployed.worker_log_tail())
        [manifest] = manifests(os_env, container)
        backup_id = manifest.split("/")[0]
        conn = swift_connection(os_env)
        names = [o["name"] for o in conn.get_container(container, full_listing=True)[1]]
        assert f"{backup_id}/filesystem.tar.zst.age" in names
        assert f"{backup_id}/filesystem.tar.zst" not in names
        assert "root/.my.cnf" in archive_members(os_env, container, backup_id, identity)

        check_signed_by_hand(conn, container, backup_id)
        weekly_verify_checks_the_signature(deployed, container)
        an_altered_manifest_is_refused(conn, container, backup_id)
    finally:
        installed.write_bytes(before)
        for path, body in saved.items():
            path.write_bytes(body)


def test_killed_worker_does_not_block_later_backups(deployed, os_env, container):
    killed_id = deployed.create_run("on-demand",
                                    **run_parameters(deployed.roots["large"], container))
    wait_for_archiving(deployed, killed_id)
    deployed.install.kill_worker()  # worker, flow run, sudo, tar: all gone at once
    state = deployed.api.flow_run(killed_id)["state"]
    assert state["type"] == "RUNNING", state

    # The server restarts too: the slot's lease must survive it (filesystem lease storage).
    # `install.sh stop`, then `install.sh services` starts the server and a new worker.
    deployed.install.restart()
    started = time.monotonic()
    next_id = deployed.create_run("on-demand", **run_parameters(deployed.roots["small"],
                                                                container))
    following = deployed.api.wait_final(next_id, timeout=240)
    assert following["state"]["type"] == "COMPLETED", following["state"]
    assert time.monotonic() - started < 180

    killed = deployed.api.flow_run(killed_id)
    assert killed["state"]["type"] == "CRASHED"
    assert "No heartbeat" in killed["state"]["message"]
    # Backup ids end with the first 6 hex digits of their flow run's id: only the later
    # backup has a manifest, the killed one left none.
    assert [m.split("/")[0][-6:] for m in manifests(os_env, container)] == [next_id[:6]]
