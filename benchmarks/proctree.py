"""Where a variant's memory and CPU go: /proc sampling of its session, the shared servers' CPU."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shell import MiB

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
# Long-running servers are not part of a variant's tree; their CPU is reported apart.
SERVER_GROUPS = (("mariadbd", "mariadb"), ("swift-", "swift"), ("uwsgi", "keystone"),
                 ("memcached", "memcached"))


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int
    comm: str
    ticks: int  # utime + stime
    rss: int  # bytes
    start: int  # starttime: (pid, start) identifies a process across pid reuse


def read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    close = data.rindex(b")")
    comm = data[data.index(b"(") + 1:close].decode(errors="replace")
    f = data[close + 2:].split()
    return Proc(pid=pid, ppid=int(f[1]), sid=int(f[3]), comm=comm,
                ticks=int(f[11]) + int(f[12]), rss=int(f[21]) * PAGE, start=int(f[19]))


def all_procs() -> list[Proc]:
    procs = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            proc = read_proc(int(name))
            if proc is not None:
                procs.append(proc)
    return procs


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_server(cmd: str) -> bool:
    # Prefect's ephemeral API server runs as a uvicorn child of the flow process.
    return "uvicorn" in cmd and "prefect.server" in cmd


ServerTicks = dict[tuple[int, int], tuple[str, int]]  # (pid, start) -> (group, ticks)


def server_ticks(extra_sessions: dict[int, str]) -> ServerTicks:
    """CPU ticks so far of each shared server process, and of the given sessions'."""
    found: ServerTicks = {}
    try:  # the shared server; other users' scratch mariadbd instances are foreign load
        main_db = int(Path("/run/mysqld/mysqld.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        main_db = None
    for proc in all_procs():
        group = extra_sessions.get(proc.sid)
        if group is None:
            group = next((g for prefix, g in SERVER_GROUPS if proc.comm.startswith(prefix)), None)
            if group == "mariadb" and main_db is not None and proc.pid != main_db:
                group = None
        if group is not None:
            found[(proc.pid, proc.start)] = (group, proc.ticks)
    return found


def cpu_seconds(ticks: Iterable[tuple[str, int]]) -> dict[str, float]:
    """CPU seconds per name, from (name, ticks) pairs, rounded to 10 ms."""
    out: dict[str, float] = {}
    for name, n in ticks:
        out[name] = out.get(name, 0.0) + n / TICK
    return {k: round(v, 2) for k, v in out.items()}


def server_cpu(before: ServerTicks, after: ServerTicks) -> tuple[dict[str, float], bool]:
    """CPU seconds per server group between two snapshots, and whether a server restarted.

    Per process, so a server restarted meanwhile (by someone else) cannot make it negative.
    """
    spent = cpu_seconds((group, ticks - before.get(key, (group, 0))[1])
                        for key, (group, ticks) in after.items())
    restarted = any(key not in after for key in before)
    return spent, restarted


def busy_ticks() -> tuple[int, int]:
    """Busy CPU ticks of the machine: (process time, interrupt time).

    Interrupt time is mostly loopback TCP (softirq) of the uploads themselves; no process is
    charged for it, so it is reported apart from the foreign load.
    """
    with open("/proc/stat") as f:
        fields_ = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields_[:8]
    return user + nice + system + steal, irq + softirq


class TreeSampler(threading.Thread):
    """Every ``interval`` s, sum the RSS of every process of one session (the variant's tree).

    The variant is started in its own session, so orphans stay counted; an ephemeral Prefect
    server inside it (and its children) is set apart. A 50 ms scan of /proc costs ~2 ms.
    """

    def __init__(self, sid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.sid, self.interval = sid, interval
        self.peak_tree = 0
        self.peak_process = 0
        self.peak_process_comm = ""
        self.peak_servers = 0
        self.peak_breakdown: dict[str, float] = {}
        self.samples = 0
        self.ticks: ServerTicks = {}
        self._servers: set[tuple[int, int]] = set()
        self._seen: set[tuple[int, int]] = set()
        self._previous: set[tuple[int, int]] = set()  # the processes of the last sample
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        procs = {p.pid: p for p in all_procs() if p.sid == self.sid}
        for proc in procs.values():
            key = (proc.pid, proc.start)
            if key not in self._seen:
                self._seen.add(key)
                if is_server(cmdline(proc.pid)):
                    self._servers.add(key)

        def in_server(proc: Proc) -> bool:
            while proc is not None:
                if (proc.pid, proc.start) in self._servers:
                    return True
                proc = procs.get(proc.ppid)
            return False

        tree = servers = 0
        by_comm: dict[str, int] = {}
        for proc in procs.values():
            parent = procs.get(proc.ppid)
            if parent is not None and proc.comm == parent.comm and (
                    abs(proc.rss - parent.rss) <= parent.rss // 50
                    or (proc.pid, proc.start) not in self._previous):
                # A child between (v)fork and exec shares its parent's pages: not new memory.
                # Its RSS can drift from its parent's as exec begins, so a child named as its
                # parent counts only once it was there the sample before (a fork-to-exec
                # lasts far less than the 50 ms between samples).
                continue
            if in_server(proc):
                servers += proc.rss
                self.ticks[(proc.pid, proc.start)] = ("(ephemeral server)", proc.ticks)
                continue
            tree += proc.rss
            by_comm[proc.comm] = by_comm.get(proc.comm, 0) + proc.rss
            self.ticks[(proc.pid, proc.start)] = (proc.comm, proc.ticks)
            if proc.rss > self.peak_process:
                self.peak_process, self.peak_process_comm = proc.rss, proc.comm
        if tree > self.peak_tree:
            self.peak_tree = tree
            self.peak_breakdown = {k: round(v / MiB, 1) for k, v in
                                   sorted(by_comm.items(), key=lambda kv: -kv[1])}
        self.peak_servers = max(self.peak_servers, servers)
        self._previous = {(p.pid, p.start) for p in procs.values()}
        self.samples += 1

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def cpu_by_command(self) -> dict[str, float]:
        """CPU seconds per command name, as last sampled (a process's last < 50 ms is lost)."""
        spent = cpu_seconds(self.ticks.values())
        return dict(sorted(spent.items(), key=lambda kv: -kv[1]))
