"""Download links: Swift TempURLs signed for a backup's objects, against the real Swift.

An operator copies a link out of the run's artifact and runs ``curl -o``: the file must be the
whole object (the SLO's segments joined by Swift), byte for byte; after the lifetime the link
must stop working; the account's temp-url key must never show up anywhere but Swift.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from unittest import mock

import pytest
from conftest import STATE
from deploy_helpers import read_env_file

from undercloud_backup import config
from undercloud_backup.core.errors import SwiftRequestFailed
from undercloud_backup.core.manifest import Manifest, Segment, StoredObject
from undercloud_backup.store import tempurl


@pytest.fixture
def store(os_env):
    from undercloud_backup.store.connection import SwiftStore

    store = SwiftStore.connect(config.swift_settings_from_env(retries=0))
    yield store
    store.close()


@pytest.fixture
def other_store(os_env):
    """A store on the test bed's second account (project backup-other). The tests that set an
    account's temp-url keys themselves use it: every backup's links in the main account are
    signed with that account's key, and other shards make and download such links meanwhile
    (a key changed under them would turn their links into 401s)."""
    from undercloud_backup.store.connection import SwiftStore

    with mock.patch.dict(os.environ, read_env_file(STATE / "keystone-other.env")):
        settings = config.swift_settings_from_env(retries=0)
    store = SwiftStore.connect(settings)
    yield store
    store.close()


@pytest.fixture
def other_container(other_store):
    """A fresh container name in the second account; its objects are deleted afterwards."""
    name = f"ucbtest-{uuid.uuid4().hex[:10]}"
    yield name
    for each in (name, f"{name}_segments"):
        try:
            for obj in other_store.list(each):
                other_store.delete(each, obj["name"])
            other_store.delete_container(each)
        except SwiftRequestFailed:
            pass  # the test may never have made it


@pytest.fixture
def account_keys(other_store):
    """Put the account's temp-url headers back as they were."""
    names = (*tempurl.KEY_HEADERS, tempurl.SLOT_HEADER)
    before = {k: v for k, v in other_store.account().items() if k in names}
    yield before
    other_store.post_account({name: before.get(name, "") for name in names})


def _backup(store, container: str) -> tuple[Manifest, dict[str, bytes]]:
    """An encrypted backup's shape, written object by object (not by the uploader): a
    3-segment SLO and a plain object (random bytes: age's output looks no different), and its
    manifest."""
    backup_id = "undercloud-20261130T220000Z-t3mp"
    segments_container = f"{container}_segments"
    store.ensure_container(container)
    store.ensure_container(segments_container)
    parts = [os.urandom(300_000), os.urandom(300_000), os.urandom(123_457)]
    segments = []
    for index, data in enumerate(parts):
        name = f"{backup_id}/filesystem.tar.zst.age/{index:08d}"
        etag = store.put(segments_container, name, data)
        segments.append(Segment(name=name, size=len(data), etag=etag,
                                sha256=hashlib.sha256(data).hexdigest()))
    slo = f"{backup_id}/filesystem.tar.zst.age"
    store.put(container, slo, swift_json([s.slo_entry(segments_container) for s in segments]),
              query={"multipart-manifest": "put"})
    whole = b"".join(parts)
    plain = os.urandom(50_001)
    db_name = f"{backup_id}/mariadb-all-databases.sql.zst.age"
    store.put(container, db_name, plain)
    objects = [StoredObject(name=slo, size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
                            compression="zstd", content="tar", segments=segments,
                            segment_container=segments_container),
               StoredObject(name=db_name, size=len(plain),
                            sha256=hashlib.sha256(plain).hexdigest(), compression="zstd",
                            content="sql")]
    manifest = Manifest(backup_id=backup_id, created_at="2026-11-30T22:00:00Z", objects=objects,
                        encryption={"format": "age", "recipients": ["sha256:" + "0" * 64]})
    store.put(container, f"{backup_id}/manifest.json", manifest.to_json())
    return manifest, {"filesystem.tar.zst.age": whole,
                      "mariadb-all-databases.sql.zst.age": plain,
                      "manifest.json": manifest.to_json()}


def swift_json(entries: list[dict]) -> bytes:
    import json

    return json.dumps(entries).encode()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_links_download_whole_objects_with_curl(other_store, other_container, account_keys,
                                                tmp_path):
    manifest, contents = _backup(other_store, other_container)
    links = tempurl.download_links(other_store, other_container, manifest)
    assert [link.leaf for link in links] == [
        "filesystem.tar.zst.age", "mariadb-all-databases.sql.zst.age", "manifest.json"]
    key = tempurl.plan_key(other_store.account(), "unused").key
    for link in links:
        assert link.expires - time.time() == pytest.approx(24 * 3600, abs=60)
        assert key not in link.url and "temp_url_sig=" in link.url
        target = tmp_path / link.leaf
        subprocess.run(["curl", "-fsS", "-o", str(target), link.url], check=True, timeout=60)
        assert target.read_bytes() == contents[link.leaf], link.leaf
        if link.sha256:
            assert hashlib.sha256(target.read_bytes()).hexdigest() == link.sha256
    # the SLO came back joined, through plain urllib too, and not as its JSON manifest
    with urllib.request.urlopen(links[0].url, timeout=30) as response:
        assert response.read() == contents["filesystem.tar.zst.age"]
        assert "filesystem.tar.zst.age" in response.headers["Content-Disposition"]
    markdown = tempurl.links_markdown(links)
    assert key not in markdown and links[0].url in markdown
    # the same path without a signature is refused
    assert _status(links[0].url.split("?")[0]) == 401


def test_links_stop_working_after_their_lifetime(other_store, other_container, account_keys):
    manifest, contents = _backup(other_store, other_container)
    links = tempurl.download_links(other_store, other_container, manifest, lifetime=3)
    assert _status(links[1].url) == 200
    time.sleep(max(0.0, links[1].expires - time.time()) + 1.5)
    assert [_status(link.url) for link in links] == [401, 401, 401]


def test_someone_elses_key_is_never_overwritten(other_store, other_container, account_keys):
    """An account key set by someone else stays; the tool takes the second slot."""
    manifest, contents = _backup(other_store, other_container)
    other_store.post_account({tempurl.KEY_HEADERS[0]: "someone-elses-key",
                       tempurl.KEY_HEADERS[1]: "", tempurl.SLOT_HEADER: ""})
    links = tempurl.download_links(other_store, other_container, manifest)
    headers = other_store.account()
    assert headers[tempurl.KEY_HEADERS[0]] == "someone-elses-key"
    ours = headers[tempurl.KEY_HEADERS[1]]
    assert len(ours) >= 40 and headers[tempurl.SLOT_HEADER] == "2"
    with urllib.request.urlopen(links[1].url, timeout=30) as response:
        assert response.read() == contents["mariadb-all-databases.sql.zst.age"]
    # a second run signs with the same key of ours: earlier links stay valid
    again = tempurl.download_links(other_store, other_container, manifest)
    assert other_store.account()[tempurl.KEY_HEADERS[1]] == ours
    assert _status(links[0].url) == 200 and _status(again[0].url) == 200


class _Untouched:
    """An account no call may reach: a plain-text backup gets no link before any request."""

    url = "http://127.0.0.1:8080/v1/AUTH_x"

    def account(self):
        raise AssertionError("Swift was asked for a key")

    def post_account(self, headers):
        raise AssertionError("Swift was asked to set a key")


def test_a_plain_text_backup_gets_no_link_and_says_how_to_download_with_credentials():
    """A link needs no credentials: for a backup in plain text it would hand the undercloud's
    secrets to whoever sees the artifact. None is signed; the artifact's section names the
    credentialed ways instead."""
    plain = Manifest(backup_id="undercloud-20261130T220000Z-p1a1n", created_at="2026-11-30",
                     objects=[], encryption={"format": "none", "recipients": [],
                                             "reason": "opted out: drill", "opted_out": True})
    for manifest in (plain, Manifest(backup_id=plain.backup_id, created_at="2026-11-30",
                                     objects=[])):  # and one of before encryption was recorded
        with pytest.raises(tempurl.PlainTextNoLinks) as caught:
            tempurl.download_links(_Untouched(), "c", manifest)
        assert plain.backup_id in str(caught.value) and "\n" not in str(caught.value)
    markdown = tempurl.plain_text_markdown("backups", plain.backup_id)
    assert "temp_url" not in markdown and "](" not in markdown
    assert f"swift download backups --prefix {plain.backup_id}/" in markdown
    assert f"python -m flows.restore --container backups --backup-id {plain.backup_id}" in markdown


def test_plan_key_slots():
    new = "fresh"
    assert tempurl.plan_key({}, new).set_headers == {
        tempurl.KEY_HEADERS[0]: new, tempurl.SLOT_HEADER: "1"}
    taken = {tempurl.KEY_HEADERS[0]: "theirs"}
    assert tempurl.plan_key(taken, new).set_headers == {
        tempurl.KEY_HEADERS[1]: new, tempurl.SLOT_HEADER: "2"}
    both = {tempurl.KEY_HEADERS[0]: "a", tempurl.KEY_HEADERS[1]: "b"}
    assert tempurl.plan_key(both, new) == tempurl.KeyPlan(key="a", set_headers={})
    ours = {**both, tempurl.SLOT_HEADER: "2"}
    assert tempurl.plan_key(ours, new) == tempurl.KeyPlan(key="b", set_headers={})
    # our slot was emptied by someone: take a free slot again, never the other's key
    gone = {tempurl.KEY_HEADERS[0]: "theirs", tempurl.SLOT_HEADER: "2"}
    assert tempurl.plan_key(gone, new).set_headers[tempurl.KEY_HEADERS[1]] == new


class _NotOwner:
    """An account the user may read but not change (a real 403 needs a non-owner role)."""

    url = "http://127.0.0.1:8080/v1/AUTH_x"

    def account(self):
        return {}

    def post_account(self, headers):
        raise SwiftRequestFailed(operation="POST account", target=self.url,
                                 reason="HTTP 403 Forbidden", transaction_id="tx0", status=403)


def test_account_that_refuses_a_key_gives_one_clear_error():
    with pytest.raises(tempurl.TempURLUnavailable) as caught:
        tempurl.account_key(_NotOwner())
    message = str(caught.value)
    assert "\n" not in message and "403" in message and "Temp-URL-Key" in message
    assert caught.value.exit_code == 2


def test_digest_and_lifetime_checks():
    assert tempurl.choose_digest({"tempurl": {"allowed_digests": ["sha1", "sha512"]}}) == \
        "sha512"
    with pytest.raises(tempurl.TempURLUnavailable, match="not in this Swift's proxy pipeline"):
        tempurl.choose_digest({"slo": {}})
    with pytest.raises(tempurl.ConfigError, match="lifetime"):
        tempurl.check_lifetime(0)
    assert tempurl.info_url("http://h:8080/v1/AUTH_x") == "http://h:8080/info"
    assert tempurl.info_url("https://h/swift/v1/AUTH_x") == "https://h/swift/info"


def test_a_real_runs_artifact_links_download_its_objects(os_env, db_cnf, store, container,
                                                         account_keys, tmp_path):
    """`python -m flows.backup --link-lifetime-hours`: the links in the run's `undercloud-backup`
    artifact, read back through the Prefect API as the UI reads it, download every object
    byte-identical to what the manifest records, and expire when the parameter says."""
    import json
    import re

    from conftest import PREFECT_API_URL, backup_in_process

    from undercloud_backup.store import catalogue

    identity, recipients = tmp_path / "identity", tmp_path / "recipients"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    recipients.write_text(subprocess.run(["age-keygen", "-y", str(identity)], check=True,
                                         capture_output=True, text=True).stdout)
    started = time.time()
    # In this process: the run's artifact is what is tested, not the backup's CLI.
    result = backup_in_process("--db-only", "--container", container, "--db-defaults-file",
                               db_cnf, "--no-prune", "--link-lifetime-hours", "0.05", "--json",
                               "--recipients-file", str(recipients))
    assert result.returncode == 0, result.stderr
    backup_id = json.loads(result.stdout)["backup_id"]
    with urllib.request.urlopen(f"{PREFECT_API_URL}/artifacts/undercloud-backup/latest",
                                timeout=30) as response:
        artifact = json.loads(response.read())
    markdown = artifact["data"]
    assert backup_id in markdown
    links = dict(re.findall(r"\[([\w.-]+)\]\((https?://[^)\s]+)\)", markdown))
    manifest = catalogue.get_manifest(store, container, backup_id)
    assert set(links) == {o.leaf for o in manifest.objects} | {"manifest.json"}
    assert all(o.leaf.endswith(".age") for o in manifest.objects)
    for key in store.account().get(tempurl.KEY_HEADERS[0]), store.account().get(
            tempurl.KEY_HEADERS[1]):
        assert not key or key not in markdown  # only signed URLs, never the key
    for leaf, url in links.items():
        expires = int(re.search(r"temp_url_expires=(\d+)", url).group(1))
        assert expires - started == pytest.approx(0.05 * 3600, abs=60)
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
        obj = manifest.object(leaf)
        if obj is None:
            assert body == store.get_bytes(container, f"{backup_id}/manifest.json")
        else:
            assert len(body) == obj.size and hashlib.sha256(body).hexdigest() == obj.sha256


def test_a_link_lifetime_out_of_range_is_one_line_and_exit_2():
    from conftest import backup_cli

    for value in ("0", "-1", "9000"):
        result = backup_cli("--db-only", "--link-lifetime-hours", value, timeout=60)
        assert result.returncode == 2, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("undercloud-backup: error: ") and "--link-lifetime-hours" in last
        assert "Traceback" not in result.stderr
