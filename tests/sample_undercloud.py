"""Generate a sample undercloud (files and databases) for the demo, the tests and the benchmark.

The tree has what a restore has to bring back exactly: root-only 0600 files, Swift-like objects
carrying ``user.swift.metadata`` xattrs, ACLs, symlinks, hard links, empty directories, names
with spaces and non-ASCII characters, and glance-like images big enough to span segments.

    python tests/sample_undercloud.py ROOT [--images-mib N] [--small-files N] [--db]
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SAMPLE_DATABASES = ("ucb_sample_nova", "ucb_sample_keystone")
SAMPLE_USER = ("ucb_sample_svc", "localhost")


@dataclass(frozen=True)
class SampleSize:
    images_mib: tuple[int, ...] = (3,)
    swift_objects: int = 12
    small_files: int = 40
    db_rows: int = 500


def _write_random(path: Path, size: int, rng: random.Random) -> None:
    with open(path, "wb") as out:
        remaining = size
        while remaining:
            n = min(remaining, 1 << 20)
            out.write(rng.randbytes(n))
            remaining -= n


def make_files(root: str | os.PathLike[str], size: SampleSize = SampleSize(),
               seed: int = 7) -> Path:
    """Write the sample tree under ``root`` and return it."""
    rng = random.Random(seed)
    top = Path(root)
    etc = top / "etc"
    for d in ("keystone/fernet-keys", "keystone/credential-keys", "pki/tls/certs", "mysql",
              "my.cnf.d"):
        (etc / d).mkdir(parents=True, exist_ok=True)
    for i in range(2):
        key = etc / "keystone/fernet-keys" / str(i)
        key.write_bytes(rng.randbytes(32).hex().encode())
        key.chmod(0o600)
    (etc / "keystone/keystone.conf").write_text("[database]\nconnection = mysql+pymysql://"
                                                "keystone:secret@127.0.0.1/keystone\n")
    (etc / "pki/tls/certs/undercloud.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n"
                                                      "-----END CERTIFICATE-----\n")
    (etc / "my.cnf.d/server.cnf").write_text("[mysqld]\nbind-address = 127.0.0.1\n")
    (etc / "hosts").write_text("127.0.0.1 localhost undercloud\n")

    root_home = top / "root"
    root_home.mkdir(exist_ok=True)
    root_home.chmod(0o700)
    secret = root_home / ".my.cnf"
    secret.write_text("[client]\nuser=root\npassword=not-a-real-secret\n")
    secret.chmod(0o600)
    os.chown(secret, 0, 0)

    stack = top / "home/stack"
    for d in ("templates", "overcloud-deploy/overcloud", "empty dir/inner", "Überschrift ü"):
        (stack / d).mkdir(parents=True, exist_ok=True)
    for i in range(size.small_files):
        sub = stack / ("templates", "overcloud-deploy/overcloud")[i % 2]
        words = " ".join(rng.choice(("nova", "neutron", "heat", "ironic", "glance", "swift"))
                         for _ in range(rng.randint(50, 400)))
        (sub / f"file {i}.yaml").write_text(words + "\n")
    (stack / "Überschrift ü/naïve café.txt").write_text("non-ASCII name\n")
    (stack / "stackrc").write_text("export OS_CLOUD=undercloud\n")
    os.chown(stack / "stackrc", 1000, 1000)
    (stack / "stackrc").chmod(0o640)
    link = stack / "latest-templates"
    if not link.is_symlink():
        link.symlink_to("templates")
    hard = stack / "templates/hardlink-to-file-0.yaml"
    if not hard.exists():
        os.link(stack / "templates/file 0.yaml", hard)

    node = top / "srv/node/d1/objects"
    for i in range(size.swift_objects):
        d = node / str(i % 8) / f"{rng.getrandbits(12):03x}"
        d.mkdir(parents=True, exist_ok=True)
        obj = d / f"{rng.getrandbits(64):016x}.data"
        _write_random(obj, rng.randint(1, 64) * 1024, rng)
        metadata = pickle.dumps({"name": f"/AUTH_x/c/o{i}", "Content-Type": "text/plain",
                                 "ETag": f"{rng.getrandbits(128):032x}"}, protocol=2)
        os.setxattr(obj, "user.swift.metadata", metadata)
        os.chown(obj, 0, 0)

    images = top / "var/lib/glance/images"
    images.mkdir(parents=True, exist_ok=True)
    for i, mib in enumerate(size.images_mib):
        _write_random(images / f"image-{i}.qcow2", mib * 1024**2, rng)
    if shutil.which("setfacl"):
        subprocess.run(["setfacl", "-m", "u:1000:r", str(images)], check=True)
    return top


def database_sql(rows: int = 500) -> str:
    """SQL creating the sample databases: InnoDB and MyISAM tables, a view, a routine, a
    trigger, an event and a service user with grants."""
    nova, keystone = SAMPLE_DATABASES
    user, host = SAMPLE_USER
    return f"""
DROP DATABASE IF EXISTS {nova};
DROP DATABASE IF EXISTS {keystone};
CREATE DATABASE {nova};
CREATE DATABASE {keystone};
USE {nova};
CREATE TABLE {nova}.instances (id INT PRIMARY KEY, uuid CHAR(36), name VARCHAR(64),
  state VARCHAR(16), meta BLOB) ENGINE=InnoDB;
INSERT INTO {nova}.instances SELECT seq, UUID(), CONCAT('vm-', seq),
  ELT(1 + seq % 3, 'active', 'shutoff', 'error'), RANDOM_BYTES(64) FROM seq_1_to_{rows};
CREATE TABLE {nova}.audit (id INT AUTO_INCREMENT PRIMARY KEY, instance INT,
  what VARCHAR(32)) ENGINE=InnoDB;
CREATE TABLE {nova}.legacy_counters (name VARCHAR(32) PRIMARY KEY, n INT) ENGINE=MyISAM;
INSERT INTO {nova}.legacy_counters VALUES ('boots', 42), ('ünïcode', 7);
CREATE VIEW {nova}.active AS SELECT id, name FROM {nova}.instances WHERE state = 'active';
CREATE TRIGGER {nova}.instances_audit AFTER UPDATE ON {nova}.instances FOR EACH ROW
  INSERT INTO {nova}.audit (instance, what) VALUES (NEW.id, 'update');
CREATE PROCEDURE {nova}.count_active(OUT n INT) SELECT COUNT(*) INTO n FROM {nova}.active;
CREATE EVENT {nova}.purge_audit ON SCHEDULE EVERY 1 DAY DISABLE DO DELETE FROM {nova}.audit;
UPDATE {nova}.instances SET state = 'active' WHERE id <= 3;
CREATE TABLE {keystone}.project (id CHAR(32) PRIMARY KEY, name VARCHAR(64),
  extra TEXT) ENGINE=InnoDB;
INSERT INTO {keystone}.project SELECT MD5(seq), CONCAT('project-', seq), REPEAT('x', seq % 90)
  FROM seq_1_to_{max(rows // 5, 1)};
DROP USER IF EXISTS '{user}'@'{host}';
CREATE USER '{user}'@'{host}' IDENTIFIED BY 'sample-service-password';
GRANT SELECT, INSERT, UPDATE ON {nova}.* TO '{user}'@'{host}';
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--images-mib", type=int, nargs="*", default=[3])
    parser.add_argument("--swift-objects", type=int, default=12)
    parser.add_argument("--small-files", type=int, default=40)
    parser.add_argument("--db", action="store_true",
                        help="also (re)create the sample databases through `mariadb`")
    parser.add_argument("--db-rows", type=int, default=500)
    args = parser.parse_args()
    make_files(args.root, SampleSize(tuple(args.images_mib), args.swift_objects,
                                     args.small_files, args.db_rows))
    if args.db:
        subprocess.run(["mariadb"], input=database_sql(args.db_rows).encode(), check=True)
    print(args.root)


if __name__ == "__main__":
    main()
