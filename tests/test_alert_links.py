"""An alert names the node by its real name and links to the run in the UI of the installed
server (before: ``Host: localhost`` from ``socket.getfqdn()``, and ``Run in the UI: None``:
the installed server knew no UI URL)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.unit


def _module(relative: str, name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_the_alerts_name_this_node_by_its_name_not_localhost():
    alerts = _module("deployments/prefect/alerts.py", "ucb_alerts")
    host = alerts.parse([]).host
    assert host not in ("localhost", "localhost.localdomain", "")
    assert host.split(".")[0] == socket.gethostname().split(".")[0]
    # where the resolver knows the node's full name, that name
    assert alerts.node_name("uc-0.ctlplane.example", "uc-0") == "uc-0.ctlplane.example"
    assert alerts.node_name("localhost", "uc-0") == "uc-0"


def test_the_installed_server_makes_links_to_a_run_in_its_ui(tmp_path, monkeypatch):
    """server.env as install.sh renders it, alone, is the server's environment (no
    PREFECT_API_URL there): the link the alert's ``flow_run|ui_url`` makes from it."""
    installfs = _module("deployments/installfs.py", "ucb_installfs")
    for key, value in {"STATE": "/var/lib/undercloud-backup", "PORT": "4200",
                       "UI_URL": "http://127.0.0.1:4200", "SERVER_AUTH_LINE": "",
                       "AUTH_LINE": "", "PREFECT_API_URL": ""}.items():
        monkeypatch.setenv(f"UCB_SUBST_{key}", value)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
           "PREFECT_HOME": str(tmp_path / "prefect")}
    for line in installfs.render(str(REPO / "deployments/env/server.env")).decode().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key] = value
    run_id = uuid.uuid4()
    made = subprocess.run(
        [sys.executable, "-c", "import sys; from prefect.utilities.urls import url_for; "
         "print(url_for('flow-run', obj_id=sys.argv[1], url_type='ui'))", str(run_id)],
        env=env, capture_output=True, text=True, timeout=60, check=True)
    assert made.stdout.strip() == f"http://127.0.0.1:4200/runs/flow-run/{run_id}"
