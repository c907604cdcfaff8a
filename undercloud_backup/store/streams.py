"""Plumbing a stored object into a consumer: Swift -> reader -> [age -d] -> zstd -d -> consumer.

The reader (:mod:`undercloud_backup.store.reader`) runs in a worker thread and writes checked bytes
into the decompressor's stdin (an encrypted ``.age`` object's into ``age -d -i IDENTITY``
first, with the identity of :func:`crypto.decrypting`: checked bytes only, so age never sees
a byte the manifest does not vouch for); this thread either hands the decompressed stream to the
consumer directly or pumps it through a line filter (the dump gate, a database filter), and
optionally reads what the consumer prints. Every process is started by
:mod:`undercloud_backup.core.execute`; memory stays bounded whatever the object's size.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Protocol

from undercloud_backup.core.errors import BackupError, CommandFailed, CommandTimedOut
from undercloud_backup.core.execute import Command, Pipeline, StageResult
from undercloud_backup.core.manifest import StoredObject
from undercloud_backup.store.reader import (
    READ_CHUNK,
    ObjectCheck,
    ObjectDamaged,
    read_collecting,
    read_strict,
)
from undercloud_backup.trust import crypto, signing


class LineFilter(Protocol):
    """What a stream passes through on its way into a consumer (a dump's gate, a filter)."""

    def feed(self, data: bytes) -> bytes: ...
    def finish(self) -> bytes: ...


def unzstd_command() -> Command:
    return Command(argv=("zstd", "-d", "-c", "-q"), name="zstd -d")


@dataclass
class StreamOutcome:
    """How streaming an object into a consumer went: the object, then each pipe's fate."""

    check: ObjectCheck
    inflate_error: BackupError | None
    consumer_error: BackupError | None
    results: list[StageResult]
    filter_error: BackupError | None = None  # the line filter refused the stream
    decrypt_error: BackupError | None = None  # age refused the object (key, authentication)

    @property
    def first_failure(self) -> BackupError | None:
        """A refusal by age first (what followed it saw a truncated stream), then by the
        filter (the consumer then saw an empty stream, and the decompressor a closed pipe);
        else the consumer's complaint, which usually says most (e.g. the SQL error and
        line)."""
        return (self.decrypt_error or self.filter_error or self.consumer_error
                or self.inflate_error)

    def reason(self) -> str:
        """The failure in one line: for ``mariadb``, its ``ERROR ... at line N`` alone (it
        also echoes the failing statement, which can be a megabyte of INSERT)."""
        failure = self.first_failure
        if failure is None:
            return ""
        if failure is self.consumer_error:
            for result in self.results:
                errors = [line for line in result.stderr_lines if line.startswith("ERROR ")]
                if errors:
                    return (f"{result.command.name} exited with status {result.status}: "
                            f"{errors[-1][:500]}")
        return str(failure)


@dataclass(frozen=True)
class Consumer:
    """Where the decompressed stream goes, and what is watched of it."""

    commands: Sequence[Command]
    line_filter: LineFilter | None = None
    read_output: Callable[[IO[bytes]], None] | None = None
    on_stderr: dict[int, Callable[[str], None]] | None = None
    secrets: Iterable[str | None] = ()
    pass_fds: Sequence[int] = ()
    after_start: Callable[[], None] | None = None


def _outcome(pipe: Pipeline) -> BackupError | None:
    try:
        pipe.wait()
    except (CommandFailed, CommandTimedOut) as error:
        return error
    return None


def _feed(read: Callable[[IO[bytes]], ObjectCheck], fd: int) -> ObjectCheck:
    out = os.fdopen(fd, "wb")
    try:
        return read(out)
    finally:
        try:
            out.close()
        except OSError:  # the consumer is gone: nothing left to flush into
            pass


def stream_object(store, container: str, obj: StoredObject, consumer: Consumer, *,
                  timeout: float, strict: bool, spool_dir: str | None = None) -> StreamOutcome:
    """Stream ``obj`` through ``zstd -d`` (``age -d | zstd -d`` when encrypted) into
    ``consumer``.

    ``strict`` reads as a restore does (a damaged part raises before its bytes go on);
    otherwise as a verification (every problem recorded in the outcome's check). Nothing is
    raised for a failing process: the outcome says who failed. Errors of the reader (Swift
    unreachable, a damaged object while restoring) and of the filter are raised after every
    process is reaped. Encrypted objects: no identity in force is exit 59 before a byte is
    read; a damaged object, or one age refuses, raises (strict) :class:`signing.ObjectTampered`
    or :class:`crypto.WrongIdentity` naming it.
    """
    if consumer.line_filter is not None and consumer.read_output is not None:
        raise ValueError("a line filter and an output reader cannot be combined")
    decrypt = crypto.decrypt_commands(obj)
    stop = threading.Event()

    def read(out: IO[bytes]) -> ObjectCheck:
        if strict:
            return read_strict(store, container, obj, out, spool_dir=spool_dir, stop=stop)
        return read_collecting(store, container, obj, out, stop=stop)

    read_fd, write_fd = os.pipe()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"read-{obj.leaf}")
    try:
        with Pipeline([*decrypt, unzstd_command()], timeout=timeout, stdin=read_fd) as inflate:
            os.close(read_fd)
            read_fd = -1
            reading = pool.submit(_feed, read, write_fd)
            write_fd = -1
            consumer_error, results, filter_error = _consume(inflate, consumer, timeout)
            inflate_error = _outcome(inflate)
    except BaseException:
        stop.set()  # leaving on an exception: do not wait for the rest of the object
        raise
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        # A verification keeps checking the parts after a damaged one: wait for those verdicts.
        pool.shutdown(wait=not stop.is_set())
    try:
        check = reading.result()
    except ObjectDamaged as error:
        if not decrypt:
            raise
        raise signing.ObjectTampered(name=obj.name, backup_id=obj.name.partition("/")[0],
                                    detail=error.fields.get("detail")) from None
    decrypt_error = crypto.stream_decryption_error(inflate_error, obj) if decrypt else None
    if decrypt_error is not None and strict:
        raise decrypt_error
    return StreamOutcome(check=check, inflate_error=inflate_error,
                         consumer_error=consumer_error, results=results,
                         filter_error=filter_error, decrypt_error=decrypt_error)


def _consume(inflate: Pipeline, consumer: Consumer, timeout: float
             ) -> tuple[BackupError | None, list[StageResult], BackupError | None]:
    """Run the consumer on the decompressed stream: its error and results (not raised),
    and the filter's refusal, if any (the consumer then sees an empty stream)."""
    assert inflate.stdout is not None
    filter_error = None
    filter_read = filter_write = -1
    if consumer.line_filter is not None:
        filter_read, filter_write = os.pipe()
    try:
        with Pipeline(consumer.commands, timeout=timeout,
                      stdin=inflate.stdout if consumer.line_filter is None else filter_read,
                      stdout=subprocess.PIPE if consumer.read_output else subprocess.DEVNULL,
                      on_stderr=consumer.on_stderr, secrets=consumer.secrets,
                      pass_fds=consumer.pass_fds) as consume:
            if consumer.after_start is not None:
                consumer.after_start()
            if consumer.line_filter is None:
                inflate.stdout.close()  # the consumer holds it; EOF/EPIPE propagate
            else:
                os.close(filter_read)
                filter_read = -1
                fd, filter_write = filter_write, -1
                try:
                    _pump(inflate.stdout, fd, consumer.line_filter)
                except BackupError as error:
                    filter_error = error
            if consumer.read_output is not None:
                assert consume.stdout is not None
                consumer.read_output(consume.stdout)
            return _outcome(consume), list(consume.results), filter_error
    finally:
        for fd in (filter_read, filter_write):
            if fd >= 0:
                os.close(fd)


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
