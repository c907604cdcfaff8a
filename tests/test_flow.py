"""The flow as Prefect users meet it: blocks, the UI form, run names, artifacts, dry runs and
retries that reuse what already completed."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import PREFECT_API_URL, backup_cli
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.utilities.callables import parameter_schema

from blocks import MariaDBConnection, SwiftTarget
from flows.backup import undercloud_backup
from undercloud_backup import backup, config, swift
from undercloud_backup.errors import SwiftRequestFailed


@pytest.fixture
def small_root(tmp_path) -> Path:
    root = tmp_path / "uc"
    (root / "etc/keystone").mkdir(parents=True)
    (root / "etc/keystone/keystone.conf").write_text("[DEFAULT]\n")
    (root / "home/stack").mkdir(parents=True)
    (root / "home/stack/stackrc").write_text("export OS_CLOUD=undercloud\n")
    return root


def test_every_parameter_is_described_for_the_ui_form():
    schema = parameter_schema(undercloud_backup).model_dump_for_openapi()
    properties = schema["properties"]
    assert {"container", "add_paths", "exclude_paths", "db_only", "root", "segment_size",
            "dry_run", "db_block", "swift_block"} <= set(properties)
    for name, prop in properties.items():
        assert prop.get("description"), f"parameter {name} has no description"
    assert schema.get("required", []) == []


def test_blocks_save_load_and_drive_a_backup(os_env, services, small_root, container):
    suffix = uuid.uuid4().hex[:8]
    MariaDBConnection(host="127.0.0.1", port=3306, user="backup",
                      password="backuppass").save(f"db-{suffix}")
    SwiftTarget(auth_url=os_env["OS_AUTH_URL"], username=os_env["OS_USERNAME"],
                password=os_env["OS_PASSWORD"], project_name=os_env["OS_PROJECT_NAME"],
                region_name=os_env["OS_REGION_NAME"], container=container,
                segment_size="2MiB").save(f"swift-{suffix}")
    loaded = SwiftTarget.load(f"swift-{suffix}")
    assert "backuppass" not in repr(loaded) and os_env["OS_PASSWORD"] not in repr(loaded)
    assert loaded.settings().segment_size == 2 * 1024**2

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OS_")}
    result = backup_cli("--root", str(small_root), "--db-block", f"db-{suffix}",
                        "--swift-block", f"swift-{suffix}", "--json", env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["container"] == container
    conn = loaded.get_connection()
    assert conn.head_object(container, summary["manifest"])


def test_settings_from_clouds_yaml_with_env_over_it(tmp_path, monkeypatch, os_env):
    (tmp_path / "clouds.yaml").write_text(
        "clouds:\n  undercloud:\n    auth:\n      auth_url: http://127.0.0.1:5000/v3\n"
        "      username: backup\n      password: from-yaml\n      project_name: backup\n"
        "    region_name: RegionOne\n")
    monkeypatch.chdir(tmp_path)
    for key in list(os_env):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OS_CLOUD", "undercloud")
    monkeypatch.setenv("OS_PASSWORD", os_env["OS_PASSWORD"])
    settings = config.swift_settings_from_env(container="c1")
    assert (settings.username, settings.region_name, settings.container) == (
        "backup", "RegionOne", "c1")
    assert settings.password == os_env["OS_PASSWORD"]
    swift.connect(settings)  # and it authenticates against the real Keystone


def test_dry_run_writes_nothing(os_env, db_cnf, small_root, container, tmp_path):
    result = backup_cli("--root", str(small_root), "--container", container,
                        "--db-defaults-file", db_cnf, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dry_run"] is True and summary["manifest"] is None
    conn = swift.connect(config.swift_settings_from_env())
    containers = [c["name"] for c in conn.get_account(full_listing=True)[1]]
    assert container not in containers and f"{container}_segments" not in containers


def test_run_name_artifact_and_summary(os_env, db_cnf, small_root, container):
    summary = undercloud_backup(root=str(small_root), container=container,
                                db_defaults_file=db_cnf, exclude_paths=["/etc/keystone"])
    assert summary["manifest"].startswith(summary["backup_id"])
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
        ours = [a for a in artifact if a.key == "undercloud-backup"]
        assert ours and summary["backup_id"] in ours[0].data
        assert "zstd -dc" in ours[0].data
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[ours[0].flow_run_id])))
    host = socket.gethostname()
    assert runs[0].name.startswith(f"backup-{host}-2")
    manifest = swift.get_manifest(swift.connect(config.swift_settings_from_env()), container,
                                  summary["backup_id"])
    assert manifest["paths"]["excluded"] == ["/etc/keystone"]
    assert manifest["paths"]["included"] == ["/etc", "/home/stack"]
    assert manifest["paths"]["absent"] == ["/root", "/srv/node", "/var/lib/glance/images"]


def test_retrying_a_failed_flow_run_reuses_completed_stages(os_env, db_cnf, small_root,
                                                            container, monkeypatch):
    """The manifest step fails once; the flow run's retry must not dump or archive again."""
    calls = {"dump": 0, "archive": 0, "manifest": 0}
    real = {"dump": backup.dump_databases, "archive": backup.archive_paths,
            "manifest": backup.write_manifest}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            if name == "manifest" and calls[name] == 1:  # a fault Swift won't make on demand
                raise SwiftRequestFailed(operation="PUT manifest", target="x",
                                         reason="HTTP 503", transaction_id="tx-test")
            return real[name](*args, **kwargs)
        return wrapper

    for name, attr in (("dump", "dump_databases"), ("archive", "archive_paths"),
                       ("manifest", "write_manifest")):
        monkeypatch.setattr(backup, attr, counting(name))
    flow_with_retry = undercloud_backup.with_options(retries=1, retry_delay_seconds=0)
    summary = flow_with_retry(root=str(small_root), container=container,
                              db_defaults_file=db_cnf, task_retries=0)
    assert calls == {"dump": 1, "archive": 1, "manifest": 2}
    conn = swift.connect(config.swift_settings_from_env())
    assert swift.list_backups(conn, container)[-1].backup_id == summary["backup_id"]
    with get_client(sync_client=True) as client:
        run_id = swift.get_manifest(conn, container, summary["backup_id"])["flow_run_id"]
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[run_id])))
    states = sorted((t.name.rsplit("-", 1)[0], t.state.name) for t in tasks)
    assert ("dump_databases", "Cached") in states and ("archive_paths", "Cached") in states


def test_prune_after_a_successful_backup_keeps_the_policy(os_env, db_cnf, small_root,
                                                          container):
    first = undercloud_backup(root=str(small_root), container=container,
                              db_defaults_file=db_cnf, db_only=True, prune=False)
    second = undercloud_backup(root=str(small_root), container=container,
                               db_defaults_file=db_cnf, db_only=True, keep_last=1,
                               keep_daily=0, keep_weekly=0)
    assert second["pruned"] == [first["backup_id"]]
    conn = swift.connect(config.swift_settings_from_env())
    assert [b.backup_id for b in swift.list_backups(conn, container)] == [second["backup_id"]]
    _, objects = conn.get_container(container, full_listing=True)
    assert not [o["name"] for o in objects if o["name"].startswith(first["backup_id"])]


def test_ad_hoc_runs_beat_as_often_as_the_zombie_automation_expects():
    """Prefect's default (every 180 s) would let the automation (3 x 30 s) crash a healthy
    ad hoc run; the ephemeral server, which dies with the run, gets none."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    from flows import cli

    def every() -> int | None:
        return get_current_settings().flows.heartbeat_frequency

    assert cli.run("test", every) == (cli.HEARTBEAT_S, 0)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert cli.run("test", every) == (None, 0)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):
        assert cli.run("test", every) == (60, 0)  # an operator's own setting wins
    zombie = (Path(__file__).parent.parent / "deployments/prefect/zombie_automation.py")
    assert f"HEARTBEAT_S = {cli.HEARTBEAT_S}" in zombie.read_text()


def test_an_ad_hoc_run_sends_heartbeats_to_the_server(os_env, db_cnf, small_root, container):
    result = backup_cli("--root", str(small_root), "--container", container,
                        "--db-defaults-file", db_cnf, "--db-only", "--no-prune", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    manifest = swift.get_manifest(swift.connect(config.swift_settings_from_env()), container,
                                  summary["backup_id"])
    query = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                        "resource": {"id": [f"prefect.flow-run.{manifest['flow_run_id']}"]}},
             "limit": 5}
    deadline, events = time.monotonic() + 20, []
    while not events and time.monotonic() < deadline:  # events are ingested asynchronously
        request = urllib.request.Request(f"{PREFECT_API_URL}/events/filter",
                                         data=json.dumps(query).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            events = json.load(response)["events"]
        time.sleep(0.5)
    assert events, "no heartbeat from the ad hoc run reached the server"
