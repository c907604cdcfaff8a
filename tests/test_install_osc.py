"""install.sh's options. `UCB_OSC=1 install.sh venv` installs the project with its `osc`
extra (`openstack undercloud backup`, which test_osc runs with the real client); without it,
the project alone (the client is ~30 packages a TripleO node already has). The venv's pip is a
recorder here: a real install of the extra into a fresh venv is a minute of pip. The
`privileged` step refuses a UCB_ETC its root wrappers would not read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from deploy_helpers import INSTALL, REPO, install_env


@pytest.fixture
def recording_venv():
    """A venv root's alone (install.sh refuses one others can write), whose pip records its
    argv and whose python is this checkout's."""
    top = Path(f"/opt/ucb-test-osc-{uuid.uuid4().hex[:8]}")
    bin_dir = top / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "pip").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {top}/pip.argv\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    for tool in ("pip", "python"):
        os.chmod(bin_dir / tool, 0o755)
    yield top
    shutil.rmtree(top)


@pytest.mark.parametrize("osc, spec", [("1", f"{REPO}[osc]"), ("0", str(REPO))])
def test_the_venv_step_installs_the_osc_extra_only_when_asked(recording_venv, tmp_path, osc,
                                                              spec):
    env = install_env(tmp_path, UCB_VENV=str(recording_venv / "venv"), UCB_OSC=osc)
    done = subprocess.run(["bash", str(INSTALL), "venv"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    argv = (recording_venv / "pip.argv").read_text().splitlines()
    assert argv[0] == "install" and argv[-1] == spec, argv


def test_the_privileged_step_refuses_an_etc_its_wrappers_would_not_read(tmp_path):
    """The root wrappers read their policy from /etc/undercloud-backup only: a privileged.conf
    written to another UCB_ETC would be silently ignored, so the step refuses, writing nothing."""
    etc = tmp_path / "etc"
    sudoers = Path("/etc/sudoers.d/undercloud-backup")
    before = sudoers.read_bytes() if sudoers.exists() else None
    env = install_env(tmp_path, UCB_ETC=str(etc))
    done = subprocess.run(["bash", str(INSTALL), "privileged"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert f"UCB_ETC={etc} would leave it unread" in done.stdout + done.stderr
    assert not etc.exists()
    assert (sudoers.read_bytes() if sudoers.exists() else None) == before
