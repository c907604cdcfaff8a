"""The flow as Prefect users meet it: blocks, the UI form, run names, artifacts, dry runs and
retries that reuse what already completed."""

from __future__ import annotations

import importlib
import json
import re
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PREFECT_API_URL, REPO, backup_cli, backup_in_process
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.utilities.callables import parameter_schema

from blocks import MariaDBConnection, SwiftTarget
from flows import params
from flows.backup import _parser, undercloud_backup
from flows.params import grouped
from undercloud_backup import config
from undercloud_backup.backup import binlog, stages
from undercloud_backup.backup import run as backup
from undercloud_backup.core.errors import SwiftRequestFailed
from undercloud_backup.core.manifest import DB_OBJECT, FS_OBJECT, SNAPSHOT_OBJECT, USERS_OBJECT
from undercloud_backup.store import catalogue
from undercloud_backup.store.connection import SwiftStore


def store() -> SwiftStore:
    return SwiftStore.connect(config.swift_settings_from_env())


@pytest.fixture
def small_root(tmp_path) -> Path:
    root = tmp_path / "uc"
    (root / "etc/keystone").mkdir(parents=True)
    (root / "etc/keystone/keystone.conf").write_text("[DEFAULT]\n")
    (root / "home/stack").mkdir(parents=True)
    (root / "home/stack/stackrc").write_text("export OS_CLOUD=undercloud\n")
    return root


@pytest.mark.unit
def test_the_ui_form_has_sections_every_field_described_and_nothing_required():
    schema = parameter_schema(undercloud_backup).model_dump_for_openapi()
    properties = schema["properties"]
    assert list(properties) == ["dry_run", "what", "database", "swift", "retention", "advanced"]
    assert properties["dry_run"]["position"] == 0  # first, not last and lost
    assert schema.get("required", []) == []
    definitions = schema["definitions"]
    titles = {d["title"] for d in definitions.values()}
    assert titles == {"What to back up", "Database", "Swift", "Retention", "Advanced"}
    fields = {}
    for definition in definitions.values():
        assert definition.get("required", []) == [], definition["title"]
        fields.update(definition["properties"])
    for name, prop in properties.items():  # a section's description is its model's docstring
        if "$ref" in prop:
            properties[name] = definitions[prop["$ref"].rsplit("/", 1)[1]]
    for name, prop in {**properties, **fields}.items():
        assert prop.get("description"), f"parameter {name} has no description"
        # the classic UI takes <container> for an HTML tag and shows nothing
        assert "<" not in prop["description"] and ">" not in prop["description"], name
    assert {"add_paths", "exclude_paths", "db_only", "root", "container", "segment_size",
            "db_block", "swift_block", "staging_dir", "keep_last"} <= set(fields)


def _descriptions(node: object) -> Iterator[tuple[str, str]]:
    """Every (name, description) in a parameter schema, sections' fields included."""
    if isinstance(node, dict):
        for name, prop in (node.get("properties") or {}).items():
            if isinstance(prop, dict) and "$ref" not in prop:  # a section: its fields count
                yield name, prop.get("description") or ""
        for value in node.values():
            yield from _descriptions(value)
    elif isinstance(node, list):
        for value in node:
            yield from _descriptions(value)


@pytest.mark.unit
def test_no_deployed_flow_form_has_angle_brackets_or_a_field_without_description():
    """Every form the UI shows (each entrypoint of prefect.yaml): the classic UI takes
    ``<container>`` for an HTML tag and drops it."""
    entrypoints = sorted(set(re.findall(r"entrypoint: (\S+)", (REPO / "prefect.yaml").read_text())))
    assert len(entrypoints) >= 3, entrypoints
    for entrypoint in entrypoints:
        path, _, name = entrypoint.partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        schema = parameter_schema(getattr(module, name)).model_dump_for_openapi()
        described = list(_descriptions(schema))
        assert described, entrypoint
        for field, text in described:
            assert text, f"{entrypoint}: parameter {field} has no description"
            assert "<" not in text and ">" not in text, f"{entrypoint}: {field}: {text}"


@pytest.mark.unit
def test_every_flow_parameter_is_a_cli_flag_with_its_default():
    """One definition: each field of each group is a flag of python -m flows.backup."""
    args = _parser().parse_args([])
    for group in params.GROUPS.values():
        for name, field in group.model_fields.items():
            assert getattr(args, name) == field.default, name
    args = _parser().parse_args(["--add-path", "/a", "--add-path", "/b", "--no-prune",
                                 "--no-table-checksums", "--keep-last", "5", "--db-port", "3307",
                                 "--segment-size", "2MiB", "--swift-timeout", "7"])
    groups = {k: params.from_args(args, g) for k, g in params.GROUPS.items()}
    assert groups["what"].add_paths == ["/a", "/b"]
    assert groups["retention"].prune is False and groups["retention"].keep_last == 5
    assert groups["advanced"].table_checksums is False
    assert groups["database"].db_port == 3307 and groups["swift"].swift_timeout == 7


@pytest.mark.unit
def test_restore_takes_the_backups_database_group_and_its_flags():
    """The db_* group is defined once: the restore's form section and flags are the backup's."""
    from flows.restore import _parser as restore_parser
    from flows.restore import undercloud_restore

    backup_schema = parameter_schema(undercloud_backup).model_dump_for_openapi()
    restore_schema = parameter_schema(undercloud_restore).model_dump_for_openapi()
    assert not any(name.startswith("db_") for name in restore_schema["properties"])
    assert (restore_schema["definitions"]["DatabaseParams"]
            == backup_schema["definitions"]["DatabaseParams"])
    args = restore_parser().parse_args(["--db-socket", "/run/m.sock", "--db-user", "root"])
    database = params.from_args(args, params.DatabaseParams)
    assert (database.db_socket, database.db_user) == ("/run/m.sock", "root")


@pytest.mark.unit
@pytest.mark.parametrize("value", ["0", "0MiB", "-1"])
def test_a_zero_segment_size_is_refused(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["--segment-size", value])
    assert exit_.value.code == 2
    assert "segment-size" in capsys.readouterr().err
    with pytest.raises(ValueError):
        params.SwiftParams(segment_size=value)


def test_errors_name_flags_on_the_cli_and_parameters_in_the_ui(os_env, db_cnf, small_root,
                                                               container):
    # A real process: the CLI's contract (exit status, last line, no traceback) is the point.
    result = backup_cli("--root", str(small_root), "--container", container,
                        "--db-defaults-file", db_cnf, "--add-path", "/not/there")
    assert result.returncode == 3
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("undercloud-backup: error: ") and "--add-path /not/there" in last
    assert "Traceback" not in result.stderr
    state = undercloud_backup(**grouped(root=str(small_root), container=container,
                                        db_defaults_file=db_cnf, add_paths=["/not/there"]),
                              return_state=True)
    assert state.is_failed()
    assert "add_paths /not/there" in state.message and "--add-path" not in state.message


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
    result = backup_in_process("--root", str(small_root), "--db-block", f"db-{suffix}",
                               "--swift-block", f"swift-{suffix}", "--json", env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["container"] == container
    assert store().head(container, summary["manifest"])


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
    SwiftStore.connect(settings)  # and it authenticates against the real Keystone


def test_dry_run_writes_nothing(os_env, db_cnf, small_root, container, tmp_path):
    result = backup_in_process("--root", str(small_root), "--container", container,
                               "--db-defaults-file", db_cnf, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dry_run"] is True and summary["manifest"] is None
    for name in (container, f"{container}_segments"):
        with pytest.raises(Exception, match="404|[Nn]ot [Ff]ound"):
            store().list(name)


def test_run_name_artifact_and_summary(os_env, db_cnf, small_root, container):
    summary = undercloud_backup(**grouped(root=str(small_root), container=container,
                                          db_defaults_file=db_cnf,
                                          exclude_paths=["/etc/keystone"]))
    assert summary.manifest.startswith(summary.backup_id)
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
        ours = [a for a in artifact if a.key == "undercloud-backup"]
        assert ours and summary.backup_id in ours[0].data
        assert "zstd -dc" in ours[0].data
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[ours[0].flow_run_id])))
    host = socket.gethostname()
    assert runs[0].name.startswith(f"backup-{host}-2")
    manifest = catalogue.get_manifest(store(), container, summary.backup_id)
    assert manifest.paths.excluded == ["/etc/keystone"]
    assert manifest.paths.included == ["/etc", "/home/stack"]
    assert manifest.paths.absent == ["/root", "/srv/node", "/var/lib/glance/images"]


def test_retrying_a_failed_flow_run_reuses_completed_stages(os_env, db_cnf, small_root,
                                                            container, monkeypatch):
    """The manifest step fails once; the flow run's retry must not dump or archive again."""
    calls = {"dump": 0, "archive": 0, "manifest": 0}
    real = {"dump": binlog.back_up_databases, "archive": stages.archive_paths,
            "manifest": backup.write_manifest}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            if name == "manifest" and calls[name] == 1:  # a fault Swift won't make on demand
                raise SwiftRequestFailed(operation="PUT manifest", target="x",
                                         reason="HTTP 503", transaction_id="tx-test")
            return real[name](*args, **kwargs)
        return wrapper

    for module, name, attr in ((binlog, "dump", "back_up_databases"),
                               (stages, "archive", "archive_paths"),
                               (backup, "manifest", "write_manifest")):
        monkeypatch.setattr(module, attr, counting(name))
    flow_with_retry = undercloud_backup.with_options(retries=1, retry_delay_seconds=0)
    summary = flow_with_retry(**grouped(root=str(small_root), container=container,
                                        db_defaults_file=db_cnf, task_retries=0))
    assert calls == {"dump": 1, "archive": 1, "manifest": 2}
    assert catalogue.list_backups(store(), container)[-1].backup_id == summary.backup_id
    manifest = catalogue.get_manifest(store(), container, summary.backup_id)
    # the reused (persisted, JSON) stage results came back typed and whole
    assert [o.leaf for o in manifest.objects] == [DB_OBJECT, USERS_OBJECT, SNAPSHOT_OBJECT,
                                                  FS_OBJECT]
    assert manifest.kind == "full" and manifest.snapshot["object"].endswith(SNAPSHOT_OBJECT)
    assert manifest.mariadb is not None and manifest.mariadb.databases
    with get_client(sync_client=True) as client:
        run_id = manifest.flow_run_id
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[run_id])))
    states = sorted((t.name.rsplit("-", 1)[0], t.state.name) for t in tasks)
    assert ("dump_databases", "Cached") in states and ("archive_paths", "Cached") in states


def test_prune_after_a_successful_backup_keeps_the_policy(os_env, db_cnf, small_root,
                                                          container):
    first = undercloud_backup(**grouped(root=str(small_root), container=container,
                                        db_defaults_file=db_cnf, db_only=True, prune=False))
    second = undercloud_backup(**grouped(root=str(small_root), container=container,
                                         db_defaults_file=db_cnf, db_only=True, keep_last=1,
                                         keep_daily=0, keep_weekly=0))
    assert second.pruned == [first.backup_id]
    assert [b.backup_id for b in catalogue.list_backups(store(), container)] == [
        second.backup_id]
    objects = store().list(container)
    assert not [o["name"] for o in objects if o["name"].startswith(first.backup_id)]


@pytest.mark.unit
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
    result = backup_in_process("--root", str(small_root), "--container", container,
                               "--db-defaults-file", db_cnf, "--db-only", "--no-prune",
                               "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    manifest = catalogue.get_manifest(store(), container, summary["backup_id"])
    query = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                        "resource": {"id": [f"prefect.flow-run.{manifest.flow_run_id}"]}},
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


@pytest.mark.unit
def test_the_summary_is_typed_and_becomes_the_same_dict_as_before():
    """The flow's result (and so ``--json``) keeps its keys: a run's, a dry run's."""
    from flows.backup import BackupSummary
    from undercloud_backup.core.manifest import StoredObject

    obj = StoredObject(name="b/x", size=1, sha256="0" * 64, compression="zstd", content="tar")
    summary = BackupSummary(backup_id="b", container="c", dry_run=False, paths=["/etc"],
                            absent=[], warnings=[], manifest="b/manifest.json", objects=[obj],
                            chain=[], level=0)
    assert set(summary.to_dict()) == {
        "backup_id", "container", "manifest", "objects", "dry_run", "paths", "absent", "kind",
        "parent", "warnings", "chain", "level", "full_reason", "partial_database",
        "signing_key", "database_kind"}
    assert summary.to_dict()["objects"] == [obj.to_dict()]
    summary.pruned = ["a"]
    assert summary.to_dict()["pruned"] == ["a"]
    summary.pruned, summary.prune_failed = None, True
    assert summary.to_dict()["pruned"] is None  # attempted and failed: said as null
    dry = BackupSummary(backup_id="b", container="c", dry_run=True, paths=[], absent=[],
                        warnings=["w"])
    assert set(dry.to_dict()) == {"backup_id", "container", "manifest", "objects", "dry_run",
                                  "paths", "absent", "kind", "parent", "warnings", "space"}


@pytest.mark.unit
def test_the_artifact_renders_from_the_typed_manifest(monkeypatch):
    import flows.backup as flow
    from undercloud_backup.core.manifest import (
        DatabaseSection,
        Manifest,
        PathsSection,
        StoredObject,
    )

    shown: dict[str, str] = {}
    monkeypatch.setattr(flow, "create_markdown_artifact",
                        lambda **kwargs: shown.update(kwargs))
    manifest = Manifest(
        backup_id="h-2", created_at="t", kind="incremental", parent="h-1", chain=["h-0", "h-1"],
        level=2, encryption={"format": "age", "recipients": ["sha256:ab"]},
        mariadb=DatabaseSection(version="10.11", object="o", system_tables=[],
                                databases={"keystone": [], "nova": []}),
        paths=PathsSection(root="/", included=["/etc"], absent=["/srv/node"],
                           changed=["/etc/a"], vanished=["/etc/b"]),
        objects=[StoredObject(name="h-2/filesystem.tar.zst", size=2048, sha256="ab" * 32,
                              compression="zstd", content="tar")])
    summary = flow.BackupSummary(backup_id="h-2", container="c", dry_run=False,
                                 paths=["/etc"], absent=[], warnings=["mind this"],
                                 manifest="h-2/manifest.json", pruned=None, prune_failed=True)
    flow._summary_artifact(summary, manifest, 3.0)
    text = shown["markdown"]
    assert "| `h-2/filesystem.tar.zst` | 2.0 KiB | plain | `abababababababab…` |" in text
    assert "- Databases (10.11): keystone, nova\n" in text
    assert "- Absent: /srv/node; excluded: none" in text
    assert "- Changed or vanished while read: 2" in text
    assert "- Pruned: FAILED" in text and "**WARNING: mind this**" in text
    assert "incremental level 2 on `h-1`; restores with its chain `h-0` > `h-1` first" in text
    assert "age, to `sha256:ab`" in text
    assert "3. `swift download c h-2/filesystem.tar.zst" in text
