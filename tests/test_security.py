"""The trust boundary on a real installation: `install.sh` run by the
tests with every step (the installation they share with test_deploy and test_ui, conftest's
full_system), a local Prefect server of its own user, its own prefix and state directory
(deployments run from this checkout), no systemd (start-stop-daemon). Each attack is made the way
a hostile worker or local user would make it; races are made deterministic by planting first and
letting root act afterwards.
"""

from __future__ import annotations

import grp
import io
import os
import pwd
import stat
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from deploy_helpers import (
    API_USER,
    GROUP,
    NOSUDO,
    REPO,
    WORKER,
    accounts_removed,
    as_user,
    descendants,
    remove_tree,
    sample_root,
    scratch_dir,
)
from install_helpers import ETC, LOG_DIR

from undercloud_backup.db import privileged
from undercloud_backup.files import archive

pytestmark = pytest.mark.slow
LIBEXEC = REPO / "deployments/libexec"


@pytest.fixture(scope="module")
def full(full_system):
    """The shared installation (conftest: full_system), every step traced."""
    return full_system


@pytest.fixture(scope="module")
def policy_root(full):
    """A sample undercloud allowed as the archive root (in place of `/`), with what the deny
    list keeps out planted in it; the shipped policy otherwise."""
    root = sample_root()
    planted = {"etc/shadow": b"root:$6$kept:1::::::\n", "etc/shadow-": b"root:$6$old:1::::::\n",
               "etc/gshadow-": b"root:*::\n", "etc/security/opasswd": b"root:1:$6$x\n",
               "root/.bash_history": b"mysql -pHUNTER2\n", "root/.cache/pip/x": b"c",
               "home/stack/.bash_history": b"export OS_PASSWORD=HUNTER2\n",
               "home/stack/.cache/x": b"c", "home/stack/.mysql_history": b"SELECT 1;\n",
               "etc/undercloud-backup/signing-key": b"-----BEGIN OPENSSH PRIVATE KEY-----\n",
               "etc/undercloud-backup/break-glass.agekey": b"AGE-SECRET-KEY-1PLANTED\n",
               "etc/undercloud-backup/server.env": b"PREFECT_SERVER_API_AUTH_STRING=a:b\n",
               "etc/undercloud-backup/alert-webhook-url": b"https://hooks.example/T0K3N\n",
               "etc/undercloud-backup/worker.env": b"OS_PASSWORD=kept\n"}
    for name, data in planted.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        (root / name).chmod(0o600)
    config = Path(privileged.CONFIG_FILE)
    shipped = config.read_text()
    config.write_text("".join(line for line in shipped.splitlines(keepends=True)
                              if not line.startswith("root =")) + f"root = {root}\n")
    try:
        yield root
    finally:
        if config.parent.is_dir():  # run alone, this module outlives the shared install
            config.write_text(shipped)
        remove_tree(root)


def sudo(*argv: str, user: str = WORKER, **kwargs) -> subprocess.CompletedProcess:
    return as_user(user, ["sudo", "-n", *argv], **kwargs)


def owner(path: Path | str) -> tuple[str, str, int]:
    st = os.lstat(path)
    return (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name,
            stat.S_IMODE(st.st_mode))


def status_field(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(field)


# ---------------------------------------------------------------- 1: root acts on root's paths
def test_install_leaves_only_root_owned_directories_above_what_root_writes(full):
    # measured, not asserted: a time depends on the machine and what else runs on it
    print(f"\ninstall.sh user privileged config services prefect: {full.install_seconds:.1f} s")
    assert owner(full.state) == ("root", "root", 0o755)
    assert owner(full.state / "worker") == (WORKER, GROUP, 0o700)
    assert owner(full.state / "server") == (API_USER, API_USER, 0o700)
    for directory in (privileged.LIBEXEC, ETC, "/etc/sudoers.d", LOG_DIR,
                      "/run/undercloud-backup", full.state):
        check = subprocess.run(["python3", "-I", str(REPO / "deployments/installfs.py"),
                                "check", str(directory)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    # The worker can no longer swap its directory for a symlink: the parent is root's.
    moved = as_user(WORKER, ["mv", str(full.state / "worker"), str(full.state / "w")])
    assert moved.returncode != 0 and "Permission denied" in moved.stderr
    planted = as_user(WORKER, ["ln", "-s", privileged.LIBEXEC, str(full.state / "x")])
    assert planted.returncode != 0
    again = full.run("user")  # documented as safe to re-run
    assert again.returncode == 0, again.stderr


def test_rerun_refuses_a_symlink_the_worker_planted_in_an_old_state_dir(full):
    """The issue's attack: an older installation let the worker own the state directory; it
    replaced worker/ and server/ with symlinks to root's directories, then root re-ran
    `install.sh user`. Root must take the directory back and refuse, chowning nothing."""
    state, victim = scratch_dir("ucb-old-state-"), scratch_dir("ucb-victim-")
    try:
        worker = pwd.getpwnam(WORKER).pw_uid
        os.chown(state, worker, grp.getgrnam(GROUP).gr_gid)
        (state / "w").mkdir()
        os.chown(state / "w", worker, -1)
        for name in ("worker", "server"):
            assert as_user(WORKER, ["ln", "-s", str(victim), str(state / name)]).returncode == 0
        result = full.run("user", UCB_STATE=str(state))
        assert result.returncode == 1
        assert result.stderr.strip().count("\n") == 0
        assert f"{state}/worker is a symbolic link" in result.stderr
        assert owner(victim) == ("root", "root", 0o755)
        assert owner(state) == ("root", "root", 0o755)  # taken back before anything else
    finally:
        remove_tree(state)
        remove_tree(victim)


def test_install_refuses_a_state_dir_planted_in_a_world_writable_directory(full):
    victim = scratch_dir("ucb-victim-")
    planted = Path(f"/var/tmp/ucb-planted-{os.getpid()}")
    try:
        assert as_user(WORKER, ["ln", "-s", str(victim), str(planted)]).returncode == 0
        result = full.run("user", UCB_STATE=str(planted))
        assert result.returncode == 1
        assert "/var/tmp is writable by group or others" in result.stderr
        assert owner(victim) == ("root", "root", 0o755)
    finally:
        planted.unlink(missing_ok=True)
        remove_tree(victim)


def test_app_step_copies_root_owned_code_the_worker_cannot_change(full):
    """The app step on a prefix of its own: the copy is root's and read-only to the worker, a
    re-run replaces it whole and leaves no .new or .old beside it."""
    prefix = scratch_dir("ucb-prefix-")
    app = prefix / "app"
    try:
        for _ in range(2):  # install, then re-run over the installed copy
            result = full.run("app", UCB_APP=str(app))
            assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in prefix.iterdir()) == ["app"]
        assert (app / "deployments/install.sh").read_bytes() == (
            REPO / "deployments/install.sh").read_bytes()
        assert not (app / ".venv").exists() and not (app / ".git").exists()
        for path in [app, *app.rglob("*")]:
            st = path.lstat()
            assert (st.st_uid, st.st_gid) == (0, 0), path
            assert not st.st_mode & 0o022, path
        code = app / "undercloud_backup/db/privileged.py"
        tamper = as_user(WORKER, ["sh", "-c", f"echo 'import os' >> {code}"])
        assert tamper.returncode != 0 and "Permission denied" in tamper.stderr
    finally:
        remove_tree(prefix)


@pytest.mark.parametrize("step", ["app", "venv"])
def test_app_and_venv_steps_refuse_a_prefix_the_worker_can_change(full, step):
    """Root copies code and runs pip only where no other user can swap a name under it: a
    prefix the worker owns (here with its target already planted as a symlink to a root
    directory) is refused before anything is written or chowned."""
    prefix, victim = scratch_dir("ucb-prefix-"), scratch_dir("ucb-victim-")
    try:
        os.chown(prefix, pwd.getpwnam(WORKER).pw_uid, grp.getgrnam(GROUP).gr_gid)
        assert as_user(WORKER, ["ln", "-s", str(victim), str(prefix / step)]).returncode == 0
        result = full.run(step, UCB_APP=str(prefix / "app"), UCB_VENV=str(prefix / "venv"))
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert str(prefix) in result.stderr
        assert owner(victim) == ("root", "root", 0o755) and list(victim.iterdir()) == []
        assert sorted(p.name for p in prefix.iterdir()) == [step]
    finally:
        remove_tree(prefix)
        remove_tree(victim)


# --------------------------------------------------- 2: a directory the caller owns is its own
def test_a_sticky_directory_the_worker_owns_does_not_pass_the_chain_check(full, policy_root):
    sticky = policy_root / "home/stack/sticky"
    (sticky / "inner").mkdir(parents=True)
    (sticky / "inner/secret").write_text("root only\n")
    (sticky / "inner/secret").chmod(0o600)
    os.chown(sticky, pwd.getpwnam(WORKER).pw_uid, -1)
    sticky.chmod(0o1777)
    try:
        result = sudo(privileged.ARCHIVE_WRAPPER, str(policy_root), "--",
                      "/home/stack/sticky/inner/secret")
        assert result.returncode == 77 and result.stdout == ""
        assert f"{sticky} can be changed by the calling user" in result.stderr
    finally:
        remove_tree(sticky)


# ------------------------------------------------------------------- 3: no secret on an argv
def test_no_secret_on_any_argv_during_install_or_in_the_daemons(full):
    password = full.auth.split(":", 1)[1]
    assert len(password) >= 20
    traced = b"".join(trace.read_bytes() for trace in full.traces)
    assert b"execve(" in traced and b"installfs.py" in traced and b"work-pool" in traced
    assert password.encode() not in traced
    for name in ("server", "worker"):
        pid = full.pid(name)
        for process in (pid, *descendants(pid)):
            with open(f"/proc/{process}/cmdline", "rb") as cmdline:
                assert password.encode() not in cmdline.read()


# --------------------------------------------------------------- 4: the server's own user
def test_the_server_runs_as_its_own_user_and_the_worker_uses_the_api_password(full):
    server = full.pid("server")
    api_uid = pwd.getpwnam(API_USER).pw_uid
    assert status_field(server, "Uid").split() == [str(api_uid)] * 4
    assert str(grp.getgrnam(GROUP).gr_gid) not in status_field(server, "Groups").split()
    rights = subprocess.run(["sudo", "-l", "-U", API_USER], capture_output=True, text=True)
    assert privileged.LIBEXEC not in rights.stdout
    assert "is not allowed to run sudo" in rights.stdout
    # The worker reaches neither the server's state nor its settings; nor the reverse.
    for path in (full.state / "server/prefect.db", ETC / "server.env"):
        assert as_user(WORKER, ["cat", str(path)]).returncode != 0, path
    assert as_user(API_USER, ["cat", str(ETC / "worker.env")]).returncode != 0
    assert owner(full.state / "server/prefect.db")[:2] == (API_USER, API_USER)
    # The API: the password opens it, nothing else does.
    assert full.api()("GET", "/health") is True
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(full.url + "/flow_runs/filter", data=b"{}", timeout=10)
    assert refused.value.code == 401


# ------------------------------------------------- 5: without systemd, the units' protections
def test_daemons_without_systemd_have_umask_0077_and_private_logs(full):
    for name, group in (("server", API_USER), ("worker", GROUP)):
        assert status_field(full.pid(name), "Umask") == "0077"
        assert owner(LOG_DIR / f"{name}.log") == ("root", group, 0o640)
        assert as_user(NOSUDO, ["cat", str(LOG_DIR / f"{name}.log")]).returncode != 0
    assert "PREFECT_API_URL" in (LOG_DIR / "server.log").read_text()  # it did log there
    assert owner(full.state / "server/prefect.db")[2] == 0o600
    # Nor the settings, the state, or the keys the installation made.
    for path in (ETC / "worker.env", ETC / "server.env", full.state / "server/prefect.db",
                 full.state / "worker", ETC / "break-glass.agekey"):
        assert path.exists(), path
        read = as_user(NOSUDO, ["cat" if path.is_file() else "ls", str(path)])
        assert read.returncode != 0 and "Permission denied" in read.stderr, path


# ---------------------------------------------------------- 6: the group holds the worker only
def test_installer_refuses_a_group_with_other_members(full):
    intruder = "ucb-intruder"
    with accounts_removed(users=(intruder,), groups=(intruder,)):
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", intruder], check=True)
        subprocess.run(["usermod", "-a", "-G", GROUP, intruder], check=True)
        for steps in (["user"], ["privileged"]):
            result = full.run(*steps)
            assert result.returncode == 1
            assert result.stderr.count("\n") == 1, result.stderr
            assert f"group {GROUP} has members other than {WORKER} ({intruder})" \
                in result.stderr
        subprocess.run(["gpasswd", "-d", intruder, GROUP], check=True, capture_output=True)
        # A primary group counts as membership too.
        subprocess.run(["usermod", "-g", GROUP, intruder], check=True)
        assert full.run("user").returncode == 1
        subprocess.run(["usermod", "-g", intruder, intruder], check=True)
        assert full.run("user").returncode == 0
    # A group password: anyone who knows it joins with newgrp.
    subprocess.run(["groupmod", "--password", "$6$salt$notarealhash", GROUP], check=True)
    try:
        result = full.run("user")
        assert result.returncode == 1 and f"group {GROUP} has a password" in result.stderr
    finally:
        subprocess.run(["gpasswd", "-r", GROUP], check=True)
    assert full.run("user").returncode == 0


def test_accounts_that_tests_create_are_removed_with_their_processes():
    name = "ucb-leftover"
    with accounts_removed(users=(name,), groups=(name,)):
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", name],
                       check=True)
        sleeper = subprocess.Popen(["setpriv", f"--reuid={name}", f"--regid={name}",
                                    "--clear-groups", "sleep", "60"])
        time.sleep(0.2)
    assert sleeper.wait(timeout=10) != 0
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    with pytest.raises(KeyError):
        grp.getgrnam(name)


# ------------------------------------------------------------- 7: what no restore needs stays out
def test_the_deny_list_keeps_secrets_no_restore_needs_out_of_the_archive(full, policy_root):
    plan = archive.plan_paths(str(policy_root))
    result = as_user(WORKER, list(privileged.archive_command(plan).argv), text=False)
    assert result.returncode == 0, result.stderr
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        names = set(tar.getnames())
    # What a restore needs stays in (the worker reads what it backs up: worker.env included).
    assert {"etc/shadow", "root/.my.cnf", "etc/keystone/fernet-keys/0",
            "etc/undercloud-backup/worker.env"} <= names
    for denied in ("etc/shadow-", "etc/gshadow-", "etc/security/opasswd", "root/.bash_history",
                   "root/.cache", "root/.cache/pip/x", "home/stack/.bash_history",
                   "home/stack/.cache/x", "home/stack/.mysql_history",
                   "etc/undercloud-backup/signing-key", "etc/undercloud-backup/break-glass.agekey",
                   "etc/undercloud-backup/server.env",
                   "etc/undercloud-backup/alert-webhook-url"):
        assert denied not in names, denied
    for secret in ("server.env", "alert-webhook-url", "break-glass.agekey"):
        asked = sudo(privileged.ARCHIVE_WRAPPER, str(policy_root), "--",
                     f"/etc/undercloud-backup/{secret}")
        assert asked.returncode == 77 and asked.stdout == "", secret
        assert f"deny = /etc/undercloud-backup/{secret}" in asked.stderr
    asked = sudo(privileged.ARCHIVE_WRAPPER, str(policy_root), "--", "/etc/shadow-")
    assert asked.returncode == 77 and asked.stdout == ""
    assert "/etc/shadow- is denied ('deny = /etc/shadow-'" in asked.stderr
    history = sudo(privileged.ARCHIVE_WRAPPER, str(policy_root), "--",
                   "/home/stack/.bash_history")
    assert history.returncode == 77 and "deny = /home/*/.bash_history" in history.stderr


def test_a_rerun_adds_the_shipped_deny_lines_a_kept_policy_lacks(full):
    """privileged.conf is the operator's once installed, but `install.sh privileged` appends
    the shipped deny lines it lacks (an installation made before the install's own secrets
    were on the list): the worker then cannot read server.env, the webhook URL or the
    break-glass identity through the wrapper, under the shipped `root = /`. The operator's
    other lines stay as they were."""
    config = Path(privileged.CONFIG_FILE)
    current = config.read_text()
    shipped = (REPO / "deployments/privileged.conf").read_text()
    new = ("/etc/undercloud-backup/server.env", "/etc/undercloud-backup/alert-webhook-url",
           "/etc/undercloud-backup/break-glass.agekey", "/var/lib/undercloud-backup/server")
    older = "".join(line for line in shipped.splitlines(keepends=True)
                    if not any(line.strip() == f"deny = {path}" for path in new))
    older += "path = /opt/operator-added\n"
    url_file = ETC / "alert-webhook-url"
    made_url = not url_file.exists()
    try:
        config.write_text(older)
        done = full.run("privileged")
        assert done.returncode == 0, done.stderr
        policy = config.read_text()
        assert policy.startswith(older)  # nothing of the operator's changed or removed
        assert [line for line in policy[len(older):].splitlines() if line.startswith("deny")] \
            == [f"deny = {path}" for path in sorted(new, key=shipped.index)]
        assert "deny = /etc/undercloud-backup/server.env" in done.stdout
        again = full.run("privileged")  # nothing more to add
        assert again.returncode == 0 and config.read_text() == policy
        if made_url:
            url_file.write_text("https://hooks.example/T0K3N\n")
            url_file.chmod(0o600)
        for path in (ETC / "server.env", url_file, ETC / "break-glass.agekey"):
            assert path.exists(), path
            asked = sudo(privileged.ARCHIVE_WRAPPER, "/", "--", str(path))
            assert asked.returncode == 77 and asked.stdout == "", (path, asked.stderr)
        # A policy with no deny line at all gets the whole shipped list.
        config.write_text("".join(line for line in shipped.splitlines(keepends=True)
                                  if not line.startswith("deny")))
        assert full.run("privileged").returncode == 0
        added = [line.split("=", 1)[1].strip() for line in config.read_text().splitlines()
                 if line.startswith("deny =")]
        assert added == [line.split("=", 1)[1].strip() for line in shipped.splitlines()
                         if line.startswith("deny =")]
    finally:
        config.write_text(current)
        if made_url:
            url_file.unlink(missing_ok=True)


def test_shipped_deny_list_is_the_wrappers_default():
    from test_sudo import load_wrapper

    policy = (REPO / "deployments/privileged.conf").read_text().splitlines()
    shipped = tuple(line.split("=", 1)[1].strip() for line in policy if line.startswith("deny ="))
    assert shipped == load_wrapper("ucb-archive").DEFAULT_DENY
    assert "/etc/shadow" not in shipped and "/root/.my.cnf" not in shipped


# ----------------------------------------------------------------------------- the UI is served
def test_the_installed_server_serves_both_uis_from_its_state(full):
    base = f"http://127.0.0.1:{full.port}"
    pages = {}
    for ui, cookie in (("v2", ""), ("v1", "prefect_ui_version=v1")):
        request = urllib.request.Request(base + "/", headers={
            "Accept": "text/html", "Sec-Fetch-Mode": "navigate", "Cookie": cookie})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/html")
            pages[ui] = response.read()
        served = full.state / f"server/ui/{ui}/index.html"
        assert pages[ui] == served.read_bytes(), ui
        assert owner(served)[0] == API_USER
    assert pages["v1"] != pages["v2"]
    with urllib.request.urlopen(base + "/ui-settings", timeout=30) as response:
        settings = __import__("json").loads(response.read())
    assert settings["available_uis"] == ["v1", "v2"] and settings["auth"] == "BASIC"
    assert "Failed to create" not in (LOG_DIR / "server.log").read_text()



# ----------------------------------------------------------------------------- alerts at install
def test_install_sets_up_the_alerts_from_a_root_owned_url_file_and_no_argv_holds_it(full):
    url_file = ETC / "alert-webhook-url"
    secret = "http://127.0.0.1:9/hook/T0K3N-" + os.urandom(8).hex()
    url_file.write_text(secret + "\n")
    url_file.chmod(0o600)
    trace = scratch_dir("ucb-alerts-trace-", 0o700) / "prefect"
    try:
        done = full.run("prefect", trace=trace)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "alerts: not configured" not in done.stdout
        traced = trace.read_bytes()
        assert b"alerts.py" in traced and b"--url-file" in traced
        assert secret.encode() not in traced  # on no argv of the installer or its children
        assert secret not in done.stdout + done.stderr
        api = full.api()
        names = {a["name"]: a for a in api("POST", "/automations/filter", {})}
        failed = names["undercloud-backup: backup failed"]
        silent = names["undercloud-backup: no backup completed"]
        assert failed["enabled"] and silent["enabled"]
        assert silent["trigger"]["posture"] == "Proactive"
        assert silent["trigger"]["within"] == 26 * 3600
        block_id = failed["actions"][0]["block_document_id"]
        assert silent["actions"][0]["block_document_id"] == block_id
        block = api("GET", f"/block_documents/{block_id}")
        assert secret not in str(block)  # a secret field: obfuscated unless asked for ...
        # ... and Prefect's open-source server gives it in clear to any holder of the API
        # password who asks (one password, no roles): docs/deploy.md says so.
        clear = api("GET", f"/block_documents/{block_id}?include_secrets=true")
        assert clear["data"]["secrets"]["webhook_url"] == secret
        listed = api("POST", "/block_documents/filter", {"include_secrets": True})
        assert secret in str(listed)
        # Without a target the install still succeeds and says how to add one: the
        # installation's own `prefect` step (full_install asserts it exited 0) had none.
        assert "alerts: not configured" in full.output and str(url_file) in full.output
    finally:
        url_file.unlink(missing_ok=True)
        remove_tree(trace.parent)
        # The installation is shared: take back the automations and block this test made.
        api = full.api()
        for made in api("POST", "/automations/filter", {}):
            if made["name"] in ("undercloud-backup: backup failed",
                                "undercloud-backup: no backup completed"):
                api("DELETE", f"/automations/{made['id']}")
        for block in api("POST", "/block_documents/filter", {
                "block_documents": {"name": {"any_": ["undercloud-backup-alerts"]}}}):
            api("DELETE", f"/block_documents/{block['id']}")
