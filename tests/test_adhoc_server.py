"""Root's ad hoc runs (no PREFECT_API_URL) and another local user.

Such a run starts a temporary Prefect server whose artifacts hold TempURLs that download the
backup without credentials. Here `nobody` plays the other local user while root's backup runs:
finds the server, asks its API, reads what it can of the server's process and files; then a
later run's server is asked (with its own password) for the earlier run's artifact.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from contextlib import closing
from pathlib import Path

import pytest
from conftest import REPO, backup_cli
from deploy_helpers import as_user, remove_tree, scratch_dir
from test_faults import _stalling_zstd

from flows.server import PRIVATE_PREFIX, TEMPLATE_PREFIX

NOBODY = "nobody"
# What `nobody` does: prints every /proc/*/cmdline and /proc/*/environ it can read (the test
# looks for the password in them), and asks the server's API without a password and with ones
# it might guess.
PROBE = r"""
import base64, json, os, sys, urllib.error, urllib.request
url = sys.argv[1]
readable = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    for what in ("cmdline", "environ"):
        try:
            with open(f"/proc/{pid}/{what}", "rb") as f:
                readable.append(f.read().decode("utf-8", "replace"))
        except OSError:
            pass
def ask(path, auth=None, body=b"{}"):
    request = urllib.request.Request(url + path, data=body,
                                     headers={"Content-Type": "application/json"})
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
answers = {"health": ask("/health", body=None)}
for path in ("/artifacts/filter", "/flow_runs/filter", "/logs/filter"):
    for auth in (None, "admin:admin", ":", "undercloud-backup:"):
        answers[f"{path} {auth}"] = ask(path, auth)
print(json.dumps({"readable": readable, "answers": answers}))
"""


@pytest.fixture
def home():
    """The ad hoc runs' PREFECT_HOME, root's own but open to all (0755, as a PREFECT_HOME set
    to e.g. /var/lib/something would be): only what the run makes may protect its data."""
    path = scratch_dir("ucb-adhoc-home-")
    yield path
    remove_tree(path)


@pytest.fixture
def adhoc_env(home, os_env) -> dict[str, str]:
    """An operator's ad hoc run: no PREFECT_API_URL (the session's server is out of it) and
    Prefect's default "ephemeral" profile (which conftest turns off for other tests)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_EPHEMERAL_ENABLED="true")
    return env


@pytest.fixture
def recipients(tmp_path) -> str:
    """An age recipients file: encrypted backups are the ones whose artifact has TempURLs."""
    identity = tmp_path / "identity"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(identity)], check=True,
                            capture_output=True, text=True).stdout
    path = tmp_path / "recipients"
    path.write_text(public)
    return str(path)


def _servers(home: Path) -> list[int]:
    """Pids of the temporary Prefect servers of runs with this PREFECT_HOME."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"uvicorn" in cmdline and f"PREFECT_HOME={home}/".encode() in environ:
            found.append(int(pid))
    return found


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if b"=" in e)


def _listening_port(pid: int) -> int:
    listing = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True,
                             check=True).stdout
    ports = [int(m[1]) for line in listing.splitlines() if f"pid={pid}," in line
             for m in [re.search(r"127\.0\.0\.1:(\d+)", line)] if m]
    assert len(ports) == 1, listing
    return ports[0]


def _ask(url: str, path: str, auth: str) -> dict | list:
    request = urllib.request.Request(
        url + path, data=b"{}", headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + b64encode(auth.encode()).decode()})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _private_dirs(home: Path) -> list[Path]:
    return sorted(p for p in home.iterdir() if p.name.startswith(PRIVATE_PREFIX))


def _readable_by_nobody(home: Path) -> list[str]:
    found = as_user(NOBODY, ["find", str(home), "-readable", "-type", "f"])
    return found.stdout.split()


def _pids(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


def _wait_for(what: str, check, process: subprocess.Popen | None = None,
              timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (found := check()):
            return found
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.communicate()}")
        time.sleep(0.3)
    raise AssertionError(f"no {what} within {timeout:.0f} s")


def test_another_local_user_gets_nothing_from_roots_adhoc_runs(
        home, adhoc_env, recipients, tmp_path, container, db_cnf):
    root = tmp_path / "uc"
    (root / "etc").mkdir(parents=True)
    (root / "etc/secret").write_text("root's secret\n")
    # 1. A complete encrypted backup: its artifact had the TempURLs that downloaded it.
    first = backup_cli("--root", str(root), "--container", container, "--db-defaults-file",
                       db_cnf, "--recipients-file", recipients, "--no-prune", "--json",
                       env=adhoc_env)
    assert first.returncode == 0, first.stderr
    first_id = json.loads(first.stdout)["backup_id"]
    # Its server, database and persisted task results are gone; nothing readable is left.
    assert _private_dirs(home) == []
    assert _readable_by_nobody(home) == []
    assert not (home / "prefect.db").exists() and not (home / "storage").exists()
    # What the next runs start from holds no run of anyone's.
    templates = list(home.glob(f"{TEMPLATE_PREFIX}*.db"))
    assert len(templates) == 1 and stat.S_IMODE(templates[0].stat().st_mode) == 0o600
    with closing(sqlite3.connect(f"file:{templates[0]}?mode=ro", uri=True)) as db:
        assert db.execute("SELECT count(*) FROM artifact").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM flow_run").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM log").fetchone() == (0,)

    # 2. A second run, held mid-backup, while nobody looks around.
    marker = 600 + int(uuid.uuid4().int % 300)
    env = dict(adhoc_env, **_stalling_zstd(tmp_path / "bin", marker))
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.backup", "--root", str(root), "--container", container,
         "--db-defaults-file", db_cnf, "--recipients-file", recipients, "--no-prune"],
        cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        (pid,) = _wait_for("temporary server", lambda: _servers(home), process)
        _wait_for("stalled compressor", lambda: _pids(f"sleep {marker}"), process)
        port = _listening_port(pid)
        url = f"http://127.0.0.1:{port}/api"
        auth = _environ(pid)["PREFECT_SERVER_API_AUTH_STRING"]
        password = auth.split(":", 1)[1]
        assert len(password) >= 40
        (private,) = _private_dirs(home)

        probe = as_user(NOBODY, ["/usr/bin/python3", "-c", PROBE, url])
        assert probe.returncode == 0, probe.stderr
        seen = json.loads(probe.stdout)
        assert seen["answers"].pop("health") == [200, "true"]  # it is there, and says so
        for asked, (code, _) in seen["answers"].items():
            assert code == 401, asked
        assert not [text for text in seen["readable"] if password in text]
        # Its database and home: a directory only root enters.
        assert stat.S_IMODE(private.lstat().st_mode) == 0o700 and private.lstat().st_uid == 0
        for argv in (["ls", str(private)], ["cat", str(private / "prefect.db")]):
            denied = as_user(NOBODY, argv)
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, argv
        assert _readable_by_nobody(home) == []

        # With the password (root's, from the server's environment): only this run is there.
        runs = _ask(url, "/flow_runs/filter", auth)
        assert len(runs) == 1, [r["name"] for r in runs]
        artifacts = _ask(url, "/artifacts/filter", auth)
        assert {a["flow_run_id"] for a in artifacts} <= {runs[0]["id"]}
        assert [a for a in artifacts if a["key"] == "undercloud-backup"] == []
        assert "temp_url_sig" not in json.dumps(artifacts)
        logs = _ask(url, "/logs/filter", auth)
        assert logs and {entry["flow_run_id"] for entry in logs} == {runs[0]["id"]}
        assert password not in json.dumps(logs) + json.dumps(artifacts)
        process.kill()  # 3. SIGKILL: nothing of ours cleans up
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        _wait_for("the run's children to end", lambda: not _pids(f"sleep {marker}"), timeout=30)
    assert password not in stderr
    _wait_for("the server's end", lambda: not _servers(home), timeout=30)  # died with it
    # The killed run's data stays behind, still private, until the next ad hoc run.
    assert private.is_dir() and _readable_by_nobody(home) == []
    listed = backup_cli("--list", "--json", "--container", container, env=adhoc_env)
    assert listed.returncode == 0, listed.stderr
    assert [b["backup_id"] for b in json.loads(listed.stdout)["backups"]] == [first_id]
    assert not private.exists() and _private_dirs(home) == []


def test_what_others_plant_where_the_server_keeps_its_data_is_never_used_or_followed(tmp_path):
    from flows import server

    nobody = pwd.getpwnam(NOBODY)
    base = tmp_path / "home"
    base.mkdir()
    # A PREFECT_HOME another user can change is not used: the system's temporary directory is.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, nobody.pw_uid, nobody.pw_gid)
    assert server._private_base(theirs / "prefect") == Path(os.path.realpath(tempfile.gettempdir()))
    assert server._private_base(base) == base
    # A template database that is not root's alone is never copied.
    template = server._template(base)
    template.write_bytes(b"SQLite format 3\0 planted")
    template.chmod(0o600)
    os.chown(template, nobody.pw_uid, nobody.pw_gid)
    assert not server._copy_template(template, base / "a.db") and not (base / "a.db").exists()
    os.chown(template, 0, 0)
    template.chmod(0o644)
    assert not server._copy_template(template, base / "b.db") and not (base / "b.db").exists()
    template.chmod(0o600)
    assert server._copy_template(template, base / "c.db")
    assert (base / "c.db").read_bytes() == template.read_bytes()
    # Leftovers: a killed run's directory goes; a live run's, a link and another's stay.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "kept").write_text("x")
    never_a_pid = 4194305  # above the kernel's largest pid_max
    killed = base / f"{PRIVATE_PREFIX}{never_a_pid}-aaaa"
    (killed / "results").mkdir(parents=True)
    link = base / f"{PRIVATE_PREFIX}{never_a_pid}-bbbb"
    link.symlink_to(victim)
    live = base / f"{PRIVATE_PREFIX}{os.getpid()}-cccc"
    live.mkdir()
    foreign = base / f"{PRIVATE_PREFIX}{never_a_pid}-dddd"
    foreign.mkdir()
    os.chown(foreign, nobody.pw_uid, nobody.pw_gid)
    server._remove_leftovers(base)
    assert not killed.exists()
    assert link.is_symlink() and (victim / "kept").exists() and live.is_dir() and foreign.is_dir()
