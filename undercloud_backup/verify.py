"""Read a backup back and prove it restores.

Every object is streamed from Swift segment by segment (never whole in memory): each segment's
MD5 is checked against the ETag the manifest recorded for it, so a damaged segment is named,
and the whole object's size and SHA-256 against the manifest. The filesystem archive goes
through ``zstd -d | tar --list`` (every entry readable, every archived path present); the dump
through ``zstd -d | mariadb`` into a throwaway server (:mod:`undercloud_backup.scratchdb`),
whose per-table row counts and checksums are then compared with the manifest's.

:func:`stream_object` is the plumbing restore uses too: Swift -> (spool, check) -> zstd -d ->
an optional line filter -> a consumer pipe, every process started by :mod:`execute`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Protocol

import pymysql
import requests

from undercloud_backup import database as db
from undercloud_backup import swift
from undercloud_backup.backup import DB_OBJECT, FS_OBJECT
from undercloud_backup.errors import (
    BackupError,
    BackupNotFound,
    CommandFailed,
    CommandTimedOut,
    SwiftRequestFailed,
    SwiftUnreachable,
)
from undercloud_backup.execute import Command, Pipeline, StageResult
from undercloud_backup.scratchdb import scratch_mariadb
from undercloud_backup.sizes import format_size

READ_CHUNK = swift.READ_CHUNK
FEEDER_JOIN_S = 120.0
# What a restore of an undercloud cannot do without (docs/restore.md); missing ones are warned
# about when the path that should hold them was archived.
ESSENTIALS: dict[str, str] = {
    "etc/keystone/fernet-keys": "Keystone fernet keys (issued tokens stop validating)",
    "etc/keystone/credential-keys": "Keystone credential keys (stored credentials unreadable)",
    "etc/pki": "certificates and CA anchors",
    "root/.my.cnf": "the MariaDB root password file",
    "home/stack/undercloud.conf": "undercloud.conf (needed to reinstall)",
}


class VerificationFailed(BackupError):
    """Backup {backup_id} failed verification: {summary}"""

    exit_code = 41


class ObjectDamaged(BackupError):
    """{target} is missing or damaged: {detail}; restore from another backup (python -m flows.backup --list)."""  # noqa: E501

    exit_code = 43


# ------------------------------------------------------------------------------ catalogue
def latest_backup(conn, container: str) -> str:
    """The newest complete backup (one with a manifest) in ``container``."""
    entries = swift.list_backups(conn, container)
    if not entries:
        raise BackupNotFound(backup_id="(latest)", container=container)
    return entries[-1].backup_id


def load_manifest(conn, container: str, backup_id: str | None) -> dict:
    """The manifest of ``backup_id``, or of the latest complete backup when it is None."""
    backup_id = backup_id or latest_backup(conn, container)
    try:
        return swift.get_manifest(conn, container, backup_id)
    except SwiftRequestFailed as error:
        if "HTTP 404" in str(error):
            raise BackupNotFound(backup_id=backup_id, container=container) from None
        raise
    except json.JSONDecodeError as error:
        raise ObjectDamaged(target=f"{container}/{swift.manifest_name(backup_id)}",
                            detail=f"not JSON ({error})") from None


def find_object(manifest: dict, leaf: str) -> dict | None:
    return next((o for o in manifest.get("objects", []) if o["name"].endswith("/" + leaf)), None)


# ------------------------------------------------------------------------ reading objects
@dataclass
class ObjectCheck:
    """What reading one object back found; ``problems`` empty means it is exactly as recorded."""

    name: str
    expected_size: int
    expected_sha256: str
    size: int = 0
    sha256: str = ""
    segments_read: int = 0
    complete: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.complete and not self.problems

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _http_status(error: SwiftRequestFailed) -> str:
    return f"{error.fields.get('reason')}, transaction {error.fields.get('transaction_id')}"


class _Parts:
    """The pieces an object is stored as: its segments (SLO) or the object itself."""

    def __init__(self, container: str, record: dict) -> None:
        if record.get("segments"):
            seg_container = record.get("segment_container") or f"{container}_segments"
            self.items = [(seg_container, s["name"], int(s["size"]), _digest(s),
                           f"segment {s['name'].rsplit('/', 1)[-1]} ({seg_container}/{s['name']})")
                          for s in record["segments"]]
        else:  # a plain object: its SHA-256 is the whole object's
            self.items = [(container, record["name"], int(record["size"]), _digest(record),
                           None)]


def _digest(record: dict) -> tuple[str, str]:
    """The strongest checksum recorded of a part: our SHA-256, else Swift's MD5 (its ETag)."""
    return ("sha256", record["sha256"]) if record.get("sha256") else ("md5", record["etag"])


def _check_head(conn, container: str, record: dict, check: ObjectCheck) -> bool:
    """HEAD the object as any Swift client would fetch it; False when it is not there."""
    target = f"{container}/{record['name']}"
    try:
        with swift.swift_errors("HEAD object", target, swift.storage_url(conn)):
            headers = conn.head_object(container, record["name"])
    except SwiftRequestFailed as error:
        if "HTTP 404" in str(error):
            check.problems.append(f"{target}: missing ({_http_status(error)})")
            return False
        raise
    size = int(headers.get("content-length", -1))
    etag = headers.get("etag", "").strip('"')
    if size != record["size"] or etag != record["etag"]:
        check.problems.append(f"{target}: Swift has {size} bytes, etag {etag}; the manifest "
                              f"records {record['size']} bytes, etag {record['etag']}")
    stored_sha = headers.get(swift.SHA256_HEADER.lower())
    if stored_sha and stored_sha != record["sha256"]:
        check.problems.append(f"{target}: metadata sha256 {stored_sha} differs from the "
                              f"manifest's {record['sha256']}")
    return True


def _check_slo_manifest(conn, container: str, record: dict, check: ObjectCheck) -> None:
    """The SLO manifest Swift serves must list exactly the segments our manifest recorded."""
    target = f"{container}/{record['name']}"
    with swift.swift_errors("GET SLO manifest", target, swift.storage_url(conn)):
        _, body = conn.get_object(container, record["name"],
                                  query_string="multipart-manifest=get")
    try:
        served = [(e["name"].split("/", 2)[-1], e["hash"], int(e["bytes"]))
                  for e in json.loads(body)]
    except (ValueError, KeyError, TypeError):
        check.problems.append(f"{target}: not a Static Large Object manifest")
        return
    recorded = [(s["name"], s["etag"], int(s["size"])) for s in record["segments"]]
    if served != recorded:
        check.problems.append(f"{target}: its SLO manifest lists {len(served)} segment(s) that "
                              f"differ from the {len(recorded)} the backup manifest recorded")


def read_object(conn, container: str, record: dict, out: IO[bytes] | None, *,
                spool_dir: str | None = None,
                stop: threading.Event | None = None) -> ObjectCheck:
    """Stream one object, segment by segment, into ``out``, checking it against ``record``.

    Without ``spool_dir`` (verification) bytes flow straight on and every problem is
    collected; after the first bad segment nothing more is written to ``out`` (it is closed,
    so the consumer sees a truncated stream), but every remaining segment is still checked.
    With ``spool_dir`` (restore) each segment is first spooled to an anonymous file and checked,
    so no byte of a damaged segment ever reaches ``out``: the first problem raises
    :class:`ObjectDamaged`. ``out`` is left open for the caller to close, unless it broke.
    """
    name = record["name"]
    check = ObjectCheck(name=name, expected_size=int(record["size"]),
                        expected_sha256=record["sha256"])
    strict = spool_dir is not None
    digest = hashlib.sha256()
    sink: list[IO[bytes] | None] = [out]

    def problem(text: str) -> None:
        check.problems.append(text)
        if strict:
            raise ObjectDamaged(target=f"{container}/{name}", detail=text)
        _close_sink()

    def _close_sink() -> None:
        if sink[0] is not None:
            try:
                sink[0].close()
            except OSError:  # a consumer that already died
                pass
            sink[0] = None

    def deliver(chunk: bytes) -> None:
        digest.update(chunk)
        check.size += len(chunk)
        if sink[0] is not None:
            try:
                sink[0].write(chunk)
            except (BrokenPipeError, ValueError):
                # The consumer stopped reading; its own exit status says why. A restore has
                # no use for the rest, a verification still checks every byte.
                sink[0] = None
                if strict:
                    raise _ConsumerGone() from None

    if not _check_head(conn, container, record, check):
        if strict:
            raise ObjectDamaged(target=f"{container}/{name}", detail=check.problems[-1])
        _close_sink()
        return check
    if strict and check.problems:
        raise ObjectDamaged(target=f"{container}/{name}", detail=check.problems[-1])
    if record.get("segments"):
        _check_slo_manifest(conn, container, record, check)
        if strict and check.problems:
            raise ObjectDamaged(target=f"{container}/{name}", detail=check.problems[-1])

    url = swift.storage_url(conn)
    try:
        for part_container, part_name, size, (algorithm, expected), label in _Parts(
                container, record).items:
            label = label or f"{part_container}/{part_name}"
            part_digest = hashlib.new(algorithm, usedforsecurity=False)
            got = 0
            spool = tempfile.TemporaryFile(dir=spool_dir) if strict else None
            try:
                try:
                    with swift.swift_errors("GET", f"{part_container}/{part_name}", url):
                        _, body = conn.get_object(part_container, part_name,
                                                  resp_chunk_size=READ_CHUNK)
                        for chunk in body:
                            if stop is not None and stop.is_set():
                                check.problems.append(f"{label}: reading was interrupted")
                                return check
                            part_digest.update(chunk)
                            got += len(chunk)
                            if spool is not None:
                                spool.write(chunk)
                            else:
                                deliver(chunk)
                except SwiftRequestFailed as error:
                    if "HTTP 404" not in str(error):
                        raise
                    problem(f"{label}: missing ({_http_status(error)})")
                    continue
                except requests.exceptions.RequestException as error:
                    # A connection dropped mid-body: transient, the task retries the check.
                    raise SwiftUnreachable(service="Swift", url=url,
                                           reason=f"reading {label}: {error}") from None
                check.segments_read += 1
                if got != size or part_digest.hexdigest() != expected:
                    problem(f"{label}: read {got} bytes with {algorithm} "
                            f"{part_digest.hexdigest()}; the manifest records {size} bytes with "
                            f"{algorithm} {expected}")
                    continue
                if spool is not None:
                    spool.seek(0)
                    for chunk in iter(lambda: spool.read(READ_CHUNK), b""):  # noqa: B023
                        deliver(chunk)
            finally:
                if spool is not None:
                    spool.close()
    except _ConsumerGone:
        return check
    check.sha256 = digest.hexdigest()
    check.complete = True
    if check.size != check.expected_size and not check.problems:
        problem(f"{container}/{name}: read {check.size} bytes; the manifest records "
                f"{check.expected_size}")
    elif check.sha256 != check.expected_sha256 and not check.problems:
        problem(f"{container}/{name}: sha256 {check.sha256}; the manifest records "
                f"{check.expected_sha256}")
    return check


class _ConsumerGone(Exception):
    """The process we were feeding exited; stop reading (restore only)."""


# ------------------------------------------------------------------------------ plumbing
def unzstd_command() -> Command:
    return Command(argv=("zstd", "-d", "-c", "-q"), name="zstd -d")


class LineFilter(Protocol):
    def feed(self, data: bytes) -> bytes: ...
    def finish(self) -> bytes: ...


@dataclass
class StreamOutcome:
    """How streaming an object into a consumer went: the object, then each pipe's fate."""

    check: ObjectCheck
    inflate_error: BackupError | None
    consumer_error: BackupError | None
    results: list[StageResult]

    @property
    def first_failure(self) -> BackupError | None:
        """The consumer's complaint usually says most (e.g. the SQL error and line)."""
        return self.consumer_error or self.inflate_error

    def reason(self) -> str:
        """The failure in one line: for ``mariadb``, its ``ERROR ... at line N`` alone (it
        also echoes the failing statement, which can be a megabyte of INSERT)."""
        failure = self.first_failure
        if failure is None:
            return ""
        if self.consumer_error is not None:
            for result in self.results:
                errors = [line for line in result.stderr_lines if line.startswith("ERROR ")]
                if errors:
                    return (f"{result.command.name} exited with status {result.status}: "
                            f"{errors[-1][:500]}")
        return str(failure)


class _Feeder(threading.Thread):
    def __init__(self, conn, container: str, record: dict, fd: int,
                 spool_dir: str | None) -> None:
        super().__init__(daemon=True, name=f"read-{record['name']}")
        self.args = (conn, container, record)
        self.out = os.fdopen(fd, "wb")
        self.spool_dir = spool_dir
        self.stop = threading.Event()
        self.check: ObjectCheck | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.check = read_object(*self.args, self.out, spool_dir=self.spool_dir,
                                     stop=self.stop)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            self.error = error
        finally:
            try:
                self.out.close()
            except OSError:  # the consumer is gone: nothing left to flush into
                pass


def _outcome(pipe: Pipeline) -> BackupError | None:
    try:
        pipe.wait()
    except (CommandFailed, CommandTimedOut) as error:
        return error
    return None


def stream_object(conn, container: str, record: dict, consumer: Sequence[Command], *,
                  timeout: float, spool_dir: str | None = None,
                  line_filter: LineFilter | None = None,
                  read_output: Callable[[IO[bytes]], None] | None = None,
                  on_stderr: dict[int, Callable[[str], None]] | None = None,
                  secrets: Iterable[str | None] = (), pass_fds: Sequence[int] = (),
                  after_start: Callable[[], None] | None = None) -> StreamOutcome:
    """Swift -> ``zstd -d`` -> [``line_filter``] -> ``consumer``, with bounded memory.

    A thread reads the object (see :func:`read_object`; ``spool_dir`` makes it strict) into
    the decompressor; this thread either pumps the decompressed stream through
    ``line_filter`` or hands it to the consumer directly, and ``read_output`` reads what the
    consumer prints. Nothing is raised for a failing process: the outcome says who failed.
    Errors of the reading thread (Swift unreachable, a damaged object while restoring) are
    raised after both pipes are reaped.
    """
    if line_filter is not None and read_output is not None:
        raise ValueError("a line filter and an output reader cannot be combined")
    read_fd, write_fd = os.pipe()
    feeder = _Feeder(conn, container, record, write_fd, spool_dir)
    finished = False
    try:
        with Pipeline([unzstd_command()], timeout=timeout, stdin=read_fd) as inflate:
            os.close(read_fd)
            read_fd = -1
            feeder.start()
            assert inflate.stdout is not None
            filter_read = filter_write = -1
            if line_filter is not None:
                filter_read, filter_write = os.pipe()
            try:
                with Pipeline(consumer, timeout=timeout,
                              stdin=inflate.stdout if line_filter is None else filter_read,
                              stdout=subprocess.PIPE if read_output else subprocess.DEVNULL,
                              on_stderr=on_stderr, secrets=secrets,
                              pass_fds=pass_fds) as consume:
                    if after_start is not None:
                        after_start()
                    if line_filter is None:
                        inflate.stdout.close()  # the consumer holds it; EOF/EPIPE propagate
                    else:
                        os.close(filter_read)
                        filter_read = -1
                        _pump(inflate.stdout, filter_write, line_filter)
                        filter_write = -1
                    if read_output is not None:
                        assert consume.stdout is not None
                        read_output(consume.stdout)
                    consumer_error = _outcome(consume)
                    results = list(consume.results)
            finally:
                for fd in (filter_read, filter_write):
                    if fd >= 0:
                        os.close(fd)
            inflate_error = _outcome(inflate)
        finished = True
    finally:
        if read_fd >= 0:
            os.close(read_fd)
        if not finished:  # leaving on an exception: do not wait for the rest of the object
            feeder.stop.set()
        # Normally the reader is done once zstd saw EOF, except that a verification keeps
        # checking the segments after a damaged one: wait for those verdicts.
        if feeder.ident is not None:
            feeder.join(timeout=None if finished else FEEDER_JOIN_S)
        else:
            feeder.out.close()
    if feeder.error is not None:
        raise feeder.error
    assert feeder.check is not None
    return StreamOutcome(check=feeder.check, inflate_error=inflate_error,
                         consumer_error=consumer_error, results=results)


def _pump(source: IO[bytes], fd: int, line_filter: LineFilter) -> None:
    """Decompressed bytes through the filter into the consumer; stop if it goes away."""
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in iter(lambda: source.read(READ_CHUNK), b""):
                out.write(line_filter.feed(chunk))
            out.write(line_filter.finish())
    except BrokenPipeError:
        pass  # the consumer exited; its status tells why
    finally:
        source.close()


# ------------------------------------------------------------------------------- archive
_ESCAPE = re.compile(rb"\\([0-7]{3}|[\\abfnrtv?])")
_SIMPLE = {b"\\": b"\\", b"a": b"\a", b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r",
           b"t": b"\t", b"v": b"\v", b"?": b"?"}


def unescape_member(raw: bytes) -> str:
    """A member name as ``tar --quoting-style=escape`` prints it, back to the real name."""
    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        return bytes([int(code, 8)]) if len(code) == 3 else _SIMPLE[code]

    return os.fsdecode(_ESCAPE.sub(one, raw))


def tar_list_command() -> Command:
    return Command(argv=("tar", "--list", "--file=-", "--quoting-style=escape", "--xattrs",
                         "--xattrs-include=*", "--acls", "--selinux"), name="tar --list")


def read_members(stream: IO[bytes], on_member: Callable[[str], None]) -> None:
    """Feed every member name tar prints (one per line, directories end in ``/``)."""
    for raw in iter(stream.readline, b""):
        on_member(unescape_member(raw.rstrip(b"\n")))


@dataclass
class ArchiveReport:
    """What ``tar --list`` found in the archive, compared with the manifest's path plan."""

    entries: int = 0
    directories: int = 0
    included: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)
    essentials_found: list[str] = field(default_factory=list)

    def add(self, member: str) -> None:
        self.entries += 1
        if member.endswith("/"):
            self.directories += 1
        bare = member.rstrip("/")
        for path in self.included:
            rel = path.lstrip("/")
            if path not in self.found and (bare == rel or bare.startswith(rel + "/")
                                           or not rel):
                self.found.append(path)
        for essential in ESSENTIALS:
            if essential not in self.essentials_found and (
                    bare == essential or bare.startswith(essential + "/")):
                self.essentials_found.append(essential)

    def missing(self) -> list[str]:
        return [p for p in self.included if p not in self.found]

    def essentials_missing(self) -> list[str]:
        """Essentials whose parent was archived but that the archive does not hold."""
        archived = [p.lstrip("/") for p in self.found]
        return [e for e in ESSENTIALS if e not in self.essentials_found
                and any(not p or e.startswith(p + "/") for p in archived)]


def check_archive(conn, container: str, manifest: dict, record: dict, *,
                  timeout: float) -> dict:
    """Read the archive through ``tar --list``; every entry must be readable to the end."""
    started = time.monotonic()
    report = ArchiveReport(included=list((manifest.get("paths") or {}).get("included", [])))
    tar_errors: list[str] = []
    outcome = stream_object(conn, container, record, [tar_list_command()], timeout=timeout,
                            read_output=lambda out: read_members(out, report.add),
                            on_stderr={0: tar_errors.append})
    problems = list(outcome.check.problems)
    if outcome.first_failure is not None and outcome.check.ok:
        problems.append(f"{record['name']}: the archive is unreadable: {outcome.reason()}")
    elif outcome.first_failure is None:
        for path in report.missing():
            problems.append(f"{record['name']}: {path} was archived but is not in the archive")
    warnings = [f"{e} is not in the backup: {ESSENTIALS[e]}" for e in report.essentials_missing()]
    return {"object": outcome.check.as_dict(), "entries": report.entries,
            "directories": report.directories, "files": report.entries - report.directories,
            "paths_found": report.found, "essentials_found": report.essentials_found,
            "problems": problems, "warnings": warnings,
            "seconds": round(time.monotonic() - started, 2)}


# ------------------------------------------------------------------------------ database
def table_stats(session, databases: Iterable[str],
                checksums: bool = True) -> dict[str, tuple[int, int | None]]:
    """``db.table`` -> (exact row count, ``CHECKSUM TABLE ... EXTENDED`` or None), read as
    the backup read them (:func:`database.table_stats`)."""
    return {f"{t.database}.{t.table}": (t.rows, t.checksum)
            for t in db.table_stats(session, tuple(databases), checksums)}


@dataclass
class TableComparison:
    """Per-table row counts and checksums, as recorded in a manifest and as found."""

    compared: int = 0
    matching: int = 0
    # False when the backup recorded row counts only (--no-table-checksums)
    checksums: bool = True
    differences: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def compare_tables(session, recorded: dict[str, dict], *,
                   ignore: Sequence[str] = ()) -> TableComparison:
    """Compare every table the manifest recorded with what ``session`` sees now.

    ``ignore`` holds ``db.table`` patterns (fnmatch) of tables known to change between the
    manifest's snapshot and the dump's on a live server (heartbeats, for instance).
    """
    result = TableComparison(checksums=any(
        table.get("checksum") is not None
        for info in recorded.values() for table in info.get("tables", [])))
    with session.cursor() as cursor:
        cursor.execute("SHOW DATABASES")
        present = {row[0] for row in cursor.fetchall()}
    found = table_stats(session, [d for d in recorded if d in present], result.checksums)
    expected: set[str] = set()
    for database, info in sorted(recorded.items()):
        if database not in present:
            result.differences.append(f"database {database}: missing after the load")
            continue
        for table in info.get("tables", []):
            name = f"{database}.{table['table']}"
            expected.add(name)
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore):
                result.ignored.append(name)
                continue
            result.compared += 1
            if name not in found:
                result.differences.append(f"table {name}: missing after the load")
                continue
            rows, checksum = found[name]
            if rows != table["rows"]:
                result.differences.append(f"table {name}: {rows} rows, the manifest records "
                                          f"{table['rows']}")
            elif table.get("checksum") is not None and checksum != table["checksum"]:
                result.differences.append(f"table {name}: checksum {checksum}, the manifest "
                                          f"records {table['checksum']}")
            else:
                result.matching += 1
    result.extra = sorted(set(found) - expected)
    return result


def check_database(conn, container: str, manifest: dict, record: dict, *, staging_dir: str,
                   timeout: float, ignore_tables: Sequence[str] = (),
                   logger: logging.Logger | logging.LoggerAdapter | None = None) -> dict:
    """Load the dump into a throwaway MariaDB and compare it table by table with the manifest."""
    log = logger or logging.getLogger(__name__)
    started = time.monotonic()
    recorded = (manifest.get("mariadb") or {}).get("databases", {})
    with scratch_mariadb(staging_dir, lifetime_s=timeout) as server:
        with server.session.cursor() as cursor:
            cursor.execute("SELECT VERSION()")
            scratch_version = cursor.fetchone()[0]
        log.info("loading %s (%s) into a %s on port %d, started in %.1f s", record["name"],
                 format_size(record["size"]), server.where, server.port,
                 time.monotonic() - started)
        load_started = time.monotonic()
        outcome = stream_object(conn, container, record, [server.client_command()],
                                timeout=timeout)
        loaded_in = time.monotonic() - load_started
        problems = list(outcome.check.problems)
        failure = outcome.first_failure
        comparison = TableComparison()
        if failure is not None:
            problems.append(f"loading the dump into a scratch MariaDB failed: {outcome.reason()}")
        elif outcome.check.ok:
            log.info("dump loaded in %.1f s; comparing %d database(s) with the manifest",
                     loaded_in, len(recorded))
            try:
                comparison = compare_tables(server.session, recorded, ignore=ignore_tables)
            except pymysql.err.MySQLError as error:
                problems.append(f"comparing the loaded tables failed: {error}")
            problems += comparison.differences
    warnings = [f"table {name} was loaded but the manifest has no record of it"
                for name in comparison.extra]
    backup_version = (manifest.get("mariadb") or {}).get("version", "")
    if backup_version and backup_version.split(".")[:2] != scratch_version.split(".")[:2]:
        warnings.append(f"the dump comes from MariaDB {backup_version} and was loaded into "
                        f"{scratch_version}; checksums may differ between versions")
    return {"object": outcome.check.as_dict(), "loaded": failure is None and outcome.check.ok,
            "load_seconds": round(loaded_in, 2), "scratch_version": scratch_version,
            "databases": len(recorded), **comparison.as_dict(), "problems": problems,
            "warnings": warnings, "seconds": round(time.monotonic() - started, 2)}


def check_plain(conn, container: str, record: dict) -> dict:
    """Read an object we have no deeper check for: sizes and checksums only."""
    check = read_object(conn, container, record, None)
    return {"object": check.as_dict(), "problems": list(check.problems), "warnings": []}


# ---------------------------------------------------------------------------- the report
def summarize(manifest: dict, container: str, results: dict[str, dict],
              seconds: float) -> dict:
    """One verdict from the per-object checks; ``ok`` is True only if nothing differed."""
    problems = [p for r in results.values() for p in r.get("problems", [])]
    warnings = [w for r in results.values() for w in r.get("warnings", [])]
    recorded = {o["name"] for o in manifest.get("objects", [])}
    for name in sorted(recorded - set(results)):
        problems.append(f"{name}: not checked")
    return {
        "backup_id": manifest["backup_id"], "container": container,
        "created_at": manifest.get("created_at"), "ok": not problems,
        "problems": problems, "warnings": warnings,
        "objects": [r["object"] for r in results.values()],
        "archive": next((_without(r, "object") for r in results.values()
                         if "entries" in r), None),
        "database": next((_without(r, "object") for r in results.values()
                          if "loaded" in r), None),
        "seconds": round(seconds, 1),
    }


def _without(result: dict, key: str) -> dict:
    return {k: v for k, v in result.items() if k != key}


def short_summary(report: dict, limit: int = 3) -> str:
    problems = report["problems"]
    text = "; ".join(problems[:limit])
    if len(problems) > limit:
        text += f" (and {len(problems) - limit} more)"
    return text


def kind_of(record: dict) -> str:
    """Which check an object gets: ``archive``, ``database`` or ``plain``."""
    leaf = record["name"].rsplit("/", 1)[-1]
    if record.get("content") == "tar" or leaf == FS_OBJECT:
        return "archive"
    if record.get("content") == "mariadb-dump" or leaf == DB_OBJECT:
        return "database"
    return "plain"
