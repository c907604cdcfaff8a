"""Pure functions and the executor: command lines as data, planning, parsing, process groups."""

from __future__ import annotations

import os
import time

import pytest

from undercloud_backup.core.errors import (
    CommandFailed,
    CommandTimedOut,
    ConfigError,
    InsufficientSpace,
    PathNotFound,
    redact,
)
from undercloud_backup.core.execute import Command, Pipeline, capture
from undercloud_backup.core.sizes import format_size, parse_size
from undercloud_backup.db import connection
from undercloud_backup.db import dump as dbdump
from undercloud_backup.files import archive

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text,expected", [
    ("64MiB", 64 * 1024**2), ("64M", 64 * 1024**2), ("64MB", 64 * 1000**2),
    ("1GiB", 1024**3), ("1.5G", int(1.5 * 1024**3)), ("1048576", 1048576), (" 2 kib ", 2048),
])
def test_parse_size_accepts_what_operators_write(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "12 parsecs", "-1M", "1e3"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(3 * 1024**3 // 2) == "1.5 GiB"


def test_normalize_paths():
    assert archive.normalize("/etc/") == "/etc"
    assert archive.normalize("//home/./stack/") == "/home/stack"
    with pytest.raises(ConfigError):
        archive.normalize("etc")
    with pytest.raises(ConfigError):
        archive.normalize("/home/../etc")


def test_plan_paths_defaults_added_absent_nested_and_excluded(tmp_path):
    for d in ("etc/keystone", "home/stack", "opt/extra", "srv/node"):
        (tmp_path / d).mkdir(parents=True)
    plan = archive.plan_paths(str(tmp_path), add_paths=["/opt/extra/", "/etc/keystone"],
                              exclude_paths=["/srv/node", "/home/stack/.cache"])
    assert plan.included == ("/etc", "/home/stack", "/opt/extra")  # /etc/keystone is in /etc
    assert plan.absent == ("/root", "/var/lib/glance/images")
    assert plan.excluded == ("/srv/node", "/home/stack/.cache")


def test_plan_paths_refuses_a_missing_added_path(tmp_path):
    (tmp_path / "etc").mkdir()
    with pytest.raises(PathNotFound, match="/opt/nope"):
        archive.plan_paths(str(tmp_path), add_paths=["/opt/nope"])


def test_tar_command_keeps_metadata_and_anchors_exclusions():
    plan = archive.PathPlan(root="/", included=("/etc", "/home/stack"), absent=(),
                            excluded=("/home/stack/.cache",))
    argv = archive.tar_command(plan, prefix=("sudo", "-n")).argv
    assert argv[:3] == ("sudo", "-n", "tar")
    for option in ("--numeric-owner", "--acls", "--xattrs", "--xattrs-include=*", "--selinux",
                   "--anchored", "--directory=/"):
        assert option in argv
    assert "--exclude=home/stack/.cache" in argv
    assert argv[-3:] == ("--", "etc", "home/stack")
    assert argv.index("--exclude=home/stack/.cache") < argv.index("--")


def test_tar_report_sorts_complaints_by_kind():
    report = archive.TarReport()
    for line in [
        "tar: home/stack/log.txt: file changed as we read it",
        "tar: home/stack/gone: File removed before we read it",
        "tar: home/stack/tmp/x: Cannot stat: No such file or directory",
        "tar: root/secret: Cannot open: Permission denied",
        "tar: Exiting with failure status due to previous errors",
        "tar: something odd happened",
    ]:
        report.add(line)
    assert report.changed == ["home/stack/log.txt"]
    assert report.vanished == ["home/stack/gone", "home/stack/tmp/x"]
    assert report.unreadable == ["root/secret (Permission denied)"]
    assert report.other == ["tar: something odd happened"]


def test_tar_report_keeps_a_bounded_list_and_counts_the_rest():
    """A mount gone bad can make tar complain about millions of files: the manifest lists the
    first ones and says how many more, and stays far below what readers take (64 MiB)."""
    import json

    from undercloud_backup.core.manifest import PathsSection

    report = archive.TarReport()
    for n in range(25_000):
        report.add(f"tar: srv/node/d{n}: Cannot open: Permission denied")
        report.add(f"tar: var/log/{'é' * 3000}{n}: file changed as we read it")
    assert report.count("unreadable") == 25_000 and len(report.unreadable) == 10_000
    assert report.listed("unreadable")[-1] == "... and 15000 more, not listed"
    assert report.count("changed") == 25_000 and len(report.changed) < 1000  # by characters
    section = PathsSection(root="/", included=["/etc"], absent=[], excluded=[],
                           changed=report.listed("changed"), vanished=report.listed("vanished"),
                           unreadable=report.listed("unreadable"), other=report.listed("other"))
    assert len(json.dumps(section.to_dict(), indent=2).encode()) < 32 << 20


def test_dump_command_is_consistent_and_keeps_the_password_off_argv():
    command = dbdump.dump_command(("keystone", "nova"), options_fd=9, tool="mariadb-dump")
    argv = command.argv
    assert argv[1] == "--defaults-extra-file=/dev/fd/9"
    for option in ("--single-transaction", "--routines", "--events", "--triggers"):
        assert option in argv
    # users and grants go to an object of their own (mariadb --one-database loads this one)
    assert not any(a.startswith("--system") for a in argv)
    assert argv[-3:] == ("--databases", "keystone", "nova")
    assert not any("password" in a for a in argv)


def test_option_file_round_trip(tmp_path):
    cnf = tmp_path / "my.cnf"
    cnf.write_text("[mysqld]\nport=1\n[client]\nhost=db.example\nport=3307\nuser=backup\n"
                   "password='p\"w d'\n!includedir /etc/mysql/conf.d/\n")
    settings = connection.DatabaseSettings.from_option_file(cnf)
    assert (settings.host, settings.port, settings.user, settings.password) == (
        "db.example", 3307, "backup", 'p"w d')
    assert 'password="p\\"w d"' in settings.option_file_text()
    assert "p\"w d" not in repr(settings)


def test_redact():
    assert redact("login s3cret failed", ["s3cret", None, ""]) == "login ******** failed"


def test_insufficient_space_message_says_needed_and_available():
    error = InsufficientSpace(location="/var/tmp", purpose="2 streams", needed="2.0 GiB",
                              available="1.0 GiB")
    assert "need 2.0 GiB, available 1.0 GiB" in str(error)
    assert error.exit_code == 14


# ----------------------------------------------------------------------------- executor
def test_pipeline_fails_when_an_early_stage_fails_like_pipefail():
    producer = Command(("sh", "-c", "echo partial; echo boom >&2; exit 3"), name="producer")
    consumer = Command(("cat",), name="cat")
    with pytest.raises(CommandFailed, match=r"producer failed \(exit status 3\): boom"):
        with Pipeline([producer, consumer], timeout=10) as pipe:
            assert pipe.stdout.read() == b"partial\n"
            pipe.wait()


def test_pipeline_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    # The grandchild would outlive a plain kill of its parent.
    script = f"sleep 60 & echo $! > {pidfile}; wait"
    started = time.monotonic()
    with pytest.raises(CommandTimedOut):
        with Pipeline([Command(("sh", "-c", script), name="sleeper")], timeout=1) as pipe:
            pipe.stdout.read()
            pipe.wait()
    assert time.monotonic() - started < 10
    child = int(pidfile.read_text())
    time.sleep(0.2)
    try:  # gone, or a zombie awaiting a reaper (PID 1 here does not reap)
        with open(f"/proc/{child}/stat") as stat:
            state = stat.read().split(")")[-1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("Z", "gone")


def test_pipeline_refuses_a_secret_on_argv():
    with pytest.raises(ValueError, match="secret"):
        Pipeline([Command(("echo", "hunter2"), name="echo")], timeout=5, secrets=["hunter2"])


def test_pipeline_redacts_secrets_from_errors():
    read_fd, write_fd = os.pipe()
    command = Command(("sh", "-c", f"cat /dev/fd/{read_fd} >&2; exit 1"), name="leaky")
    os.write(write_fd, b"password=hunter2")
    os.close(write_fd)
    with pytest.raises(CommandFailed) as raised:
        with Pipeline([command], timeout=5, secrets=["hunter2"], pass_fds=(read_fd,)) as pipe:
            os.close(read_fd)
            pipe.stdout.read()
            pipe.wait()
    assert "hunter2" not in str(raised.value)
    assert "password=********" in str(raised.value)


def test_capture_returns_output():
    assert capture(Command(("printf", "x y"), name="printf"), timeout=5) == b"x y"


def test_segment_limits_are_checked_before_anything_is_written():
    from undercloud_backup.store.space import SwiftLimits, check_segments

    limits = SwiftLimits(max_object_bytes=5 * 1024**3, max_manifest_segments=1000)
    check_segments({"filesystem archive": 1000 * 1024**2}, 1024**2, limits)  # exactly 1000
    with pytest.raises(ConfigError, match=r"use --segment-size 1\.1 MiB or more"):
        check_segments({"filesystem archive": 1100 * 1024**2}, 1024**2, limits)
    with pytest.raises(ConfigError, match="over Swift's object limit"):
        check_segments({}, 6 * 1024**3, limits)
    check_segments({"x": 10**15}, 1024**2, SwiftLimits())  # a cluster that says nothing


def test_segment_size_is_chosen_per_stream_from_its_size():
    from undercloud_backup.store.space import SwiftLimits, auto_segment_size

    mib, limits = 1024**2, SwiftLimits(max_object_bytes=5 * 1024**3, max_manifest_segments=1000)
    # small and medium streams: 64 MiB, so the upload starts early and spools stay small
    assert auto_segment_size(0, limits) == 64 * mib
    assert auto_segment_size(50 * 1024**3, limits) == 64 * mib
    # 500 GiB of /srv/node: at most 900 of the 1000 segments, in whole MiB
    size = auto_segment_size(500 * 1024**3, limits)
    assert size % mib == 0 and 500 * 1024**3 / size <= 900 and size < 570 * mib
    # a cluster with a lower limit gets bigger segments; none above Swift's object limit
    assert auto_segment_size(500 * 1024**3, SwiftLimits(max_manifest_segments=100)) > 5 * 1024**3
    assert auto_segment_size(10 * 1024**4, limits) == 5 * 1024**3


def test_space_check_counts_the_uploaders_spools_per_stream_of_its_own_size(tmp_path):
    from undercloud_backup.store.space import (
        DATABASE_STREAM,
        FILES_STREAM,
        STAGING_MARGIN,
        SwiftLimits,
        check_space,
    )
    from undercloud_backup.store.upload import SPOOLS_PER_STREAM

    mib = 1024**2
    staging = tmp_path / "staging"
    staging.mkdir()
    limits = SwiftLimits(max_object_bytes=5 * 1024**3, max_manifest_segments=1000)
    # 200 GiB of database: 228 MiB segments; a 4 KiB file stream
    streams = {DATABASE_STREAM: 200 * 1024**3, FILES_STREAM: 4096}
    report = check_space(str(staging), streams, None, limits=limits)
    assert report.database_segment_size == 228 * mib
    assert report.files_segment_size == 64 * mib
    # the uploader's own bound of spools; the tiny file stream never spools more than it makes
    assert report.staging_needed == (SPOOLS_PER_STREAM * 228 * mib + (4096 + 8 * mib + 1)
                                     + STAGING_MARGIN)
    assert f"up to {SPOOLS_PER_STREAM} segments per stream" in report.checks[0]
    fixed = check_space(str(staging), streams, 1024**3, limits=limits)
    assert fixed.database_segment_size == fixed.files_segment_size == 1024**3
    with pytest.raises(ConfigError, match="would need more than Swift's 1000 segments"):
        check_space(str(staging), streams, 64 * mib, limits=limits)
    with pytest.raises(ConfigError, match="more than 0 bytes"):
        check_space(str(staging), streams, 0, limits=limits)


def test_inside_is_the_one_path_in_path_helper():
    assert archive.inside("/etc/keystone", "/etc") and archive.inside("/etc", "/etc")
    assert not archive.inside("/etc2", "/etc") and archive.inside("/anything", "/")
    assert archive.inside("etc/pki", "etc") and archive.inside("etc", "")


@pytest.mark.parametrize("pattern,path,expected", [
    ("/*", "/etc", True), ("/", "/home/stack", True), ("/etc", "/etc/keystone", True),
    ("/home/*", "/home/stack", True), ("/et*", "/etc", True), ("/e", "/etc", False),
    ("/srv/node/*/tmp", "/srv/node", False), ("/etc/keystone", "/etc", False),
])
def test_excludes_follows_tars_anchored_patterns(pattern, path, expected):
    assert archive.excludes(pattern, path) is expected


@pytest.mark.parametrize("exclude", ["/*", "/", "/etc", "/e*"])
def test_excluding_every_path_is_an_error_not_an_empty_archive(tmp_path, exclude):
    from undercloud_backup.backup.run import BackupRequest, plan_files

    (tmp_path / "etc").mkdir()
    request = BackupRequest(backup_id="b", created_at="t", hostname="h", root=str(tmp_path),
                            exclude_paths=(exclude,))
    with pytest.raises(ConfigError, match="leaves out every path to back up"):
        plan_files(request)
    (tmp_path / "root").mkdir()
    if exclude in ("/etc", "/e*"):  # /root is left: the plan says only what tar archives
        assert plan_files(request).included == ("/root",)


def test_a_pipeline_tells_how_much_a_stage_has_read():
    """Progress counts what the compressor took in (the estimate is of uncompressed bytes)."""
    size = 3 * 1024 * 1024
    producer = Command(("sh", "-c", f"head -c {size} /dev/zero; sleep 2"), "producer")
    with Pipeline([producer, Command(("zstd", "-q", "-c"), "zstd")], timeout=30) as pipe:
        deadline = time.monotonic() + 5
        while (pipe.bytes_read(1) or 0) < size and time.monotonic() < deadline:
            time.sleep(0.01)
        read = pipe.bytes_read(1)
        assert pipe.stdout is not None
        compressed = pipe.stdout.read()
        pipe.wait()
    assert read is not None and size <= read < size + 64 * 1024
    assert len(compressed) < size // 100
    assert pipe.bytes_read(1) is None and pipe.bytes_read(5) is None


def test_stream_progress_is_what_the_compressor_read_not_what_it_wrote():
    from undercloud_backup.backup import stages

    size = 2 * 1024 * 1024
    producer = Command(("sh", "-c", f"head -c {size} /dev/zero; sleep 1"), "producer")
    seen: list[tuple[int, int | None]] = []
    with Pipeline([producer, stages.zstd_command(3)], timeout=30) as pipe:
        report = stages._reading(pipe, lambda sent, elapsed, read: seen.append((sent, read)))
        deadline = time.monotonic() + 5
        while (pipe.bytes_read(1) or 0) < size and time.monotonic() < deadline:
            time.sleep(0.01)
        report(0, 0)
        assert pipe.stdout is not None
        sent = len(pipe.stdout.read())
        pipe.wait()
        report(sent, 1)  # after zstd exited: what it read is still known
    assert sent < size // 100
    assert seen[0][1] is not None and seen[0][1] >= size
    assert seen[-1] == (sent, seen[0][1])


# ------------------------------------------------- flow-run heartbeats (flows/heartbeats.py)
class _Engine:
    """What the heartbeat thread uses of Prefect's flow run engine."""

    def __init__(self, every: int | None) -> None:
        import logging
        import types

        self.heartbeat_seconds, self.beats = every, []
        self.flow_run = types.SimpleNamespace(state=None)
        self.logger = logging.getLogger("test-heartbeats")

    def _build_heartbeat_event_template(self):
        return "resource", ["related"]

    def _emit_flow_run_heartbeat(self, resource, related):
        self.beats.append((resource, related))


def _beating() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "flow-run-heartbeats"]


def test_flow_runs_use_heartbeats_that_stop_with_the_run():
    import types

    from prefect import flow_engine

    import flows  # noqa: F401 - installs them
    from flows import heartbeats

    # Written for the pinned Prefect: an upgrade must look at heartbeats.py again.
    assert flow_engine._send_heartbeats is heartbeats.send_heartbeats
    engine = _Engine(every=30)
    with heartbeats.send_heartbeats(engine):
        deadline = time.monotonic() + 10
        while not engine.beats and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.beats == [("resource", ["related"])]  # one at once, the next in 30 s
    assert not _beating()
    finished = _Engine(every=30)
    finished.flow_run.state = types.SimpleNamespace(is_final=lambda: True)
    with heartbeats.send_heartbeats(finished):
        deadline = time.monotonic() + 10  # the thread sees the final state and ends by itself
        while time.monotonic() < deadline and _beating():
            time.sleep(0.05)
        assert finished.beats == []  # none once the run is over
    off = _Engine(every=None)
    with heartbeats.send_heartbeats(off):
        assert not _beating()


def test_a_snapshot_that_decompresses_beyond_the_bound_is_refused_not_held():
    """A planted zstd bomb in place of tar's snapshot: 1.5 KB that would expand to 50 MB."""
    import subprocess

    from undercloud_backup.core.errors import ObjectTooLarge
    from undercloud_backup.files import chain

    bomb = subprocess.run("head -c 50000000 /dev/zero | zstd -q -19", shell=True, check=True,
                          capture_output=True).stdout
    assert len(bomb) < 4096
    with pytest.raises(ObjectTooLarge, match="larger than a tar snapshot ever is"):
        chain.decompress(bomb, limit=1 << 20)
    assert chain.decompress(bomb) == bytes(50000000)  # within the default bound: whole
