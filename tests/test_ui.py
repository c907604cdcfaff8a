"""The Prefect UI of a real installation, driven by a real browser (Debian's headless Chromium
through Playwright; no browser download).

`deployments/install.sh` installs everything (its own server user with API auth, the worker
user, the sudo wrappers: the installation shared with test_security, conftest's full_system);
the browser logs in, opens undercloud_backup/on-demand, starts a
custom run (an added path, an excluded path) and a database-only one, follows each to
Completed and opens its artifact, then starts a quick run with the deployment's defaults. What
the operator sees is checked against the API and against Swift. Screenshots of every step are
kept in SHOTS (printed), which CI leaves in place.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import sample_undercloud as sample
from deploy_helpers import remove_tree, sample_root, scratch_mariadb
from install_helpers import LOG_DIR
from playwright import sync_api as playwright_api
from test_deploy import archive_members, manifests

from undercloud_backup.db import privileged

pytestmark = pytest.mark.slow

SHOTS = Path(os.environ.get("UCB_UI_SCREENSHOTS", "/var/tmp/ucb-ui-screenshots"))
CHROMIUM = "/usr/bin/chromium"
# No network beyond loopback here: without these Chromium keeps calling Google's hosts.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
ADDED = "/opt/extra"
EXCLUDED = "/home/stack/templates"


@pytest.fixture(scope="module")
def installed(full_system):
    """The shared full install (conftest: full_system) whose wrappers may read a sample
    undercloud and dump a private MariaDB; its policy and deployment defaults put back after."""
    root = sample_root((1,))
    (root / "opt/extra").mkdir(parents=True)
    (root / "opt/extra/notes.txt").write_text("not a default path\n")
    started = time.monotonic()
    config = Path(privileged.CONFIG_FILE)
    shipped = config.read_text()
    api = full_system.api()
    on_demand = api("GET", "/deployments/name/undercloud_backup/on-demand")
    try:
        with scratch_mariadb() as db_socket:
            subprocess.run(["mariadb", f"--socket={db_socket}"], input=sample.database_sql(),
                           text=True, check=True)
            config.write_text(
                "".join(line for line in shipped.splitlines(keepends=True)
                        if not line.startswith("root ="))
                # an added path is archived only where root's policy allows it
                + f"root = {root}\npath = {ADDED}\nsocket = {db_socket}\n")
            full_system.root = root
            full_system.setup_seconds = time.monotonic() - started
            yield full_system
    finally:
        config.write_text(shipped)
        api("PATCH", f"/deployments/{on_demand['id']}", {"parameters": on_demand["parameters"]})
        remove_tree(root)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield chromium
        chromium.close()


class Operator:
    """The browser session of an operator; each step leaves a numbered screenshot."""

    def __init__(self, page, base: str) -> None:
        self.page, self.base, self.step = page, base, 0
        SHOTS.mkdir(parents=True, exist_ok=True)

    def shot(self, name: str) -> Path:
        self.step += 1
        path = SHOTS / f"{self.step:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def log_in(self, auth: str) -> None:
        self.page.goto(self.base + "/deployments")
        field = self.page.locator("input[placeholder='admin:pass']")
        field.fill(auth)
        self.shot("login")
        self.page.locator("button[type=submit]").click()
        self.page.get_by_role("link", name="on-demand").wait_for()

    def open_on_demand(self) -> None:
        self.page.goto(self.base + "/deployments")
        self.page.get_by_role("link", name="on-demand").click()
        self.page.wait_for_url("**/deployments/deployment/**")
        self.page.get_by_text("undercloud_backup").first.wait_for()
        self.shot("deployment")

    def run_menu(self, item: str) -> None:
        self.page.get_by_role("button", name="Run", exact=True).click()
        self.page.get_by_text(item, exact=True).click()

    def field(self, label: str):
        """The innermost form property whose label is ``label`` (nested groups repeat it)."""
        name = self.page.locator("span.schema-form-property__label",
                                 has_text=re.compile(rf"^{re.escape(label)}( \(Optional\))?$"))
        return self.page.locator("div.schema-form-property").filter(has=name).last

    def add_item(self, label: str, value: str) -> None:
        prop = self.field(label)
        prop.get_by_role("button", name="Add item").click()
        prop.locator("input, textarea").last.fill(value)

    def set_text(self, label: str, value: str) -> None:
        self.field(label).locator("input, textarea").first.fill(value)

    def toggle(self, label: str) -> None:
        self.field(label).locator("label[role=switch]").click()

    def start(self, action, name: str) -> str:
        """Do ``action`` (Submit, Quick run), then follow the toast's "View run" link;
        return the id of the flow run it created. A submit the server refused (an API error
        recorded, no run created: seen about once in ten runs on this 2-core machine, SQLite
        busy under load) is warned about and submitted again, up to three times in all."""
        refused: list[str] = []
        created: list[str] = []  # the ids of the runs the server created for this page

        def record(response) -> None:
            if (response.request.method == "POST" and response.status == 201
                    and response.url.endswith("/create_flow_run")):
                created.append(response.json()["id"])
            if response.status >= 400 and "/api/" in response.url:
                try:
                    body = response.text()[:300]
                except Exception:  # noqa: BLE001 - the body is only for the message
                    body = "?"
                refused.append(f"{response.request.method} {response.url} -> "
                               f"{response.status} {body}")
        self.page.on("response", record)
        try:
            for attempt in (1, 2, 3):
                action()
                try:
                    self.page.get_by_role("button", name="View run").last.wait_for()
                    break
                except playwright_api.TimeoutError:
                    shot = self.shot(f"{name}-no-run")
                    if attempt < 3 and refused:
                        warnings.warn(f"UI {name}: the server refused the submit "
                                      f"({'; '.join(refused)}); submitting again", stacklevel=2)
                        refused.clear()
                        time.sleep(2)  # the server's database, busy a moment ago
                        continue
                    log = (LOG_DIR / "server.log").read_text(errors="replace")[-4000:]
                    raise AssertionError(
                        f"{name}: no run was created (see {shot}); API errors {refused}; the "
                        f"page says {self.page.locator('body').inner_text()[-1500:]!r}; "
                        f"server log:\n{log}") from None
            # The toast closes by itself after a few seconds, so it is clicked at once (its
            # screenshot is the run page's). Where the browser was too slow even for that (a
            # loaded machine), the run the toast announced is opened by the id the server
            # returned for it.
            try:
                self.page.get_by_role("button", name="View run").last.click(timeout=10_000)
            except playwright_api.TimeoutError:
                if not created:
                    raise
                self.page.goto(f"{self.base}/runs/flow-run/{created[-1]}")
            self.page.wait_for_url(re.compile(r".*/runs/flow-run/[0-9a-f-]{36}$"))
        finally:
            self.page.remove_listener("response", record)
        run_id = self.page.url.rsplit("/", 1)[1]
        assert run_id in created, (run_id, created)  # the run this submit created
        self.shot(f"{name}-scheduled")
        return run_id

    def submit(self, name: str) -> str:
        return self.start(self.page.get_by_role("button", name="Submit").click, name)

    def follow(self, run_id: str, name: str, api, timeout: float = 240) -> str:
        """Wait (on the API, every 0.5 s) until the run is final, then open its page: return
        the final state its badge shows. (Reloading the page meanwhile, as an operator might,
        only takes CPU from the backup on a 2-core machine.)"""
        final = ("Completed", "Failed", "Crashed", "Cancelled")
        api_state = api.wait_final(run_id, timeout)["state"]
        self.page.goto(f"{self.base}/runs/flow-run/{run_id}")
        badge = self.page.locator(".state-badge").first
        deadline = time.monotonic() + 30
        state = ""
        while state not in final and time.monotonic() < deadline:
            state = badge.inner_text().strip() if badge.count() else ""
            time.sleep(0.2)
        self.shot(f"{name}-state")
        assert state == "Completed", f"{name}: UI shows {state}; {api_state['message']}"
        assert api_state["type"] == "COMPLETED"
        return state

    def artifact(self, name: str, expect: str) -> str:
        """Open the run's Artifacts tab, then its backup report; return the page's text."""
        self.page.get_by_text("Artifacts", exact=True).first.click()
        self.page.get_by_text("undercloud-backup").last.click()
        self.page.wait_for_url("**/artifacts/artifact/**")
        self.page.get_by_text(expect).first.wait_for()
        self.page.wait_for_load_state("networkidle")
        time.sleep(0.5)
        self.shot(f"{name}-artifact")
        return self.page.locator("body").inner_text()


def test_operator_runs_backups_from_the_ui(installed, browser, os_env, container):
    api = installed.api()
    started = time.monotonic()
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    op = Operator(context.new_page(), f"http://127.0.0.1:{installed.port}")
    op.log_in(installed.auth)
    op.open_on_demand()

    # Custom run: what to back up changed, into the test's container
    op.run_menu("Custom run")
    op.page.get_by_text("Parameters").first.wait_for()
    op.add_item("Add Paths", ADDED)
    op.add_item("Exclude Paths", EXCLUDED)
    op.set_text("Root", str(installed.root))
    op.set_text("Container", container)
    # an optional field (Container: str | None) is a plain field: no type switch whose
    # "None" reads as an error
    assert op.page.get_by_text("Property is type None").count() == 0
    op.shot("custom-form")
    run_id = op.submit("custom")
    assert op.follow(run_id, "custom", api) == "Completed"
    run = api.flow_run(run_id)
    assert run["state"]["type"] == "COMPLETED"
    what = run["parameters"]["what"]
    assert what["add_paths"] == [ADDED] and what["exclude_paths"] == [EXCLUDED]
    [manifest] = manifests(os_env, container)
    backup_id = manifest.split("/")[0]
    members = archive_members(os_env, container, backup_id, installed.identity)
    assert "opt/extra/notes.txt" in members and "root/.my.cnf" in members
    assert not [m for m in members if m.startswith("home/stack/templates")]
    shown = op.artifact("custom", backup_id)
    assert backup_id in shown and "Complete: manifest" in shown
    # encrypted by default, to the installation's break-glass key, whose identity is still on
    # this node: the artifact says so, and gives the links encrypted objects get
    assert "Encryption: age, to sha256:" in shown and "Download (links valid until" in shown
    assert "WARNING: the break-glass identity" in shown
    archived = next(line for line in shown.splitlines() if line.startswith("Paths archived"))
    assert "opt/extra" in archived and "home/stack" in archived, archived

    # Custom run: the databases only
    op.open_on_demand()
    op.run_menu("Custom run")
    op.page.get_by_text("Parameters").first.wait_for()
    op.toggle("Db Only")
    op.set_text("Root", str(installed.root))
    op.set_text("Container", container)
    op.shot("db-only-form")
    db_run = op.submit("db-only")
    assert op.follow(db_run, "db-only", api) == "Completed"
    assert api.flow_run(db_run)["parameters"]["what"]["db_only"] is True
    newest = [m for m in manifests(os_env, container) if m != manifest]
    assert len(newest) == 1
    db_backup = newest[0].split("/")[0]
    shown = op.artifact("db-only", db_backup)
    assert db_backup in shown and f"{db_backup}/mariadb-all-databases.sql.zst.age" in shown
    assert f"{db_backup}/filesystem.tar.zst" not in shown and "Paths archived: none" in shown

    # Quick run with the deployment's defaults (pointed at the sample tree, as an operator of
    # this test machine would set them), through the sudo wrappers
    deployment = api("GET", "/deployments/name/undercloud_backup/on-demand")
    parameters = json.loads(json.dumps(deployment["parameters"]))
    parameters["what"]["root"] = str(installed.root)
    parameters["swift"]["container"] = container
    api("PATCH", f"/deployments/{deployment['id']}", {"parameters": parameters})
    op.open_on_demand()
    quick = op.start(lambda: op.run_menu("Quick run"), "quick")
    assert op.follow(quick, "quick", api) == "Completed"
    assert api.flow_run(quick)["parameters"]["advanced"]["privileged"] is True
    assert len(manifests(os_env, container)) == 3
    seconds = time.monotonic() - started
    print(f"\nUI screenshots: {SHOTS}\nbrowser test: {seconds:.0f} s "
          f"(+ {installed.setup_seconds:.0f} s install)")
