"""The Swift store against real Swift behind Keystone, with a fault-injecting proxy in front:
what is retried (5xx, 429 with its Retry-After, a lost connection, a stall) and what is not
(400, 403, 404, 409, 413; a 401 only within the budget), counted at the proxy; a dead Swift
fails within its budget; the manifest PUT is retried like any other; bad container names are
refused before anything is written; a full staging disk is exit 14; the uploader spools at most
two segments."""

from __future__ import annotations

import email.utils
import hashlib
import io
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO
from swift_proxy import swift_proxy_fixture  # noqa: F401 - the swift_proxy fixture

from undercloud_backup import config
from undercloud_backup.core.errors import (
    ConfigError,
    InsufficientSpace,
    NotFound,
    ObjectTooLarge,
    SwiftRequestFailed,
    SwiftUnreachable,
)
from undercloud_backup.core.manifest import Manifest
from undercloud_backup.store import catalogue, upload
from undercloud_backup.store.connection import SwiftStore
from undercloud_backup.store.swift import SwiftSettings

MiB = 1024**2
SLO_MANIFEST = re.compile(r"/upload\.bin$")


def through(proxy, **overrides) -> SwiftStore:
    """A store whose requests go through the proxy (Keystone is reached directly)."""
    return SwiftStore.connect(config.swift_settings_from_env(storage_url=proxy.account_url,
                                                             **overrides))


@pytest.fixture
def store(swift_proxy, container):
    store = through(swift_proxy)
    store.ensure_container(container)
    store.ensure_container(f"{container}_segments")
    return store


def gaps(proxy, method: str, path: str) -> list[float]:
    times = [s.at for s in proxy.log if s.method == method and path in s.path]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


# ------------------------------------------------------------------------ retried
def test_a_503_is_retried_and_the_put_succeeds(store, swift_proxy, container):
    swift_proxy.fail(503, times=2, method="PUT", path="/obj")
    etag = store.put(container, "obj", b"payload")
    assert etag == hashlib.md5(b"payload", usedforsecurity=False).hexdigest()
    assert swift_proxy.count(method="PUT", path="/obj") == 3
    assert store.get_bytes(container, "obj") == b"payload"
    assert gaps(swift_proxy, "PUT", "/obj")[1] >= 1.9  # back-off doubles: 1 s, then 2 s


def test_429_waits_as_long_as_retry_after_says(store, swift_proxy, container):
    store.put(container, "obj", b"x")
    swift_proxy.fail(429, times=1, method="HEAD", retry_after=3)
    store.head(container, "obj")
    (gap,) = gaps(swift_proxy, "HEAD", "/obj")
    assert 3.0 <= gap < 4.0  # not the 1 s back-off


def test_retry_after_as_an_http_date(store, swift_proxy, container):
    store.put(container, "obj", b"x")
    swift_proxy.fail(503, times=1, method="HEAD",
                     retry_after=email.utils.formatdate(time.time() + 4, usegmt=True))
    store.head(container, "obj")
    (gap,) = gaps(swift_proxy, "HEAD", "/obj")
    assert 2.5 <= gap < 4.5  # whole seconds in the date


def test_retry_after_beyond_the_budget_fails_at_once(swift_proxy, container):
    store = through(swift_proxy, retry_budget_s=5)
    swift_proxy.fail(429, times=None, method="PUT", retry_after=60)
    started = time.monotonic()
    with pytest.raises(SwiftRequestFailed, match="asked to wait 60 s") as caught:
        store.ensure_container(container)
    assert time.monotonic() - started < 2
    assert caught.value.status == 429 and caught.value.retryable
    assert swift_proxy.count(method="PUT") == 1


def test_the_manifest_put_is_retried_after_a_503(store, swift_proxy, container):
    """Its body is bytes: swiftclient alone could not send it again."""
    manifest = Manifest(backup_id="uc-20261130T000000Z-000001", created_at="2026-11-30")
    swift_proxy.fail(503, times=1, method="PUT", path="manifest.json")
    name = catalogue.put_manifest(store, container, manifest)
    assert swift_proxy.count(method="PUT", path="manifest.json") == 2
    assert catalogue.get_manifest(store, container, manifest.backup_id) == manifest
    assert [e.manifest for e in catalogue.list_backups(store, container)] == [name]


def test_a_connection_reset_mid_body_resumes_where_it_broke(store, swift_proxy, container):
    data = os.urandom(3 * MiB)
    store.put(container, "big", data)
    swift_proxy.reset(after=MiB + 17, times=1, method="GET", path="/big")
    _, body = store.get(container, "big", chunk_size=64 * 1024)
    assert hashlib.sha256(b"".join(body)).digest() == hashlib.sha256(data).digest()
    assert swift_proxy.count(method="GET", path="/big") == 2


def test_a_segmented_upload_survives_503s_on_segments_and_the_slo_manifest(
        store, swift_proxy, container, tmp_path):
    data = os.urandom(5 * MiB + 5)
    swift_proxy.fail(503, times=1, method="PUT", path="/00000002")
    swift_proxy.fail(503, times=1, method="PUT", path=SLO_MANIFEST)
    uploader = upload.StreamUploader(store, container, "b/upload.bin", segment_size=MiB,
                                     staging_dir=str(tmp_path), compression="none",
                                     content="test")
    uploader.feed(io.BytesIO(data))
    record = uploader.commit()
    assert len(record.segments) == 6 and record.size == len(data)
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    _, body = store.get(container, "b/upload.bin")
    assert b"".join(body) == data
    assert swift_proxy.count(method="PUT", path="/00000002") == 2
    assert sum(1 for s in swift_proxy.log if s.method == "PUT"
               and SLO_MANIFEST.search(s.path)) == 2


# -------------------------------------------------------------------- not retried
@pytest.mark.parametrize("status", [400, 403, 404, 409, 413])
def test_client_errors_fail_at_once(store, swift_proxy, container, status):
    started = time.monotonic()
    with pytest.raises(SwiftRequestFailed) as caught:
        swift_proxy.fail(status, times=None, method="PUT", path="/obj")
        store.put(container, "obj", b"x")
    assert time.monotonic() - started < 1
    assert caught.value.status == status
    assert not caught.value.retryable
    assert isinstance(caught.value, NotFound) == (status == 404)
    assert "tx-test-proxy-" in str(caught.value)  # the transaction id is kept
    assert swift_proxy.count(method="PUT", path="/obj") == 1


def test_401_is_reauthenticated_then_fails_within_the_budget(swift_proxy, container):
    """A new token each time; a 401 to a new token is an auth outage, tried again while
    the budget lasts (tests/test_interrupted.py)."""
    store = through(swift_proxy, retry_budget_s=2)
    swift_proxy.fail(401, times=None, method="HEAD")
    with pytest.raises(SwiftRequestFailed) as caught:
        store.head(container, "obj")
    assert caught.value.status == 401 and caught.value.exit_code == 30
    # the first, one at once after a new token, one more 1 s later (the next is past 2 s)
    assert swift_proxy.count(method="HEAD") == 3


def test_a_401_once_reauthenticates_and_a_file_body_is_sent_again(store, swift_proxy,
                                                                   container):
    swift_proxy.fail(401, times=1, method="PUT", path="/obj")
    store.put(container, "obj", io.BytesIO(b"again"))
    assert store.get_bytes(container, "obj") == b"again"
    assert swift_proxy.count(method="PUT", path="/obj") == 2


def test_a_missing_object_is_typed_not_found(os_env, container):
    store = SwiftStore.connect(config.swift_settings_from_env())
    store.ensure_container(container)
    with pytest.raises(NotFound) as caught:
        store.head(container, "nothing-here")
    assert caught.value.status == 404 and caught.value.exit_code == 32
    assert catalogue.listing(store, container + "-absent") == []


# ------------------------------------------------------------------------ stalls
def test_a_dead_swift_fails_within_the_budget(swift_proxy, container):
    """Accepts, reads the request, never answers: timeout 1 s, budget 4 s."""
    store = through(swift_proxy, timeout=1, retry_budget_s=4)
    swift_proxy.stall(times=None)
    started = time.monotonic()
    with pytest.raises(SwiftUnreachable, match=r"no answer within 1 s; giving up after 2 "
                                               r"attempt\(s\) in 3 s \(retry budget 4 s\)"
                       ) as caught:
        store.ensure_container(container)
    took = time.monotonic() - started
    assert 3 <= took < 4 + 1 + 1, took  # within budget + one timeout (+ slack)
    assert caught.value.retryable
    # Attempts at 0 s and 1+1 s (each timing out after 1 s); the next, at 3+2 s, would start
    # past the budget, so the request gives up at 3 s instead of trying.
    assert swift_proxy.count(method="PUT") == 2


def test_a_slow_but_live_swift_completes(store, swift_proxy, container):
    """A stall longer than the timeout is retried; a shorter one is waited out."""
    slow = through(swift_proxy, timeout=2, retry_budget_s=10)
    swift_proxy.stall(seconds=6, times=1, method="PUT", path="/obj")
    slow.put(container, "obj", b"late")
    assert swift_proxy.count(method="PUT", path="/obj") == 2
    swift_proxy.stall(seconds=1, times=1, method="GET", path="/obj")
    assert slow.get_bytes(container, "obj") == b"late"
    assert swift_proxy.count(method="GET", path="/obj") == 1


# ---------------------------------------------------------------- container names
@pytest.mark.unit
@pytest.mark.parametrize("name", ["a/evil", "q?x=1", "", "x" * 248, "tab\there"])
def test_bad_container_names_are_refused(name):
    with pytest.raises(ConfigError):
        SwiftSettings(auth_url="http://keystone", container=name)


@pytest.mark.unit
def test_the_longest_container_name_leaves_room_for_segments():
    SwiftSettings(auth_url="http://keystone", container="x" * 247)  # + "_segments" = 256
    SwiftSettings(auth_url="http://keystone", container="ü" * 123)  # 246 bytes of UTF-8
    with pytest.raises(ConfigError, match="257 bytes"):
        SwiftSettings(auth_url="http://keystone", container="ü" * 124)


@pytest.mark.parametrize("name", ["a/evil", "q?x=1", ""])
def test_the_backup_refuses_a_bad_container_with_exit_2_before_writing(os_env, name):
    store = SwiftStore.connect(config.swift_settings_from_env())
    before = {c["name"] for c in store.containers()}
    result = subprocess.run([sys.executable, "-m", "flows.backup", "--container", name,
                             "--db-only"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ))
    assert result.returncode == 2, result.stderr
    assert "container name" in result.stderr and "Traceback" not in result.stderr
    # Not the account's whole list: the tests of another shard make containers meanwhile.
    # What this run could have made is a container named by the bad name's first part (Swift
    # reads "a/evil" as container "a", object "evil"), or its segments container.
    stem = re.split(r"[/?]", name)[0]
    made = {c["name"] for c in store.containers()} - before
    assert not made & {name, stem, f"{name}_segments", f"{stem}_segments"}, made


# ------------------------------------------------------------------ staging spools
def open_spools(staging: Path) -> int:
    """Anonymous spool files of this process under ``staging`` (deleted but open)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(str(staging)) and target.endswith("(deleted)")
    return count


def test_the_uploader_spools_at_most_two_segments(store, swift_proxy, container, tmp_path):
    swift_proxy.stall(seconds=0.3, times=None, method="PUT", path="/0000")  # slow segments
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, open_spools(tmp_path))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        uploader = upload.StreamUploader(store, container, "b/spools", segment_size=MiB,
                                         staging_dir=str(tmp_path), compression="none",
                                         content="test")
        uploader.feed(io.BytesIO(os.urandom(8 * MiB)))
        uploader.commit()
    finally:
        done.set()
        watcher.join()
    assert peak == upload.SPOOLS_PER_STREAM == 2
    assert open_spools(tmp_path) == 0


@pytest.fixture
def small_staging(tmp_path):
    mount = tmp_path / "staging"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_staging_disk_is_insufficient_space(store, container, small_staging):
    """The space check passed, then the disk filled: exit 14 naming the filesystem, not an
    OSError; nothing is left in the staging directory or in Swift."""
    uploader = upload.StreamUploader(store, container, "b/full", segment_size=2 * MiB,
                                     staging_dir=str(small_staging), compression="none",
                                     content="test")
    filler = small_staging / "other-writer"
    filler.write_bytes(b"\0" * (2 * MiB))
    with pytest.raises(InsufficientSpace) as caught:
        try:
            uploader.feed(io.BytesIO(os.urandom(6 * MiB)))
        except BaseException:
            uploader.abort()
            raise
    error = caught.value
    assert error.exit_code == 14 and not error.retryable
    assert f"staging directory {small_staging} (filesystem {small_staging})" in str(error)
    assert "need 4.0 MiB for this stream (2 segments)" in str(error)
    filler.unlink()
    assert os.listdir(small_staging) == [] and open_spools(small_staging) == 0
    assert catalogue.listing(store, f"{container}_segments") == []


# ------------------------------------------------------------------ classification
@pytest.mark.unit
def test_retryable_follows_the_status_and_survives_pickling():
    """Prefect pickles task exceptions; its retry condition reads ``retryable``."""
    import pickle

    def failed(status):
        return SwiftRequestFailed(operation="PUT", target="c/o", reason="x",
                                  transaction_id="tx", status=status)

    transient = [None, 408, 429, 498, 500, 503, 599]
    permanent = [400, 401, 403, 404, 405, 409, 411, 412, 413, 416, 422]
    assert [failed(s).retryable for s in transient] == [True] * len(transient)
    assert [failed(s).retryable for s in permanent] == [False] * len(permanent)
    again = pickle.loads(pickle.dumps(failed(503)))
    assert again.status == 503 and again.retryable and str(again) == str(failed(503))
    gone = pickle.loads(pickle.dumps(NotFound(operation="HEAD", target="c/o", reason="HTTP 404",
                                              transaction_id="tx", status=404)))
    assert isinstance(gone, NotFound) and not gone.retryable


# ------------------------------------------------- small objects are read with a bound
def test_a_planted_oversized_manifest_or_signature_is_refused_before_it_is_held(store,
                                                                              container):
    """Whoever can write to the container (the Swift credentials) cannot make a run read
    gigabytes into memory through an object that is always small: a 64 MiB + 1 byte
    "manifest", a 100 KiB "signature"."""
    from undercloud_backup.core.manifest import ManifestError
    from undercloud_backup.store.connection import SMALL_OBJECT_LIMIT
    from undercloud_backup.trust import signing

    backup_id = "vm-20261201T000000Z-abcdef"
    store.put(container, f"{backup_id}/manifest.json", b"{" + b" " * SMALL_OBJECT_LIMIT)
    with pytest.raises(ManifestError) as refused:
        catalogue.get_manifest(store, container, backup_id)
    assert str(refused.value) == (
        f"Swift object {container}/{backup_id}/manifest.json is larger than a manifest ever is "
        "(67,108,865 bytes, at most 67,108,864): not reading it into memory; it is damaged or "
        "was planted.")
    # --list shows it without kind, as any unreadable manifest, and goes on
    entries = catalogue.describe(store, container, catalogue.list_backups(store, container))
    assert [(e.backup_id, e.kind) for e in entries] == [(backup_id, None)]

    store.put(container, f"{backup_id}/manifest.json", b"{}")
    store.put(container, signing.signature_name(backup_id), b"x" * (100 << 10))
    with pytest.raises(ObjectTooLarge) as refused:
        signing.load_signed_manifest(store, container, backup_id, "/dev/null")
    assert refused.value.exit_code == 34 and "larger than a signature ever is" in str(
        refused.value)
    assert store.get_bytes(container, f"{backup_id}/manifest.json") == b"{}"  # still usable
    # and a run never commits a manifest that readers would refuse
    with pytest.raises(ObjectTooLarge):
        catalogue.put_manifest_body(store, container, "vm-x", b" " * (SMALL_OBJECT_LIMIT + 1))
    with pytest.raises(NotFound):
        store.head(container, "vm-x/manifest.json")
