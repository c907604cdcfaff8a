"""How far a backup is: percent of the space check's estimate, bytes, rate and time left.

The streams (database dump, filesystem archive) each feed the bytes they have read so far;
the reporter sums them against the estimate and hands a :class:`Snapshot` to its sinks, each
throttled on its own: a Prefect progress artifact (the UI), and the terminal (a bar redrawn in
place when stderr is a TTY, a plain line every so often when it is a log or a pipe).

Use (one reporter per run, its streams fed from any thread)::

    reporter = progress.for_run(estimate_bytes)        # sinks chosen from the context
    on_db = reporter.stream("database dump")           # callable(done_bytes, elapsed=0)
    ...                                                 # on_db(n) as the stream reads
    reporter.finish()                                   # 100 % and a last line

The estimate is of what is read (uncompressed); a stream may read more than estimated, so the
percent stays below 100 until :meth:`Reporter.finish`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TextIO
from uuid import UUID

from undercloud_backup.core.sizes import format_size

ARTIFACT_KEY = "backup-progress"
RATE_WINDOW = 10.0  # seconds of samples the rate is taken over
UNFINISHED_CAP = 99.9

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """Progress at one moment. ``rate`` in bytes/s; ``percent``/``eta`` None when unknown."""

    done: int
    estimate: int
    elapsed: float
    rate: float
    finished: bool = False

    @property
    def percent(self) -> float | None:
        if self.finished:
            return 100.0
        if self.estimate <= 0:
            return None
        return min(UNFINISHED_CAP, 100.0 * self.done / self.estimate)

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate; None without a rate, 0 once past the estimate."""
        if self.finished:
            return 0.0
        if self.estimate <= 0 or self.rate <= 0:
            return None
        return max(0.0, (self.estimate - self.done) / self.rate)

    def describe(self) -> str:
        """``42.0% · 1.2 GiB of 2.9 GiB · 35.0 MiB/s · 48 s left``"""
        parts = []
        if self.percent is not None:
            parts.append(f"{self.percent:.1f}%")
        total = f" of {format_size(self.estimate)}" if self.estimate > 0 else ""
        parts.append(f"{format_size(self.done)}{total}")
        parts.append(f"{format_size(int(self.rate))}/s")
        if self.finished:
            parts.append(f"done in {format_duration(self.elapsed)}")
        elif self.eta is not None:
            parts.append(f"{format_duration(self.eta)} left")
        return " · ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class RateMeter:
    """Bytes per second over the last ``window`` seconds (overall until the window fills)."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> float:
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        first_time, first_done = self.samples[0]
        span = now - first_time
        return (done - first_done) / span if span > 0 else 0.0


class Throttle:
    """Lets an update through at most every ``every`` seconds; the final one always."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.last: float | None = None

    def allow(self, now: float, final: bool = False) -> bool:
        if final or self.last is None or now - self.last >= self.every:
            self.last = now
            return True
        return False


class Sink(Protocol):
    throttle: Throttle

    def emit(self, snapshot: Snapshot) -> None: ...


class ArtifactSink:
    """The run's progress artifact (created at once, in the flow's context; updated by id)."""

    def __init__(self, description: str = "Backup progress", every: float = 2.0) -> None:
        from prefect.artifacts import create_progress_artifact

        self.throttle = Throttle(every)
        self.description = description
        artifact_id = create_progress_artifact(progress=0.0, key=ARTIFACT_KEY,
                                               description=f"{description}: starting")
        # Prefect's async_dispatch returns a coroutine only when called from one; the sink is
        # made and updated from synchronous flows and tasks.
        assert isinstance(artifact_id, UUID), "ArtifactSink needs a synchronous caller"
        self.artifact_id = artifact_id
        self.failed = False

    def emit(self, snapshot: Snapshot) -> None:
        from prefect.artifacts import update_progress_artifact

        if self.failed:
            return
        try:
            update_progress_artifact(self.artifact_id, progress=snapshot.percent or 0.0,
                                     description=f"{self.description}: {snapshot.describe()}")
        except Exception as error:  # noqa: BLE001 - progress must never fail the backup
            self.failed = True
            log.warning("progress artifact not updated any more: %s", error)


class ConsoleSink:
    """A bar redrawn in place on a terminal; a plain line every ``every`` s otherwise."""

    def __init__(self, stream: TextIO | None = None, every: float | None = None,
                 width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.throttle = Throttle(every if every is not None else (0.5 if self.tty else 30.0))
        self.width = width

    def bar(self, snapshot: Snapshot) -> str:
        filled = int(self.width * (snapshot.percent or 0.0) / 100)
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {snapshot.describe()}"

    def emit(self, snapshot: Snapshot) -> None:
        if self.tty:
            end = "\n" if snapshot.finished else ""
            self.stream.write(f"\r\x1b[K{self.bar(snapshot)}{end}")
        else:
            self.stream.write(f"progress: {snapshot.describe()}\n")
        self.stream.flush()


class Reporter:
    """Sums the streams' bytes against the estimate; thread-safe; sinks throttled each."""

    def __init__(self, estimate: int, sinks: list[Sink],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.estimate = max(0, int(estimate))
        self.sinks = sinks
        self.clock = clock
        self.started = clock()
        self.done: dict[str, int] = {}
        self.meter = RateMeter()
        self.meter.add(self.started, 0)
        self.lock = threading.Lock()
        self.finished = False

    def stream(self, name: str) -> Callable[..., None]:
        """A callback for one stream: ``callback(done_bytes, elapsed=None)`` (cumulative)."""
        self.done.setdefault(name, 0)

        def callback(done: int, elapsed: float | None = None) -> None:
            self.update(name, done)

        return callback

    def update(self, name: str, done: int) -> None:
        with self.lock:
            if self.finished:
                return
            self.done[name] = max(self.done.get(name, 0), int(done))
            self._publish(final=False)

    def finish(self) -> Snapshot:
        """Mark the run's streams complete: 100 % and a last update to every sink."""
        with self.lock:
            self.finished = True
            return self._publish(final=True)

    def _publish(self, final: bool) -> Snapshot:
        now = self.clock()
        total = sum(self.done.values())
        rate = self.meter.add(now, total)
        if final:
            elapsed = now - self.started
            rate = total / elapsed if elapsed > 0 else 0.0
        snapshot = Snapshot(done=total, estimate=self.estimate, elapsed=now - self.started,
                            rate=rate, finished=final)
        for sink in self.sinks:
            if sink.throttle.allow(now, final):
                sink.emit(snapshot)
        return snapshot


def in_flow_run() -> bool:
    try:
        from prefect.context import FlowRunContext
    except ImportError:  # pragma: no cover - prefect is a dependency
        return False
    return FlowRunContext.get() is not None


def for_run(estimate: int, console: TextIO | None = None, artifact: bool | None = None,
            ) -> Reporter:
    """The reporter a backup uses: the terminal always, the artifact inside a flow run."""
    sinks: list[Sink] = [ConsoleSink(console)]
    if artifact if artifact is not None else in_flow_run():
        try:
            sinks.append(ArtifactSink())
        except Exception as error:  # noqa: BLE001 - no artifact is no reason to stop
            log.warning("no progress artifact: %s", error)
    return Reporter(estimate, sinks)


# One reporter per process for the run under way: the flow starts it once the space check has
# its estimate, the streams (in their own tasks and threads) feed it by name, the flow ends it.
_current: Reporter | None = None


def start_run(estimate: int, **options) -> Reporter:
    """The run's reporter (see :func:`for_run`), which :func:`feed` then reaches."""
    global _current
    _current = for_run(estimate, **options)
    return _current


def feed(stream: str, done: int) -> None:
    """``done`` bytes of ``stream`` so far, to the run's reporter if one is started."""
    reporter = _current
    if reporter is not None:
        reporter.update(stream, done)


def finish_run() -> Snapshot | None:
    """100 % and the last line; None when no reporter was started."""
    global _current
    reporter, _current = _current, None
    return reporter.finish() if reporter is not None else None
