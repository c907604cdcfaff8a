"""Retention against real Swift: backups at faked times, the kept set matches the policy
exactly, and a prune killed half way leaves only complete or clearly incomplete backups."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO, cli_in_process

from undercloud_backup import config
from undercloud_backup.core.errors import ConfigError
from undercloud_backup.store import catalogue, retention
from undercloud_backup.store.connection import SwiftStore

UTC = dt.UTC


def cli(*args: str) -> subprocess.CompletedProcess:
    """A prune with the CLI's flags, called in this process: what a prune does, without a
    Python that imports Prefect started for each."""
    return cli_in_process("prune", *args)


def cli_process(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m flows.prune`` as an operator runs it: for the CLI's own contract (its exit
    status and ``--json`` alone on stdout)."""
    return subprocess.run([sys.executable, "-m", "flows.prune", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def backup_id(when: dt.datetime, n: int = 0) -> str:
    return f"uc-{when:%Y%m%dT%H%M%SZ}-{n:06x}"


def put_backup(store: SwiftStore, container: str, when: dt.datetime, *, segments: int = 2,
               complete: bool = True, n: int = 0) -> str:
    """A backup shaped like the flow's: a segmented archive (SLO) and a manifest, with
    ``created_at`` set to ``when``."""
    ident = backup_id(when, n)
    segment_container = f"{container}_segments"
    name = f"{ident}/filesystem.tar.zst"
    entries, records = [], []
    for index in range(segments):
        body = os.urandom(64)
        segment = f"{name}/{index:08d}"
        etag = store.put(segment_container, segment, body)
        entries.append({"path": f"/{segment_container}/{segment}", "etag": etag,
                        "size_bytes": len(body)})
        records.append({"name": segment, "size": len(body), "etag": etag})
    store.put(container, name, json.dumps(entries).encode(),
              query={"multipart-manifest": "put"})
    if complete:
        manifest = {"format": "undercloud-backup/1", "backup_id": ident,
                    "created_at": when.isoformat(), "objects": [
                        {"name": name, "size": 64 * segments, "sha256": "", "etag": "",
                         "compression": "zstd", "content": "tar",
                         "segment_container": segment_container, "segments": records}]}
        store.put(container, catalogue.manifest_name(ident), json.dumps(manifest).encode())
    return ident


def names(store: SwiftStore, container: str) -> set[str]:
    return {o["name"] for o in catalogue.listing(store, container)}


@pytest.fixture(name="conn")  # named apart so another module can import it
def conn_fixture(os_env, container) -> SwiftStore:
    store = SwiftStore.connect(config.swift_settings_from_env())
    store.ensure_container(container)
    store.ensure_container(f"{container}_segments")
    return store


# Backups at faked times (UTC), newest last: a few a day in the last days, then sparser.
TIMES = [
    "2026-09-28T02:00", "2026-10-05T02:00", "2026-10-07T02:00",   # W40, W41, W41
    "2026-10-12T02:00", "2026-10-14T02:00",                       # W42, W42
    "2026-10-19T02:00", "2026-10-21T02:00", "2026-10-22T02:00",   # W43 x3
    "2026-10-23T02:00", "2026-10-23T14:00",                       # Fri x2
    "2026-10-24T02:00", "2026-10-25T02:00", "2026-10-25T13:00",   # Sat, Sun x2 (W43)
    "2026-10-26T02:00", "2026-10-26T09:00", "2026-10-26T20:00",   # Mon (W44) x3
]


def stored(times: list[str]) -> list[retention.StoredBackup]:
    return [retention.StoredBackup(backup_id(at(t)), complete=True, created_at=at(t))
            for t in times]


@pytest.mark.unit
def test_policy_selection_by_hand():
    kept = retention.select(stored(TIMES), retention.RetentionPolicy(
        keep_last=2, keep_daily=3, keep_weekly=3))
    assert kept == {
        backup_id(at("2026-10-26T20:00")): ["last", "daily 2026-10-26", "weekly 2026-W44",
                                            "newest"],
        backup_id(at("2026-10-26T09:00")): ["last"],
        backup_id(at("2026-10-25T13:00")): ["daily 2026-10-25", "weekly 2026-W43"],
        backup_id(at("2026-10-24T02:00")): ["daily 2026-10-24"],
        backup_id(at("2026-10-14T02:00")): ["weekly 2026-W42"],
    }


@pytest.mark.unit
def test_the_newest_backup_is_always_kept_and_an_empty_policy_is_refused():
    kept = retention.select(stored(TIMES[:3]), retention.RetentionPolicy(
        keep_last=0, keep_daily=0, keep_weekly=1))
    assert kept == {backup_id(at("2026-10-07T02:00")): ["weekly 2026-W41", "newest"]}
    with pytest.raises(ConfigError, match="keeps nothing"):
        retention.RetentionPolicy(keep_last=0, keep_daily=0, keep_weekly=0)


@pytest.mark.unit
def test_each_host_keeps_its_own_backups():
    """Two underclouds sharing a container: neither prunes the other's backups away."""
    backups = stored(TIMES)
    for backup in backups[:3]:
        backup.hostname = "undercloud-b"
    kept = retention.select(backups, retention.RetentionPolicy(
        keep_last=1, keep_daily=0, keep_weekly=0))
    assert kept == {backup_id(at("2026-10-26T20:00")): ["last", "newest"],
                    backup_id(at("2026-10-07T02:00")): ["last", "newest"]}


@pytest.mark.unit
def test_two_backups_of_the_same_second_keep_the_one_written_last():
    """created_at has whole seconds: the one whose manifest Swift wrote last is the newest,
    whatever the ids' random tails say (else a run could prune itself away)."""
    when = at("2026-10-26T20:00")
    older = retention.StoredBackup("vm-20261026T200000Z-ffffff", complete=True,
                                   created_at=when, last_modified=when)
    newer = retention.StoredBackup("vm-20261026T200000Z-000000", complete=True,
                                   created_at=when, last_modified=when.replace(microsecond=900))
    policy = retention.RetentionPolicy(keep_last=1, keep_daily=0, keep_weekly=0)
    for backups in ([older, newer], [newer, older]):
        assert retention.select(backups, policy) == {newer.backup_id: ["last", "newest"]}


@pytest.mark.slow
def test_prune_keeps_exactly_the_policy_set_and_removes_stale_incomplete_ones(conn, container):
    ids = {t: put_backup(conn, container, at(t)) for t in TIMES}
    # A failed run: archive without a manifest; and something that is not a backup at all.
    incomplete = put_backup(conn, container, at("2026-10-26T21:00"), complete=False, n=1)
    conn.put(container, "README.txt", b"operator notes")
    expected = {ids[t] for t in ("2026-10-26T20:00", "2026-10-26T09:00", "2026-10-25T13:00",
                                 "2026-10-24T02:00", "2026-10-14T02:00")}
    policy = ("--container", container, "--keep-last", "2", "--keep-daily", "3",
              "--keep-weekly", "3")
    everything = (names(conn, container), names(conn, f"{container}_segments"))

    dry = cli_process(*policy, "--dry-run", "--json")  # the CLI's contract: a real process
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert {b["backup_id"] for b in plan["kept"]} == expected
    assert {b["backup_id"] for b in plan["deleted"]} == set(ids.values()) - expected
    assert [b["backup_id"] for b in plan["incomplete_kept"]] == [incomplete]  # just written
    assert (names(conn, container), names(conn, f"{container}_segments")) == everything

    result = cli(*policy, "--json")
    assert result.returncode == 0, result.stderr
    assert {e.backup_id for e in catalogue.list_backups(conn, container)} == expected
    remaining = {n.split("/")[0] for n in names(conn, container) | names(
        conn, f"{container}_segments")}
    assert remaining == expected | {incomplete, "README.txt"}

    # Two days later nothing was written to the incomplete one: it goes; README stays.
    later = (dt.datetime.now(UTC) + dt.timedelta(days=2)).isoformat()
    assert cli(*policy, "--now", later).returncode == 0
    remaining = {n.split("/")[0] for n in names(conn, container) | names(
        conn, f"{container}_segments")}
    assert remaining == expected | {"README.txt"}


def intact(conn: SwiftStore, container: str, ident: str) -> bool:
    """Complete and whole: the manifest and everything it lists are there."""
    try:
        manifest = catalogue.get_manifest(conn, container, ident)
    except Exception:  # noqa: BLE001 - no manifest
        return False
    for record in manifest.objects:
        conn.head(container, record.name)
        for segment in record.segments:
            conn.head(record.segment_container, segment.name)
    return True


@pytest.mark.slow
def test_a_prune_killed_half_way_leaves_only_complete_or_clearly_incomplete_backups(
        conn, container):
    start = at("2026-10-01T02:00")
    ids = [put_backup(conn, container, start + dt.timedelta(days=i), segments=6)
           for i in range(12)]
    keep = set(ids[-2:])
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.prune", "--container", container, "--keep-last", "2",
         "--keep-daily", "0", "--keep-weekly", "0"], cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    announced = 0
    for line in process.stderr:
        if "deleting backup" in line:
            announced += 1
            if announced == 3:  # two backups on their way out, the third just started
                os.killpg(process.pid, signal.SIGKILL)
                break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the prune finished before it was killed"

    listed = {e.backup_id for e in catalogue.list_backups(conn, container)}
    present = {n.split("/")[0] for n in names(conn, container) | names(
        conn, f"{container}_segments")}
    for ident in present:
        # Listed as complete only if whole; anything else has no manifest at all.
        assert (ident in listed) == intact(conn, container, ident)
    assert keep <= listed
    assert len(listed) > len(keep)  # really interrupted: some doomed backups still complete
    assert len(set(ids) - listed) >= 2  # and some already incomplete (manifest gone first)

    later = (dt.datetime.now(UTC) + dt.timedelta(days=2)).isoformat()
    finish = cli("--container", container, "--keep-last", "2", "--keep-daily", "0",
                 "--keep-weekly", "0", "--now", later)
    assert finish.returncode == 0, finish.stderr
    assert names(conn, f"{container}_segments") == {
        s.name for ident in keep for o in catalogue.get_manifest(conn, container, ident).objects
        for s in o.segments}
    assert {n.split("/")[0] for n in names(conn, container)} == keep


def test_manifest_goes_first(conn, container):
    """The order of deletion, observed: after the manifest's DELETE the backup is no longer
    listed, while its objects are still there."""
    ident = put_backup(conn, container, at("2026-10-01T02:00"))
    backups, _ = retention.inventory(conn, container)
    backup = next(b for b in backups if b.backup_id == ident)
    calls: list[tuple[str, str]] = []
    real_delete = conn.delete

    def observing_delete(c: str, name: str, **kwargs):
        listed = {e.backup_id for e in catalogue.list_backups(conn, container)}
        calls.append((name, "listed" if ident in listed else "unlisted"))
        return real_delete(c, name, **kwargs)

    conn.delete = observing_delete
    retention.delete_backup(conn, container, backup)
    assert calls[0] == (catalogue.manifest_name(ident), "listed")
    assert all(state == "unlisted" for _, state in calls[1:])
    # manifest, SLO manifest, two segments, and last the marker put before the manifest went
    assert len(calls) == 1 + 1 + 2 + 1 and calls[-1][0] == f"{ident}/{retention.DELETING}"
