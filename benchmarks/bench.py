#!/usr/bin/env python3
"""Benchmark undercloud-backup against the plain-tools pipelines (issue 5).

    python benchmarks/bench.py [--scale N] [--runs K] [--json FILE]

Generates a sample undercloud (files under a scratch root, database ``ucb_bench`` in the local
MariaDB), then runs every variant K times, alternating, against the local Swift behind
Keystone: the reference sequential and streamed pipelines, our flow against a running Prefect
server and with Prefect's ephemeral server, and the restores (ours when ``flows/restore.py``
exists, and ``swift download | zstd -d | tar -x`` plus ``mariadb``) into a scratch MariaDB
server. For each variant it reports the median wall time, throughput, the peak RSS of the
variant's whole process tree (servers excluded), and where the CPU went.

Standard library only (plus the project's venv for our flow); loopback services only.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("UCB_DEV_STATE", "/var/lib/undercloud-backup-dev"))
BENCH_DB = "ucb_bench"
MiB = 1024**2
# The flow's default paths (undercloud_backup.archive.DEFAULT_PATHS), relative to the root:
# the reference tar archives exactly what ours does.
PATHS = ("etc", "root", "home/stack", "srv/node", "var/lib/glance/images")
DUMP_OPTS = "--single-transaction --all-databases --routines --events --triggers"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
# Long-running servers are not part of a variant's tree; their CPU is reported apart.
SERVER_GROUPS = (("mariadbd", "mariadb"), ("swift-", "swift"), ("uwsgi", "keystone"),
                 ("memcached", "memcached"))


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ /proc sampling
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


def server_cpu(before: ServerTicks, after: ServerTicks) -> tuple[dict[str, float], bool]:
    """CPU seconds per server group between two snapshots, and whether a server restarted.

    Per process, so a server restarted meanwhile (by someone else) cannot make it negative.
    """
    out: dict[str, float] = {}
    for key, (group, ticks) in after.items():
        out[group] = out.get(group, 0.0) + (ticks - before.get(key, (group, 0))[1]) / TICK
    restarted = any(key not in after for key in before)
    return {k: round(v, 2) for k, v in out.items()}, restarted


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
        self.ticks: dict[tuple[int, int], tuple[str, int]] = {}
        self._servers: set[tuple[int, int]] = set()
        self._seen: set[tuple[int, int]] = set()
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
            if (parent is not None and proc.comm == parent.comm
                    and abs(proc.rss - parent.rss) <= parent.rss // 50):
                # A child between (v)fork and exec shares its parent's pages: not new memory.
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
        self.samples += 1

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def cpu_by_command(self) -> dict[str, float]:
        """CPU seconds per command name, as last sampled (a process's last < 50 ms is lost)."""
        out: dict[str, float] = {}
        for comm, ticks in self.ticks.values():
            out[comm] = out.get(comm, 0.0) + ticks / TICK
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


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


def measure(variant: str, round_: int, argv: list[str], env: dict[str, str], log_path: Path,
            extra_sessions: dict[int, str] | None = None, cwd: str | None = None) -> RunResult:
    """Run ``argv`` in a new session; time it and sample its process tree."""
    extra_sessions = extra_sessions or {}
    load = os.getloadavg()[0]
    before_servers = server_ticks(extra_sessions)
    before_busy = busy_ticks()
    before_self = os.times()
    with open(log_path, "ab") as logf:
        logf.write(f"\n=== {variant} round {round_}: {shlex.join(argv)}\n".encode())
        logf.flush()
        offset = logf.tell()
        started_at = time.time()
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=logf, start_new_session=True)
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
    after_self = os.times()
    after_busy = busy_ticks()
    busy = (after_busy[0] - before_busy[0]) / TICK
    softirq = (after_busy[1] - before_busy[1]) / TICK
    servers, restarted = server_cpu(before_servers, server_ticks(extra_sessions))
    cpu = usage.ru_utime + usage.ru_stime
    own = (after_self.user + after_self.system) - (before_self.user + before_self.system)
    other = busy - cpu - sum(servers.values()) - own
    return RunResult(
        variant=variant, round=round_, ok=proc.returncode == 0, returncode=proc.returncode,
        wall_s=round(wall, 3), rss_mib_tree=round(sampler.peak_tree / MiB, 1),
        rss_mib_max_process=round(sampler.peak_process / MiB, 1),
        max_process=sampler.peak_process_comm,
        rss_mib_servers_in_tree=round(sampler.peak_servers / MiB, 1),
        rss_mib_at_peak=sampler.peak_breakdown, cpu_s=round(cpu, 2),
        cpu_by_command=sampler.cpu_by_command(), cpu_servers_s=servers,
        cpu_other_s=round(max(other, 0.0), 2), cpu_softirq_s=round(softirq, 2),
        loadavg_before=round(load, 2),
        stdout=out.decode(errors="replace").strip(), started_at=started_at,
        log_path=str(log_path), log_offset=offset,
        note="a shared server restarted during the run" if restarted else "")


# Our flow's log lines that mark its phases (Prefect's console format starts with HH:MM:SS.mmm).
PHASES = (
    ("flow_started", "Beginning flow run"),
    ("space_checked", "space: staging"),
    ("archive_started", "archiving "),
    ("dump_started", "dumping "),  # logged after the row counts and checksums
    ("dump_stored", "database dump stored"),
    ("archive_stored", "filesystem archive stored"),
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
            if needle in line and (phase != "flow_finished" or "Flow run" in line):
                with contextlib.suppress(ValueError):
                    stamp = time.mktime(time.strptime(day + line[:8], "%Y-%m-%d %H:%M:%S"))
                    marks[phase] = round(stamp + float("0" + line[8:12]) - result.started_at, 2)
    marks["process_exited"] = result.wall_s
    return marks


# ------------------------------------------------------------------------------- environment
def read_env_file(path: Path) -> dict[str, str]:
    """The variables an ``export A=b C=d`` env file sets (services.sh writes keystone.env)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export "):
            for word in shlex.split(line[len("export "):]):
                key, _, value = word.partition("=")
                values[key] = value
    return values


def base_env(os_env: dict[str, str]) -> dict[str, str]:
    """The caller's environment without Prefect or OpenStack settings, plus the backup user's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OS_", "ST_"))}
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env.update(os_env)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: str | list[str], *, env: dict[str, str] | None = None, check: bool = True,
        input_: bytes | None = None, quiet: bool = True) -> subprocess.CompletedProcess:
    argv = ["bash", "-o", "pipefail", "-c", cmd] if isinstance(cmd, str) else cmd
    done = subprocess.run(argv, env=env, check=False, input=input_,
                          stdout=subprocess.PIPE if quiet else None,
                          stderr=subprocess.PIPE if quiet else None)
    if check and done.returncode != 0:
        tail = (done.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{shlex.join(argv)[:120]} failed ({done.returncode}): "
                           + " | ".join(tail))
    return done


def kill_session(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a server we started (its own session), by its id; SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def prefect_server(home: Path, python: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """A Prefect server for the "running server" variants: (API URL, its session id)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server_env = dict(env, PREFECT_HOME=str(home))
    with open(home / "server.log", "ab") as logf:
        proc = subprocess.Popen(
            [str(python.parent / "prefect"), "server", "start", "--host", "127.0.0.1",
             "--port", str(port), "--analytics-off"],
            env=server_env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        started = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited; see {home / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() - started > 180:
                    raise RuntimeError("prefect server did not answer in 180 s") from None
                time.sleep(0.5)
        log(f"prefect server up on {url} in {time.monotonic() - started:.1f} s")
        yield url, proc.pid
    finally:
        kill_session(proc)


SCRATCH_SESSIONS: set[int] = set()  # our scratch mariadbd: its CPU counts as "mariadb"


@contextlib.contextmanager
def scratch_mariadb(workdir: Path) -> Iterator[Path]:
    """A throwaway MariaDB server (socket only) for the restores: the real one stays intact."""
    # The socket and pid file live in the datadir: mariadbd runs as mysql and cannot write
    # to the root-owned workdir.
    datadir = workdir / "scratch-db"
    sock = datadir / "mysqld.sock"
    shutil.rmtree(datadir, ignore_errors=True)
    datadir.mkdir(parents=True)
    shutil.chown(datadir, "mysql", "mysql")
    run(["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=mysql",
         "--auth-root-authentication-method=socket", "--skip-test-db"])
    logf = open(workdir / "scratch-db.log", "ab")
    # Compiled-in defaults match Debian's (128 MiB buffer pool): the restores are comparable.
    proc = subprocess.Popen(
        ["mariadbd", "--no-defaults", f"--datadir={datadir}", f"--socket={sock}",
         "--skip-networking", "--user=mysql", f"--pid-file={datadir / 'mysqld.pid'}",
         "--skip-log-bin", "--max-allowed-packet=1G"],
        stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(120):
            if run(["mariadb-admin", f"--socket={sock}", "ping"], check=False).returncode == 0:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"scratch mariadbd exited; see {workdir / 'scratch-db.log'}")
            time.sleep(0.5)
        SCRATCH_SESSIONS.add(proc.pid)
        yield sock
    finally:
        SCRATCH_SESSIONS.discard(proc.pid)
        run(["mariadb-admin", f"--socket={sock}", "shutdown"], check=False)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            kill_session(proc)
        logf.close()
        shutil.rmtree(datadir, ignore_errors=True)


def reset_scratch(sock: Path) -> None:
    """Drop every non-system database of the scratch server, so each restore starts empty."""
    out = run(["mariadb", f"--socket={sock}", "-N", "-e", "SHOW DATABASES"]).stdout.decode()
    system = {"information_schema", "performance_schema", "sys", "mysql"}
    drops = "".join(f"DROP DATABASE `{d}`;" for d in out.split() if d not in system)
    # The reference loads the `mysql` tables of an --all-databases dump, which leaves the
    # privilege cache stale until a flush; the next restore's GRANTs would then fail.
    run(["mariadb", f"--socket={sock}", "-e", drops + "FLUSH PRIVILEGES;"])


# ------------------------------------------------------------------------------- sample data
IMAGES_MIB = (("overcloud-full.qcow2", 400), ("ironic-python-agent.kernel", 250),
              ("cirros.img", 100))
SWIFT_OBJECTS = 400
SMALL_FILES = 20_000
DATA_VERSION = 1  # bump when the generator changes, so a kept tree is regenerated


def scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def generate_files(root: Path, scale: float) -> None:
    """About 1 GB per unit of scale: services.md appendix A plus the sample's awkward cases."""
    sys.path.insert(0, str(REPO))
    from undercloud_backup import sample

    # Root-only files, ACLs, symlinks, hard links, odd names, xattrs: a restore must keep them.
    sample.make_files(root, sample.SampleSize(images_mib=()))
    rng = random.Random(42)
    images = root / "var/lib/glance/images"
    for name, mib in IMAGES_MIB:  # incompressible, like qcow2 images mostly are
        with open(images / name, "wb") as out:
            left = int(mib * scale * MiB)
            while left:
                n = min(left, MiB)
                out.write(os.urandom(n))
                left -= n
    node = root / "srv/node/d1/objects"
    for i in range(scaled(SWIFT_OBJECTS, scale)):
        d = node / str(i % 64) / f"{rng.getrandbits(12):03x}"
        d.mkdir(parents=True, exist_ok=True)
        body = os.urandom(rng.randint(64, 512) * 1024)
        path = d / f"{rng.getrandbits(64):016x}.data"
        path.write_bytes(body)
        metadata = {"name": f"/AUTH_bench/c/o{i}", "Content-Type": "application/octet-stream",
                    "ETag": hashlib.md5(body, usedforsecurity=False).hexdigest(),
                    "Content-Length": str(len(body)), "X-Timestamp": f"{1.7e9 + i:.5f}"}
        os.setxattr(path, "user.swift.metadata", pickle.dumps(metadata, protocol=2))
    syll = ["ka", "to", "ri", "ne", "mo", "sa", "lu", "vi", "de", "po", "stack", "nova",
            "neutron", "heat", "ironic", "glance", "swift", "keystone", "error", "info", "debug",
            "node", "port", "volume"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    # A pool of log-like lines, drawn from per file: as compressible as appendix A, 20x faster.
    lines = [f"2026-11-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} "
             + " ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + "\n"
             for _ in range(50_000)]
    home = root / "home/stack"
    kinds = ("templates", "logs", "scripts", ".ansible/tmp", "overcloud-deploy", ".cache")
    for i in range(scaled(SMALL_FILES, scale)):
        d = home / kinds[i % 6] / str(i // 500)
        d.mkdir(parents=True, exist_ok=True)
        text = "".join(rng.choices(lines, k=rng.randint(2048, 8192) // 62 + 1))
        (d / f"file{i}.txt").write_text(text)


def database_sql(scale: float) -> str:
    """services.md appendix B (about a 476 MB dump at scale 1), in database ``ucb_bench``."""
    events, instances, blobs = (scaled(n, scale) for n in (1_200_000, 300_000, 8_000))
    return f"""
DROP DATABASE IF EXISTS {BENCH_DB};
CREATE DATABASE {BENCH_DB};
USE {BENCH_DB};
CREATE TABLE events (
  id BIGINT PRIMARY KEY, ts DATETIME NOT NULL, host VARCHAR(64) NOT NULL, level VARCHAR(8) NOT NULL,
  request_id CHAR(36) NOT NULL, msg VARCHAR(512) NOT NULL, KEY (ts), KEY (host)) ENGINE=InnoDB;
CREATE TABLE instances (
  id BIGINT PRIMARY KEY, uuid CHAR(36) NOT NULL, project_id CHAR(32) NOT NULL, name VARCHAR(64),
  state VARCHAR(16), flavor INT, metadata TEXT, created_at DATETIME, UNIQUE KEY (uuid))
  ENGINE=InnoDB;
CREATE TABLE blobs (id INT PRIMARY KEY, kind VARCHAR(16), data MEDIUMTEXT) ENGINE=InnoDB;
SET SESSION sql_log_bin = 0;
INSERT INTO events
SELECT seq, '2026-01-01' + INTERVAL (seq * 7) SECOND, CONCAT('overcloud-controller-', seq % 13),
       ELT(1 + seq % 4, 'INFO', 'DEBUG', 'WARNING', 'ERROR'), UUID(),
       CONCAT('GET /v2.1/servers/', MD5(seq), ' status: ', 200 + seq % 5, ' len: ', seq % 9999,
              ' time: 0.', seq % 997, ' agent: python-novaclient ', SHA1(RAND()))
FROM seq_1_to_{events};
INSERT INTO instances
SELECT seq, UUID(), MD5(seq % 500), CONCAT('vm-', seq), ELT(1 + seq % 3, 'active', 'shutoff',
       'error'), seq % 8, CONCAT('{{"image": "', MD5(RAND()), '", "tags": ["', SHA2(RAND(), 256),
       '"], "notes": "', REPEAT('lorem ipsum ', 10), '"}}'), '2025-01-01' + INTERVAL seq MINUTE
FROM seq_1_to_{instances};
INSERT INTO blobs SELECT seq, 'random', CONCAT(TO_BASE64(RANDOM_BYTES(1024)),
       TO_BASE64(RANDOM_BYTES(1024)), TO_BASE64(RANDOM_BYTES(1024)),
       TO_BASE64(RANDOM_BYTES(1024))) FROM seq_1_to_{blobs};
ANALYZE TABLE events, instances, blobs;
"""


def ensure_bench_db(ctx: Context) -> None:
    """Recreate the bench database if something dropped it (untimed, before a backup).

    A pytest session of this project drops every ucb_* database it finds when it starts, so a
    benchmark running beside the tests can lose its database between two runs.
    """
    if not ctx.source_bytes:
        return  # data not prepared yet (the Prefect overhead runs)
    found = run(["mariadb", "-N", "-e", "SELECT COUNT(*) FROM information_schema.tables "
                 f"WHERE table_schema = '{BENCH_DB}'"], check=False)
    if found.returncode == 0 and found.stdout.decode().strip() == "3":
        return
    log(f"{BENCH_DB} vanished (dropped by someone else?); recreating it")
    run(["mariadb"], input_=database_sql(ctx.args.scale).encode())


def tree_bytes(root: Path) -> tuple[int, int]:
    """Apparent bytes and entries under the archived paths (what tar reads)."""
    total = count = 0
    for rel in PATHS:
        for directory, _dirs, files in os.walk(root / rel):
            count += 1
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(directory, name)).st_size
                count += 1
    return total, count


def dump_bytes(cnf: Path) -> int:
    """Bytes of the reference dump (untimed; it also warms the buffer pool like a first run)."""
    proc = subprocess.Popen(["mariadb-dump", f"--defaults-extra-file={cnf}", *DUMP_OPTS.split()],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    total = 0
    while chunk := proc.stdout.read(MiB):
        total += len(chunk)
    if proc.wait() != 0:
        raise RuntimeError("mariadb-dump failed (is the backup user's option file right?)")
    return total


# ---------------------------------------------------------------------------------- variants
@dataclass
class Context:
    args: argparse.Namespace
    workdir: Path
    root: Path
    staging: Path
    logs: Path
    python: Path
    swift: str
    cnf: Path
    env: dict[str, str]
    api_url: str = ""
    server_sid: int = 0
    scratch_sock: Path | None = None
    source_bytes: int = 0
    restore_available: bool = False
    restore_help: str = ""
    last_backup: dict[str, dict] = field(default_factory=dict)  # variant -> our --json output

    @property
    def segment_bytes(self) -> int:
        return (self.args.segment_mib or 64) * MiB

    def container(self, variant: str) -> str:
        return f"ucb-bench-{variant.replace('_', '-')}"

    def running_env(self) -> dict[str, str]:
        return dict(self.env, PREFECT_API_URL=self.api_url,
                    PREFECT_HOME=str(self.workdir / "prefect-client"))

    def ephemeral_env(self, home: Path | None = None) -> dict[str, str]:
        return dict(self.env, PREFECT_HOME=str(home or self.workdir / "prefect-ephemeral"),
                    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")


def clean_container(ctx: Context, container: str) -> None:
    """Delete a variant's container and its segments (outside the timing)."""
    # Both at once: each CLI call costs a Python start and a token.
    sw = shlex.quote(ctx.swift)
    run(f"{sw} delete {container} & {sw} delete {container}_segments & wait", env=ctx.env,
        check=False)


def tar_cmd(root: Path) -> str:
    return f"tar -C {shlex.quote(str(root))} --xattrs --acls -cf - {' '.join(PATHS)}"


def dump_cmd(ctx: Context) -> str:
    return f"mariadb-dump --defaults-extra-file={shlex.quote(str(ctx.cnf))} {DUMP_OPTS}"


ZSTD = "zstd -q -T0 -3"


def ref_sequential(ctx: Context, c: str) -> str:
    s = shlex.quote(str(ctx.staging))
    return (f"set -e; {dump_cmd(ctx)} | {ZSTD} > {s}/db.sql.zst\n"
            f"{tar_cmd(ctx.root)} | {ZSTD} > {s}/files.tar.zst\n"
            f"cd {s} && {ctx.swift} -q upload {c} db.sql.zst files.tar.zst "
            f"--segment-size {ctx.segment_bytes}")


def _stream(ctx: Context, c: str, producer: str, name: str) -> str:
    return (f"{producer} | {ZSTD} | {ctx.swift} -q upload {c} - --object-name {name} "
            f"--segment-size {ctx.segment_bytes}")


def ref_streamed(ctx: Context, c: str) -> str:
    return (f"set -e; {_stream(ctx, c, dump_cmd(ctx), 'db.sql.zst')}\n"
            f"{_stream(ctx, c, tar_cmd(ctx.root), 'files.tar.zst')}")


def ref_streamed_parallel(ctx: Context, c: str) -> str:
    # What a careful operator could also do by hand: both streams at once.
    return (f"{_stream(ctx, c, dump_cmd(ctx), 'db.sql.zst')} & a=$!\n"
            f"{_stream(ctx, c, tar_cmd(ctx.root), 'files.tar.zst')} & b=$!\n"
            "wait $a; ra=$?; wait $b; rb=$?; exit $((ra | rb))")


def ours_argv(ctx: Context, c: str, *extra: str) -> list[str]:
    # Our own segment size (64 MiB at these sizes), unless --segment-mib was given.
    size = ["--segment-size", f"{ctx.args.segment_mib}MiB"] if ctx.args.segment_mib else []
    return [str(ctx.python), "-m", "flows.backup", "--root", str(ctx.root), "--container", c,
            "--db-defaults-file", str(ctx.cnf), *size, "--staging-dir", str(ctx.staging),
            "--json", *extra]


@dataclass
class Variant:
    name: str
    label: str
    kind: str  # backup | restore | overhead
    build: Callable[[Context, int], tuple[list[str], dict[str, str]] | None]
    prepare: Callable[[Context], None] = lambda ctx: None
    after: Callable[[Context, RunResult], None] = lambda ctx, result: None
    sessions: Callable[[Context], dict[int, str]] = lambda ctx: {}


# The backups the restores read; the other variants' containers are emptied right after a run.
RESTORE_SOURCES = ("reference_sequential", "ours_running_server")


def shell_variant(name: str, label: str, script: Callable[[Context, str], str],
                  kind: str = "backup") -> Variant:
    def build(ctx: Context, _round: int) -> tuple[list[str], dict[str, str]]:
        return ["bash", "-o", "pipefail", "-c", script(ctx, ctx.container(name))], ctx.env

    def prepare(ctx: Context) -> None:
        clean_container(ctx, ctx.container(name))
        for leftover in ctx.staging.glob("*.zst"):
            leftover.unlink()
        ensure_bench_db(ctx)

    def after(ctx: Context, result: RunResult) -> None:
        for leftover in ctx.staging.glob("*.zst"):
            if result.ok:
                result.stored_bytes += leftover.stat().st_size
            leftover.unlink()
        if name not in RESTORE_SOURCES:
            clean_container(ctx, ctx.container(name))  # disk: Swift shares it with the data

    return Variant(name, label, kind, build, prepare, after)


def ours_variant(name: str, label: str, ephemeral: bool, *extra: str,
                 kind: str = "backup") -> Variant:
    def build(ctx: Context, _round: int) -> tuple[list[str], dict[str, str]]:
        env = ctx.ephemeral_env() if ephemeral else ctx.running_env()
        return ours_argv(ctx, ctx.container(name), *extra), env

    def after(ctx: Context, result: RunResult) -> None:
        if result.ok:
            result.timeline = timeline(result)
            with contextlib.suppress(ValueError, IndexError, KeyError):
                ctx.last_backup[name] = json.loads(result.stdout.splitlines()[-1])
                result.stored_bytes = sum(o["size"] for o in ctx.last_backup[name]["objects"])
        if name not in RESTORE_SOURCES:
            clean_container(ctx, ctx.container(name))

    def sessions(ctx: Context) -> dict[int, str]:
        return {ctx.server_sid: "prefect-server"} if ctx.server_sid else {}

    def prepare(ctx: Context) -> None:
        clean_container(ctx, ctx.container(name))
        ensure_bench_db(ctx)

    return Variant(name, label, kind, build, prepare, after, sessions)


def restore_target(ctx: Context, name: str) -> Path:
    return ctx.workdir / "restore" / name


def prepare_restore(name: str) -> Callable[[Context], None]:
    def prepare(ctx: Context) -> None:
        target = restore_target(ctx, name)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        assert ctx.scratch_sock is not None
        reset_scratch(ctx.scratch_sock)
    return prepare


def check_restore(name: str) -> Callable[[Context, RunResult], None]:
    """Untimed sanity check: the files and the bench database came back."""
    def after(ctx: Context, result: RunResult) -> None:
        if not result.ok:
            return
        if name == "restore_ours":
            result.timeline = timeline(result, RESTORE_PHASES)
        got, _ = tree_bytes(restore_target(ctx, name))
        want, _ = tree_bytes(ctx.root)
        rows = run(["mariadb", f"--socket={ctx.scratch_sock}", "-N", "-e",
                    f"SELECT COUNT(*) FROM {BENCH_DB}.events"], check=False)
        count = rows.stdout.decode().strip() if rows.returncode == 0 else "missing"
        expected = scaled(1_200_000, ctx.args.scale)
        if got != want or count != str(expected):
            result.ok = False
            result.note = " ".join(filter(None, (result.note, f"restore check failed: {got}/"
                                                 f"{want} bytes, events rows {count}")))
        shutil.rmtree(restore_target(ctx, name), ignore_errors=True)
    return after


def restore_reference(ctx: Context, _round: int) -> tuple[list[str], dict[str, str]] | None:
    c = ctx.container("reference_sequential")
    target = shlex.quote(str(restore_target(ctx, "restore_reference")))
    script = (f"set -e; {ctx.swift} download {c} files.tar.zst -o - | zstd -dcq | "
              f"tar -x --xattrs --xattrs-include='*' --acls --numeric-owner -C {target}\n"
              f"{ctx.swift} download {c} db.sql.zst -o - | zstd -dcq | "
              f"mariadb --socket={shlex.quote(str(ctx.scratch_sock))}")
    return ["bash", "-o", "pipefail", "-c", script], ctx.env


def restore_ours(ctx: Context, _round: int) -> tuple[list[str], dict[str, str]] | None:
    """``python -m flows.restore`` of our latest bench backup into the scratch target/server.

    Built from the restore CLI's --help, since that flow is being written alongside this one:
    it runs only when the CLI can aim the database at another server than the real one.
    """
    backup = ctx.last_backup.get("ours_running_server")
    if not ctx.restore_available or backup is None:
        return None
    h = ctx.restore_help
    target = str(restore_target(ctx, "restore_ours"))
    argv = [str(ctx.python), "-m", "flows.restore"]
    argv += ["--container", backup["container"]] if "--container" in h else []
    argv += (["--backup-id", backup["backup_id"]] if "--backup-id" in h else [backup["backup_id"]])
    for flag in ("--target", "--root", "--target-root"):
        if flag in h:
            argv += [flag, target]
            break
    if "--db-socket" not in h:
        return None  # it could only load into the real server: not in a benchmark
    argv += ["--db-socket", str(ctx.scratch_sock)]
    if "--db-user" in h:
        argv += ["--db-user", "root"]  # scratch server: root through its socket, no password
    if "--all-databases" in h:
        argv.append("--all-databases")  # users and grants too, as the reference's full load
    if "--staging-dir" in h:
        argv += ["--staging-dir", str(ctx.staging)]
    for flag in ("--yes", "--force"):
        if flag in h:
            argv.append(flag)
    argv += ["--json"] if "--json" in h else []
    return argv, ctx.running_env()


def overhead_tools(ctx: Context, c: str) -> str:
    return _stream(ctx, c, dump_cmd(ctx), "db.sql.zst")


BACKUPS = [
    shell_variant("reference_sequential", "reference sequential (file, then swift upload)",
                  ref_sequential),
    shell_variant("reference_streamed", "reference streamed (| swift upload -), one by one",
                  ref_streamed),
    shell_variant("reference_streamed_parallel", "reference streamed, both at once",
                  ref_streamed_parallel),
    ours_variant("ours_running_server", "ours, running Prefect server", ephemeral=False),
    ours_variant("ours_fast", "ours, running server, --compression-level 1 "
                 "--no-table-checksums", False, "--compression-level", "1",
                 "--no-table-checksums"),
    ours_variant("ours_ephemeral_server", "ours, ephemeral Prefect server", ephemeral=True),
]
RESTORES = [
    Variant("restore_reference", "restore: swift download | zstd -d | tar -x; mariadb <",
            "restore", restore_reference, prepare_restore("restore_reference"),
            check_restore("restore_reference")),
    Variant("restore_ours", "restore: ours (python -m flows.restore)", "restore", restore_ours,
            prepare_restore("restore_ours"), check_restore("restore_ours"),
            lambda ctx: {ctx.server_sid: "prefect-server"} if ctx.server_sid else {}),
]
OVERHEAD = [
    shell_variant("overhead_tools_db_only", "tiny --db-only: dump | zstd | swift upload -",
                  overhead_tools, kind="overhead"),
    ours_variant("overhead_running_server", "tiny --db-only: ours, running server", False,
                 "--db-only", kind="overhead"),
    ours_variant("overhead_ephemeral_server", "tiny --db-only: ours, ephemeral server", True,
                 "--db-only", kind="overhead"),
    Variant("overhead_import_only", "tiny: python -c 'import flows.backup' (no run)", "overhead",
            lambda ctx, _r: ([str(ctx.python), "-c", "import flows.backup"], ctx.running_env())),
]


# ------------------------------------------------------------------------------------ runner
ATTEMPTS = 3


def run_variant(ctx: Context, variant: Variant, round_: int,
                results: dict[str, list[RunResult]]) -> None:
    built = variant.build(ctx, round_)
    if built is None:
        return
    argv, env = built
    # Retries: on a shared server another user's test can drop a database or kill a
    # connection in the middle of an --all-databases dump. Failures stay in the JSON.
    for attempt in range(ATTEMPTS):
        variant.prepare(ctx)
        sessions = {**{sid: "mariadb" for sid in SCRATCH_SESSIONS}, **variant.sessions(ctx)}
        result = measure(variant.name, round_, argv, env, ctx.logs / f"{variant.name}.log",
                         sessions, cwd=str(REPO))
        variant.after(ctx, result)
        results.setdefault(variant.name, []).append(result)
        status = ("ok" if result.ok else f"FAILED rc={result.returncode}") + (
            f" ({result.note})" if result.note else "")
        log(f"  {variant.name:<30} {result.wall_s:7.2f} s  tree {result.rss_mib_tree:6.1f} MiB"
            f"  cpu {result.cpu_s:6.2f} s  other {result.cpu_other_s:5.2f} s  {status}")
        if result.ok:
            return
        if attempt + 1 < ATTEMPTS:
            log(f"  retrying {variant.name} (see {ctx.logs / variant.name}.log)")


def rounds(ctx: Context, variants: list[Variant], runs: int,
           results: dict[str, list[RunResult]], then: Sequence[Variant] = ()) -> None:
    """Alternate: every variant once per round, the order rotated from round to round."""
    for r in range(runs):
        log(f"round {r + 1}/{runs}")
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for variant in order:
            run_variant(ctx, variant, r, results)
        later = list(then)
        for variant in (later[r % len(later):] + later[:r % len(later)]) if later else ():
            run_variant(ctx, variant, r, results)


def summarize(results: dict[str, list[RunResult]], labels: dict[str, str],
              source_bytes: dict[str, int]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, runs in results.items():
        good = [r for r in runs if r.ok]
        walls = [r.wall_s for r in good]
        entry: dict = {"label": labels[name], "runs": len(runs), "failed": len(runs) - len(good)}
        if good:
            median = statistics.median(walls)
            commands: dict[str, list[float]] = {}
            for r in good:
                for comm, s in r.cpu_by_command.items():
                    commands.setdefault(comm, []).append(s)
            servers: dict[str, list[float]] = {}
            for r in good:
                for group, s in r.cpu_servers_s.items():
                    servers.setdefault(group, []).append(s)
            entry.update(
                wall_s_median=round(median, 3), wall_s=walls,
                throughput_mb_s=(round(source_bytes[name] / 1e6 / median, 1)
                                 if source_bytes.get(name) else None),
                rss_mib_peak=max(r.rss_mib_tree for r in good),
                rss_mib_max_process=max(r.rss_mib_max_process for r in good),
                max_process=max(good, key=lambda r: r.rss_mib_max_process).max_process,
                rss_mib_servers_in_tree=max(r.rss_mib_servers_in_tree for r in good),
                rss_mib_at_peak=max(good, key=lambda r: r.rss_mib_tree).rss_mib_at_peak,
                timeline_median={k: round(statistics.median(r.timeline[k] for r in good
                                                             if k in r.timeline), 2)
                                 for k in dict.fromkeys(k for r in good for k in r.timeline)},
                cpu_s_median=round(statistics.median(r.cpu_s for r in good), 2),
                stored_mb_median=(round(statistics.median(
                    r.stored_bytes for r in good) / 1e6, 1) if good[0].stored_bytes else None),
                cpu_by_command_median={k: round(statistics.median(v), 2)
                                       for k, v in commands.items()},
                cpu_servers_s_median={k: round(statistics.median(v), 2)
                                      for k, v in servers.items()},
                cpu_other_s_median=round(statistics.median(r.cpu_other_s for r in good), 2),
                cpu_softirq_s_median=round(statistics.median(r.cpu_softirq_s for r in good),
                                           2),
            )
        entry["per_run"] = [{k: v for k, v in asdict(r).items() if k != "stdout"} for r in runs]
        out[name] = entry
    return out


def ratio(variants: dict[str, dict], a: str, b: str) -> float | None:
    x, y = variants.get(a, {}).get("wall_s_median"), variants.get(b, {}).get("wall_s_median")
    return round(x / y, 3) if x and y else None


def table(variants: dict[str, dict], names: list[str], ref: str | None) -> str:
    head = ("| variant | runs | wall median (s) | min–max (s) | MB/s | tree RSS peak (MiB) "
            "| max process (MiB) | CPU (s) | stored (MB) | vs ref |")
    lines = [head, "|" + "---|" * 10]
    for name in names:
        v = variants.get(name)
        if v is None:
            continue
        label = v["label"].replace("|", "\\|")  # pipes inside a markdown cell
        if "wall_s_median" not in v:
            lines.append(f"| {label} | {v['runs']} | failed | | | | | | | |")
            continue
        vs = ratio(variants, name, ref) if ref else None
        lines.append(
            f"| {label} | {v['runs'] - v['failed']}/{v['runs']} | {v['wall_s_median']:.2f} "
            f"| {min(v['wall_s']):.2f}–{max(v['wall_s']):.2f} "
            f"| {v['throughput_mb_s'] or ''} | {v['rss_mib_peak']:.0f} "
            f"| {v['rss_mib_max_process']:.0f} ({v['max_process']}) | {v['cpu_s_median']:.1f} "
            f"| {v.get('stored_mb_median') or ''} | {f'{vs:.2f}×' if vs else ''} |")
    return "\n".join(lines)


def cpu_table(variants: dict[str, dict], names: list[str]) -> str:
    lines = ["| variant | CPU by command in the tree (s, median) | servers (s) | softirq (s) "
             "| foreign load (s) |", "|---|---|---|---|---|"]
    for name in names:
        v = variants.get(name)
        if not v or "cpu_by_command_median" not in v:
            continue
        top = ", ".join(f"{k} {s:.1f}" for k, s in
                        sorted(v["cpu_by_command_median"].items(), key=lambda kv: -kv[1])[:6]
                        if s >= 0.05)
        servers = ", ".join(f"{k} {s:.1f}" for k, s in v["cpu_servers_s_median"].items()
                            if s >= 0.05)
        lines.append(f"| {name} | {top} | {servers} | {v['cpu_softirq_s_median']:.1f} "
                     f"| {v['cpu_other_s_median']:.1f} |")
    return "\n".join(lines)


def timeline_table(variants: dict[str, dict], names: list[str],
                   phases: tuple[tuple[str, str], ...] = PHASES) -> str:
    """When each phase of our flow was reached, in seconds since the process started."""
    cols = [p for p, _ in phases] + ["process_exited"]
    lines = ["| variant | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name in names:
        t = variants.get(name, {}).get("timeline_median")
        if t:
            lines.append(f"| {name} | " + " | ".join(
                f"{t[c]:.2f}" if c in t else "" for c in cols) + " |")
    return "\n".join(lines)


def memory_table(variants: dict[str, dict], names: list[str]) -> str:
    lines = ["| variant | tree RSS at its peak, by command (MiB) | servers inside (MiB) |",
             "|---|---|---|"]
    for name in names:
        v = variants.get(name)
        if not v or "rss_mib_at_peak" not in v:
            continue
        parts = ", ".join(f"{k} {mib:.0f}" for k, mib in v["rss_mib_at_peak"].items()
                          if mib >= 1)
        lines.append(f"| {name} | {parts} | {v['rss_mib_servers_in_tree'] or ''} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0,
                   help="data size: 1 = ~1 GB of files + a ~500 MB dump (default 1)")
    p.add_argument("--runs", type=int, default=3, help="runs of each variant (default 3)")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/ucb-bench"),
                   help="data, staging, restores and logs (default /var/tmp/ucb-bench)")
    p.add_argument("--segment-mib", type=int,
                   help="Swift segment size for every variant, MiB (default: 64 for the "
                        "reference, our own choice for ours)")
    p.add_argument("--keep", action="store_true",
                   help="keep the generated files and the ucb_bench database for the next run")
    p.add_argument("--only", default="",
                   help="comma-separated subset: overhead,backup,restore (default all)")
    p.add_argument("--python", type=Path, default=REPO / ".venv/bin/python",
                   help="interpreter with the project installed (default the repo's .venv)")
    p.add_argument("--os-env", type=Path, default=STATE / "keystone.env",
                   help="OS_* file of the Swift user (default: services.sh's keystone.env)")
    p.add_argument("--db-defaults-file", type=Path, default=STATE / "mariadb-backup.cnf",
                   help="option file of the MariaDB backup user (default: services.sh's)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.scale <= 0:
        p.error("--runs must be >= 1 and --scale > 0")
    return args


def prepare_data(ctx: Context) -> tuple[int, int, int]:
    """Generate (or reuse, with --keep) the files and (re)create the bench database."""
    marker = ctx.workdir / "data.json"
    want = {"scale": ctx.args.scale, "version": DATA_VERSION}
    if not (marker.exists() and json.loads(marker.read_text()) == want and ctx.root.is_dir()):
        shutil.rmtree(ctx.root, ignore_errors=True)
        marker.unlink(missing_ok=True)
        t = time.monotonic()
        generate_files(ctx.root, ctx.args.scale)
        marker.write_text(json.dumps(want))
        log(f"files generated in {time.monotonic() - t:.1f} s")
    files, entries = tree_bytes(ctx.root)
    t = time.monotonic()
    exists = run(["mariadb", "-N", "-e", f"SELECT COUNT(*) FROM {BENCH_DB}.events"], check=False)
    if exists.returncode != 0 or exists.stdout.decode().strip() != str(
            scaled(1_200_000, ctx.args.scale)):
        for attempt in range(ATTEMPTS):  # other users' tests may kill connections
            try:
                run(["mariadb"], input_=database_sql(ctx.args.scale).encode())
                break
            except RuntimeError as error:
                if attempt + 1 == ATTEMPTS:
                    raise
                log(f"creating {BENCH_DB} failed, retrying: {error}")
        log(f"database {BENCH_DB} created in {time.monotonic() - t:.1f} s")
    dump = dump_bytes(ctx.cnf)
    return files, entries, dump


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the servers we started are stopped on the way out."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _exit_on_sigterm()
    only = set(filter(None, args.only.split(","))) or {"overhead", "backup", "restore"}
    for tool in ("mariadb", "mariadb-dump", "zstd", "tar", "swift"):
        if shutil.which(tool, path="/usr/bin:/bin:/usr/sbin") is None:
            sys.exit(f"bench: {tool} is not installed (deployments/dev/services.sh installs it)")
    workdir = args.workdir.resolve()
    ctx = Context(args=args, workdir=workdir, root=workdir / "root",
                  staging=workdir / "staging", logs=workdir / "logs", python=args.python,
                  swift=shutil.which("swift", path="/usr/bin:/bin") or "swift",
                  cnf=args.db_defaults_file,
                  env=base_env(read_env_file(args.os_env)))
    for d in (ctx.staging, ctx.logs):
        d.mkdir(parents=True, exist_ok=True)
    restore_py = REPO / "flows/restore.py"
    if restore_py.exists():
        help_ = subprocess.run([str(ctx.python), "-m", "flows.restore", "--help"], cwd=REPO,
                               capture_output=True, env=ctx.env, check=False)
        ctx.restore_available = help_.returncode == 0
        ctx.restore_help = help_.stdout.decode()
    results: dict[str, list[RunResult]] = {}
    labels = {v.name: v.label for v in BACKUPS + RESTORES + OVERHEAD}
    report: dict = {"scale": args.scale, "runs": args.runs, "segment_mib": args.segment_mib,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": {
                        "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()[0]}}
    sources: dict[str, int] = {}
    t0 = time.monotonic()
    try:
        # Prefect's fixed cost first, while the server holds no bench database: --db-only dumps
        # every database there is.
        run(["mariadb", "-e", f"DROP DATABASE IF EXISTS {BENCH_DB}"])
        with prefect_server(workdir / "prefect-server", ctx.python, ctx.env) as (url, sid):
            ctx.api_url, ctx.server_sid = url, sid
            if "overhead" in only:
                first_home = workdir / "prefect-first-run"
                shutil.rmtree(first_home, ignore_errors=True)
                first = Variant("overhead_ephemeral_first_run",
                                "tiny --db-only: ours, ephemeral, fresh PREFECT_HOME (migrations)",
                                "overhead", lambda c, _r: (ours_argv(
                                    c, c.container("overhead_ephemeral_server"), "--db-only"),
                                    c.ephemeral_env(first_home)))
                labels[first.name] = first.label
                log("Prefect overhead on a tiny --db-only backup")
                run_variant(ctx, first, 0, results)
                rounds(ctx, OVERHEAD, args.runs, results)
                for v in OVERHEAD[:3]:
                    clean_container(ctx, ctx.container(v.name))
                shutil.rmtree(first_home, ignore_errors=True)
            if only & {"backup", "restore"}:
                log(f"preparing data at scale {args.scale} under {ctx.root}")
                files, entries, dump = prepare_data(ctx)
                ctx.source_bytes = files + dump
                report["data"] = {"files_bytes": files, "file_entries": entries,
                                  "dump_bytes": dump, "source_bytes": files + dump}
                log(f"data: {files / 1e6:.0f} MB in {entries} entries, dump {dump / 1e6:.0f} MB")
                for v in BACKUPS + RESTORES:
                    sources[v.name] = ctx.source_bytes
                with contextlib.ExitStack() as stack:
                    restores: list[Variant] = []
                    if "restore" in only:
                        ctx.scratch_sock = stack.enter_context(scratch_mariadb(workdir))
                        restores = RESTORES
                    backups = BACKUPS if "backup" in only else [
                        v for v in BACKUPS
                        if v.name in ("reference_sequential", "ours_running_server")]
                    rounds(ctx, backups, args.runs, results, then=restores)
                for v in BACKUPS:
                    clean_container(ctx, ctx.container(v.name))
    finally:
        if not args.keep:
            run(["mariadb", "-e", f"DROP DATABASE IF EXISTS {BENCH_DB}"], check=False)
            shutil.rmtree(ctx.root, ignore_errors=True)
            (workdir / "data.json").unlink(missing_ok=True)
        shutil.rmtree(workdir / "restore", ignore_errors=True)
    variants = summarize(results, labels, sources)
    report["variants"] = variants
    report["ratios"] = {
        "backup_vs_reference_sequential": ratio(variants, "ours_running_server",
                                                "reference_sequential"),
        "backup_ephemeral_vs_reference_sequential": ratio(variants, "ours_ephemeral_server",
                                                          "reference_sequential"),
        "backup_vs_reference_streamed": ratio(variants, "ours_running_server",
                                              "reference_streamed"),
        "backup_vs_reference_streamed_parallel": ratio(variants, "ours_running_server",
                                                       "reference_streamed_parallel"),
        "restore_vs_reference": ratio(variants, "restore_ours", "restore_reference"),
    }
    report["restore_ours"] = ("measured" if "restore_ours" in variants else
                              "ours: not available" + (
                                  "" if ctx.restore_available or not restore_py.exists()
                                  else " (flows.restore --help failed)"))
    report["total_s"] = round(time.monotonic() - t0, 1)

    data = report.get("data")
    print(f"\n## undercloud-backup benchmark, scale {args.scale}, {args.runs} run(s) each, "
          + (f"{args.segment_mib} MiB segments" if args.segment_mib else
             "64 MiB segments for the reference, our own choice for ours"))
    if data:
        print(f"source: {data['files_bytes'] / 1e6:.0f} MB of files ({data['file_entries']} "
              f"entries) + {data['dump_bytes'] / 1e6:.0f} MB dump = "
              f"{data['source_bytes'] / 1e6:.0f} MB\n")
    names = [v.name for v in BACKUPS + RESTORES]
    print(table(variants, [n for n in names if n.startswith(("ref", "ours"))],
                "reference_sequential"))
    print()
    print(table(variants, ["restore_reference", "restore_ours"], "restore_reference"))
    if "restore_ours" not in variants:
        print(f"\nrestore, {report['restore_ours']}")
    over = ["overhead_tools_db_only", "overhead_import_only", "overhead_running_server",
            "overhead_ephemeral_server", "overhead_ephemeral_first_run"]
    if any(n in variants for n in over):
        print()
        print(table(variants, over, "overhead_tools_db_only"))
    print()
    print(cpu_table(variants, names + over))
    print()
    print(memory_table(variants, names + over))
    print("\nour flow's timeline (s since start, median):\n")
    print(timeline_table(variants, [n for n in names + over if not n.startswith("restore")]))
    if "restore_ours" in variants:
        print()
        print(timeline_table(variants, ["restore_ours"], RESTORE_PHASES))
    print("\nratios: " + ", ".join(f"{k} = {v}" for k, v in report["ratios"].items()))
    print(f"total {report['total_s']:.0f} s; logs in {ctx.logs}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"JSON written to {args.json}")
    # Exit 1 only when a variant never succeeded: times are reported, never asserted.
    return 1 if any("wall_s_median" not in v for v in variants.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
