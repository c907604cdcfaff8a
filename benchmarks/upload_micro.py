#!/usr/bin/env python3
"""Micro-benchmark of our Swift upload path (``StreamUploader``), one knob at a time.

    .venv/bin/python benchmarks/upload_micro.py FILE [--runs K] [--only a,b]

FILE is a compressed stream (e.g. ``tar ... | zstd > FILE``); it is fed through a pipe, as
zstd's output is in the flow. Each variant is timed with our process's own CPU (all threads)
and the Swift servers' CPU, alternating, so the cost of each knob shows apart from the rest of
the backup. Needs the OS_* variables of the backup user (services.sh's keystone.env).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import hashlib
import os
import queue
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import bench  # noqa: E402 - the sibling script: env file and /proc helpers
import urllib3.connection  # noqa: E402

from undercloud_backup import swift  # noqa: E402
from undercloud_backup.config import swift_settings_from_env  # noqa: E402

MiB = 1024**2
F_SETPIPE_SZ = 1031
CONTAINER = "ucb-bench-micro"


class NoMd5Spool(swift._Spool):
    """A spool that leaves the MD5 to Swift (its ETag answer is then only recorded)."""

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.size += len(chunk)


class NoMd5Uploader(swift.StreamUploader):
    def _put_segment(self, index: int, spool: swift._Spool) -> swift.Segment:
        name = self._segment_name(index)
        spool.file.seek(0)
        etag = self.conn.put_object(self.settings.segment_container, name, spool.file,
                                    content_length=spool.size, chunk_size=swift.READ_CHUNK)
        return swift.Segment(name=name, size=spool.size, etag=etag)


class TwoPutsUploader(swift.StreamUploader):
    """Two segment PUTs in flight per stream (one connection each): while Swift finishes one
    segment (its MD5 check and fsync), the next one is already being sent."""

    WORKERS = 2

    def _hand_over(self, index: int, spool: swift._Spool) -> None:
        if self._worker is None:
            self._queue = queue.Queue(maxsize=self.WORKERS)
            self._workers = [threading.Thread(target=self._loop_with, daemon=True, args=(
                self.conn if n == 0 else swift.connect(self.settings),))
                for n in range(self.WORKERS)]
            for worker in self._workers:
                worker.start()
            self._worker = self._workers[0]
        super()._hand_over(index, spool)

    def _loop_with(self, conn: object) -> None:
        # The base class PUTs with self.conn; a shallow copy carries this thread's connection.
        view = copy.copy(self)
        view.conn = conn  # type: ignore[assignment]
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.put(None)  # the other worker must see the end too
                return
            index, spool = item
            try:
                if self._error is None:
                    self.segments.append(view._put_segment(index, spool))
            except BaseException as error:  # noqa: BLE001 - handed to the reading thread
                self._error = error
            finally:
                spool.close()

    def _finish_worker(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            for worker in self._workers:
                worker.join()
            self._worker = None
        if self._error is not None:
            raise self._error


@contextlib.contextmanager
def patched(obj: object, name: str, value: object) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def blocksize(size: int) -> Iterator[None]:
    """urllib3 sends a file body in ``blocksize`` pieces (16 KiB by default)."""
    original = urllib3.connection.HTTPConnection.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("blocksize", size)
        original(self, *args, **kwargs)

    with patched(urllib3.connection.HTTPConnection, "__init__", init):
        yield


def upload_stream(path: Path, segment: int, *, uploader: type = swift.StreamUploader,
                  pipe_size: int = 0, read_chunk: int = 0) -> None:
    settings = swift_settings_from_env(container=CONTAINER, segment_size=segment)
    conn = swift.connect(settings)
    swift.ensure_containers(conn, settings)
    cat = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    assert cat.stdout is not None
    if pipe_size:
        fcntl.fcntl(cat.stdout.fileno(), F_SETPIPE_SZ, pipe_size)
    up = uploader(conn, settings, f"micro/{time.monotonic_ns()}", staging_dir="/var/tmp",
                  compression="zstd", content="bench")
    with contextlib.ExitStack() as stack:
        if read_chunk:
            stack.enter_context(patched(swift, "READ_CHUNK", read_chunk))
        if uploader is NoMd5Uploader:
            stack.enter_context(patched(swift, "_Spool", NoMd5Spool))
        up.feed(cat.stdout)
    cat.wait()
    if uploader is NoMd5Uploader:  # the SLO ETag of our record needs the per-segment MD5s
        up.segments.sort(key=lambda s: s.name)
        settings_c = settings.container
        entries = [s.slo_entry(settings.segment_container) for s in up.segments]
        import json

        conn.put_object(settings_c, up.name, json.dumps(entries),
                        query_string="multipart-manifest=put")
    else:
        up.commit()


def upload_direct(path: Path, segment: int, md5: bool = True) -> None:
    """Each segment PUT straight from the pipe (chunked transfer), no spool and no re-read.

    What "no per-segment re-reading" would cost us: a failed segment can then only be
    retried by restarting the stream (nothing is kept to re-send).
    """
    import json

    settings = swift_settings_from_env(container=CONTAINER, segment_size=segment)
    conn = swift.connect(settings)
    swift.ensure_containers(conn, settings)
    cat = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    assert cat.stdout is not None
    stream = cat.stdout
    sha = hashlib.sha256()
    entries = []
    base = f"micro/direct-{time.monotonic_ns()}"
    pending = stream.read(MiB)
    index = 0
    while pending:
        digest = hashlib.md5(usedforsecurity=False) if md5 else None
        sent = [0]

        def body(first: bytes = pending, digest=digest, sent=sent):  # type: ignore[no-untyped-def]
            chunk = first
            while chunk:
                sha.update(chunk)
                if digest is not None:
                    digest.update(chunk)
                sent[0] += len(chunk)
                yield chunk
                if sent[0] >= segment:
                    return
                chunk = stream.read(min(MiB, segment - sent[0]))

        name = f"{base}/{index:08d}"
        # A generator body goes out chunked: the last segment's length is not known ahead.
        etag = conn.put_object(settings.segment_container, name, body())
        if digest is not None and etag != digest.hexdigest():
            raise RuntimeError(f"segment {name}: ETag {etag} != MD5 {digest.hexdigest()}")
        entries.append({"path": f"/{settings.segment_container}/{name}", "etag": etag,
                        "size_bytes": sent[0]})
        index += 1
        pending = stream.read(MiB)
    cat.wait()
    conn.put_object(CONTAINER, base, json.dumps(entries), query_string="multipart-manifest=put")


def plain_put(path: Path, _segment: int) -> None:
    """One PUT straight from the file: our client's ceiling, no pipe, no spool."""
    settings = swift_settings_from_env(container=CONTAINER)
    conn = swift.connect(settings)
    swift.ensure_containers(conn, settings)
    with open(path, "rb") as f:
        conn.put_object(CONTAINER, f"micro/plain-{time.monotonic_ns()}", f,
                        content_length=path.stat().st_size, chunk_size=swift.READ_CHUNK)


def hash_only(path: Path, _segment: int) -> None:
    """Read the pipe, SHA-256 and MD5 it, write it to a spool: the non-network half."""
    cat = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    assert cat.stdout is not None
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open("/var/tmp/ucb-micro-spool", "wb") as out:
        while chunk := cat.stdout.read(MiB):
            sha.update(chunk)
            md5.update(chunk)
            out.write(chunk)
    os.unlink("/var/tmp/ucb-micro-spool")
    cat.wait()


VARIANTS: dict[str, Callable[[Path], None]] = {
    "stream_64MiB": lambda p: upload_stream(p, 64 * MiB),
    "stream_16MiB": lambda p: upload_stream(p, 16 * MiB),
    "stream_256MiB": lambda p: upload_stream(p, 256 * MiB),
    "stream_1GiB_default": lambda p: upload_stream(p, 1024 * MiB),
    "stream_64MiB_no_md5": lambda p: upload_stream(p, 64 * MiB, uploader=NoMd5Uploader),
    "stream_64MiB_pipe_1MiB": lambda p: upload_stream(p, 64 * MiB, pipe_size=MiB),
    "stream_64MiB_read_4MiB": lambda p: upload_stream(p, 64 * MiB, read_chunk=4 * MiB),
    "stream_64MiB_blocksize_1MiB": lambda p: _with(blocksize(MiB), upload_stream, p, 64 * MiB),
    "stream_64MiB_two_puts": lambda p: upload_stream(p, 64 * MiB, uploader=TwoPutsUploader),
    "direct_64MiB_no_spool": lambda p: upload_direct(p, 64 * MiB),
    "direct_64MiB_no_spool_no_md5": lambda p: upload_direct(p, 64 * MiB, md5=False),
    "plain_put_from_file": lambda p: plain_put(p, 0),
    "read_hash_spool_only": lambda p: hash_only(p, 0),
}


def _with(cm: contextlib.AbstractContextManager, fn: Callable, *args: object) -> None:
    with cm:
        fn(*args)


def clean(env: dict[str, str]) -> None:
    for name in (CONTAINER, f"{CONTAINER}_segments"):
        subprocess.run(["swift", "delete", name], env=env, capture_output=True, check=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", type=Path)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", default="")
    args = p.parse_args()
    os_env = bench.read_env_file(bench.STATE / "keystone.env")
    os.environ.update(os_env)
    env = bench.base_env(os_env)
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    size = args.file.stat().st_size
    results: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n in names}
    for r in range(args.runs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            clean(env)
            servers0, busy0 = bench.server_ticks({}), bench.busy_ticks()
            u0 = resource.getrusage(resource.RUSAGE_SELF)
            c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.monotonic()
            VARIANTS[name](args.file)
            wall = time.monotonic() - t
            u1 = resource.getrusage(resource.RUSAGE_SELF)
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            servers1, busy1 = bench.server_ticks({}), bench.busy_ticks()
            own = (u1.ru_utime + u1.ru_stime) - (u0.ru_utime + u0.ru_stime)
            cat = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
            servers, _ = bench.server_cpu(servers0, servers1)
            sw = servers.get("swift", 0.0)
            other = (busy1[0] - busy0[0]) / bench.TICK - own - cat - sum(servers.values())
            results[name].append((wall, own, sw, other))
            print(f"{name:<30} {wall:6.2f} s  {size / MiB / wall:6.0f} MiB/s  python cpu "
                  f"{own:5.2f} s  swift cpu {sw:5.2f} s  other {other:5.2f} s", flush=True)
    clean(env)
    print(f"\n| variant ({size / MiB:.0f} MiB) | wall s (median) | MiB/s | python CPU s "
          "| Swift servers CPU s | foreign CPU s |")
    print("|---|---|---|---|---|---|")
    for name in names:
        rows = results[name]
        med = [statistics.median(x[i] for x in rows) for i in range(4)]
        print(f"| {name} | {med[0]:.2f} | {size / MiB / med[0]:.0f} | {med[1]:.2f} "
              f"| {med[2]:.2f} | {med[3]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
