"""Alerts: the automations deployments/prefect/alerts.py installs, on the session's real Prefect
server (its triggers and actions services run), notifying a real HTTP receiver on loopback.

Each test uses a flow name of its own, so backups that other tests run on the same server
cannot trigger (or silence) these automations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from undercloud_backup.core.errors import PathNotFound

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "deployments/prefect/alerts.py"
HOST = "undercloud-0.ctlplane.example"


class Receiver:
    """A webhook endpoint: records each POSTed JSON body."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.token = uuid.uuid4().hex
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/{self.token}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, count: int, timeout: float) -> float:
        """Seconds until ``count`` bodies arrived (fails after ``timeout``)."""
        started = time.monotonic()
        while len(self.bodies) < count:
            assert time.monotonic() - started < timeout, \
                f"{len(self.bodies)} notification(s) after {timeout} s, wanted {count}"
            time.sleep(0.2)
        return time.monotonic() - started

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def tag():
    """Unique names for the flow, the automations and the block; removed afterwards."""
    name = f"ucbtest-{uuid.uuid4().hex[:8]}"
    yield name
    remove_alerts(name)


def remove_alerts(name: str) -> None:
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client

    for suffix in ("backup failed", "no backup completed"):
        try:
            Automation.read(name=f"{name}: {suffix}").delete()
        except ValueError:
            pass
    with get_client(sync_client=True) as client:
        try:
            block = client.read_block_document_by_name(f"{name}-alerts", "custom-webhook")
            client.delete_block_document(block.id)
        except Exception:  # noqa: BLE001 - the test may have failed before making it
            pass


def install_alerts(tag: str, receiver: Receiver, *extra: str) -> subprocess.CompletedProcess:
    """alerts.py as install.sh runs it: the URL in the environment, never on argv."""
    env = dict(os.environ, UCB_ALERT_WEBHOOK_URL=receiver.url)
    argv = [sys.executable, str(ALERTS), "--host", HOST, "--flow-name", tag,
            "--name-prefix", tag, *extra]
    assert receiver.token not in " ".join(argv)
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert receiver.token not in result.stdout + result.stderr
    return result


def test_failed_run_sends_one_notification_naming_host_run_and_error(tag, receiver):
    from prefect import flow

    first = install_alerts(tag, receiver, "--silence-hours", "24")
    assert first.stdout.count("automation created") == 2
    again = install_alerts(tag, receiver, "--silence-hours", "24")   # idempotent
    assert again.stdout.count("automation updated") == 2
    error = PathNotFound(path="etc/missing", root="/")

    @flow(name=tag, flow_run_name="nightly-alert-test")
    def failing() -> None:
        raise error

    started = time.monotonic()
    state = failing(return_state=True)
    assert state.is_failed()
    receiver.wait(1, timeout=60)
    took = time.monotonic() - started
    # Anything else on its way (a second automation, a retry) would come through the same
    # pipeline as the first one: wait as long again, and 3 s more (5 s at least).
    time.sleep(max(5.0, took + 3))
    assert len(receiver.bodies) == 1, receiver.bodies
    note = receiver.bodies[0]
    assert note["host"] == HOST and note["source"] == "undercloud-backup"
    assert note["subject"] == f"[undercloud-backup] {HOST}: backup nightly-alert-test Failed"
    assert f"Host: {HOST}" in note["body"]
    assert "Flow run: nightly-alert-test (Failed)" in note["body"]
    assert str(error) in note["body"]                      # the error line itself
    assert "/runs/flow-run/" in note["body"]               # a link to the run in the UI
    print(f"notification {took:.1f} s after the run started")


# The session's server evaluates proactive automations every second (conftest), so a short
# window ends when it should; 10 s is Prefect's shortest. Windows follow each other: the
# notification comes at the end of the first window without a completed run, between 1 and 2
# windows after the last one.
SILENCE_WINDOW_S = 10


class SilenceScenario:
    """The silence alert's scenario on the server's real clock: backups completing every few
    seconds over two windows, then none until the alert. Nearly all of its minute is waiting
    on the server's windows, so it runs in a thread from the module's start, beside the other
    tests (each has a flow of its own), and its test checks what it saw."""

    def __init__(self) -> None:
        self.tag = f"ucbtest-{uuid.uuid4().hex[:8]}"
        self.receiver = Receiver()
        self.seen: dict[str, object] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="silence-scenario", daemon=True)

    def _run(self) -> None:
        try:
            self._scenario()
        except BaseException as error:  # noqa: BLE001 - raised again in the test
            self.error = error

    def _scenario(self) -> None:
        from prefect import flow

        @flow(name=self.tag, flow_run_name="nightly")
        def succeeding() -> None:
            pass

        window = SILENCE_WINDOW_S
        succeeding()
        install_alerts(self.tag, self.receiver, "--silence-hours", str(window / 3600))
        # a backup completing every few seconds (a run takes about 1 s): never silent for a
        # whole window, over two windows
        until = time.monotonic() + 2 * window
        while time.monotonic() < until:
            succeeding()
            time.sleep(2)
        self.seen["after_runs"] = list(self.receiver.bodies)
        # then silence: one notification once a whole window passed without a completed run
        self.seen["waited"] = self.receiver.wait(1, timeout=2 * window + 15)
        # What came for that window (a duplicate would come with it, within a few seconds),
        # taken now: while the silence goes on, each later window sends one more, and the
        # test that reads this may run several windows later on a loaded machine.
        time.sleep(3)
        self.seen["notes"] = list(self.receiver.bodies)

    def result(self, timeout: float) -> dict[str, object]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the silence scenario still runs after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.seen

    def close(self) -> None:
        self.thread.join(120)
        self.receiver.close()
        remove_alerts(self.tag)


SILENCE_TEST = "test_silent_window_sends_one_and_completed_runs_keep_it_quiet"


@pytest.fixture(scope="module", autouse=True)
def silence(request, prefect_server):
    """The silence scenario, started with the module when its test is selected."""
    if not any(item.name == SILENCE_TEST and item.module is request.module
               for item in request.session.items):
        yield None
        return
    scenario = SilenceScenario()
    scenario.thread.start()
    yield scenario
    scenario.close()


def test_webhook_url_stays_secret_and_bad_targets_fail_in_one_line(tag, receiver, tmp_path):
    from prefect.settings import PREFECT_API_URL

    install_alerts(tag, receiver, "--send-test")
    assert receiver.wait(1, timeout=10) >= 0
    assert "test notification" in receiver.bodies[0]["subject"]
    # the block as the API (and the UI) shows it: no token anywhere
    request = urllib.request.Request(
        f"{PREFECT_API_URL.value()}/block_documents/filter", method="POST",
        data=json.dumps({"block_documents": {"name": {"any_": [f"{tag}-alerts"]}}}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        shown = response.read().decode()
    assert f"{tag}-alerts" in shown and receiver.token not in shown
    env = {k: v for k, v in os.environ.items() if k != "UCB_ALERT_WEBHOOK_URL"}
    base = [sys.executable, str(ALERTS), "--name-prefix", tag, "--flow-name", tag]
    for extra, expected in [
        ([], "no notification target"),
        (["--url-file", str(tmp_path / "absent")], "cannot read the webhook URL file"),
        (["--block", "custom-webhook/nope-none"], "no block custom-webhook/nope-none"),
    ]:
        result = subprocess.run(base + extra, env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    # a webhook that answers 404 at --send-test: one line, without the URL's token
    (tmp_path / "url").write_text(receiver.url.replace("/hooks/", "/gone/") + "\n")
    receiver.server.RequestHandlerClass.do_POST = lambda self: (self.send_response(404),
                                                                self.end_headers())
    result = subprocess.run(base + ["--url-file", str(tmp_path / "url"), "--send-test"],
                            env=env, capture_output=True, text=True, timeout=60)
    # Prefect may note its event queue draining first; our one line is the last one
    last = result.stderr.splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith("alerts.py: HTTPStatusError:") and "404" in last
    assert receiver.token not in result.stderr


def test_silent_window_sends_one_and_completed_runs_keep_it_quiet(silence):
    window = SILENCE_WINDOW_S
    seen = silence.result(timeout=5 * window + 120)
    assert seen["after_runs"] == []
    assert seen["waited"] >= window - 4   # not before the window is (almost) over
    bodies = seen["notes"]
    assert len(bodies) == 1
    note = bodies[0]
    assert note["subject"] == \
        f"[undercloud-backup] {HOST}: no backup completed in the last {window} s"
    assert f"No run of the flow {silence.tag} completed" in note["body"]
