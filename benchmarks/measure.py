"""One timed run of a variant: wall time, its process tree's RSS and CPU, and our flow's phases."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from proctree import TICK, ServerTicks, TreeSampler, busy_ticks, server_cpu, server_ticks
from shell import MiB, kill_session, spawn


@dataclass
class RunResult:
    variant: str
    round: int
    ok: bool
    returncode: int
    wall_s: float
    rss_mib_tree: float
    rss_mib_max_process: float
    max_process: str
    rss_mib_servers_in_tree: float
    rss_mib_at_peak: dict[str, float]  # the tree's peak, per command name
    cpu_s: float  # user+sys of the whole tree (wait4), ephemeral server included
    cpu_by_command: dict[str, float]
    cpu_servers_s: dict[str, float]
    cpu_other_s: float  # busy CPU not ours, not the servers': other users of the machine
    cpu_softirq_s: float  # interrupt time, machine-wide: mostly our loopback traffic
    loadavg_before: float
    stdout: str = ""
    note: str = ""
    started_at: float = 0.0  # time.time() at start, to place the flow's log lines
    log_path: str = ""
    log_offset: int = 0
    timeline: dict[str, float] = field(default_factory=dict)
    stored_bytes: int = 0  # compressed bytes the backup wrote (backups that say)
    stored_files_bytes: int = 0  # of which the filesystem archive
    kind: str = ""  # our backup's --json kind (full, incremental) where it says
    parent: str = ""

    def add_note(self, note: str) -> None:
        self.note = " ".join(filter(None, (self.note, note)))


@dataclass
class Machine:
    """CPU counters of the whole machine at one moment, to split a run's CPU by who spent it."""

    servers: ServerTicks
    busy: tuple[int, int]
    self_s: float  # this benchmark process's own CPU (its sampler thread)

    @classmethod
    def now(cls, extra_sessions: dict[int, str]) -> Machine:
        own = os.times()
        return cls(server_ticks(extra_sessions), busy_ticks(), own.user + own.system)


@dataclass
class Exited:
    """What the variant's process left: its output, exit status, wall and wait4 CPU seconds."""

    stdout: bytes
    returncode: int
    wall_s: float
    cpu_s: float
    log_offset: int
    started_at: float
    sampler: TreeSampler  # stopped: its peaks and per-command CPU


def _run_sampled(argv: list[str], env: dict[str, str], cwd: str | None, log_path: Path,
                 header: str) -> Exited:
    with open(log_path, "ab") as logf:
        logf.write(header.encode())
        logf.flush()
        offset = logf.tell()
        started_at, started = time.time(), time.monotonic()
        proc = spawn(argv, logf, env=env, cwd=cwd, stdout=subprocess.PIPE)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        assert proc.stdout is not None
        try:
            out = proc.stdout.read()  # small: only our flow's --json line
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted: take the variant's whole session down with us
            sampler.stop()
            kill_session(proc)
            raise
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    return Exited(out, proc.returncode, wall, usage.ru_utime + usage.ru_stime, offset,
                  started_at, sampler)


def measure(variant: str, round_: int, argv: list[str], env: dict[str, str], log_path: Path,
            extra_sessions: dict[int, str] | None = None, cwd: str | None = None) -> RunResult:
    """Run ``argv`` in a new session; time it and sample its process tree."""
    extra_sessions = extra_sessions or {}
    load = os.getloadavg()[0]
    before = Machine.now(extra_sessions)
    done = _run_sampled(argv, env, cwd, log_path,
                        f"\n=== {variant} round {round_}: {shlex.join(argv)}\n")
    sampler = done.sampler
    after = Machine.now(extra_sessions)
    busy = (after.busy[0] - before.busy[0]) / TICK
    softirq = (after.busy[1] - before.busy[1]) / TICK
    servers, restarted = server_cpu(before.servers, after.servers)
    other = busy - done.cpu_s - sum(servers.values()) - (after.self_s - before.self_s)
    return RunResult(
        variant=variant, round=round_, ok=done.returncode == 0, returncode=done.returncode,
        wall_s=round(done.wall_s, 3), rss_mib_tree=round(sampler.peak_tree / MiB, 1),
        rss_mib_max_process=round(sampler.peak_process / MiB, 1),
        max_process=sampler.peak_process_comm,
        rss_mib_servers_in_tree=round(sampler.peak_servers / MiB, 1),
        rss_mib_at_peak=sampler.peak_breakdown, cpu_s=round(done.cpu_s, 2),
        cpu_by_command=sampler.cpu_by_command(), cpu_servers_s=servers,
        cpu_other_s=round(max(other, 0.0), 2), cpu_softirq_s=round(softirq, 2),
        loadavg_before=round(load, 2),
        stdout=done.stdout.decode(errors="replace").strip(), started_at=done.started_at,
        log_path=str(log_path), log_offset=done.log_offset,
        note="a shared server restarted during the run" if restarted else "")


# Our flow's log lines that mark its phases (Prefect's console format starts with HH:MM:SS.mmm).
PHASES = (
    ("flow_started", "Beginning flow run"),
    ("space_checked", "space: staging"),
    ("archive_started", "archiving "),
    ("dump_started", "dumping "),  # logged after the row counts and checksums
    ("dump_stored", "database dump stored"),
    ("archive_stored", "filesystem archive"),  # "... stored" or "... (full) stored as"
    ("manifest_written", "manifest written"),
    ("flow_finished", "Finished in state"),
)
RESTORE_PHASES = (
    ("flow_started", "Beginning flow run"),
    ("files_started", "extracting "),
    ("files_restored", " entries into "),
    ("databases_started", "loading "),
    ("databases_restored", "database(s) in "),
    ("flow_finished", "Finished in state"),
)


def error_line(result: RunResult) -> str:
    """The failed run's own one-line reason (its last ``error:`` line), from its log."""
    with open(result.log_path, "rb") as f:
        f.seek(result.log_offset)
        text = f.read().decode(errors="replace")
    lines = [line.strip() for line in text.splitlines()
             if "error:" in line and not line.startswith("=== ")]
    return lines[-1][:300] if lines else ""


def timeline(result: RunResult, phases: tuple[tuple[str, str], ...] = PHASES
             ) -> dict[str, float]:
    """Seconds from the process start to each phase of our flow, from its log."""
    with open(result.log_path, "rb") as f:
        f.seek(result.log_offset)
        text = f.read().decode(errors="replace")
    day = time.strftime("%Y-%m-%d ", time.localtime(result.started_at))
    marks: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("=== "):
            break
        for phase, needle in phases:
            if needle in line and (phase != "flow_finished" or "Flow run" in line) and (
                    phase != "archive_stored" or " stored" in line):
                with contextlib.suppress(ValueError):
                    stamp = time.mktime(time.strptime(day + line[:8], "%Y-%m-%d %H:%M:%S"))
                    marks[phase] = round(stamp + float("0" + line[8:12]) - result.started_at, 2)
    marks["process_exited"] = result.wall_s
    return marks
