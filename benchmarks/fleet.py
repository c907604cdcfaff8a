"""The fleet at scale: one Prefect server, N simulated nodes polling it, a fan-out of small
database-only backups, on PostgreSQL and on SQLite. A measurement, not a test.

    .venv/bin/python benchmarks/fleet.py [--nodes 3,10,30] [--databases postgresql,sqlite]
                                         [--max-parallel N] [--json FILE]

For each database and node count: `deployments/dev/fleet.sh up N` (its own state directory and
name prefix, so a test fleet is never touched), wait until every node's worker is online, then
back up every node at once (`db_only`, at most --max-parallel at a time, default all) through
its on-demand deployment, as `fleet_backup` does, while sampling the server's RSS and CPU (its
whole process tree) and timing the API (a flow-run filter, what the UI and the fleet flows
ask most) every 0.25 s. Then the same dumps by hand, the reference: for each node as its user
`mariadb-dump | zstd | age | swift upload`, as many at once. Reported: the fan-out's wall time
and the reference's, their ratio, the server's peak RSS and CPU, the API's p50/p95, and how
many runs completed. `fleet.sh down` after each. Runs as root, with services.sh's Swift.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLEET = REPO / "deployments" / "dev" / "fleet.sh"
STATE = Path("/var/lib/ucb-fleet-bench")
PREFIX = "ucbb"
CLOCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def env_file(path: str | Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in Path(path).read_text().splitlines()
                if "=" in line and not line.startswith("#"))


def fleet(*args: str, database: str = "postgresql") -> subprocess.CompletedProcess:
    env = {**os.environ, "UCB_FLEET_STATE": str(STATE), "UCB_FLEET_PREFIX": PREFIX,
           "UCB_FLEET_DATABASE": database}
    return subprocess.run([str(FLEET), *args], env=env, capture_output=True, text=True,
                          timeout=1800)


def tree(pid: int) -> list[int]:
    """pid and its descendants (the server's uvicorn and its services)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def usage(pids: list[int]) -> tuple[int, float]:
    """RSS bytes and CPU seconds (user + system) of these processes."""
    rss, cpu = 0, 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        cpu += (int(fields[11]) + int(fields[12])) / CLOCK
        rss += int(fields[21]) * PAGE
    return rss, cpu


class Sampler(threading.Thread):
    """Every 0.25 s: the server tree's RSS and one timed API call."""

    def __init__(self, server_pid: int, url: str, auth: str) -> None:
        super().__init__(daemon=True)
        self.server_pid, self.url = server_pid, url
        self.header = "Basic " + base64.b64encode(auth.encode()).decode()
        self.rss: list[int] = []
        self.latency: list[float] = []
        self.errors = 0
        self.stop = threading.Event()

    def call(self) -> None:
        request = urllib.request.Request(
            self.url + "/flow_runs/filter", data=json.dumps({"limit": 50}).encode(),
            headers={"Authorization": self.header, "Content-Type": "application/json"})
        started = time.monotonic()
        try:
            urllib.request.urlopen(request, timeout=30).read()
            self.latency.append(time.monotonic() - started)
        except Exception:  # noqa: BLE001 - counted: a refused or timed-out call is a result
            self.errors += 1

    def run(self) -> None:
        while not self.stop.is_set():
            self.rss.append(usage(tree(self.server_pid))[0])
            self.call()
            self.stop.wait(0.25)


async def fan_out(nodes: list[str], max_parallel: int) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    gate = asyncio.Semaphore(max_parallel)

    async def one(node: str) -> tuple[str, str]:
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(
                f"undercloud_backup/on-demand-{node}")
        what = {**(deployment.parameters or {}).get("what", {}), "db_only": True}
        async with gate:
            run = await run_deployment(deployment.id, parameters={"what": what}, timeout=1500,
                                       poll_interval=2)
        return node, run.state.type.value if run.state else "UNKNOWN"
    return dict(await asyncio.gather(*(one(n) for n in nodes)))


async def workers_online(nodes: list[str], timeout: float = 600) -> float:
    from prefect.client.orchestration import get_client

    started = time.monotonic()
    async with get_client() as client:
        while True:
            ready = [(await client.read_work_pool(f"undercloud-{n}")).status for n in nodes]
            if all(str(getattr(s, "value", s)) == "READY" for s in ready):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise SystemExit(f"workers not online after {timeout} s: {ready}")
            await asyncio.sleep(1)


REFERENCE = ("mariadb-dump --no-defaults --socket=\"$SOCK\" --user=\"$USER_NAME\" "
             "--single-transaction --all-databases --routines --events | zstd -q -3 "
             "| age -R \"$RECIPIENTS\" | \"$SWIFT\" upload ucb-bench-reference - "
             "--object-name \"dump-$(date +%s%N).sql.zst.age\" >/dev/null")


def reference(nodes: dict[str, dict], max_parallel: int) -> tuple[float, int]:
    """Each node's dump by hand, as its user, at most max_parallel at once: seconds, failures."""
    swift = str(Path(sys.executable).parent / "swift")
    started = time.monotonic()
    pending = list(nodes.items())
    running: list[subprocess.Popen] = []
    failures = 0
    while pending or running:
        while pending and len(running) < max_parallel:
            node, line = pending.pop(0)
            env = {**{k: v for k, v in env_file(line["env"]).items() if k.startswith("OS_")},
                   "PATH": "/usr/bin:/bin", "SOCK": line["db_socket"], "USER_NAME": line["user"],
                   "RECIPIENTS": str(Path(line["env"]).parent / "recipients"), "SWIFT": swift,
                   "OS_AUTH_TYPE": "v3password", "OS_IDENTITY_API_VERSION": "3"}
            running.append(subprocess.Popen(
                ["setpriv", f"--reuid={line['user']}", f"--regid={line['user']}",
                 "--clear-groups", "bash", "-o", "pipefail", "-c", REFERENCE],
                env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for process in list(running):
            if process.poll() is not None:
                running.remove(process)
                if process.returncode:
                    failures += 1
                    print(f"reference failed: {process.stderr.read().decode()[-300:]}",
                          file=sys.stderr)
        time.sleep(0.05)
    return time.monotonic() - started, failures


def measure(count: int, database: str, max_parallel: int | None) -> dict:
    fleet("down")
    started = time.monotonic()
    up = fleet("up", str(count), database=database)
    if up.returncode:
        raise SystemExit(f"fleet.sh up {count} failed: {up.stderr[-2000:]}")
    up_s = time.monotonic() - started
    lines = [json.loads(line) for line in up.stdout.splitlines()]
    nodes, operator = {line["node"]: line for line in lines[:-1]}, env_file(lines[-1]["env"])
    server_pid = json.loads((STATE / "fleet.json").read_text())["pids"]["server"]
    parallel = max_parallel or count
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    # Prefect reads its settings once per process: each fleet's server is set here.
    with temporary_settings({PREFECT_API_URL: operator["PREFECT_API_URL"],
                             PREFECT_API_AUTH_STRING: operator["PREFECT_API_AUTH_STRING"]}):
        return _measure(count, database, parallel, nodes, operator, server_pid, up_s)


def _measure(count: int, database: str, parallel: int, nodes: dict, operator: dict,
             server_pid: int, up_s: float) -> dict:
    try:
        online_s = asyncio.run(workers_online(list(nodes)))
        idle_rss, _ = usage(tree(server_pid))
        sampler = Sampler(server_pid, operator["PREFECT_API_URL"],
                          operator["PREFECT_API_AUTH_STRING"])
        cpu_before = usage(tree(server_pid))[1]
        sampler.start()
        started = time.monotonic()
        states = asyncio.run(fan_out(list(nodes), parallel))
        fan_out_s = time.monotonic() - started
        cpu = usage(tree(server_pid))[1] - cpu_before
        sampler.stop.set()
        sampler.join()
        reference_s, reference_failed = reference(nodes, parallel)
    finally:
        down = fleet("down")
        if down.returncode:
            print(f"fleet.sh down: {down.stderr[-1000:]}", file=sys.stderr)
    latency = sorted(sampler.latency)
    return {
        "database": database, "nodes": count, "max_parallel": parallel,
        "up_s": round(up_s, 1), "workers_online_s": round(online_s, 1),
        "fan_out_s": round(fan_out_s, 1), "reference_s": round(reference_s, 1),
        "ratio": round(fan_out_s / reference_s, 1) if reference_s else None,
        "completed": sum(1 for s in states.values() if s == "COMPLETED"),
        "reference_failed": reference_failed,
        "server_rss_idle_mib": round(idle_rss / 2**20),
        "server_rss_peak_mib": round(max(sampler.rss, default=0) / 2**20),
        "server_cpu_s": round(cpu, 1), "server_cpu_pct": round(100 * cpu / fan_out_s),
        "api_p50_ms": round(1000 * statistics.median(latency)) if latency else None,
        "api_p95_ms": round(1000 * latency[int(0.95 * (len(latency) - 1))]) if latency else None,
        "api_calls": len(latency), "api_errors": sampler.errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="3,10,30")
    parser.add_argument("--databases", default="postgresql,sqlite")
    parser.add_argument("--max-parallel", type=int, default=None,
                        help="runs at once (default: every node)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (fleet.sh makes users and services)", file=sys.stderr)
        return 1
    results = []
    columns = ("database", "nodes", "up_s", "fan_out_s", "reference_s", "ratio", "completed",
               "server_rss_peak_mib", "server_cpu_pct", "api_p50_ms", "api_p95_ms",
               "api_errors")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns), flush=True)
    for database in args.databases.split(","):
        for count in (int(n) for n in args.nodes.split(",")):
            result = measure(count, database, args.max_parallel)
            results.append(result)
            print("| " + " | ".join(str(result[c]) for c in columns) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
