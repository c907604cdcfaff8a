"""The progress reporter: its maths, its throttling, and what the terminal and the UI get."""

from __future__ import annotations

import io
import threading

import pytest

from undercloud_backup.core import progress
from undercloud_backup.core.progress import Reporter, Snapshot, Throttle

MiB = 1024**2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self, every: float = 0.0) -> None:
        self.throttle = Throttle(every)
        self.seen: list[Snapshot] = []

    def emit(self, snapshot: Snapshot) -> None:
        self.seen.append(snapshot)


@pytest.mark.unit
def test_snapshot_maths():
    half = Snapshot(done=50 * MiB, estimate=100 * MiB, elapsed=10, rate=5 * MiB)
    assert half.percent == 50.0 and half.eta == 10.0
    assert half.describe() == "50.0% · 50.0 MiB of 100.0 MiB · 5.0 MiB/s · 10 s left"
    # more read than estimated: never 100 % (nor a negative time left) before the end
    over = Snapshot(done=130 * MiB, estimate=100 * MiB, elapsed=10, rate=MiB)
    assert over.percent == progress.UNFINISHED_CAP and over.eta == 0.0
    # no estimate or no rate yet: unknowns stay unknown, not 0 or a division error
    unknown = Snapshot(done=10, estimate=0, elapsed=0, rate=0)
    assert unknown.percent is None and unknown.eta is None
    assert Snapshot(done=1, estimate=100, elapsed=0, rate=0).eta is None
    done = Snapshot(done=90 * MiB, estimate=100 * MiB, elapsed=125, rate=MiB, finished=True)
    assert done.percent == 100.0 and done.describe().endswith("done in 2 min 05 s")
    assert progress.format_duration(7322) == "2 h 02 min"


@pytest.mark.unit
def test_reporter_sums_streams_and_measures_the_rate():
    clock, sink = Clock(), Recorder()
    reporter = Reporter(400 * MiB, [sink], clock=clock)
    db, files = reporter.stream("database dump"), reporter.stream("filesystem archive")
    for second in range(1, 6):
        clock.now += 1
        db(second * 10 * MiB, second)          # 10 MiB/s
        files(second * 30 * MiB)               # 30 MiB/s
    last = sink.seen[-1]
    assert last.done == 200 * MiB and last.percent == 50.0
    assert last.rate == pytest.approx(40 * MiB, rel=0.15)
    assert last.eta == pytest.approx(5, rel=0.15)
    # a stream that reports an older (smaller) count does not go backwards
    db(1)
    assert sink.seen[-1].done == 200 * MiB
    final = reporter.finish()
    assert final.finished and final.percent == 100.0 and sink.seen[-1] is final
    files(999 * MiB)                            # after finish: ignored
    assert sink.seen[-1] is final


@pytest.mark.unit
def test_rate_follows_the_recent_window():
    meter = progress.RateMeter(window=10)
    t, done = 0.0, 0
    for _ in range(30):                          # 30 s at 100 MiB/s
        t += 1
        done += 100 * MiB
        meter.add(t, done)
    for _ in range(20):                          # then 20 s at 10 MiB/s
        t += 1
        done += 10 * MiB
        rate = meter.add(t, done)
    assert rate == pytest.approx(10 * MiB, rel=0.01)


@pytest.mark.unit
def test_throttling_per_sink_and_the_final_update_always_passes():
    clock = Clock()
    fast, slow = Recorder(every=1.0), Recorder(every=10.0)
    reporter = Reporter(1000, [fast, slow], clock=clock)
    feed = reporter.stream("s")
    for step in range(1, 101):                   # 100 updates over 25 s
        clock.now += 0.25
        feed(step)
    assert len(fast.seen) == 25 and len(slow.seen) == 3   # t=0.25, 10.25, 20.25
    clock.now += 0.01
    reporter.finish()
    assert fast.seen[-1].finished and slow.seen[-1].finished and len(slow.seen) == 4


@pytest.mark.unit
def test_threads_feeding_at_once_lose_nothing():
    sink = Recorder()
    reporter = Reporter(8 * 1000, [sink])
    feeds = [reporter.stream(f"s{i}") for i in range(8)]
    threads = [threading.Thread(target=lambda f=f: [f(n) for n in range(1, 1001)])
               for f in feeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert reporter.finish().done == 8000


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.unit
def test_console_bar_on_a_terminal_and_lines_otherwise():
    clock = Clock()
    tty, plain = FakeTTY(), io.StringIO()
    reporter = Reporter(100 * MiB, [progress.ConsoleSink(tty, every=1),
                                    progress.ConsoleSink(plain, every=30)], clock=clock)
    feed = reporter.stream("s")
    for second in range(1, 61):
        clock.now += 1
        feed(second * MiB)
    reporter.finish()
    bars = tty.getvalue()
    assert bars.startswith("\r\x1b[K[") and bars.endswith("done in 1 min 00 s\n")
    assert bars.count("\r") == 61 and bars.count("\n") == 1     # redrawn in place
    assert "[###############..............." in bars             # 50 % of a 30-wide bar
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue() and len(lines) == 3      # t=1, 31, finish
    assert lines[0].startswith("progress: 1.0% · 1.0 MiB of 100.0 MiB")
    assert lines[1].startswith("progress: 31.0%") and lines[1].endswith("left")
    assert lines[2] == "progress: 100.0% · 60.0 MiB of 100.0 MiB · 1.0 MiB/s · done in 1 min 00 s"


def test_progress_artifact_in_a_flow_run(prefect_server):
    """Inside a flow the reporter keeps a progress artifact up to date (real server)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    @flow
    def feeds() -> str:
        reporter = progress.for_run(10 * MiB, console=io.StringIO())
        feed = reporter.stream("filesystem archive")
        feed(5 * MiB)
        reporter.sinks[1].throttle.last = None   # let the next update through at once
        feed(6 * MiB)
        reporter.finish()
        return str(reporter.sinks[1].artifact_id)

    artifact_id = feeds()
    with get_client(sync_client=True) as client:
        # by its id: the session's server holds more artifacts than one unfiltered page
        ours = client.read_artifacts(artifact_filter=ArtifactFilter(
            id=ArtifactFilterId(any_=[artifact_id])))
    assert ours and ours[0].type == "progress" and ours[0].key == progress.ARTIFACT_KEY
    assert ours[0].data == 100.0
    assert ours[0].description.startswith("Backup progress: 100.0% · 6.0 MiB of 10.0 MiB")
    assert progress.for_run(1, console=io.StringIO()).sinks[1:] == []   # no flow: no artifact


@pytest.mark.unit
def test_run_reporter_fed_by_stream_name():
    out = io.StringIO()
    progress.feed("database dump", 5)                      # no run started: ignored
    assert progress.finish_run() is None
    reporter = progress.start_run(100, console=out, artifact=False)
    progress.feed("database dump", 30)
    progress.feed("filesystem archive", 20)
    assert sum(reporter.done.values()) == 50
    final = progress.finish_run()
    assert final is not None and final.done == 50 and final.percent == 100.0
    assert out.getvalue().splitlines()[-1].startswith("progress: 100.0% · 50 B of 100 B")
    progress.feed("database dump", 99)                     # after the run: ignored
    assert sum(reporter.done.values()) == 50
