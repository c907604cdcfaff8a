"""A restore through the binary log fetches the shipped logs while the full dump loads: the
logs are on disk before the load ends, nothing of them is left in staging afterwards, and a
load that fails replays nothing and leaves nothing behind either."""
# ruff: noqa: F811 - test_binlog's scratch servers and database are this file's fixtures too

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from binlog_server import BinlogServer
from test_binlog import backup, database, restore, source, target  # noqa: F401
from test_identity import age_identity

from undercloud_backup.core.manifest import USERS_OBJECT
from undercloud_backup.restore import databases as restoredb
from undercloud_backup.restore.files import RestoreFailed


def _fetched_logs(staging: Path) -> list[str]:
    return sorted(p.name for p in staging.glob("undercloud-replay-*/*") if p.stat().st_size)


def _chain(server: BinlogServer, name: str, container: str,
           *args: str) -> tuple[str, list[str]]:
    """A full, then two nightlies; the newest one's id and every shipped log's file name."""
    backup(server, container, *args)
    files = []
    for night in (1, 2):
        server.sql(f"UPDATE {name}.t SET v = 'night {night}' WHERE id % 10 = {night};")
        nightly = backup(server, container, *args)
        assert nightly["database_kind"] == "binlog", nightly["stderr"][-2000:]
        files += [o["name"].rsplit("mariadb-binlog-", 1)[1].split(".zst")[0]
                  for o in nightly["objects"]]
    return nightly["backup_id"], files


def _nights(server: BinlogServer, name: str) -> str:
    return server.sql(f"SELECT COUNT(*) FROM {name}.t WHERE v LIKE 'night %'").strip()


def test_the_logs_are_fetched_while_the_dump_loads(source, target, database, container,
                                                   tmp_path, monkeypatch):
    tip, files = _chain(source, database, container)
    staging = tmp_path / "staging"
    staging.mkdir()
    seen_during_load: list[list[str]] = []
    original = restoredb._load

    def load_waiting_for_the_logs(store, container_, obj, *args, **kwargs):
        check = original(store, container_, obj, *args, **kwargs)
        if obj.leaf != USERS_OBJECT:  # the dump itself: are the logs arriving meanwhile?
            deadline = time.monotonic() + 30
            while _fetched_logs(staging) != sorted(files) and time.monotonic() < deadline:
                time.sleep(0.05)
            seen_during_load.append(_fetched_logs(staging))
        return check

    monkeypatch.setattr(restoredb, "_load", load_waiting_for_the_logs)
    done = restore(target, container, "--backup-id", tip, "--all-databases", "--overwrite",
                   "--staging-dir", str(staging))
    assert done.returncode == 0, done.stderr[-3000:]
    assert seen_during_load == [sorted(files)]  # every log there before the load returned
    result = json.loads(done.stdout)["databases"]
    assert result["compared"] >= 1 and result["matching"] == result["compared"], result
    assert _nights(target, database) == _nights(source, database) != "0"
    assert not list(staging.iterdir())  # the downloaded logs went with the restore


def test_a_failed_load_replays_nothing_and_leaves_no_log_behind(source, target, database,
                                                                container, tmp_path,
                                                                monkeypatch):
    tip, _ = _chain(source, database, container)
    staging = tmp_path / "staging"
    staging.mkdir()

    def failing_load(*args, **kwargs):
        raise RestoreFailed(what="the dump", reason="the server went away (injected)")

    monkeypatch.setattr(restoredb, "_load", failing_load)
    done = restore(target, container, "--backup-id", tip, "--all-databases", "--overwrite",
                   "--staging-dir", str(staging))
    assert done.returncode == RestoreFailed.exit_code, done.stderr[-3000:]
    assert "injected" in done.stderr and "replaying the binary log" not in done.stderr
    assert not list(staging.iterdir())
    assert not [t for t in threading.enumerate() if t.name.startswith("binlog-fetch")]


def test_encrypted_logs_fetched_beside_the_load_are_decrypted_with_the_identity(
        source, target, database, container, tmp_path):
    """The identity given to the restore reaches the thread that fetches the logs."""
    identity = tmp_path / "identity"
    recipients = tmp_path / "recipients"
    recipients.write_text(age_identity(identity) + "\n")
    tip, files = _chain(source, database, container, "--recipients-file", str(recipients))
    assert files
    done = restore(target, container, "--backup-id", tip, "--all-databases", "--overwrite",
                   "--identity", str(identity))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _nights(target, database) == _nights(source, database) != "0"
