"""A restore through the binary log: the newest full dump before a point, then the shipped logs.

:func:`plan_to_end` replays a nightly's chain to its end point; :func:`plan_until` finds, among a
host's backups, the full dump before a time (or a GTID) and the shipped logs after it. Both are
decided before anything is written: a point no shipped log reaches, a link missing from the
chain or a gap between log files is refused, naming what can be reached. :func:`replay`
runs ``mariadb-binlog`` over the logs, downloaded (each checked against the manifest as every
object is) into a private directory, into ``mariadb --sandbox``; :func:`prefetched` downloads
them while the dump loads. Nothing replays past a gap.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from undercloud_backup.core.errors import BackupError, BackupNotFound
from undercloud_backup.core.execute import Command, Pipeline
from undercloud_backup.core.manifest import Manifest, StoredObject
from undercloud_backup.db import binlog
from undercloud_backup.files import confine
from undercloud_backup.store import catalogue
from undercloud_backup.store.reader import ObjectDamaged
from undercloud_backup.store.streams import Consumer, stream_object

UNTIL_FORMAT = "%Y-%m-%d %H:%M:%S"
BINLOG, BINLOG_CONTENT = binlog.BINLOG, binlog.BINLOG_CONTENT


class PointInTimeUnreachable(BackupError):
    """{point} cannot be restored: {reason}. Nothing was written."""

    exit_code = 80


class LogChainBroken(BackupError):
    """The binary log of {backup_id} cannot be replayed: {reason}. Nothing was replayed past it; restore an earlier point or the full dump alone."""  # noqa: E501

    exit_code = 81


@dataclass
class ReplayPlan:
    """What a restore through the log loads: ``base``'s dump, then ``logs`` from ``start``
    up to ``stop_position`` in the last (an end point) or ``stop_datetime`` / ``stop_gtid``."""

    base: Manifest
    links: list[Manifest]  # the binlog backups whose logs replay, oldest first
    start: binlog.Coordinates
    logs: list[tuple[str, StoredObject]] = field(default_factory=list)
    stop_position: int | None = None
    stop_datetime: str | None = None
    stop_gtid: str | None = None
    end: Manifest | None = None  # the backup whose end point this is (its counts compare)

    @property
    def point(self) -> str:
        if self.stop_datetime:
            return f"{self.stop_datetime} UTC"
        if self.stop_gtid:
            return f"GTID {self.stop_gtid}"
        return f"the end point of {self.end.backup_id if self.end else self.base.backup_id}"

    def describe(self) -> str:
        return (f"full dump {self.base.backup_id}, then {len(self.logs)} binary log file(s) "
                f"of {len(self.links)} backup(s), to {self.point}")

    def objects(self) -> list[StoredObject]:
        return [obj for _, obj in self.logs]


Load = Callable[[str], Manifest]


def parse_until(text: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(text.strip(), UNTIL_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        raise PointInTimeUnreachable(point=repr(text), reason="not a time as YYYY-MM-DD "
                                     "HH:MM:SS (UTC)") from None


def _when(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text, UNTIL_FORMAT).replace(tzinfo=dt.UTC)
    except (TypeError, ValueError):
        return None


def _end(manifest: Manifest) -> binlog.Coordinates | None:
    return binlog.Coordinates.from_dict(manifest.mariadb.end if manifest.mariadb else None)


def _number(file: str) -> int:
    match = re.search(r"\.(\d+)$", file)
    return int(match.group(1)) if match else -1


def chain_to(manifest: Manifest, load: Load) -> list[Manifest]:
    """The backups from the full dump to ``manifest``, oldest first, each link checked."""
    links = [manifest]
    while links[0].mariadb is not None and links[0].mariadb.kind == binlog.BINLOG:
        child = links[0]
        assert child.mariadb is not None
        parent_id = child.mariadb.parent or ""
        try:
            parent = load(parent_id)
        except BackupNotFound:
            raise LogChainBroken(backup_id=manifest.backup_id,
                                 reason=f"the backup {parent_id} it replays on is gone") from None
        if parent.mariadb is None or parent.hostname != child.hostname:
            raise LogChainBroken(backup_id=manifest.backup_id,
                                 reason=f"{parent_id} holds no database part of this host")
        if _end(parent) != binlog.Coordinates.from_dict(child.mariadb.start):
            raise LogChainBroken(backup_id=manifest.backup_id,
                                 reason=f"{child.backup_id} does not start where {parent_id} "
                                        "ends (a gap)")
        links.insert(0, parent)
        if len(links) > 100_000:
            raise LogChainBroken(backup_id=manifest.backup_id, reason="the chain loops")
    return links


def _logs(links: list[Manifest], last_file: str | None) -> list[tuple[str, StoredObject]]:
    """Every shipped file of the chain once, in order, checked for gaps, up to ``last_file``."""
    base, rest = links[0], links[1:]
    start = _end(base)
    assert start is not None
    logs: list[tuple[str, StoredObject]] = []
    for link in rest:
        assert link.mariadb is not None
        for entry in link.mariadb.binlogs:
            log = binlog.ShippedLog.from_dict(entry)
            obj = next((o for o in link.objects if o.name == log.object), None)
            if obj is None:
                raise LogChainBroken(backup_id=link.backup_id,
                                     reason=f"its manifest lists {log.file} without an object")
            expected = logs[-1][0] if logs else None
            if expected is None and log.file != start.file or \
                    expected is not None and _number(log.file) != _number(expected) + 1:
                raise LogChainBroken(backup_id=link.backup_id,
                                     reason=f"{log.file} does not follow "
                                            f"{expected or 'the dump start ' + start.file}")
            logs.append((log.file, obj))
            if log.file == last_file:
                return logs
    return logs


def plan_to_end(manifest: Manifest, load: Load) -> ReplayPlan:
    """The replay that brings ``manifest``'s chain to its end point."""
    links = chain_to(manifest, load)
    end = _end(manifest)
    start = _end(links[0])
    if end is None or start is None:
        raise LogChainBroken(backup_id=manifest.backup_id, reason="no coordinates recorded")
    return ReplayPlan(base=links[0], links=links[1:], start=start,
                      logs=_logs(links, end.file), stop_position=end.position, end=manifest)


def _host_backups(store, container: str, hostname: str | None, load: Load) -> list[Manifest]:
    manifests = []
    for entry in catalogue.list_backups(store, container):
        try:
            manifest = load(entry.backup_id)
        except (BackupNotFound, ValueError, ObjectDamaged):
            continue
        if manifest.mariadb is not None and _end(manifest) is not None and \
                (hostname is None or manifest.hostname == hostname):
            manifests.append(manifest)
    return manifests


def plan_until(store, container: str, hostname: str | None, load: Load, *,
               until: dt.datetime | None = None, until_gtid: str | None = None) -> ReplayPlan:
    """The newest full dump before ``until`` (or ``until_gtid``) and the logs after it."""
    manifests = _host_backups(store, container, hostname, load)
    point = (f"{until.strftime(UNTIL_FORMAT)} UTC" if until else f"GTID {until_gtid}")
    dumps = [m for m in manifests if m.mariadb and m.mariadb.kind == binlog.DUMP]
    if not dumps:
        raise PointInTimeUnreachable(point=point, reason="no full dump with binary-log "
                                     "coordinates in the container")
    reachable = _reachable(manifests)
    chosen = _choose_dump(dumps, until, until_gtid)
    if chosen is None:
        first = _end(dumps[0])
        raise PointInTimeUnreachable(point=point, reason=(
            f"it is before the first full dump ({dumps[0].backup_id}, "
            f"{first.time if first else '?'} UTC); the newest point that can be reached is "
            f"{reachable}"))
    links = [chosen]
    children = {m.mariadb.parent: m for m in manifests
                if m.mariadb and m.mariadb.kind == binlog.BINLOG}
    while not _covers(links[-1], until, until_gtid):
        child = children.get(links[-1].backup_id)
        if child is None:
            last = _end(links[-1])
            raise PointInTimeUnreachable(point=point, reason=(
                f"no shipped binary log reaches it: the log after the full dump "
                f"{chosen.backup_id} ends at {last.time if last else '?'} UTC "
                f"({links[-1].backup_id}); the newest point that can be reached is "
                f"{reachable}"))
        links.append(child)
    full = chain_to(links[-1], lambda backup_id: next(
        m for m in links if m.backup_id == backup_id))
    last_end = _end(links[-1])
    logs = _logs(full, last_end.file if last_end else None)
    start = _end(chosen)
    assert start is not None
    return ReplayPlan(base=chosen, links=links[1:], start=start, logs=logs,
                      stop_datetime=until.strftime(UNTIL_FORMAT) if until else None,
                      stop_gtid=until_gtid,
                      stop_position=last_end.position if until_gtid and last_end else None)


def _seq(gtid: str) -> int:
    parts = gtid.split(",")[0].strip().split("-")
    return int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else -1


def _choose_dump(dumps: list[Manifest], until: dt.datetime | None,
                 until_gtid: str | None) -> Manifest | None:
    chosen = None
    for manifest in dumps:
        end = _end(manifest)
        assert end is not None
        if until is not None:
            when = _when(end.time)  # its snapshot may hold events of that very second
            if when is not None and when < until:
                chosen = manifest
        elif until_gtid is not None and 0 <= _seq(end.gtid) <= _seq(until_gtid):
            chosen = manifest
    return chosen


def _covers(manifest: Manifest, until: dt.datetime | None, until_gtid: str | None) -> bool:
    end = _end(manifest)
    assert end is not None
    if until is not None:
        when = _when(end.time)
        return when is not None and when >= until
    return _seq(end.gtid) >= _seq(until_gtid or "")


def _reachable(manifests: list[Manifest]) -> str:
    ends = [e for e in (_end(m) for m in manifests) if e is not None]
    newest = max(ends, key=lambda e: e.time, default=None)
    return f"{newest.time} UTC (GTID {newest.gtid})" if newest else "none"


# ------------------------------------------------------------------------------- replaying
def _download(store, container: str, obj: StoredObject, path: str, timeout: float,
              spool_dir: str) -> None:
    outcome = stream_object(store, container, obj, Consumer(
        [Command(argv=("dd", f"of={path}", "bs=1M", "status=none"), name="dd")]),
        timeout=timeout, strict=True, spool_dir=spool_dir)
    failure = outcome.first_failure
    if failure is not None:
        raise failure


OpenClient = Callable[[], tuple[Command, tuple[int, ...]]]
Fetched = Callable[[], list[str]]


def _download_all(store, container: str, plan: ReplayPlan, directory: str, timeout: float,
                  staging_dir: str, stop: threading.Event | None = None) -> list[str]:
    paths = []
    for file, obj in plan.logs:
        if stop is not None and stop.is_set():
            break  # the load failed: nothing will replay
        path = os.path.join(directory, file)
        try:
            _download(store, container, obj, path, timeout, staging_dir)
        except ObjectDamaged as error:
            raise LogChainBroken(backup_id=obj.name.partition("/")[0],
                                 reason=str(error)) from None
        paths.append(path)
    return paths


def _replay_directory(staging_dir: str) -> str:
    """A new directory of ours, under a random name, in ``staging_dir`` reached only through
    names no other user can change (a planted link or another user's directory: exit 65)."""
    return tempfile.mkdtemp(prefix="undercloud-replay-", dir=confine.secure_staging(staging_dir))


@contextmanager
def prefetched(store, container: str, plan: ReplayPlan, *, timeout: float,
               staging_dir: str) -> Iterator[Fetched]:
    """The plan's logs downloaded (each checked) in a thread of its own, with its own Swift
    connection, while the caller loads the dump: only the replay itself then waits for the
    load. Yields what :func:`replay` takes as ``fetched``: it waits for the downloads and
    raises what they raised. The files are removed on the way out, whatever happened."""
    directory = _replay_directory(staging_dir)
    stop = threading.Event()
    worker = None
    try:
        worker = store.clone() if plan.logs else None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="binlog-fetch") as pool:
            # in the caller's context: the identity that decrypts is a context variable
            future = pool.submit(contextvars.copy_context().run, _download_all, worker,
                                 container, plan, directory, timeout, staging_dir,
                                 stop) if plan.logs else None
            try:
                yield (lambda: future.result()) if future is not None else list
            finally:
                stop.set()  # a download under way finishes; the next ones do not start
    finally:
        if worker is not None:
            worker.close()
        shutil.rmtree(directory, ignore_errors=True)


def replay(store, container: str, plan: ReplayPlan, open_client: OpenClient, *,
           databases: Sequence[str] | None, timeout: float, staging_dir: str,
           secrets: Sequence[str | None] = (), fetched: Fetched | None = None) -> int:
    """Replay the plan's logs into the client ``open_client`` gives (a command and the
    descriptors it inherits, closed here after it ran); the files replayed. ``fetched``: the
    logs :func:`prefetched` downloads, else they are downloaded (checked) here first.
    ``databases``: only their events (one pass each), else everything."""
    if not plan.logs:
        return 0
    if fetched is None:
        directory = _replay_directory(staging_dir)
        try:
            paths = _download_all(store, container, plan, directory, timeout, staging_dir)
            return _apply(plan, paths, open_client, databases, timeout, secrets)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return _apply(plan, fetched(), open_client, databases, timeout, secrets)


def _apply(plan: ReplayPlan, paths: list[str], open_client: OpenClient,
           databases: Sequence[str] | None, timeout: float,
           secrets: Sequence[str | None]) -> int:
    tool = binlog.binlog_tool()
    for name in (list(databases) if databases else [None]):
        if plan.stop_gtid:
            command = gtid_replay_command(paths, plan.start, plan.stop_gtid, name, tool)
        else:
            command = binlog.replay_command(paths, plan.start.position, plan.stop_position,
                                            plan.stop_datetime, name, tool)
        client, pass_fds = open_client()
        try:
            _pipe(command, client, timeout, pass_fds, secrets, plan.point)
        finally:
            for fd in pass_fds:
                os.close(fd)
    return len(paths)


def gtid_replay_command(paths: list[str], start: binlog.Coordinates, stop_gtid: str,
                        database: str | None, tool: str) -> Command:
    """After the dump's GTID position (its snapshot holds it) up to ``stop_gtid``, inclusive;
    by byte position when the dump recorded no GTID (an empty log)."""
    first = f"--start-position={start.gtid}" if start.gtid else \
        f"--start-position={start.position}"
    return Command(argv=(tool, "--no-defaults", first, f"--stop-position={stop_gtid}",
                         *([f"--database={database}"] if database else []), *paths),
                   name="mariadb-binlog")


def _pipe(producer: Command, client: Command, timeout: float, pass_fds: Sequence[int],
          secrets: Sequence[str | None], point: str) -> None:
    env = dict(os.environ, TZ=binlog.REPLAY_ENV_TZ)
    with Pipeline([producer], timeout=timeout, env=env) as source:
        assert source.stdout is not None
        with Pipeline([client], timeout=timeout, stdin=source.stdout,
                      stdout=subprocess.DEVNULL, pass_fds=pass_fds, secrets=secrets) as sink:
            source.stdout.close()  # the client holds it; EOF and EPIPE propagate
            try:
                sink.wait()
            except BackupError as error:
                raise LogChainBroken(backup_id=f"the chain to {point}", reason=f"replaying "
                                     f"into the server failed: {_reason(sink, error)}") from None
        try:
            source.wait()
        except BackupError as error:
            raise LogChainBroken(backup_id=f"the chain to {point}",
                                 reason=f"mariadb-binlog failed: {error}") from None


def _reason(pipe: Pipeline, error: BackupError) -> str:
    for result in pipe.results:
        errors = [line for line in result.stderr_lines if line.startswith("ERROR ")]
        if errors:
            return errors[-1][:500]
    return str(error)


def files_backup(store, container: str, manifest: Manifest, until: dt.datetime | None,
                 load: Load) -> Manifest | None:
    """The newest backup of ``manifest``'s host with files, created at or before ``until``."""
    if until is None:
        return None
    chosen = None
    for entry in catalogue.list_backups(store, container):
        try:
            candidate = load(entry.backup_id)
        except (BackupNotFound, ValueError, ObjectDamaged):
            continue
        created = candidate.created_at.replace("Z", "+00:00")
        try:
            when = dt.datetime.fromisoformat(created)
        except ValueError:
            continue
        when = when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when
        if candidate.hostname == manifest.hostname and candidate.paths is not None and \
                when <= until:
            chosen = candidate
    return chosen
