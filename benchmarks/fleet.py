"""The fleet at scale: one Prefect server, N simulated nodes polling it, a fan-out of small
database-only backups, on PostgreSQL and on SQLite. A measurement, not a test.

    .venv/bin/python benchmarks/fleet.py [--nodes 3,10,30] [--databases postgresql,sqlite]
        [--max-parallel N] [--nice 19] [--api-workers N] [--no-reference] [--json FILE]

For each database and node count: `deployments/dev/fleet.sh up N` (its own state directory and
name prefix, so a test fleet is never touched), wait until every node's worker is online, then
back up every node at once (`db_only`, at most --max-parallel at a time, default all) through
its on-demand deployment, as `fleet_backup` does, from a client process of its own, while
sampling the server's RSS and timing its API every 0.25 s (in turn /health, which reads no
database, and a flow-run filter, what the UI and the fleet flows ask most). Then the same dumps
by hand, the reference: for each node as its user `mariadb-dump | zstd | age | swift upload`, as
many at once. `fleet.sh down` after each.

The simulated nodes share this machine's cores with the server, where a real fleet has them on
machines of their own: by default their processes (workers, the flow runs they start, their
MariaDB) and the fan-out's client run at nice 19, so they take only the CPU the server leaves
(--nice 0: they compete with it). Reported besides the fan-out's wall time, the runs completed,
the server's peak RSS and the API's p50/p95: where the CPU went (server, PostgreSQL, nodes,
anything else on the machine, each as % of one core) and how long the server's threads waited
for a core (% of the wall time): a server that waits is starved, one that does not is slow by
itself. --api-workers N replaces the one-process server by Prefect's scaled layout on the same
PostgreSQL (N API processes, the background services apart, Redis between them; needs
prefect-redis). Runs as root, with services.sh's Swift.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fleet_probe import (
    Sampler,
    Yielder,
    cpu_by_group,
    machine_busy,
    percentiles,
    run_queue_wait,
    snapshot,
    tree,
)

REPO = Path(__file__).resolve().parents[1]
FLEET = REPO / "deployments" / "dev" / "fleet.sh"
STATE = Path("/var/lib/ucb-fleet-bench")
PREFIX = "ucbb"


def env_file(path: str | Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in Path(path).read_text().splitlines()
                if "=" in line and not line.startswith("#"))


def fleet(*args: str, database: str = "postgresql") -> subprocess.CompletedProcess:
    env = {**os.environ, "UCB_FLEET_STATE": str(STATE), "UCB_FLEET_PREFIX": PREFIX,
           "UCB_FLEET_DATABASE": database}
    return subprocess.run([str(FLEET), *args], env=env, capture_output=True, text=True,
                          timeout=1800)


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




def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scale_out(server_pid: int, url: str, workers: int) -> list[int]:
    """Replace fleet.sh's server (API and background services in one process) by Prefect's
    scaled layout on the same PostgreSQL and port: ``prefect server start --workers N
    --no-services`` (N API processes sharing the listening socket, so the kernel spreads the
    workers' and probes' connections), one ``prefect server services start``, and the Redis
    they need between them for events, leases and the services' coordination (a private one,
    nothing kept on disk). The nodes' workers keep their URL and reconnect. Returns the new
    processes' pids (each a session of its own)."""
    import pwd

    try:
        import prefect_redis  # noqa: F401 - checked here: the layout cannot run without it
    except ImportError:
        raise SystemExit("--api-workers needs prefect-redis in this venv "
                         "(pip install prefect-redis)") from None
    redis_port, port = free_port(), url.rsplit(":", 1)[1].split("/")[0]
    started = [subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
         "--appendonly", "no", "--dir", str(STATE / "server")],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).pid]
    stop([server_pid])
    env = {**env_file(STATE / "server.env"),
           "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",
           "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
           "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
           "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
           "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
           "PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1",
           "PREFECT_REDIS_MESSAGING_PORT": str(redis_port),
           "PREFECT_SERVER_DOCKET_URL": f"redis://127.0.0.1:{redis_port}/1"}
    user = pwd.getpwnam(f"{PREFIX}-server")
    prefect = str(Path(sys.executable).parent / "prefect")
    for name, argv in (
            ("services", [prefect, "server", "services", "start"]),
            ("api", [prefect, "server", "start", "--host", "127.0.0.1", "--port", port,
                     "--workers", str(workers), "--no-services", "--analytics-off"])):
        log = open(STATE / "log" / f"scaled-{name}.log", "ab")  # noqa: SIM115 - child's
        started.append(subprocess.Popen(
            argv, env=env, cwd=STATE / "server", user=user.pw_uid, group=user.pw_gid,
            extra_groups=[], start_new_session=True, stdin=subprocess.DEVNULL, stdout=log,
            stderr=log).pid)
    wait_healthy(url, env_file(STATE / "operator.env")["PREFECT_API_AUTH_STRING"])
    return started


def wait_healthy(url: str, auth: str, timeout: float = 120) -> None:
    header = "Basic " + base64.b64encode(auth.encode()).decode()
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(urllib.request.Request(
                url + "/health", headers={"Authorization": header}), timeout=2)
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise SystemExit(f"API replica {url} not healthy after {timeout} s") from None
            time.sleep(0.5)


def stop(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # not ours (fleet.sh's server): wait until it is gone
            while Path(f"/proc/{pid}").exists():
                time.sleep(0.1)


def lower_priority(pids: dict[str, int], nice: int) -> None:
    """Every process of the simulated nodes (each worker's and MariaDB's process group; the
    flow runs a worker starts inherit its priority) yields the CPU to the server, as if the
    nodes were other machines."""
    for name, pid in pids.items():
        if name != "server":
            try:
                os.setpriority(os.PRIO_PGRP, pid, nice)
            except ProcessLookupError:
                pass


def measure(count: int, database: str, args: argparse.Namespace) -> dict:
    fleet("down")
    started = time.monotonic()
    up = fleet("up", str(count), database=database)
    if up.returncode:
        raise SystemExit(f"fleet.sh up {count} failed: {up.stderr[-2000:]}")
    up_s = time.monotonic() - started
    lines = [json.loads(line) for line in up.stdout.splitlines()]
    nodes, operator = {line["node"]: line for line in lines[:-1]}, env_file(lines[-1]["env"])
    pids = json.loads((STATE / "fleet.json").read_text())["pids"]
    scaled: list[int] = []
    try:
        if args.nice:
            lower_priority(pids, args.nice)
        if args.api_workers:
            scaled = scale_out(pids["server"], operator["PREFECT_API_URL"], args.api_workers)
        return _measure(count, database, args, nodes, operator, pids, scaled, up_s)
    finally:
        stop(scaled)
        down = fleet("down")
        if down.returncode:
            print(f"fleet.sh down: {down.stderr[-1000:]}", file=sys.stderr)


def _measure(count: int, database: str, args: argparse.Namespace, nodes: dict, operator: dict,
             pids: dict[str, int], scaled: list[int], up_s: float) -> dict:
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    # Prefect reads its settings once per process: each fleet's server is set here.
    with temporary_settings({PREFECT_API_URL: operator["PREFECT_API_URL"],
                             PREFECT_API_AUTH_STRING: operator["PREFECT_API_AUTH_STRING"]}):
        online_s = asyncio.run(workers_online(list(nodes)))
    parallel = args.max_parallel or count
    servers = set(scaled) or {pids["server"]}
    # This process first: its fan-out child and the fleet's processes are named after it.
    roots = {os.getpid(): "benchmark"}
    roots.update({pid: ("server" if name == "server" else "nodes") for name, pid in pids.items()})
    roots.update(dict.fromkeys(servers, "server"))
    sampler = Sampler(servers, operator["PREFECT_API_URL"], operator["PREFECT_API_AUTH_STRING"])
    # The same calls on the idle fleet first: what a request costs the server by itself.
    for kind in ("health", "filter") * 20:
        sampler.call(kind)
    idle, sampler.latency = sampler.latency, {"health": [], "filter": []}
    # The fan-out is the operator's client, on another machine in a real fleet: its own
    # process, at the nodes' priority (by nice(1), which execs it: the same pid, and no Python
    # between fork and exec in this threaded process, as core/execute.py says).
    niced = ["nice", "-n", str(args.nice)] if args.nice else []
    client = subprocess.Popen(
        [*niced, sys.executable, __file__, "--fan-out", ",".join(nodes),
         "--max-parallel", str(parallel)],
        env={**os.environ, **operator}, stdout=subprocess.PIPE)
    roots[client.pid] = "operator"
    yielder = Yielder({pid for pid, group in roots.items() if group in ("nodes", "operator")},
                      args.nice)
    if args.nice:
        yielder.once()
        yielder.start()
    before, busy_before = snapshot(roots), machine_busy()
    waited_before, started = run_queue_wait(tree(servers)), time.monotonic()
    sampler.start()
    out, _ = client.communicate(timeout=1800)
    fanned = json.loads(out)
    waited = run_queue_wait(tree(servers)) - waited_before
    after, busy_after = snapshot(roots), machine_busy()
    interval = time.monotonic() - started  # the fan-out and its client's start-up
    sampler.stop.set()
    yielder.stop.set()
    sampler.join()
    wall = fanned["seconds"]
    cpu = cpu_by_group(before, after)
    reference_s, reference_failed = reference(nodes, parallel) if args.reference else (0.0, 0)
    health, query = percentiles(sampler.latency["health"]), percentiles(sampler.latency["filter"])
    both = percentiles(sampler.latency["health"] + sampler.latency["filter"])
    pct = {group: round(100 * seconds / interval) for group, seconds in cpu.items()}
    idle_health, idle_query = percentiles(idle["health"]), percentiles(idle["filter"])
    return {
        "database": database, "nodes": count, "max_parallel": parallel, "nice": args.nice,
        "api_workers": args.api_workers or "1+services",
        "up_s": round(up_s, 1), "workers_online_s": round(online_s, 1),
        "fan_out_s": round(wall, 1), "reference_s": round(reference_s, 1),
        "completed": sum(1 for s in fanned["states"].values() if s == "COMPLETED"),
        "reference_failed": reference_failed,
        "server_rss_peak_mib": round(max(sampler.rss, default=0) / 2**20),
        "server_cpu_s": round(cpu.get("server", 0.0), 1),
        "server_cpu_pct": pct.get("server", 0),
        "server_wait_pct": round(100 * waited / interval),
        "postgresql_cpu_pct": pct.get("postgresql", 0), "nodes_cpu_pct": pct.get("nodes", 0),
        "operator_cpu_pct": pct.get("operator", 0),
        "benchmark_cpu_pct": pct.get("benchmark", 0), "other_cpu_pct": pct.get("other", 0),
        "machine_busy_pct": round(100 * (busy_after - busy_before) / interval),
        "cores": os.cpu_count(),
        "api_p50_ms": both[0], "api_p95_ms": both[1],
        "idle_health_p50_ms": idle_health[0], "idle_filter_p50_ms": idle_query[0],
        "idle_filter_p95_ms": idle_query[1],
        "health_p50_ms": health[0], "health_p95_ms": health[1],
        "filter_p50_ms": query[0], "filter_p95_ms": query[1],
        "api_calls": len(sampler.latency["health"]) + len(sampler.latency["filter"]),
        "api_errors": sampler.errors,
    }


def fan_out_only(nodes: str, max_parallel: int) -> int:
    """The operator's side, in a process of its own: the fan-out's states and wall time."""
    import prefect.deployments  # noqa: F401 - loaded before the clock starts, as the parent was

    started = time.monotonic()
    states = asyncio.run(fan_out(nodes.split(","), max_parallel))
    print(json.dumps({"states": states, "seconds": time.monotonic() - started}))
    return 0


COLUMNS = ("database", "nodes", "nice", "api_workers", "fan_out_s", "completed",
           "server_rss_peak_mib", "server_cpu_pct", "server_wait_pct", "postgresql_cpu_pct",
           "nodes_cpu_pct", "other_cpu_pct", "machine_busy_pct", "health_p50_ms",
           "health_p95_ms", "idle_filter_p50_ms", "filter_p50_ms", "filter_p95_ms", "api_p50_ms",
           "api_p95_ms",
           "api_errors")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="3,10,30")
    parser.add_argument("--databases", default="postgresql,sqlite")
    parser.add_argument("--max-parallel", type=int, default=None,
                        help="runs at once (default: every node)")
    parser.add_argument("--nice", type=int, default=19,
                        help="the simulated nodes' niceness (0: they compete with the server)")
    parser.add_argument("--api-workers", type=int, default=0,
                        help="replace the server by N API processes, the background services "
                             "apart, and Redis between them (Prefect's scaled layout)")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the dumps by hand")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--fan-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fan_out:
        return fan_out_only(args.fan_out, args.max_parallel)
    if os.geteuid() != 0:
        print("run as root (fleet.sh makes users and services)", file=sys.stderr)
        return 1
    results = []
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)
    for database in args.databases.split(","):
        for count in (int(n) for n in args.nodes.split(",")):
            result = measure(count, database, args)
            results.append(result)
            print("| " + " | ".join(str(result[c]) for c in COLUMNS) + " |", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
