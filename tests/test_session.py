"""One Swift session per backup run: Keystone is asked for a token once, each container is
PUT once, every store is closed; counted on a real backup (Keystone reached directly, Swift
through the counting proxy)."""

from __future__ import annotations

import re
import subprocess
import threading

import pytest
from keystoneauth1.identity.v3 import base as v3_base

from flows.backup import undercloud_backup
from flows.params import grouped
from flows.restore import undercloud_restore
from flows.verify import verify_backup
from undercloud_backup import config
from undercloud_backup.store import session as swift_session
from undercloud_backup.store.connection import SwiftSession, SwiftStore

# PUT /v1/AUTH_x/<container>: a container, not an object under it.
CONTAINER_PATH = re.compile(r"^/v1/[^/]+/[^/]+$")


@pytest.fixture
def logins(monkeypatch) -> list[str]:
    """Every Keystone token request of this process (each thread's), as it happens."""
    seen: list[str] = []
    lock = threading.Lock()
    real = v3_base.Auth.get_auth_ref

    def counting(self, session, **kwargs):
        with lock:
            seen.append(threading.current_thread().name)
        return real(self, session, **kwargs)

    monkeypatch.setattr(v3_base.Auth, "get_auth_ref", counting)
    return seen


@pytest.fixture
def opened(monkeypatch) -> list[SwiftStore]:
    """Every store opened in this process, to check each was closed."""
    stores: list[SwiftStore] = []
    real = SwiftStore.__init__

    def tracking(self, *args, **kwargs):
        real(self, *args, **kwargs)
        stores.append(self)

    monkeypatch.setattr(SwiftStore, "__init__", tracking)
    return stores


@pytest.fixture
def recipients(tmp_path) -> str:
    key = tmp_path / "key"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(key)], check=True, capture_output=True,
                            text=True).stdout
    (tmp_path / "recipients").write_text(public)
    return str(tmp_path / "recipients")


def container_puts(proxy) -> dict[str, int]:
    counts: dict[str, int] = {}
    for seen in proxy.log:
        if seen.method == "PUT" and CONTAINER_PATH.match(seen.path):
            name = seen.path.rsplit("/", 1)[1]
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_a_backup_logs_in_once_puts_each_container_once_and_closes_every_store(
        os_env, db_cnf, tmp_path, container, swift_proxy, monkeypatch, logins, opened,
        recipients):
    """Space check, dump, users, level, archive, snapshot, manifest, prune and the download
    links (an encrypted backup has them) share one token and one container check each; a
    second run (an incremental: it reads its parent) does the same with a session of its own."""
    monkeypatch.setenv("OS_STORAGE_URL", swift_proxy.account_url)
    root = tmp_path / "uc"
    (root / "etc").mkdir(parents=True)
    (root / "etc/a.conf").write_text("[a]\n")
    for run in (1, 2):
        del logins[:]
        swift_proxy.log.clear()
        summary = undercloud_backup(**grouped(
            root=str(root), container=container, db_defaults_file=db_cnf,
            segment_size="1MiB", recipients_file=recipients, keep_last=5))
        assert summary.manifest, summary
        assert summary.kind == ("full" if run == 1 else "incremental")
        assert len(logins) == 1, (run, logins)
        assert container_puts(swift_proxy) == {container: 1, f"{container}_segments": 1}, run
        assert [s for s in opened if not s.closed] == [], run
    assert swift_session.registered() == 0  # the run's session closed with it
    # verify (its checks run side by side) and a restore of that incremental (its chain's
    # listings and archives) each log in once too
    identity = str(tmp_path / "key")
    del logins[:]
    report = verify_backup(container=container, identity=identity, check_signature=False)
    assert report.ok and len(logins) == 1, logins
    del logins[:]
    restored = undercloud_restore(container=container, identity=identity,
                                  check_signature=False, target=str(tmp_path / "restored"))
    assert restored.files is not None and len(logins) == 1, logins
    assert [s for s in opened if not s.closed] == []
    assert swift_session.registered() == 0


def test_stores_on_one_session_share_its_login_and_container_checks(os_env, swift_proxy,
                                                                    container, logins):
    """Two threads' stores ensure both containers at once: one login, one PUT each; a store
    outside any run's session logs in for itself; each is closed by its ``with``."""
    settings = config.swift_settings_from_env(storage_url=swift_proxy.account_url,
                                              container=container)
    with SwiftSession(settings) as session:
        with session.store() as first, first.clone() as second:
            threads = [threading.Thread(target=store.ensure_container, args=(name,))
                       for store in (first, second)
                       for name in (container, f"{container}_segments")]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            first.list(container)
            second.list(f"{container}_segments")
    assert first.closed and second.closed and session.closed
    assert len(logins) == 1
    assert container_puts(swift_proxy) == {container: 1, f"{container}_segments": 1}
    with swift_session.open_store(settings) as alone:
        alone.ensure_container(container)
    assert alone.closed and alone.session.closed and len(logins) == 2
    assert container_puts(swift_proxy)[container] == 2  # a new session checks again
