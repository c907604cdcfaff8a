"""The typed manifest: version 1 manifests still read, and nothing is lost on the way back."""

from __future__ import annotations

import json

import pytest

from undercloud_backup.core.manifest import (
    FORMAT,
    Manifest,
    ManifestError,
    Segment,
    StoredObject,
)

pytestmark = pytest.mark.unit

V1 = {
    "format": "undercloud-backup/1", "backup_id": "uc-20260101T000000Z-abcdef",
    "created_at": "2026-01-01T00:00:00+00:00", "completed_at": "2026-01-01T00:01:00+00:00",
    "hostname": "uc", "tool": {"name": "undercloud-backup", "version": "0.1.0"},
    "flow_run_id": None, "platform": {"python": "3.11", "kernel": "6"},
    "mariadb": {"version": "10.11", "object": "uc-20260101T000000Z-abcdef/mariadb-all-"
                "databases.sql.zst", "system_tables": ["users"],
                "databases": {"nova": {"tables": [{"table": "i", "engine": "InnoDB", "rows": 3,
                                                   "checksum": 12}]}}},
    "paths": {"root": "/", "included": ["/etc"], "absent": [], "excluded": [], "changed": [],
              "vanished": [], "unreadable": [], "other": []},
    "space": {"staging_dir": "/var/tmp"},
    "objects": [{"name": "uc-20260101T000000Z-abcdef/filesystem.tar.zst", "size": 10,
                 "sha256": "ab", "compression": "zstd", "content": "tar", "etag": "e",
                 "segment_container": "c_segments",
                 "segments": [{"name": "s/0", "size": 10, "etag": "e0"}]}],
    "a_future_field": {"kept": True},
}


def test_version_1_reads_and_writes_back_unchanged():
    manifest = Manifest.from_json(json.dumps(V1))
    assert manifest.format == "undercloud-backup/1"
    assert manifest.mariadb.users_object is None and manifest.mariadb.has_checksums
    fs = manifest.object("filesystem.tar.zst")
    assert fs is not None and fs.segmented and fs.segments[0].sha256 == ""
    assert manifest.object("nothing") is None
    back = manifest.to_dict()
    # Version 2 fields appear with their defaults; everything version 1 had is as it was.
    for key, value in V1.items():
        if key in ("mariadb", "objects"):
            continue
        assert back[key] == value, key
    assert back["mariadb"]["databases"] == V1["mariadb"]["databases"]
    assert back["objects"][0]["segments"][0] == {"name": "s/0", "size": 10, "etag": "e0",
                                                 "sha256": ""}


def test_new_manifest_round_trips():
    obj = StoredObject(name="b/filesystem.tar.zst", size=5, sha256="x", compression="zstd",
                       content="tar", segments=[Segment("s/0", 5, "e", "h")])
    manifest = Manifest(backup_id="b", created_at="t", objects=[obj])
    assert manifest.format == FORMAT and manifest.name == "b/manifest.json"
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert obj.segments[0].slo_entry("c_segments") == {"path": "/c_segments/s/0", "etag": "e",
                                                       "size_bytes": 5}


@pytest.mark.parametrize("body, says", [
    (b"{not json", "not JSON"),
    (b'{"objects": []}', "no backup_id"),
    (b'{"backup_id": "b", "format": "undercloud-backup/9"}', "newer than this tool reads"),
])
def test_unreadable_manifests_say_why(body, says):
    with pytest.raises(ManifestError, match=says):
        Manifest.from_json(body)
