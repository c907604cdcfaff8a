"""The installed worker plans what it cannot read: through real sudo, the shipped sudoers file
and the installed ``ucb-archive --estimate``, as the unprivileged worker user.

A privileged run learns which paths exist and how big they are from the wrapper (root), checks
every path of its plan against the policy before it writes anything, and the estimate action
is as hostile-user-proof as the archive: bounded by the policy, never following what the worker
can change, never naming a file.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import remove_container, swift_store
from deploy_helpers import REPO, WORKER, as_user, remove_tree, scratch_dir
from test_sudo import ARCHIVE, PYTHON, sudo
from test_sudo import installed as installed  # noqa: F401 - the module's install fixture

from flows.params import WhatToBackUp
from undercloud_backup.db import privileged
from undercloud_backup.files import estimate

ROOT_ONLY = {"etc/private/blob": 4 << 20, "root/big": 2 << 20}  # bytes, under 0700 dirs
ADDED = "/var/lib/private-app/data"  # inside a root-only directory, allowed by the policy


@pytest.fixture(scope="module")
def tree(installed):  # noqa: F811 - the imported fixture
    """The sample root with root-only content the worker cannot see, and a policy allowing
    ADDED besides the defaults (put back afterwards)."""
    root = installed
    for name, size in ROOT_ONLY.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        path.write_bytes(os.urandom(size))
        path.chmod(0o600)
    private = root / ADDED.lstrip("/")
    private.mkdir(parents=True)
    private.parent.chmod(0o700)
    (private / "state.db").write_bytes(os.urandom(1 << 20))
    config = Path(privileged.CONFIG_FILE)
    policy = config.read_text()
    config.write_text(policy + f"path = {os.path.dirname(ADDED)}\n")
    try:
        yield root
    finally:
        config.write_text(policy)
        remove_tree(root / "etc/private")
        remove_tree(root / "root/big")
        remove_tree(root / "var/lib/private-app")


@pytest.fixture(scope="module")
def worker_home(installed):  # noqa: F811
    """A PREFECT_HOME and a staging directory of the worker's own."""
    home = scratch_dir("ucb-worker-home-")
    uid = pwd.getpwnam(WORKER).pw_uid
    for path in (home, home / "staging", home / "prefect"):
        path.mkdir(exist_ok=True)
        os.chown(path, uid, -1)
    yield home
    remove_tree(home)


def worker_backup(home: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m flows.backup --privileged`` as the worker, as an operator runs it there."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("OS_", "PREFECT_API_URL"))}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(home / "prefect"))
    return as_user(WORKER, [PYTHON, "-m", "flows.backup", "--privileged", "--staging-dir",
                            str(home / "staging"), "--task-retries", "0", "--no-prune", *args],
                   env=env, timeout=timeout)


def as_root_estimate(root: Path, paths: list[str]) -> int:
    """What root sees (this process): the planned paths' tar bytes, the deny list left out."""
    module = load_archive_wrapper()
    return estimate.measure(str(root), paths, module.DEFAULT_DENY).total(paths)


def load_archive_wrapper():
    from test_sudo import load_wrapper

    return load_wrapper("ucb-archive")


# ------------------------------------------------------------------ the plan, as the worker
def test_a_worker_dry_run_plans_from_what_root_reads(tree, worker_home, os_env):
    """The space check, segment sizes and progress estimate count root-only files, and an
    added path inside a root-only directory (allowed by the policy) is found."""
    container = f"ucbtest-{uuid.uuid4().hex[:8]}"
    quick = worker_backup(worker_home, "--root", str(tree), "--dry-run", "--json",
                          "--container", container)
    assert quick.returncode == 0, quick.stderr
    summary = json.loads(quick.stdout)
    files_bytes = summary["space"]["files_bytes"]
    assert files_bytes == as_root_estimate(tree, summary["paths"])
    assert files_bytes > sum(ROOT_ONLY.values())  # the root-only bytes are in it

    assert as_user(WORKER, ["test", "-e", str(tree / ADDED.lstrip("/"))]).returncode != 0
    added = worker_backup(worker_home, "--root", str(tree), "--add-path", ADDED, "--dry-run",
                          "--json", "--container", container)
    assert added.returncode == 0, added.stderr
    summary = json.loads(added.stdout)
    assert ADDED in summary["paths"]
    assert summary["space"]["files_bytes"] == as_root_estimate(tree, summary["paths"])
    assert summary["space"]["files_bytes"] > files_bytes + (1 << 20)


def test_a_path_the_policy_refuses_fails_before_anything_is_written(tree, worker_home,
                                                                    os_env):
    container = f"ucbtest-{uuid.uuid4().hex[:10]}"
    outside = tree / "opt/elsewhere"
    outside.mkdir(parents=True)
    (tree / "home/stack/.cache").mkdir()  # both seen by the worker: the plan used to pass
    try:
        result = worker_backup(worker_home, "--root", str(tree), "--container", container,
                               "--add-path", "/opt/elsewhere", "--add-path",
                               "/home/stack/.cache")
        assert result.returncode == 7, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert "privileged policy /etc/undercloud-backup/privileged.conf refuses" in last
        assert "/opt/elsewhere is not below an allowed path" in last
        assert "/home/stack/.cache is denied" in last
        assert "nothing was written" in last and "Traceback" not in result.stderr
        store = swift_store()
        existing = {c["name"] for c in store.containers()}
        for name in (container, f"{container}_segments"):
            assert name not in existing or store.list(name) == [], \
                f"{name} holds objects of a refused run"
    finally:
        remove_tree(outside)
        remove_tree(tree / "home/stack/.cache")
        remove_container(container)


# ------------------------------------------------------------------ the estimate, attacked
def estimate_as_worker(root: Path, *paths: str, excludes: tuple[str, ...] = ()
                       ) -> subprocess.CompletedProcess:
    argv = list(privileged.estimate_command(str(root), paths, excludes).argv)
    assert argv[:3] == ["sudo", "-n", ARCHIVE]
    return sudo(*argv[2:], timeout=60)


def test_the_estimate_answers_what_root_sees_and_no_names(tree):
    paths = ["/etc", "/root", "/home/stack", "/srv/node", "/var/lib/glance/images", ADDED,
             "/etc/keystone", "/var/lib/glance/images/absent/deeper"]
    result = estimate_as_worker(tree, *paths, excludes=("/home/stack/templates",))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert [p["path"] for p in answer["paths"]] == paths
    sizes = estimate.PathSizes.from_answer(answer)
    assert not sizes.exists("/var/lib/glance/images/absent/deeper") and sizes.exists(ADDED)
    assert sizes.exists("/etc/keystone") and "/etc/keystone" not in sizes.sizes
    assert answer["paths"][6] == {"path": "/etc/keystone", "exists": True, "bytes": 0,
                                  "in": "/etc"}  # counted in /etc, once
    local = estimate.measure(str(tree), paths, ("/home/stack/templates",
                                                *load_archive_wrapper().DEFAULT_DENY))
    assert sizes.sizes == local.sizes
    assert "blob" not in result.stdout and "state.db" not in result.stdout


def test_the_estimate_is_refused_what_an_archive_would_be(tree):
    worker = pwd.getpwnam(WORKER).pw_uid
    own = tree / "home/stack/worker-owned"
    own.mkdir()
    os.chown(own, worker, -1)
    secret_dir = scratch_dir("ucb-not-allowed-", 0o700)
    (secret_dir / "big").write_bytes(os.urandom(3 << 20))
    try:
        # Outside the policy, or denied: refused without saying whether it exists.
        for path, says in ((str(secret_dir), "is not below an allowed path"),
                           ("/var/lib/nope-" + uuid.uuid4().hex, "is not below an allowed path"),
                           ("/etc/shadow-", "is denied")):
            result = estimate_as_worker(tree, path)
            assert (result.returncode, result.stdout) == (77, ""), result.stderr
            assert says in result.stderr
        refused = sudo(ARCHIVE, "/var/tmp", "--estimate", "--", "/etc")
        assert refused.returncode == 77 and "root /var/tmp is not allowed" in refused.stderr
        # Below a directory the worker controls: refused whether the name exists or not (no
        # oracle), and a symlink it planted there is never followed.
        assert as_user(WORKER, ["ln", "-s", str(secret_dir), str(own / "link")]).returncode == 0
        for path in ("/home/stack/worker-owned/link/big", "/home/stack/worker-owned/none"):
            result = estimate_as_worker(tree, path)
            assert (result.returncode, result.stdout) == (77, ""), result.stderr
            assert "can be changed by the calling user" in result.stderr or \
                "is a symbolic link" in result.stderr
        # Walked from above, the worker's directory counts its links as links: the 3 MiB the
        # link points at are not counted, and a FIFO of the worker's is never opened.
        assert as_user(WORKER, ["mkfifo", str(own / "fifo")]).returncode == 0
        (tree / "home/stack/worker-owned/sub").mkdir()
        os.chown(own / "sub", worker, -1)
        as_user(WORKER, ["ln", "-s", str(secret_dir), str(own / "sub/dir-link")])
        result = estimate_as_worker(tree, "/home/stack")
        assert result.returncode == 0, result.stderr
        counted = json.loads(result.stdout)["paths"][0]["bytes"]
        deny = load_archive_wrapper().DEFAULT_DENY
        assert counted == estimate.measure(str(tree), ["/home/stack"], deny).total(
            ["/home/stack"])
        assert counted < 1 << 20
        # Options the archive refuses are refused here too, and nothing runs but the walk.
        for extra in (["--to-command=touch /x"], ["--snapshot=" + uuid.uuid4().hex]):
            result = sudo(ARCHIVE, str(tree), "--estimate", *extra, "--", "/etc")
            assert result.returncode == 64 and "unexpected argument" in result.stderr
    finally:
        remove_tree(own)
        remove_tree(secret_dir)


@pytest.mark.unit
def test_the_form_and_the_readme_say_an_added_path_needs_a_policy_line():
    line = f"path = line in {privileged.CONFIG_FILE}"
    assert line in WhatToBackUp.model_fields["add_paths"].description
    steps = (REPO / "README.md").read_text().split("### From install to a first backup")[1]
    assert f"`add_paths` needs a `path =` line in `{privileged.CONFIG_FILE}`" in " ".join(
        steps.split())
