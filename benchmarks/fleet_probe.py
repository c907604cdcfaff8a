"""What benchmarks/fleet.py samples while a fleet fans out: who spends the machine's CPU, how long
the server waits for a core, and how fast its API answers with and without a database query."""

from __future__ import annotations

import base64
import itertools
import json
import os
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

CLOCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

Snapshot = dict[tuple[int, int], tuple[str, int, int]]  # (pid, start) -> group, ticks, rss


def _stats() -> dict[int, list[bytes]]:
    """Every process's /proc stat fields after its name."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                data = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            found[int(entry)] = [data[data.index(b"(") + 1:data.rindex(b")")],
                                 *data[data.rindex(b")") + 2:].split()]
    return found


def _descendants(stats: dict[int, list[bytes]], roots: Mapping[int, str]) -> dict[int, str]:
    children: dict[int, list[int]] = {}
    for pid, f in stats.items():
        children.setdefault(int(f[2]), []).append(pid)
    group: dict[int, str] = {}
    for root, name in roots.items():
        todo = [root]
        while todo:
            current = todo.pop()
            if current in stats:
                group[current] = name
            todo += children.get(current, [])
    return group


def snapshot(roots: Mapping[int, str]) -> Snapshot:
    """Every process's CPU ticks (with its reaped children's) and RSS, by group.

    Groups: each root's name for it and its descendants (the API processes, the nodes' workers
    with their flow runs and their MariaDB), PostgreSQL, and "other" (this benchmark, the shared
    services, anything else on the machine). A flow run that exited is counted through its
    worker's reaped-children time, so nothing is lost between two snapshots.
    """
    stats = _stats()
    groups = _descendants(stats, roots)
    found: Snapshot = {}
    for pid, f in stats.items():
        group = groups.get(pid) or (
            "postgresql" if f[0].startswith(b"postgres") else "other")
        ticks = sum(int(x) for x in f[12:16])  # utime, stime, cutime, cstime
        found[(pid, int(f[20]))] = (group, ticks, int(f[22]) * PAGE)
    return found


def cpu_by_group(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds per group between two snapshots (processes born meanwhile count whole)."""
    spent: dict[str, float] = {}
    for key, (group, ticks, _) in after.items():
        previous = before.get(key)
        spent[group] = spent.get(group, 0.0) + (ticks - (previous[1] if previous else 0)) / CLOCK
    return spent


def run_queue_wait(pids: set[int]) -> float:
    """Seconds these processes' threads have spent runnable but waiting for a CPU.

    The second field of each thread's schedstat: a direct measure of a process starved by the
    rest of the machine, whatever it does itself.
    """
    waited = 0
    for pid in pids:
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                waited += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return waited / 1e9


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (every core)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK


def tree(roots: set[int]) -> set[int]:
    """These processes and their descendants."""
    return set(_descendants(_stats(), dict.fromkeys(roots, "")))


class Sampler(threading.Thread):
    """Every 0.25 s: the server's RSS (all its processes), then one timed call, in turn /health
    (no database) and a flow-run filter (what the UI and the fleet flows ask most). A slow
    /health means the server waits for a CPU or its event loop is busy; a filter slow alone
    means the database."""

    def __init__(self, server_pids: set[int], url: str, auth: str) -> None:
        super().__init__(daemon=True)
        self.server_pids, self.url = server_pids, url
        self.header = "Basic " + base64.b64encode(auth.encode()).decode()
        self.calls = itertools.cycle(("health", "filter"))
        self.rss: list[int] = []
        self.latency: dict[str, list[float]] = {"health": [], "filter": []}
        self.errors = 0
        self.stop = threading.Event()

    def call(self, kind: str) -> None:
        url = self.url
        if kind == "health":
            request = urllib.request.Request(url + "/health", headers={
                "Authorization": self.header})
        else:
            request = urllib.request.Request(
                url + "/flow_runs/filter", data=json.dumps({"limit": 50}).encode(),
                headers={"Authorization": self.header, "Content-Type": "application/json"})
        started = time.monotonic()
        try:
            urllib.request.urlopen(request, timeout=30).read()
            self.latency[kind].append(time.monotonic() - started)
        except Exception:  # noqa: BLE001 - counted: a refused or timed-out call is a result
            self.errors += 1

    def run(self) -> None:
        while not self.stop.is_set():
            pids = tree(self.server_pids)
            self.rss.append(sum(_rss(pid) for pid in pids))
            self.call(next(self.calls))
            self.stop.wait(0.25)


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[21]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def percentiles(values: list[float]) -> tuple[int | None, int | None]:
    """p50 and p95 in milliseconds."""
    if not values:
        return None, None
    ordered = sorted(values)
    return (round(1000 * ordered[len(ordered) // 2]),
            round(1000 * ordered[int(0.95 * (len(ordered) - 1))]))


class Yielder(threading.Thread):
    """Every 0.2 s, the nice value of each autogroup the given processes and their descendants
    run in. With autogroup scheduling (Linux's default for processes outside a CPU cgroup) the
    kernel shares the CPU between sessions first and applies a process's nice only within its
    session; every node's worker and MariaDB, and every flow run (Prefect starts each in a new
    session), is a session of its own, so each would get as much CPU as the server whatever
    its nice."""

    def __init__(self, roots: set[int], nice: int) -> None:
        super().__init__(daemon=True)
        self.roots, self.nice = roots, nice
        self.stop = threading.Event()

    def once(self) -> None:
        for pid in tree(self.roots):
            try:
                path = Path(f"/proc/{pid}/autogroup")
                if not path.read_text().rstrip().endswith(f"nice {self.nice}"):
                    path.write_text(str(self.nice))
            except OSError:  # gone, or a kernel without autogroups
                continue

    def run(self) -> None:
        while not self.stop.is_set():
            self.once()
            self.stop.wait(0.2)
