"""The fault matrix: every fault case once, against the real services.

Not a pytest module (pytest collects test_*.py only): run it as a script from the repository
root, under the machine lock that test runs take::

    PATH=$PWD/.venv/bin:$PATH flock /tmp/ucb-pytest.lock \\
        .venv/bin/python tests/fault_matrix.py --markdown matrix.md

Per case: one good "earlier" backup into a fresh container (ucbtest-matrix-<random>), then the
faulty run (``python -m flows.backup`` as an operator runs it) into the same container, then what
is observed: exit status, the last stderr line, whether a new manifest appeared, whether the
earlier backup (its manifest's bytes and every object, HEAD each) is intact, leftovers (objects
of a backup id with no manifest, files in the run's staging directory, processes of the run's
session still alive) and the time the faulty run took. Nothing is asserted: the table is the
result, to be read against what the tests claim. Faults in Swift go through tests/swift_proxy.py.
The script starts its own Prefect server (as conftest does) so each run does not start one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]
STATE = Path(os.environ.get("UCB_DEV_STATE", "/var/lib/undercloud-backup-dev"))
DB_CNF = str(STATE / "mariadb-backup.cnf")
PYTHON = sys.executable
SOCKET = "/run/mysqld/mysqld.sock"
SMALL_SWIFT = ["--swift-timeout", "2", "--swift-retry-budget", "6", "--task-retries", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The environment, set before anything imports prefect (as conftest does).
PREFECT_HOME = tempfile.mkdtemp(prefix="ucb-matrix-prefect-")
PREFECT_PORT = _free_port()
os.environ.update(
    PREFECT_HOME=PREFECT_HOME,
    PREFECT_API_URL=f"http://127.0.0.1:{PREFECT_PORT}/api",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_SERVER_EPHEMERAL_ENABLED="false",
    PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.3",
)
for _key in [k for k in os.environ if k.startswith("OS_")]:
    del os.environ[_key]
from deploy_helpers import read_env_file  # noqa: E402 - after sys.path, before prefect

os.environ.update(read_env_file(STATE / "keystone.env"))

from deploy_helpers import stop  # noqa: E402
from swift_proxy import Rule, SwiftProxy  # noqa: E402

from undercloud_backup import config  # noqa: E402
from undercloud_backup.core.errors import NotFound  # noqa: E402
from undercloud_backup.store.connection import SwiftStore  # noqa: E402


def mariadb(sql: str) -> str:
    result = subprocess.run(["mariadb", "--batch", "--skip-column-names"], input=sql,
                            capture_output=True, text=True, check=True)
    return result.stdout


def store() -> SwiftStore:
    return SwiftStore.connect(config.swift_settings_from_env(retries=1))


def objects(container: str) -> dict[str, str]:
    """container/name -> etag, for the container and its segments container."""
    s = store()
    found: dict[str, str] = {}
    for c in (container, f"{container}_segments"):
        try:
            listing = s.list(c)
        except NotFound:
            continue
        found.update({f"{c}/{o['name']}": o["hash"] for o in listing})
    return found


def remove_container(container: str) -> None:
    s = store()
    for c in (container, f"{container}_segments"):
        try:
            for o in s.list(c):
                s.delete(c, o["name"])
            s.delete_container(c)
        except Exception:  # noqa: BLE001 - may never have been created
            pass


def manifests(names) -> set[str]:
    return {n for n in names if n.endswith("/manifest.json") and n.count("/") == 2}


def backup_id(name: str) -> str:
    return name.split("/", 2)[1]


class RandomFail(Rule):
    """Answer ``status`` to a fraction of the matching requests (forever)."""

    def __init__(self, fraction: float, status: int = 503) -> None:
        super().__init__("fail", times=None, status=status)
        self.fraction = fraction
        self.rng = random.Random(15)

    def matches(self, method: str, path: str) -> bool:
        return self.rng.random() < self.fraction


@dataclass
class Result:
    case: str
    status: str = ""
    last: str = ""
    manifest: str = ""
    intact: str = ""
    leftovers: str = ""
    seconds: str = ""
    notes: list[str] = field(default_factory=list)


def start_prefect() -> subprocess.Popen:
    log = open(Path(PREFECT_HOME) / "server.log", "wb")
    server = subprocess.Popen(
        [str(Path(PYTHON).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
         "--port", str(PREFECT_PORT), "--analytics-off"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(os.environ),
        start_new_session=True)
    log.close()
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{os.environ['PREFECT_API_URL']}/health",
                                        timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Prefect server did not start; see {PREFECT_HOME}/server.log")
        time.sleep(0.2)


def session_alive(sid: int) -> list[str]:
    found = subprocess.run(["pgrep", "-a", "-s", str(sid)], capture_output=True, text=True)
    return [ln for ln in found.stdout.splitlines() if ln.strip()]


class Matrix:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.root = self._make_root()
        self.proxy = SwiftProxy().start()
        real = SwiftStore.connect(config.swift_settings_from_env()).url
        self.proxy.account_url = self.proxy.storage_url(real)
        self.containers: list[str] = []
        self.results: list[Result] = []

    def _make_root(self) -> Path:
        import sample_undercloud as sample

        return sample.make_files(self.work / "undercloud", sample.SampleSize(
            images_mib=(3,), swift_objects=4, small_files=10))

    def new_container(self) -> str:
        name = f"ucbtest-matrix-{uuid.uuid4().hex[:10]}"
        self.containers.append(name)
        return name

    def earlier(self, container: str) -> dict:
        result = subprocess.run(
            [PYTHON, "-m", "flows.backup", "--root", str(self.root), "--container", container,
             "--db-defaults-file", DB_CNF, "--segment-size", "1MiB", "--no-prune", "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
        if result.returncode != 0:
            raise RuntimeError(f"earlier backup failed ({result.returncode}): "
                               f"{result.stderr.strip().splitlines()[-1:]}")
        summary = json.loads(result.stdout)
        return {"summary": summary, "objects": objects(container),
                "manifest": store().get_bytes(container, summary["manifest"])}

    def run(self, case: str, earlier: dict | None, container: str, args: list[str], *,
            env: dict[str, str] | None = None, root: Path | None = None,
            staging: Path | None = None, during=None, timeout: float = 240,
            after=None, use_root: bool = True, watch: str | None = None) -> Result:
        """The faulty run: ``during(process)`` runs while it does (signals, fillers)."""
        res = Result(case)
        staging = staging or Path(tempfile.mkdtemp(dir=self.work, prefix="staging-"))
        argv = [PYTHON, "-m", "flows.backup"]
        if use_root:
            argv += ["--root", str(root or self.root)]
        argv += ["--container", container, "--staging-dir", str(staging), *args]
        if "--db-defaults-file" not in args:
            argv += ["--db-defaults-file", DB_CNF]
        if "--no-prune" not in args:
            argv.append("--no-prune")  # the earlier backup is the case's, not prune's
        started = time.monotonic()
        process = subprocess.Popen(argv, cwd=REPO, env=env or dict(os.environ), text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
        extra: list[str] = []
        if during is not None:
            holder: dict = {}

            def act() -> None:
                try:
                    holder["note"] = during(process)
                except Exception as error:  # noqa: BLE001 - said in the table
                    holder["note"] = f"fault driver failed: {error}"

            driver = threading.Thread(target=act, daemon=True)
            driver.start()
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            _, stderr = process.communicate()
            extra.append(f"killed by the matrix after {timeout:.0f} s")
        took = time.monotonic() - started
        if during is not None:
            driver.join(timeout=30)
            if holder.get("note"):
                extra.append(str(holder["note"]))
        deadline = time.monotonic() + 3  # what outlives the run by 3 s
        while (alive := session_alive(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if alive:
            ps = subprocess.run(["ps", "-o", "pid=,stat=,comm=", "-s", str(process.pid)],
                                capture_output=True, text=True).stdout.split("\n")
            alive = [" ".join(line.split()) for line in ps if line.strip()]
        for pid_line in alive:  # ours to end, by id
            try:
                os.kill(int(pid_line.split()[0]), signal.SIGKILL)
            except OSError:
                pass
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else "(none)"
        res.status = str(process.returncode)
        res.last = last if len(last) <= 140 else last[:137] + "..."
        res.seconds = f"{took:.1f}"
        if process.returncode not in (0, None) and " failed: HTTP " in last:
            extra.append("transaction id in the error line: "
                         + ("yes" if "transaction tx" in last else "NO"))
        if "Traceback" in stderr:
            extra.append("TRACEBACK in stderr")
        for secret in ("backuppass", os.environ.get("OS_PASSWORD", "\0")):
            if secret and secret in stderr:
                extra.append("A PASSWORD IS IN STDERR")
        if after is not None:
            note = after()
            if note:
                extra.append(note)
        self.judge(res, earlier, watch or container, staging, alive, extra)
        return res

    def judge(self, res: Result, earlier: dict | None, container: str, staging: Path,
              alive: list[str], extra: list[str]) -> None:
        now = objects(container) if container else {}
        before = earlier["objects"] if earlier else {}
        new_manifests = manifests(now) - manifests(before)
        res.manifest = f"yes ({len(new_manifests)})" if new_manifests else "no"
        if earlier:
            s = store()
            missing = []
            for name in before:
                c, _, obj = name.partition("/")
                try:
                    s.head(c, obj)
                except NotFound:
                    missing.append(name)
            changed = [n for n, etag in before.items() if now.get(n, etag) != etag]
            try:
                same = (s.get_bytes(container, earlier["summary"]["manifest"])
                        == earlier["manifest"])
            except NotFound:
                same = False
            res.intact = ("yes" if not missing and not changed and same else
                          f"NO: {len(missing)} missing, {len(changed)} changed, "
                          f"manifest {'same' if same else 'differs'}")
        else:
            res.intact = "n/a"
        complete = {backup_id(m) for m in manifests(now)}
        orphans = [n for n in now if backup_id(n) not in complete]
        staged = [p.name for p in staging.iterdir()] if staging.exists() else []
        parts = []
        if orphans:
            ids = sorted({backup_id(n) for n in orphans})
            parts.append(f"{len(orphans)} object(s) without manifest ({', '.join(ids)})")
        if staged:
            parts.append(f"staging: {staged[:3]}")
        if alive:
            parts.append(f"{len(alive)} process(es) of the run alive 3 s after it: "
                         f"{', '.join(alive)[:90]}")
        res.leftovers = "; ".join(parts) or "none"
        res.notes = extra

    # ------------------------------------------------------------------ the cases
    def case(self, name: str, body) -> None:
        """Make the earlier backup, run ``body(container, earlier)``; any failure is a row."""
        print(f"--- {name}", file=sys.stderr, flush=True)
        container = self.new_container()
        started = time.monotonic()
        try:
            earlier = self.earlier(container)
            results = body(container, earlier)
            for r in results if isinstance(results, list) else [results]:
                self.results.append(r)
                print(f"    {r.status} {r.seconds}s {r.last}", file=sys.stderr, flush=True)
        except Exception as error:  # noqa: BLE001 - the table says so
            traceback.print_exc()
            self.results.append(Result(name, status=f"not run: {type(error).__name__}: "
                                       f"{str(error)[:120]}"))
        finally:
            self.proxy.clear()
            print(f"    case took {time.monotonic() - started:.1f} s", file=sys.stderr)

    def through_proxy(self, **extra: str) -> dict[str, str]:
        return dict(os.environ, OS_STORAGE_URL=self.proxy.account_url, **extra)

    def proxy_note(self) -> str:
        faults = [s.fault for s in self.proxy.log if s.fault]
        counts = {f: faults.count(f) for f in sorted(set(faults))}
        return f"proxy: {len(self.proxy.log)} requests, faults {counts or 'none'}"

    def proxied(self, name: str, container: str, earlier: dict, setup, args: list[str],
                **kw) -> Result:
        self.proxy.clear()
        self.proxy.log.clear()
        setup(self.proxy)
        try:
            return self.run(name, earlier, container, ["--segment-size", "1MiB", *args],
                            env=self.through_proxy(), after=self.proxy_note, **kw)
        finally:
            self.proxy.clear()


def staging_full(m: Matrix) -> None:
    def body(container, earlier):
        root = m.work / "uc-big"
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc/random").write_bytes(os.urandom(24 * 1024**2))
        small = m.work / "small-staging"
        small.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(small)],
                       check=True)
        filler = small / "filler-by-the-matrix"
        try:
            def fill(process):
                # Swift slow (0.5 s a segment): the run is mid-stream when the disk fills
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and process.poll() is None:
                    if any("_segments/" in n and n not in earlier["objects"]
                           for n in objects(container)):
                        # another writer that keeps taking every byte freed until the run
                        # ends (filling once is not enough: the spools reuse their space)
                        full = 0
                        with open(filler, "wb", buffering=0) as out:
                            while process.poll() is None:
                                try:
                                    out.write(b"\0" * 65536)
                                except OSError:
                                    full += 1
                                    time.sleep(0.002)
                        return f"disk kept full from the first segment on ({full} ENOSPC of " \
                               f"the filler; {filler.stat().st_size} bytes of filler)"
                    time.sleep(0.1)
                return "disk NOT filled: the run never got mid-stream"

            def setup(proxy):
                proxy.stall(seconds=0.5, times=None, method="PUT", path="_segments")

            def drop_filler():
                filler.unlink(missing_ok=True)

            args = ["--segment-size", "4MiB", "--task-retries", "0", "--no-prune"]
            planned = subprocess.run(
                [PYTHON, "-m", "flows.backup", "--root", str(root), "--container", container,
                 "--staging-dir", str(small), "--db-defaults-file", DB_CNF, *args,
                 "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120,
                env=dict(os.environ))
            found = re.search(rf"staging {small}: need ([\d.]+) MiB", planned.stderr)
            if not found:
                raise RuntimeError(f"dry run did not say the need: {planned.stderr[-200:]}")
            size = math.ceil(float(found[1])) + 1
            subprocess.run(["mount", "-o", f"remount,size={size}m", str(small)], check=True)
            m.proxy.clear()
            m.proxy.log.clear()
            setup(m.proxy)
            r = m.run(f"1. staging disk full mid-stream (tmpfs {size} MiB = the space check's "
                      "need, 4 MiB segments, filled once uploading; Swift 0.5 s/segment)",
                      earlier, container, args,
                      env=m.through_proxy(), root=root, staging=small, during=fill,
                      after=drop_filler)
            m.proxy.clear()
            return r
        finally:
            subprocess.run(["umount", str(small)], check=False)
    m.case("1. staging disk full", body)


def locked_table(m: Matrix) -> None:
    import pymysql

    mariadb("DROP DATABASE IF EXISTS ucb_matrix_lock; CREATE DATABASE ucb_matrix_lock;"
            "CREATE TABLE ucb_matrix_lock.t (id INT PRIMARY KEY); "
            "INSERT INTO ucb_matrix_lock.t VALUES (1);")
    try:
        def body(container, earlier):
            holder = pymysql.connect(unix_socket=SOCKET, user="root")
            try:
                with holder.cursor() as cursor:
                    cursor.execute("LOCK TABLES ucb_matrix_lock.t WRITE")
                r = m.run(f"2. table locked by another session (LOCK TABLES WRITE, idle, "
                          f"session {holder.thread_id()}; built-in 60 s lock wait)", earlier,
                          container, ["--task-retries", "0", "--no-prune"])
                return r
            finally:
                holder.close()
        m.case("2. locked table", body)
    finally:
        mariadb("DROP DATABASE IF EXISTS ucb_matrix_lock;")


def swift_cases(m: Matrix) -> None:
    m.case("3. Swift stalls", lambda c, e: m.proxied(
        "3. Swift accepts and never answers (proxy stall; --swift-timeout 2 "
        "--swift-retry-budget 6 --task-retries 0)", c, e,
        lambda p: p.stall(times=None), [*SMALL_SWIFT]))
    m.case("4. slow Swift", lambda c, e: m.proxied(
        "4. slow but live Swift (every PUT answered 1 s late; --swift-timeout 5)", c, e,
        lambda p: p.stall(seconds=1, times=None, method="PUT"), ["--swift-timeout", "5"]))
    m.case("5a. 5% 503", lambda c, e: m.proxied(
        "5a. 5 % random 503s (every method)", c, e,
        lambda p: p.add(RandomFail(0.05)), []))
    m.case("5b. 503 on manifest", lambda c, e: m.proxied(
        "5b. one 503 on the manifest PUT", c, e,
        lambda p: p.fail(503, times=1, method="PUT", path="manifest.json"), []))
    m.case("5c. one 401", lambda c, e: m.proxied(
        "5c. one 401 on a segment PUT (re-auth)", c, e,
        lambda p: p.fail(401, times=1, method="PUT", path="_segments"), []))
    m.case("5d. reset", lambda c, e: m.proxied(
        "5d. connection reset mid-body (first GET with a body: RST after 16 bytes)", c, e,
        lambda p: p.reset(after=16, times=1, method="GET"), []))
    m.case("6. persistent 503", lambda c, e: m.proxied(
        "6. persistent 503 (every request; --swift-timeout 2 --swift-retry-budget 6 "
        "--task-retries 0)", c, e, lambda p: p.fail(503, times=None), [*SMALL_SWIFT]))
    m.case("7a. 429 honoured", lambda c, e: m.proxied(
        "7a. 429 with Retry-After: 3 (twice, on PUTs)", c, e,
        lambda p: p.fail(429, times=2, method="PUT", retry_after=3), []))
    m.case("7b. 429 beyond budget", lambda c, e: m.proxied(
        "7b. 429 with Retry-After: 60 beyond the budget (--swift-retry-budget 6 "
        "--task-retries 0)", c, e,
        lambda p: p.fail(429, times=None, method="PUT", retry_after=60), [*SMALL_SWIFT]))
    m.case("8b. proxy 400", lambda c, e: m.proxied(
        "8b. the proxy answers 400 to every PUT (--task-retries 0)", c, e,
        lambda p: p.fail(400, times=None, method="PUT"), ["--task-retries", "0"]))


def refused_cases(m: Matrix) -> None:
    def containers() -> set[str]:
        return {c["name"] for c in store().containers()}

    for label, name in [("8a. a 300-char container name", "x" * 300),
                        ("9a. container 'a/evil'", "a/evil"),
                        ("9b. container 'q?x=1'", "q?x=1"),
                        ("9c. container ''", "")]:
        def body(container, earlier, label=label, name=name):
            before = containers()
            # judged against the earlier container: nothing may appear there either
            r = m.run(label, earlier, name, ["--task-retries", "0"], watch=container)
            created = containers() - before
            r.notes.append(f"containers created: {sorted(created) or 'none'}")
            for c in created:
                remove_container(c)
            return r
        m.case(label, body)

    for label, args in [("10. --segment-size 0", ["--segment-size", "0"]),
                        ("11a. --exclude-path '/*'", ["--exclude-path", "/*"]),
                        ("11b. --exclude-path /", ["--exclude-path", "/"]),
                        ("14e. --add-path /opt/typo (does not exist)",
                         ["--add-path", "/opt/typo"])]:
        m.case(label, lambda c, e, label=label, args=args: m.run(
            label, e, c, [*args, "--task-retries", "0"]))


def stalling_zstd(directory: Path, marker: int) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "zstd"
    shim.write_text(f"#!/bin/bash\n/usr/bin/zstd \"$@\"\nexec sleep {marker} >&-\n")
    shim.chmod(0o755)
    return {"PATH": f"{directory}:{os.environ['PATH']}"}


def signal_cases(m: Matrix) -> None:
    root = m.work / "uc-signal"
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/random").write_bytes(os.urandom(3 * 1024**2))

    def waiter(container: str, earlier: dict, send):
        def during(process):
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and process.poll() is None:
                new = [n for n in objects(container)
                       if "_segments/" in n and n not in earlier["objects"]]
                if len(new) >= 3:
                    sent = time.monotonic()
                    send(process)
                    try:
                        process.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        return f"still running 60 s after the signal ({len(new)} segments up)"
                    return f"{len(new)} segment(s) up when signalled; stopped " \
                           f"{time.monotonic() - sent:.1f} s after"
                time.sleep(0.3)
            return "the run never got mid-stream: no signal sent"
        return during

    for label, send in [
        ("12a. SIGTERM mid-stream", lambda p: p.send_signal(signal.SIGTERM)),
        ("12b. SIGINT to the process group mid-stream",
         lambda p: os.killpg(p.pid, signal.SIGINT)),
        ("12c. SIGKILL mid-stream", lambda p: p.kill()),
    ]:
        def body(container, earlier, label=label, send=send):
            marker = 600 + random.randrange(300)
            env = dict(os.environ, **stalling_zstd(m.work / f"bin-{marker}", marker))
            r = m.run(label, earlier, container, ["--segment-size", "1MiB", "--no-prune"],
                      env=env, root=root, during=waiter(container, earlier, send))
            stray = subprocess.run(["pgrep", "-af", f"sleep {marker}"], capture_output=True,
                                   text=True).stdout.strip()
            if stray:
                r.notes.append(f"stray child: {stray[:60]}")
                for line in stray.splitlines():
                    try:
                        os.kill(int(line.split()[0]), signal.SIGKILL)
                    except (OSError, ValueError):
                        pass
            if label.startswith("12c"):
                # the next backup (with prune) into the same container: does it clean up?
                nxt = subprocess.run(
                    [PYTHON, "-m", "flows.backup", "--root", str(m.root), "--container",
                     container, "--db-defaults-file", DB_CNF, "--segment-size", "1MiB"],
                    cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
                now = objects(container)
                complete = {backup_id(n) for n in manifests(now)}
                orphans = [n for n in now if backup_id(n) not in complete]
                r.notes.append(f"next backup (with prune): exit {nxt.returncode}; objects "
                               f"without manifest after it: {len(orphans)}"
                               + ("; prune: " + next((ln for ln in nxt.stderr.splitlines()
                                                      if "incomplete" in ln), "")[-110:]))
            return r
        m.case(label, body)


def database_cases(m: Matrix) -> None:
    made: list[str] = []
    mariadb("DROP DATABASE IF EXISTS ucb_matrix_trg; CREATE DATABASE ucb_matrix_trg;"
            "CREATE TABLE ucb_matrix_trg.t (id INT PRIMARY KEY);"
            "CREATE TABLE ucb_matrix_trg.log (n INT);"
            "CREATE TRIGGER ucb_matrix_trg.trg AFTER INSERT ON ucb_matrix_trg.t FOR EACH ROW "
            "INSERT INTO ucb_matrix_trg.log VALUES (NEW.id);")

    def account(name: str, grants: list[str]) -> Path:
        user = f"'{name}'@'127.0.0.1'"
        made.append(user)
        mariadb(f"DROP USER IF EXISTS {user}; CREATE USER {user} IDENTIFIED BY 'pw-{name}';"
                + "".join(f"GRANT {g} TO {user};" for g in grants))
        cnf = m.work / f"{name}.cnf"
        cnf.write_text(f"[client]\nhost=127.0.0.1\nuser={name}\npassword=pw-{name}\n")
        cnf.chmod(0o600)
        return cnf

    try:
        notrig = account("ucb_matrix_notrig", [
            "SELECT, SHOW VIEW, EVENT, SHOW DATABASES, LOCK TABLES, RELOAD, PROCESS, "
            "BINLOG MONITOR ON *.*"])
        onedb = account("ucb_matrix_onedb", ["ALL ON ucb_matrix_trg.*", "SELECT ON mysql.*"])
        wrong = m.work / "wrong.cnf"
        wrong.write_text("[client]\nhost=127.0.0.1\nuser=backup\npassword=Wrong-Pass-42\n")
        for label, cnf, extra in [
            ("13a. database user without TRIGGER", notrig, []),
            ("13b. database user without TRIGGER, --allow-partial-database", notrig,
             ["--allow-partial-database"]),
            ("13c. database user that sees one database only", onedb, []),
            ("13d. database user that sees one database only, --allow-partial-database",
             onedb, ["--allow-partial-database"]),
            ("14a. wrong database password", wrong, []),
        ]:
            m.case(label, lambda c, e, label=label, cnf=cnf, extra=extra: m.run(
                label, e, c, ["--db-defaults-file", str(cnf), "--task-retries", "0",
                              "--no-prune", *extra]))
    finally:
        mariadb("DROP DATABASE IF EXISTS ucb_matrix_trg;"
                + "".join(f"DROP USER IF EXISTS {u};" for u in made))

    m.case("14b. wrong Keystone password", lambda c, e: m.run(
        "14b. wrong Keystone password", e, c, ["--task-retries", "0"],
        env=dict(os.environ, OS_PASSWORD="Wrong-Keystone-77")))
    m.case("14c. MariaDB unreachable", lambda c, e: m.run(
        "14c. MariaDB unreachable (--db-port 9)", e, c, ["--db-port", "9",
                                                         "--task-retries", "0"]))
    m.case("14d. Keystone unreachable", lambda c, e: m.run(
        "14d. Keystone unreachable (OS_AUTH_URL port 9)", e, c, ["--task-retries", "0"],
        env=dict(os.environ, OS_AUTH_URL="http://127.0.0.1:9/v3")))


def markdown(results: list[Result], took: float) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [f"# Fault matrix ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{took:.0f} s; tests/fault_matrix.py)", "",
             "| case | exit status | last stderr line | manifest written? | earlier backup "
             "intact? | leftovers | time (s) | notes |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append("| " + " | ".join(cell(x) for x in (
            r.case, r.status, f"`{r.last}`" if r.last else "", r.manifest, r.intact,
            r.leftovers, r.seconds, "; ".join(r.notes))) + " |")
    return "\n".join(lines) + "\n"


GROUPS = {"staging": staging_full, "lock": locked_table, "swift": swift_cases,
          "refused": refused_cases, "signals": signal_cases, "database": database_cases}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--only", nargs="*", choices=list(GROUPS), help="groups to run")
    options = parser.parse_args()
    started = time.monotonic()
    subprocess.run(["bash", str(REPO / "deployments/dev/services.sh"), "start"], check=True,
                   env=dict(os.environ, SKIP_APT="1"), stdout=subprocess.DEVNULL)
    server = start_prefect()
    work = Path(tempfile.mkdtemp(prefix="ucb-matrix-"))
    work.chmod(0o755)
    matrix = None
    try:
        matrix = Matrix(work)
        for name in options.only or list(GROUPS):
            GROUPS[name](matrix)
    finally:
        if matrix is not None:
            matrix.proxy.stop()
            for c in matrix.containers:
                remove_container(c)
        stop(server, timeout=15)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(PREFECT_HOME, ignore_errors=True)
    took = time.monotonic() - started
    table = markdown(matrix.results, took)
    print(table)
    if options.markdown:
        Path(options.markdown).write_text(table)
    print(f"total {took:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
