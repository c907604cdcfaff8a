"""The benchmark's data: a file tree under a scratch root and the database ``ucb_bench``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import shutil
import subprocess
import time
from pathlib import Path

from shell import REPO, MiB, log, run

BENCH_DB = "ucb_bench"
# The flow's default paths (undercloud_backup.files.archive.DEFAULT_PATHS), relative to the root:
# the reference tar archives exactly what ours does.
PATHS = ("etc", "root", "home/stack", "srv/node", "var/lib/glance/images")
DUMP_OPTS = "--single-transaction --all-databases --routines --events --triggers"
IMAGES_MIB = (("overcloud-full.qcow2", 400), ("ironic-python-agent.kernel", 250),
              ("cirros.img", 100))
SWIFT_OBJECTS = 400
SMALL_FILES = 20_000
EVENTS, INSTANCES, BLOBS = 1_200_000, 300_000, 8_000  # rows of ucb_bench's tables at scale 1
DATA_VERSION = 1  # bump when the generator changes, so a kept tree is regenerated
ATTEMPTS = 3  # on a shared server other users' tests may kill a connection: try again
# The project's sample generator (test and demo data), run through its CLI, not imported.
SAMPLE_MODULE = "tests.sample_undercloud"


def scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def generate_files(root: Path, scale: float, python: Path) -> None:
    """About 1 GB per unit of scale: services.md appendix A plus the sample's awkward cases."""
    # Root-only files, ACLs, symlinks, hard links, odd names, xattrs: a restore must keep them.
    run([str(python), "-m", SAMPLE_MODULE, str(root), "--images-mib"], cwd=REPO)
    rng = random.Random(42)
    _write_images(root / "var/lib/glance/images", scale)
    _write_swift_objects(root / "srv/node/d1/objects", scale, rng)
    _write_logs(root / "home/stack", scale, rng)


def _write_images(images: Path, scale: float) -> None:
    for name, mib in IMAGES_MIB:  # incompressible, like qcow2 images mostly are
        with open(images / name, "wb") as out:
            left = int(mib * scale * MiB)
            while left:
                n = min(left, MiB)
                out.write(os.urandom(n))
                left -= n


def _write_swift_objects(node: Path, scale: float, rng: random.Random) -> None:
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


def _write_logs(home: Path, scale: float, rng: random.Random) -> None:
    syll = ["ka", "to", "ri", "ne", "mo", "sa", "lu", "vi", "de", "po", "stack", "nova",
            "neutron", "heat", "ironic", "glance", "swift", "keystone", "error", "info", "debug",
            "node", "port", "volume"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    # A pool of log-like lines, drawn from per file: as compressible as appendix A, 20x faster.
    lines = [f"2026-11-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} "
             + " ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + "\n"
             for _ in range(50_000)]
    kinds = ("templates", "logs", "scripts", ".ansible/tmp", "overcloud-deploy", ".cache")
    for i in range(scaled(SMALL_FILES, scale)):
        d = home / kinds[i % 6] / str(i // 500)
        d.mkdir(parents=True, exist_ok=True)
        text = "".join(rng.choices(lines, k=rng.randint(2048, 8192) // 62 + 1))
        (d / f"file{i}.txt").write_text(text)


def database_sql(scale: float) -> str:
    """services.md appendix B (about a 476 MB dump at scale 1), in database ``ucb_bench``."""
    events, instances, blobs = (scaled(n, scale) for n in (EVENTS, INSTANCES, BLOBS))
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


def query(sql: str, *client: str) -> str | None:
    """One value from ``mariadb -N -e`` (the main server, or ``client``'s); None if it fails."""
    done = run(["mariadb", *client, "-N", "-e", sql], check=False)
    return done.stdout.decode().strip() if done.returncode == 0 else None


def events_rows(*client: str) -> str | None:
    """Rows of ``ucb_bench.events`` as the server says, or None (no database, no server)."""
    return query(f"SELECT COUNT(*) FROM {BENCH_DB}.events", *client)


def create_bench_db(scale: float) -> None:
    for attempt in range(ATTEMPTS):
        try:
            run(["mariadb"], input_=database_sql(scale).encode())
            return
        except RuntimeError as error:
            if attempt + 1 == ATTEMPTS:
                raise
            log(f"creating {BENCH_DB} failed, retrying: {error}")


def ensure_bench_db(scale: float) -> None:
    """Recreate the bench database if something dropped it (untimed, before a backup).

    A pytest session of this project drops every ucb_* database it finds when it starts, so a
    benchmark running beside the tests can lose its database between two runs.
    """
    tables = query("SELECT COUNT(*) FROM information_schema.tables "
                   f"WHERE table_schema = '{BENCH_DB}'")
    if tables != "3":
        log(f"{BENCH_DB} vanished (dropped by someone else?); recreating it")
        create_bench_db(scale)


def drop_bench_db(check: bool = True) -> None:
    run(["mariadb", "-e", f"DROP DATABASE IF EXISTS {BENCH_DB}"], check=check)


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


def prepare_data(workdir: Path, root: Path, scale: float, cnf: Path,
                 python: Path) -> tuple[int, int, int]:
    """Generate (or reuse, with --keep) the files and (re)create the bench database:
    (bytes of files, entries, bytes of the dump)."""
    marker = workdir / "data.json"
    want = {"scale": scale, "version": DATA_VERSION}
    if not (marker.exists() and json.loads(marker.read_text()) == want and root.is_dir()):
        remove_files(workdir, root)
        t = time.monotonic()
        generate_files(root, scale, python)
        marker.write_text(json.dumps(want))
        log(f"files generated in {time.monotonic() - t:.1f} s")
    files, entries = tree_bytes(root)
    t = time.monotonic()
    if events_rows() != str(scaled(EVENTS, scale)):
        create_bench_db(scale)
        log(f"database {BENCH_DB} created in {time.monotonic() - t:.1f} s")
    return files, entries, dump_bytes(cnf)


def remove_files(workdir: Path, root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    (workdir / "data.json").unlink(missing_ok=True)
