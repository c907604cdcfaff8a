"""The one place where subprocesses are started.

Commands arrive as data (:class:`Command`, built by pure functions elsewhere). A :class:`Pipeline`
joins them stdout-to-stdin like a shell pipe with ``pipefail``: every stage's exit status is
checked, the whole tree lives in one process group that is killed on timeout, error or
cancellation, stderr is collected per stage and secrets are redacted from everything that leaves.
Every child also dies with this process (``PR_SET_PDEATHSIG``, set by ``setpriv`` in the child:
Python's ``preexec_fn`` can deadlock a child forked while other threads run), and
:func:`kill_all` stops every live pipeline at once (an interrupted run).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

from undercloud_backup.core.errors import CommandFailed, CommandTimedOut, SudoRefused, redact

KILL_GRACE_SECONDS = 5.0
MAX_STDERR_LINES = 10_000
# Every pipeline between __enter__ and its reaping; kill_all() stops them on an interruption.
_LIVE: set[Pipeline] = set()
_LIVE_LOCK = threading.Lock()
_TRACKERS = threading.local()


@functools.cache
def _die_with_parent() -> tuple[str, ...]:
    """The argv prefix that makes a child get SIGKILL when the thread that started it ends,
    whatever killed it: util-linux's ``setpriv --pdeathsig`` sets it and execs the command
    (empty where setpriv is too old to). The kernel drops it on a set-uid exec (sudo): such a
    child ends by SIGPIPE once the stage reading its output (zstd, or us) is gone."""
    setpriv = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")
    if setpriv is None:
        return ()
    probe = subprocess.run([setpriv, "--help"], capture_output=True, text=True, check=False)
    return (setpriv, "--pdeathsig", "KILL", "--") if "--pdeathsig" in probe.stdout else ()


def kill_all() -> int:
    """Stop every live pipeline (SIGTERM, then SIGKILL after a grace); return how many."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    threads = [threading.Thread(target=p.kill, daemon=True) for p in live]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(KILL_GRACE_SECONDS + 1)
    return len(live)


class Tracker:
    """The pipelines started by one thread inside :func:`tracked`, to stop from another."""

    def __init__(self) -> None:
        self.pipelines: list[Pipeline] = []
        self.stopped = False

    def kill(self) -> None:
        self.stopped = True
        for pipeline in list(self.pipelines):
            pipeline.kill()


@contextmanager
def tracked() -> Iterator[Tracker]:
    """Record the pipelines this thread starts in the block, so another thread can stop them."""
    tracker = Tracker()
    stack = getattr(_TRACKERS, "stack", None) or []
    _TRACKERS.stack = [*stack, tracker]
    try:
        yield tracker
    finally:
        _TRACKERS.stack = stack


@dataclass(frozen=True)
class Command:
    """A command line, built as data so it can be inspected and tested without running it."""

    argv: tuple[str, ...]
    name: str
    ok_statuses: frozenset[int] = frozenset({0})

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("empty command")

    @property
    def uses_sudo(self) -> bool:
        return self.argv[0] == "sudo"


@dataclass
class StageResult:
    command: Command
    status: int | None = None
    stderr_lines: list[str] = field(default_factory=list)
    stderr_dropped: int = 0

    def stderr_tail(self, lines: int = 5) -> str:
        return " | ".join(line for line in self.stderr_lines[-lines:] if line) or "no output"


def _read_lines(stream: IO[bytes], result: StageResult, on_line: Callable[[str], None] | None):
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if len(result.stderr_lines) < MAX_STDERR_LINES:
            result.stderr_lines.append(line)
        else:
            result.stderr_dropped += 1
        if on_line is not None:
            on_line(line)
    stream.close()


class Pipeline:
    """Run ``commands`` as ``c1 | c2 | ...``; the caller reads the last stage's ``stdout``.

    Use as a context manager. Leaving the block with an exception kills the whole process group;
    :meth:`wait` reaps every stage and raises :class:`CommandFailed` for the first stage (in pipe
    order) whose status is not acceptable.
    """

    def __init__(
        self,
        commands: Sequence[Command],
        *,
        timeout: float | None,
        secrets: Iterable[str | None] = (),
        pass_fds: Sequence[int] = (),
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
        stdout: int | IO[bytes] | None = subprocess.PIPE,
        on_stderr: dict[int, Callable[[str], None]] | None = None,
        env: dict[str, str] | None = None,
        survive_interrupt: bool = False,
    ) -> None:
        self.commands = list(commands)
        # kill_all() leaves it running (a server the interrupted run still reports to)
        self.survive_interrupt = survive_interrupt
        self.timeout = timeout
        self.secrets = [s for s in secrets if s]
        for command in self.commands:
            for arg in command.argv:
                if any(secret in arg for secret in self.secrets):
                    raise ValueError(f"refusing to put a secret on the argv of {command.name}")
        self.pass_fds = tuple(pass_fds)
        self.stdin = stdin
        self.stdout_target = stdout
        self.on_stderr = on_stderr or {}
        self.env = env
        self.processes: list[subprocess.Popen] = []
        self.results = [StageResult(command) for command in self.commands]
        self.stdout: IO[bytes] | None = None
        self._readers: list[threading.Thread] = []
        self._timer: threading.Timer | None = None
        self.timed_out = False
        self.pgid: int | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Pipeline:
        if not self.survive_interrupt:
            with _LIVE_LOCK:
                _LIVE.add(self)
        trackers = getattr(_TRACKERS, "stack", None) or ()
        for tracker in trackers:
            tracker.pipelines.append(self)
        try:
            self._start()
        except BaseException:
            self.kill()
            self._reap()
            raise
        if any(tracker.stopped for tracker in trackers):
            self.kill()  # stopped while starting
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.kill()
        self._reap()

    def _start(self) -> None:
        previous_stdout: IO[bytes] | None = None
        last = len(self.commands) - 1
        for index, command in enumerate(self.commands):
            stdin = self.stdin if index == 0 else previous_stdout
            stdout = self.stdout_target if index == last else subprocess.PIPE
            process = subprocess.Popen(
                (*_die_with_parent(), *command.argv),
                stdin=stdin,
                stdout=stdout,
                stderr=subprocess.PIPE,
                pass_fds=self.pass_fds if index == 0 else (),
                # One group for the whole pipe: a single killpg takes every stage (and sudo's
                # children) down.
                process_group=0 if self.pgid is None else self.pgid,
                env=self.env,
                close_fds=True,
            )
            if self.pgid is None:
                self.pgid = process.pid
            if previous_stdout is not None:
                previous_stdout.close()  # the next stage owns it now; EOF/SIGPIPE propagate
            previous_stdout = process.stdout if index != last else None
            self.processes.append(process)
            reader = threading.Thread(
                target=_read_lines,
                args=(process.stderr, self.results[index], self.on_stderr.get(index)),
                daemon=True,
            )
            reader.start()
            self._readers.append(reader)
        self.stdout = self.processes[-1].stdout
        if self.timeout is not None:
            self._timer = threading.Timer(self.timeout, self._on_timeout)
            self._timer.daemon = True
            self._timer.start()

    def bytes_read(self, index: int) -> int | None:
        """Bytes stage ``index`` has read so far (``rchar`` of ``/proc/PID/io``), e.g. what the
        compressor took in: progress in uncompressed bytes without a copy through Python.
        None once it has exited, or where /proc does not tell (another user's process)."""
        if index >= len(self.processes) or self.processes[index].poll() is not None:
            return None  # (a reaped pid may already be someone else's)
        try:
            with open(f"/proc/{self.processes[index].pid}/io", encoding="ascii") as io:
                for line in io:
                    if line.startswith("rchar:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return None

    def _on_timeout(self) -> None:
        self.timed_out = True
        self.kill()

    def kill(self) -> None:
        """Terminate the process group, then kill it after a grace period."""
        if self.pgid is None:
            return
        if all(p.poll() is not None for p in self.processes):
            return
        _signal_group(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in self.processes):
                return
            time.sleep(0.05)
        _signal_group(self.pgid, signal.SIGKILL)

    def _reap(self) -> None:
        if self.stdout is not None and not self.stdout.closed:
            self.stdout.close()
        for process, result in zip(self.processes, self.results, strict=False):
            result.status = process.wait()
        for reader in self._readers:
            reader.join(timeout=10)
        if self._timer is not None:
            self._timer.cancel()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    # -- outcome ---------------------------------------------------------------------------
    def wait(self) -> list[StageResult]:
        """Reap every stage; raise for a timeout or the first stage that failed."""
        self._reap()
        if self.timed_out:
            raise CommandTimedOut(name=self._names(), timeout=self.timeout)
        failed = [r for r in self.results if r.status not in r.command.ok_statuses]
        if failed:
            raise self.failure(first_cause(failed))
        return self.results

    def failure(self, result: StageResult) -> CommandFailed | SudoRefused:
        tail = redact(result.stderr_tail(), self.secrets)
        if result.command.uses_sudo and result.status == 1 and "sudo:" in tail:
            return SudoRefused(command=" ".join(result.command.argv[2:]), stderr=tail)
        return CommandFailed(name=result.command.name, status=result.status, stderr=tail)

    def _names(self) -> str:
        return " | ".join(c.name for c in self.commands)


def _lost_its_reader(result: StageResult) -> bool:
    """A stage that ended because the stage after it went away: SIGPIPE, or EPIPE said."""
    return result.status == -signal.SIGPIPE or any(
        "Broken pipe" in line for line in result.stderr_lines[-5:])


def first_cause(failed: Sequence[StageResult]) -> StageResult:
    """Of the stages that failed (in pipe order), the one that failed first: not a stage
    that only lost its reader when a later one died (``tar | zstd | age``: age refusing its
    recipients makes zstd fail with "Broken pipe"; the line names age)."""
    return next((r for r in failed if not _lost_its_reader(r)), failed[0])


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run(command: Command, *, timeout: float, secrets: Iterable[str | None] = ()) -> StageResult:
    """Run one command to completion, output discarded, and check its status."""
    with Pipeline([command], timeout=timeout, secrets=secrets, stdout=subprocess.DEVNULL) as pipe:
        return pipe.wait()[0]


def capture(command: Command, *, timeout: float, secrets: Iterable[str | None] = ()) -> bytes:
    """Run one command and return its (small) standard output."""
    with Pipeline([command], timeout=timeout, secrets=secrets) as pipe:
        assert pipe.stdout is not None
        output = pipe.stdout.read()
        pipe.wait()
    return output
