"""The restore day rehearsed end to end: a real Keystone, backed by MariaDB, is
backed up, its node is lost and reinstalled, and docs/restore.md's steps, in their order, bring
it back: a token issued before the backup validates afterwards and a credential encrypted with
the old credential keys reads back.

The stand-in node is a directory tree (the node's ``/``) and a MariaDB server of its own reached
through a fixed socket path, as on a real undercloud; "reinstalled" means a new tree with the new
installation's identity files and a freshly installed, different MariaDB server at that path.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pymysql
import pytest
from conftest import cli_in_process, free_port
from test_restore import make_backup, remove_container

from undercloud_backup.db.scratch import ScratchServer, scratch_mariadb

KEYSTONE_WSGI = "/usr/bin/keystone-wsgi-public"
REINSTALLED = {"etc/fstab": "UUID=new / xfs defaults 0 0\n", "etc/machine-id": "new-machine\n",
               "etc/hostname": "undercloud.example\n"}


class Keystone:
    """A Keystone whose configuration, keys and database are the stand-in node's."""

    def __init__(self, root: Path, work: Path, db_socket: Path, password: str) -> None:
        self.root, self.work, self.db_socket = root, work, db_socket
        self.conf = root / "etc/keystone/keystone.conf"
        self.admin_password = password
        self.port = free_port()
        # Debian's keystone runs on the system python, which has no PyMySQL: lend it ours,
        # alone on its path (the venv's other packages are newer than keystone wants).
        self.pylib = work / "pylib"
        if not self.pylib.exists():
            self.pylib.mkdir(parents=True)
            os.symlink(os.path.dirname(pymysql.__file__), self.pylib / "pymysql")

    def write_config(self, db_password: str) -> None:
        keys = self.root / "etc/keystone"
        (keys / "fernet-keys").mkdir(parents=True, exist_ok=True)
        (keys / "credential-keys").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "[DEFAULT]\n"
            f"log_file = {self.work / 'keystone.log'}\n"
            "[database]\n"
            f"connection = mysql+pymysql://keystone:{db_password}@localhost/keystone"
            f"?unix_socket={self.db_socket}&charset=utf8mb4\n"
            "[fernet_tokens]\n"
            f"key_repository = {keys / 'fernet-keys'}\n"
            "[credential]\n"
            f"key_repository = {keys / 'credential-keys'}\n"
            "[token]\nprovider = fernet\n")
        self.conf.chmod(0o640)

    def manage(self, *args: str, env: dict[str, str] | None = None) -> None:
        done = subprocess.run(
            ["keystone-manage", "--config-file", str(self.conf), *args], capture_output=True,
            text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(self.pylib), **(env or {})})
        assert done.returncode == 0, f"keystone-manage {args[0]}: {done.stderr[-2000:]}"

    def set_up(self) -> None:
        self.manage("db_sync")
        for setup in ("fernet_setup", "credential_setup"):
            self.manage(setup, "--keystone-user", "root", "--keystone-group", "root")
        # the password from the environment: an argv is readable by every local user
        self.manage("bootstrap", "--bootstrap-public-url", self.url,
                    env={"OS_BOOTSTRAP_PASSWORD": self.admin_password})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v3"

    @contextmanager
    def serving(self) -> Iterator[Keystone]:
        argv = ["uwsgi", "--plugins", "python3", "--http-socket", f"127.0.0.1:{self.port}",
                "--wsgi-file", KEYSTONE_WSGI, "--master", "--processes", "1", "--die-on-term",
                "--pythonpath", str(self.pylib), "--env",
                f"OS_KEYSTONE_CONFIG_FILES={self.conf}"]
        with open(self.work / "uwsgi.log", "ab") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.call("GET", "")
                    break
                except (urllib.error.URLError, ConnectionError):
                    assert process.poll() is None, (self.work / "uwsgi.log").read_text()[-2000:]
                    assert time.monotonic() < deadline, "keystone did not answer in 60 s"
                    time.sleep(0.3)
            yield self
        finally:
            process.terminate()
            process.wait(timeout=30)

    def call(self, method: str, path: str, body: dict | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
        request = urllib.request.Request(
            self.url + path, method=method, headers={"Content-Type": "application/json",
                                                     **(headers or {})},
            data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, dict(response.headers), json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), {}

    def issue_token(self) -> tuple[str, str]:
        status, headers, body = self.call("POST", "/auth/tokens", {"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": "admin", "domain": {"id": "default"},
                "password": self.admin_password}}},
            "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}}})
        assert status == 201, status
        return headers["X-Subject-Token"], body["token"]["user"]["id"]

    def validate(self, token: str, auth: str) -> int:
        return self.call("GET", "/auth/tokens", headers={"X-Auth-Token": auth,
                                                         "X-Subject-Token": token})[0]


def create_service_database(server: ScratchServer, password: str) -> None:
    with server.session.cursor() as cursor:
        cursor.execute("CREATE DATABASE keystone")
        cursor.execute("CREATE USER 'keystone'@'localhost' IDENTIFIED BY %s", (password,))
        cursor.execute("GRANT ALL PRIVILEGES ON keystone.* TO 'keystone'@'localhost'")


def point(link: Path, server: ScratchServer) -> None:
    """The node's MariaDB socket path now reaches ``server``."""
    link.unlink(missing_ok=True)
    link.symlink_to(server.socket)


def step(*args: str) -> dict:
    # In this process: the procedure's steps and their results, not the CLIs' processes.
    result = cli_in_process(*args, "--json")
    assert result.returncode == 0, f"{args}: {result.stderr}"
    return json.loads(result.stdout)


@pytest.mark.slow
def test_a_lost_keystone_node_comes_back_by_the_documented_procedure(os_env, tmp_path):
    root, work = tmp_path / "node", tmp_path / "work"
    work.mkdir()
    (root / "etc").mkdir(parents=True)
    for path, text in REINSTALLED.items():
        (root / path).write_text(text.replace("new", "old"))
    link = work / "mysql.sock"
    container = f"ucbtest-{uuid.uuid4().hex[:10]}"
    db_password, admin_password = secrets.token_hex(12), secrets.token_hex(12)
    try:
        # The undercloud as it ran: Keystone with fernet tokens and encrypted credentials.
        with scratch_mariadb("/var/tmp", lifetime_s=900) as before:
            point(link, before)
            create_service_database(before, db_password)
            keystone = Keystone(root, work, link, admin_password)
            keystone.write_config(db_password)
            keystone.set_up()
            with keystone.serving():
                old_token, admin_id = keystone.issue_token()
                status, _, created = keystone.call(
                    "POST", "/credentials", {"credential": {
                        "type": "cert", "user_id": admin_id, "blob": "the old secret"}},
                    headers={"X-Auth-Token": old_token})
                assert status == 201
                credential = created["credential"]["id"]
            backup = make_backup(root, container, before)

        # The node is lost, then reinstalled: new identity files, a stock keystone.conf, and a
        # freshly installed MariaDB (with the empty `test` database upstream's installer makes).
        shutil.rmtree(root)
        (root / "etc/keystone").mkdir(parents=True)
        for path, text in REINSTALLED.items():
            (root / path).write_text(text)
        (root / "etc/keystone/keystone.conf").write_text("[DEFAULT]\n# installer default\n")
        with scratch_mariadb("/var/tmp", lifetime_s=900) as after:
            point(link, after)
            with after.session.cursor() as cursor:
                cursor.execute("CREATE DATABASE test")
            where = ("--container", container, "--backup-id", backup["backup_id"])

            # 0. prove the backup restores before touching anything
            verified = step("verify", *where)
            assert verified["ok"] is True, verified
            # 1. keys first
            keys = step("restore", *where, "--target", str(root), "--overwrite",
                        "--path", "/etc/keystone")
            assert keys["files"]["target"] == str(root)
            assert (root / "etc/keystone/fernet-keys/0").exists()
            # 2. MariaDB: everything, users and grants, over the fresh server's empty `test`
            loaded = step("restore", *where, "--no-files", "--all-databases",
                          "--overwrite-empty", "--db-socket", after.socket, "--db-user", "root")
            assert "keystone" in loaded["databases"]["databases"]
            assert loaded["databases"]["users_and_grants"] is True
            assert loaded["databases"]["differences"] == []
            # 3. the rest of the files, leaving the reinstalled node's identity alone
            step("restore", *where, "--target", str(root), "--overwrite", "--reinstalled-host")
            for path, text in REINSTALLED.items():
                assert (root / path).read_text() == text, path
            # 5. services: Keystone from the restored configuration, keys and database
            keystone = Keystone(root, work, link, admin_password)
            with keystone.serving():
                new_token, _ = keystone.issue_token()
                assert keystone.validate(old_token, new_token) == 200
                assert keystone.validate(old_token + "x", new_token) == 404
                status, _, read = keystone.call("GET", f"/credentials/{credential}",
                                                headers={"X-Auth-Token": old_token})
                assert status == 200 and read["credential"]["blob"] == "the old secret"
    finally:
        remove_container(container)
