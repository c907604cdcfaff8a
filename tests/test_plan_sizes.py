"""Sizes by what is stored: the plan counts what tar will write (the allocated blocks of a
sparse file, each hard link once, exclusions left out), so a 1 TiB sparse image holding 3 MiB
asks for megabytes of staging and ordinary segments, not gigabytes; and the wrapper's count
(the installed worker's, tests/test_privileged_plan.py) is the library's."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import REPO, backup_in_process, mounted_tmpfs, remove_container, swift_store

from undercloud_backup.files import archive, estimate
from undercloud_backup.store import catalogue

IMAGE = "var/lib/glance/images/sparse.img"
APPARENT = 1 << 40  # 1 TiB
STORED = 3 << 20  # what it holds


def make_tree(top: Path) -> Path:
    """Small files, hard and symbolic links, an excluded cache, and a 1 TiB sparse image."""
    (top / "etc/keystone").mkdir(parents=True)
    for i in range(50):
        (top / f"etc/keystone/file{i}.conf").write_text("x" * (i * 37))
    os.link(top / "etc/keystone/file7.conf", top / "etc/keystone/hard.conf")
    (top / "etc/link").symlink_to("/etc/passwd")
    (top / "root/.cache").mkdir(parents=True)
    (top / "root/.cache/big").write_bytes(os.urandom(2 << 20))
    (top / "root/keep").write_bytes(os.urandom(300_000))
    image = top / IMAGE
    image.parent.mkdir(parents=True)
    with open(image, "wb") as out:
        out.truncate(APPARENT)
        out.seek(APPARENT // 2)
        out.write(os.urandom(STORED))
    assert os.stat(image).st_blocks * 512 < 2 * STORED, "this filesystem is not sparse"
    return top


@pytest.mark.unit
def test_the_estimate_is_what_tar_writes(tmp_path):
    tree = make_tree(tmp_path / "uc")
    plan = archive.plan_paths(str(tree), exclude_paths=["/root/.cache"])
    sizes = estimate.measure(str(tree), plan.included, plan.excluded)
    counted = sizes.total(plan.included)
    tar = subprocess.run(list(archive.tar_command(plan).argv), capture_output=True, check=True)
    # tar adds its end blocks, record padding and a sparse map: a few KiB, never the 1 TiB
    assert abs(len(tar.stdout) - counted) < 32 * 1024, (len(tar.stdout), counted)
    assert STORED < counted < 2 * STORED


@pytest.mark.unit
def test_the_wrappers_count_is_the_librarys(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "uc")
    monkeypatch.delenv("SUDO_UID", raising=False)  # the wrapper's caller: root itself
    loader = importlib.machinery.SourceFileLoader(
        "ucb_archive", str(REPO / "deployments/libexec/ucb-archive"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    wrapper = importlib.util.module_from_spec(spec)
    loader.exec_module(wrapper)
    paths = [*archive.DEFAULT_PATHS, "/etc/keystone", "/opt/absent"]
    answer = wrapper.estimate(str(tree), ["root/.cache"], paths, wrapper.Caller())
    local = estimate.measure(str(tree), paths, ["/root/.cache"])
    assert estimate.PathSizes.from_answer(json.loads(json.dumps(answer))) == local
    assert local.exists("/etc/keystone") and not local.exists("/srv/node")
    assert "/etc/keystone" not in local.sizes  # counted in /etc, once


@pytest.fixture
def small_staging(tmp_path):
    """A 256 MiB file system for the staging area (the 1 TiB image was planned with 2.3 GiB)."""
    with mounted_tmpfs(tmp_path / "staging", "size=256m,mode=0700") as path:
        yield path


def test_a_sparse_terabyte_backs_up_through_a_small_staging_area(tmp_path, os_env, db_cnf,
                                                                  small_staging):
    tree = make_tree(tmp_path / "uc")
    container = f"ucbtest-{uuid.uuid4().hex[:10]}"
    try:
        result = backup_in_process("--root", str(tree), "--container", container,
                                   "--staging-dir", str(small_staging), "--db-defaults-file",
                                   db_cnf, "--no-prune", "--task-retries", "0", "--json")
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        manifest = catalogue.get_manifest(swift_store(), container, summary["backup_id"])
        space = manifest.space
        assert STORED < space["files_bytes"] < 2 * STORED
        assert space["files_segment_size"] == 64 << 20
        assert space["staging_needed"] < 256 << 20
        assert "segment size: database dump 64.0 MiB, filesystem archive 64.0 MiB" in \
            result.stderr
        # Smaller segments may be chosen for it too (the 1 TiB estimate refused under 1.1 GiB).
        dry = backup_in_process("--root", str(tree), "--container", container,
                                "--staging-dir", str(small_staging), "--db-defaults-file",
                                db_cnf, "--segment-size", "1MiB", "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        assert json.loads(dry.stdout)["space"]["files_segment_size"] == 1 << 20
    finally:
        remove_container(container)
