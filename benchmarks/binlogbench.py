"""The binary log (``--only binlog``) and a full backup's stream timeline (``--only timeline``).

binlog: a scratch MariaDB with the binary log on (ROW format, its own port and socket under
the workdir), started and stopped by the benchmark, holding the sample database. A full
(``--full``), then six nights, each after 1 % of the rows (events, instances, blobs) and 1 %
of the files changed: every nightly ships the binary log since its parent instead of
dumping. Then a full of the chain's final state, the restores of both into the scratch
target server (the chain: the full dump replayed to the sixth nightly's end point, the files
through their incrementals), and a ``--binlogs-only`` run after one more change of the rows,
whose stored bytes are set against the bytes the server wrote to its logs meanwhile.

timeline: one full backup of ours (``--full``, the shared server, the sample) with each
stream's processes sampled every 0.1 s: when ``mariadb-dump``, ``tar`` and each ``zstd``
started, wrote their first and their last byte, and exited; the flow's own marks from its
log (stream started, object stored, manifest written); the machine's idle core-seconds over
the run. The reference sequential pipeline runs once beside it, for the ratio.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from context import Context
from incremental import Changes
from measure import RunResult
from proctree import TICK, all_procs, cmdline
from runner import Results, run_variant
from sampledata import BENCH_DB, database_sql, scaled
from servers import SCRATCH_SESSIONS, scratch_mariadb
from shell import free_port, kill_session, log, run, spawn, wait_ready
from variants import BACKUPS, Variant, ours_argv, parse_ours, reset_restore_target, restore_check

NIGHTS = 6
CHAIN = "binlog_chain"
EQUIVALENT = "binlog_equivalent"
LABELS = {
    "binlog_full": "binary log on: the full (--full)",
    "binlog_nightly_1pct": "nightly, 1 % rows + 1 % files changed (log shipped)",
    "binlog_nightly_more": "nightlies 2-6 of the chain (1 % each)",
    "binlog_equivalent_full": "a full of the chain's final state (--full)",
    "binlog_restore_chain": "restore: full + 6 nightlies (log replayed to the 6th's end)",
    "binlog_restore_full": "restore: the equivalent full",
    "binlog_binlogs_only": "--binlogs-only after 1 % of the rows changed",
    "timeline_full": "ours, full (--full), streams sampled",
    "timeline_reference": "reference sequential (file, then swift upload)",
}
GRANTS = ("SELECT, SHOW VIEW, TRIGGER, LOCK TABLES, EVENT, RELOAD, PROCESS, SHOW DATABASES, "
          "BINLOG MONITOR, REPLICATION SLAVE")
STREAM_COMMS = ("mariadb-dump", "tar", "zstd", "age")


# ------------------------------------------------------------------------------ the server
@dataclass
class BinlogDb:
    sock: Path
    cnf: Path  # the backup user's option file (TCP, its own port)

    def sql(self, text: str) -> str:
        return run(["mariadb", "--no-defaults", f"--socket={self.sock}", "-N", "-e", text]
                   ).stdout.decode()

    def log_bytes(self) -> int:
        """Bytes of every binary log file the server has (SHOW BINARY LOGS)."""
        return sum(int(line.split()[1]) for line in self.sql("SHOW BINARY LOGS").splitlines())

    def change_rows(self, night: int) -> None:
        """1 % of each table's rows updated (ROW format: before and after images logged)."""
        n = night % 100
        self.sql(f"UPDATE {BENCH_DB}.events SET msg = CONCAT(LEFT(msg, 400), ' n{night}') "
                 f"WHERE id % 100 = {n}; UPDATE {BENCH_DB}.instances SET state = "
                 f"'night-{night}' WHERE id % 100 = {n}; UPDATE {BENCH_DB}.blobs SET kind = "
                 f"'night-{night}' WHERE id % 100 = {n};")


@contextlib.contextmanager
def binlog_mariadb(workdir: Path, scale: float) -> Iterator[BinlogDb]:
    """mariadbd with log_bin on (ROW), on 127.0.0.1:PORT and a socket, holding the sample."""
    datadir, port = workdir / "binlog-db", free_port()
    sock = datadir / "mysqld.sock"
    shutil.rmtree(datadir, ignore_errors=True)
    datadir.mkdir(parents=True)
    shutil.chown(datadir, "mysql", "mysql")
    run(["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=mysql",
         "--auth-root-authentication-method=socket", "--skip-test-db"])
    logfile = workdir / "binlog-db.log"
    ping = ["mariadb-admin", "--no-defaults", f"--socket={sock}", "ping"]
    with open(logfile, "ab") as logf:
        proc = spawn(["mariadbd", "--no-defaults", f"--datadir={datadir}", f"--socket={sock}",
                      f"--port={port}", "--bind-address=127.0.0.1", "--user=mysql",
                      f"--pid-file={datadir / 'mysqld.pid'}", f"--log-bin={datadir / 'binlog'}",
                      "--binlog-format=ROW", "--server-id=9", "--max-allowed-packet=1G"], logf)
    try:
        wait_ready(proc, lambda: run(ping, check=False).returncode == 0, "binlog mariadbd",
                   logfile, timeout=60)
        SCRATCH_SESSIONS.add(proc.pid)  # its CPU counts as "mariadb", not as other load
        password = os.urandom(12).hex()
        cnf = workdir / "binlog-backup.cnf"
        cnf.write_text(f"[client]\nhost=127.0.0.1\nport={port}\nuser=ucbbench\n"
                       f"password={password}\n")
        cnf.chmod(0o600)
        db = BinlogDb(sock, cnf)
        db.sql(f"CREATE USER 'ucbbench'@'127.0.0.1' IDENTIFIED BY '{password}'; "
               f"GRANT {GRANTS} ON *.* TO 'ucbbench'@'127.0.0.1';")
        t = time.monotonic()
        # the sample's load is not logged (sql_log_bin = 0 in it): the logs hold the nights
        run(["mariadb", "--no-defaults", f"--socket={sock}"], input_=database_sql(scale).encode())
        log(f"binlog server on port {port}: {BENCH_DB} loaded in {time.monotonic() - t:.1f} s")
        yield db
    finally:
        SCRATCH_SESSIONS.discard(proc.pid)
        run(["mariadb-admin", "--no-defaults", f"--socket={sock}", "shutdown"], check=False)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            kill_session(proc)
        shutil.rmtree(datadir, ignore_errors=True)
        (workdir / "binlog-backup.cnf").unlink(missing_ok=True)


# ------------------------------------------------------------------------------ variants
def _backup(name: str, container: str, db: BinlogDb, *extra: str, want_db: str = "binlog",
            clean: bool = False) -> Variant:
    def build(ctx: Context, _round: int):
        argv = ours_argv(ctx, ctx.container(container), *extra)
        argv[argv.index("--db-defaults-file") + 1] = str(db.cnf)
        return argv, ctx.running_env()

    def prepare(ctx: Context) -> None:
        if clean:
            ctx.clean_container(ctx.container(container))

    def after(ctx: Context, result: RunResult) -> None:
        parse_ours(ctx, name, result)
        out = ctx.last_backup.get(name) if result.ok else None
        if out is not None:
            result.kind, result.parent = str(out.get("kind")), str(out.get("parent"))
            if out.get("database_kind") != want_db:
                result.ok = False
                result.add_note(f"expected database_kind {want_db}, --json says "
                                f"{out.get('database_kind')!r} ({out.get('full_reason')})")

    return Variant(name, LABELS[name], "binlog", build, prepare, after, Context.server_sessions)


def _restore(name: str, source: str) -> Variant:
    def build(ctx: Context, _round: int):
        backup = ctx.last_backup.get(source)
        if backup is None:
            return None
        return [str(ctx.python), "-m", "flows.restore", "--container", backup["container"],
                "--backup-id", backup["backup_id"], "--target", str(ctx.restore_target(name)),
                "--db-socket", str(ctx.scratch_sock), "--db-user", "root", "--all-databases",
                "--staging-dir", str(ctx.staging), "--json"], ctx.running_env()

    def after(ctx: Context, result: RunResult) -> None:
        if result.ok:
            restore_check(ctx, name, result)

    return Variant(name, LABELS[name], "binlog", build,
                   lambda ctx: reset_restore_target(ctx, name), after, Context.server_sessions)


def _step(ctx: Context, variant: Variant, results: Results) -> bool:
    run_variant(ctx, variant, 0, results)
    runs = results.get(variant.name) or []
    return bool(runs) and runs[-1].ok


def binlog_part(ctx: Context, results: Results, report: dict) -> None:
    """The chain on the binlog server, its restores, then --binlogs-only (one round)."""
    changes = Changes(ctx.workdir, ctx.root)
    facts: dict = report.setdefault("binlog", {})
    with contextlib.ExitStack() as stack:
        db = stack.enter_context(binlog_mariadb(ctx.workdir, ctx.args.scale))
        ctx.scratch_sock = stack.enter_context(scratch_mariadb(ctx.workdir))
        try:
            if not _step(ctx, _backup("binlog_full", CHAIN, db, "--full", want_db="dump",
                                      clean=True), results):
                return
            tip = ""
            for night in range(1, NIGHTS + 1):
                t = time.monotonic()
                before = db.log_bytes()
                db.change_rows(night)
                changed = changes.night(1.0)
                facts.setdefault("log_bytes_per_night", []).append(db.log_bytes() - before)
                log(f"  night {night}: rows and files changed in "
                    f"{time.monotonic() - t:.1f} s, {changed}")
                tip = "binlog_nightly_1pct" if night == 1 else "binlog_nightly_more"
                if not _step(ctx, _backup(tip, CHAIN, db), results):
                    return
            ctx.last_backup["binlog_tip"] = ctx.last_backup[tip]
            if _step(ctx, _backup("binlog_equivalent_full", EQUIVALENT, db, "--full",
                                  want_db="dump", clean=True), results):
                _step(ctx, _restore("binlog_restore_chain", "binlog_tip"), results)
                _step(ctx, _restore("binlog_restore_full", "binlog_equivalent_full"), results)
            # A quarter of an hour later: only the rows changed, only the log shipped.
            before = db.log_bytes()
            db.change_rows(NIGHTS + 1)
            facts["log_bytes_binlogs_only"] = db.log_bytes() - before
            _step(ctx, _backup("binlog_binlogs_only", CHAIN, db, "--binlogs-only"), results)
            facts["rows_changed_per_night"] = sum(
                scaled(n, ctx.args.scale) // 100 for n in (1_200_000, 300_000, 8_000))
        finally:
            changes.undo()
            ctx.scratch_sock = None
            for name in (CHAIN, EQUIVALENT):
                ctx.clean_container(ctx.container(name))


# ------------------------------------------------------------------------------ timeline
@dataclass
class Stream:
    comm: str
    pid: int
    started: float
    first_byte: float | None = None
    last_byte: float | None = None
    exited: float | None = None
    wrote: int = 0
    cmd: str = ""


def _wchar(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            for line in f:
                if line.startswith(b"wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _idle_ticks() -> int:
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()
    return int(fields[4]) + int(fields[5])  # idle + iowait


@dataclass(eq=False)  # a thread: hashed by identity
class StreamSampler(threading.Thread):
    """Every 0.1 s: the stream processes (``STREAM_COMMS``) of the session whose command line
    names ``marker`` (our container), with when each wrote its first and last byte."""

    marker: str
    interval: float = 0.1
    streams: dict[tuple[int, int], Stream] = field(default_factory=dict)
    busy_cores: list[tuple[float, float]] = field(default_factory=list)  # (t, cores busy)

    def __post_init__(self) -> None:
        super().__init__(daemon=True, name="stream-sampler")
        self._halt = threading.Event()
        self._ours: dict[int, bool] = {}
        self.t0 = time.monotonic()
        self.idle0 = _idle_ticks()

    def run(self) -> None:
        last_t, last_idle = 0.0, self.idle0
        while not self._halt.is_set():
            now = time.monotonic() - self.t0
            self.sample(now)
            idle = _idle_ticks()
            dt = now - last_t
            if dt >= 1.0:
                cores = os.cpu_count() or 1
                self.busy_cores.append((round(now, 1), round(
                    cores - (idle - last_idle) / TICK / dt, 2)))
                last_t, last_idle = now, idle
            self._halt.wait(self.interval)

    def stop(self) -> float:
        """Stop; the idle core-seconds since the start."""
        idle = _idle_ticks()
        self._halt.set()
        self.join()
        return (idle - self.idle0) / TICK

    def _is_ours(self, sid: int) -> bool:
        if sid not in self._ours:
            self._ours[sid] = self.marker in cmdline(sid)
        return self._ours[sid]

    def sample(self, now: float) -> None:
        alive = set()
        for proc in all_procs():
            if proc.comm not in STREAM_COMMS or not self._is_ours(proc.sid):
                continue
            key = (proc.pid, proc.start)
            alive.add(key)
            stream = self.streams.get(key)
            if stream is None:
                stream = self.streams[key] = Stream(proc.comm, proc.pid, now,
                                                    cmd=cmdline(proc.pid)[:80])
            wrote = _wchar(proc.pid)
            if wrote is not None and wrote > stream.wrote:
                stream.first_byte = now if stream.first_byte is None else stream.first_byte
                stream.last_byte, stream.wrote = now, wrote
        for key, stream in self.streams.items():
            if key not in alive and stream.exited is None:
                stream.exited = now


def timeline_part(ctx: Context, results: Results, report: dict) -> None:
    """One full of ours with its streams sampled, and the reference sequential once."""
    name = "timeline_full"
    container = ctx.container(name)
    reference = next(v for v in BACKUPS if v.name == "reference_sequential")
    ref = Variant("timeline_reference", LABELS["timeline_reference"], "timeline",
                  reference.build, reference.prepare, reference.after, reference.sessions)
    run_variant(ctx, ref, 0, results)
    ctx.clean_container(ctx.container("reference_sequential"))

    def build(ctx: Context, _round: int):
        return ours_argv(ctx, container, "--full"), ctx.running_env()

    sampler: list[StreamSampler] = []

    def prepare(ctx: Context) -> None:
        ctx.clean_container(container)
        sampler[:] = [StreamSampler(container)]
        sampler[0].start()

    def after(ctx: Context, result: RunResult) -> None:
        idle = sampler[0].stop()
        parse_ours(ctx, name, result)
        cores = os.cpu_count() or 1
        report["timeline"] = {
            "wall_s": result.wall_s, "cores": cores,
            "idle_core_s": round(idle, 1),
            "busy_cores_mean": round(cores - idle / result.wall_s, 2) if result.wall_s else None,
            "flow_marks": result.timeline,
            "streams": [{"comm": s.comm, "start": round(s.started, 1),
                         "first_byte": s.first_byte and round(s.first_byte, 1),
                         "last_byte": s.last_byte and round(s.last_byte, 1),
                         "exited": s.exited and round(s.exited, 1),
                         "mb_written": round(s.wrote / 1e6, 1), "cmd": s.cmd}
                        for s in sampler[0].streams.values()],
            "busy_cores_per_s": sampler[0].busy_cores}
        ctx.clean_container(container)

    run_variant(ctx, Variant(name, LABELS[name], "timeline", build, prepare, after,
                             Context.server_sessions), 0, results)


# ------------------------------------------------------------------------------ report
def _median(variants: dict, name: str, key: str) -> float | None:
    return (variants.get(name) or {}).get(key)


def ratios(variants: dict, facts: dict) -> dict[str, float | None]:
    """The targets' ratios: nightly/full time and bytes, chain/full restore, --binlogs-only
    bytes against the logs' bytes, ours/reference for the sampled full."""
    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    wall, stored = "wall_s_median", "stored_mb_median"
    logs = facts.get("binlog", {}).get("log_bytes_binlogs_only")
    return {
        "binlog_nightly_vs_full_wall": div(_median(variants, "binlog_nightly_1pct", wall),
                                           _median(variants, "binlog_full", wall)),
        "binlog_nightly_vs_full_bytes": div(_median(variants, "binlog_nightly_1pct", stored),
                                            _median(variants, "binlog_full", stored)),
        "binlog_restore_chain_vs_full": div(_median(variants, "binlog_restore_chain", wall),
                                            _median(variants, "binlog_restore_full", wall)),
        "binlogs_only_bytes_vs_logs": div(_median(variants, "binlog_binlogs_only", stored),
                                          logs / 1e6 if logs else None),
        "timeline_full_vs_reference_sequential": div(_median(variants, "timeline_full", wall),
                                                     _median(variants, "timeline_reference",
                                                             wall)),
    }


def render_timeline(t: dict) -> str:
    marks = ", ".join(f"{k} {v:.1f}" for k, v in t["flow_marks"].items())
    out = [f"full backup timeline (s since start; {t['cores']} cores, idle "
           f"{t['idle_core_s']:.1f} core-s of {t['cores'] * t['wall_s']:.1f}, "
           f"{t['busy_cores_mean']} cores busy on average)", f"flow: {marks}", "",
           "| process | start | first byte | last byte | exited | MB written |", "|---" * 6 + "|"]
    for s in t["streams"]:
        out.append(f"| {s['comm']} | {s['start']} | {s['first_byte']} | {s['last_byte']} "
                   f"| {s['exited']} | {s['mb_written']} |")
    out.append("busy cores per second: " + " ".join(f"{c:.1f}" for _, c in
                                                    t["busy_cores_per_s"]))
    return "\n".join(out)


VARIANT_NAMES = [n for n in LABELS if n.startswith("binlog")]
TIMELINE_NAMES = ["timeline_reference", "timeline_full"]
