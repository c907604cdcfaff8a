"""Interrupted work costs no storage: a short auth outage is ridden out, a prune stopped half
way is finished by the next one at once, a failed run's leftovers go with the next prune, and
no prune touches the segments of a backup whose run is still alive, whatever the grace."""

from __future__ import annotations

import datetime as dt
import io
import os
import threading
import time
from dataclasses import replace
from unittest import mock

import pytest
from conftest import backup_in_process
from swift_proxy import SwiftProxy
from test_prune import (
    conn_fixture,  # noqa: F401 - the fixture `conn`, shared
    names,
    put_backup,
)

from flows.prune import prune_backups
from undercloud_backup import config
from undercloud_backup.core.errors import SwiftRequestFailed
from undercloud_backup.store import catalogue, retention
from undercloud_backup.store.connection import SwiftStore

UTC = dt.UTC


# ------------------------------------------------------------------- a stopped prune
def test_a_prune_stopped_after_the_manifest_is_finished_by_the_next_one_at_once(conn,
                                                                                 container):
    """The manifest goes first; a prune killed right after it left the objects and segments
    of a backup written minutes ago, which the grace period kept for a day. The marker it
    writes first makes the next prune finish the deletion at once."""
    now = dt.datetime.now(UTC).replace(microsecond=0)
    old = put_backup(conn, container, now - dt.timedelta(hours=2), segments=3)
    put_backup(conn, container, now - dt.timedelta(hours=1), n=1)
    policy = retention.RetentionPolicy(keep_last=1, keep_daily=0, keep_weekly=0)

    def stop_after_the_manifest(store, where, name, **kwargs):
        if name.endswith("/manifest.json"):
            real_delete(store, where, name, **kwargs)
            raise KeyboardInterrupt  # SIGINT/SIGTERM, as the CLI turns them into exceptions
        return real_delete(store, where, name, **kwargs)

    real_delete = SwiftStore.delete
    with mock.patch.object(SwiftStore, "delete", stop_after_the_manifest), \
            pytest.raises(KeyboardInterrupt):
        retention.prune(conn, container, policy, now)
    left = [n for n in names(conn, container) if n.startswith(old)]
    assert f"{old}/deleting" in left and f"{old}/manifest.json" not in left, left
    assert any(n.startswith(old) for n in names(conn, f"{container}_segments"))

    again = retention.prune(conn, container, policy, now)  # 24 h grace, as by default
    assert [b.backup_id for b in again.incomplete_deleted] == [old]
    assert not any(n.startswith(old) for n in names(conn, container))
    assert not any(n.startswith(old) for n in names(conn, f"{container}_segments"))


# ----------------------------------------------------------- runs Prefect knows about
def test_prune_with_no_grace_spares_a_running_backup_and_the_backup_completes(
        os_env, db_cnf, tmp_path, container, swift_proxy):
    """``prune --grace-hours 0`` while a backup uploads: its segments stay (its run is
    RUNNING in Prefect), so the backup commits; a failed run's leftovers written a moment ago
    go at once."""
    root = tmp_path / "uc"
    (root / "etc").mkdir(parents=True)
    (root / "etc/big.bin").write_bytes(os.urandom(3 << 20))  # 3 segments of 1 MiB
    with SwiftStore.connect(config.swift_settings_from_env()) as store:
        store.ensure_container(container)
        store.ensure_container(f"{container}_segments")
        # An incomplete backup of no run Prefect knows: the grace period applies to it.
        stray = put_backup(store, container, dt.datetime.now(UTC), complete=False, n=0xabcdef)
    # The archive's second segment is held 8 s: by then the first is in Swift.
    swift_proxy.stall(seconds=8, times=1, method="PUT", path="filesystem.tar.zst/00000001")
    outcome: dict = {}
    backup = threading.Thread(target=lambda: outcome.update(result=backup_in_process(
        "--root", str(root), "--container", container, "--db-defaults-file", db_cnf,
        "--segment-size", "1MiB", "--no-prune", "--json",
        env=dict(os.environ, OS_STORAGE_URL=swift_proxy.account_url))))
    backup.start()
    try:
        deadline = time.monotonic() + 60
        while swift_proxy.count(fault="stall") == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert swift_proxy.count(fault="stall") == 1, "the backup never reached its 2nd segment"
        result = prune_backups(container=container, grace_hours=0)
    finally:
        backup.join(120)
    running = [b.backup_id for b in result.incomplete_kept]
    assert len(running) == 1 and running[0] != stray, result.to_dict()
    assert stray in result.removed  # grace 0, no live run: removed
    done = outcome["result"]
    assert done.returncode == 0, done.stderr[-2000:]
    assert running[0] in done.stdout  # the backup it spared is the one that completed
    with SwiftStore.connect(config.swift_settings_from_env()) as store:
        assert catalogue.get_manifest(store, container, running[0]).backup_id == running[0]


def test_a_failed_runs_leftovers_go_with_the_next_prune_not_after_a_day(conn, container):
    """A run that ended (failed, crashed, cancelled) writes no more: what it left without a
    manifest is removed by the next prune, within the grace period."""
    from prefect import flow

    @flow(name="ucb-test-failing-backup")
    def failing() -> None:
        raise RuntimeError("Swift went away")

    state = failing(return_state=True)
    assert state.is_failed()
    run_id = state.state_details.flow_run_id.hex
    now = dt.datetime.now(UTC)
    left = put_backup(conn, container, now, complete=False, n=int(run_id[:6], 16))
    other = put_backup(conn, container, now, complete=False, n=0x123456)
    result = prune_backups(container=container)  # the default 24 h grace
    assert result.removed == [left], result.to_dict()
    assert [b.backup_id for b in result.incomplete_kept] == [other]


# ------------------------------------------------------------------ an auth outage
@pytest.fixture
def keystone_proxy(os_env):
    """A fault proxy in front of Keystone (the auth URL through it)."""
    from urllib.parse import urlsplit

    auth = urlsplit(os_env["OS_AUTH_URL"])
    with SwiftProxy(upstream=f"{auth.scheme}://{auth.netloc}") as proxy:
        proxy.account_url = auth._replace(netloc=urlsplit(proxy.url).netloc).geturl()
        yield proxy


def outage(seconds: float, *proxies: SwiftProxy) -> threading.Thread:
    """End the outage (every rule of ``proxies``) after ``seconds``."""
    def end() -> None:
        time.sleep(seconds)
        for proxy in proxies:
            proxy.clear()
    thread = threading.Thread(target=end, daemon=True)
    thread.start()
    return thread


def test_a_short_keystone_outage_is_ridden_out_within_the_retry_budget(
        swift_proxy, keystone_proxy, container):
    """Keystone refuses logins for 5 s and Swift cannot validate tokens meanwhile (401, as
    its delay_auth_decision answers): the upload re-authenticates, waits, and completes with
    the default policy instead of failing at the second 401."""
    settings = config.swift_settings_from_env(storage_url=swift_proxy.account_url)
    settings = replace(settings, auth_url=keystone_proxy.account_url)
    with SwiftStore.connect(settings) as store:
        store.ensure_container(container)
        keystone_proxy.fail(401, times=None, method="POST", path="/auth/tokens")
        swift_proxy.fail(401, times=None, method="PUT", path="/obj")
        started = time.monotonic()
        ending = outage(5, keystone_proxy, swift_proxy)
        store.put(container, "obj", io.BytesIO(b"after the outage"))
        took = time.monotonic() - started
        ending.join()
        assert store.get_bytes(container, "obj") == b"after the outage"
    assert 5 <= took < 20, took
    assert keystone_proxy.count(method="POST", fault="fail") >= 2  # logins were tried again


def test_an_auth_outage_longer_than_the_budget_fails_naming_it(swift_proxy, keystone_proxy,
                                                              container):
    settings = config.swift_settings_from_env(storage_url=swift_proxy.account_url,
                                              retry_budget_s=3)
    settings = replace(settings, auth_url=keystone_proxy.account_url)
    with SwiftStore.connect(settings) as store:
        store.ensure_container(container)
        swift_proxy.fail(401, times=None, method="PUT", path="/obj")
        started = time.monotonic()
        with pytest.raises(SwiftRequestFailed) as caught:
            store.put(container, "obj", b"x")
    assert time.monotonic() - started < 3 + 2
    assert caught.value.exit_code == 30 and caught.value.status == 401
    assert "Keystone unavailable" in str(caught.value) and "retry budget 3 s" in str(
        caught.value)
