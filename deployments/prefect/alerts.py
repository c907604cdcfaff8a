"""Create or update the automations that tell an operator about backups that need a look.

Two automations of the Prefect server, both sending through one notification block:

* **backup failed**: a run of the backup flow ends FAILED or CRASHED; the message names the
  host, the flow run, its state and its error line, with a link to the run in the UI;
* **no backup completed**: no run of the backup flow COMPLETED within ``--silence-hours``
  (default 26: a nightly backup plus slack). A proactive trigger: it fires on the silence
  itself, so a dead worker, a paused schedule or a server that was down all night are noticed.

The notification block is chosen at install:

    # a generic webhook (POST of JSON {"subject", "body", "host", "source"}): the default
    UCB_ALERT_WEBHOOK_URL=https://hooks.example/T0K3N python alerts.py
    python alerts.py --url-file /etc/undercloud-backup/alert-webhook-url
    # Slack or Microsoft Teams incoming webhooks, URL likewise from a file or the environment
    python alerts.py --kind slack --url-file FILE
    # any notification block made beforehand (email, PagerDuty, ...), by type slug and name
    python alerts.py --block sendgrid-email/ops-mail

The URL is a secret (webhook URLs carry their token): it is read from a file or the
environment, never from argv, and kept in the block's secret fields. ``--send-test`` sends one
message through the block right away. Idempotent: the block and the automations of the same
names are updated in place. Uses PREFECT_API_URL (and PREFECT_API_AUTH_STRING).
Exit status: 0 done, 2 bad arguments or no notification target, 1 the server refused.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

FLOW_NAME = "undercloud_backup"
BLOCK_NAME = "undercloud-backup-alerts"
FAILED_NAME = "undercloud-backup: backup failed"
SILENT_NAME = "undercloud-backup: no backup completed"
URL_ENV = "UCB_ALERT_WEBHOOK_URL"
KINDS = {"webhook": "custom-webhook", "slack": "slack-webhook", "teams": "ms-teams-webhook"}


class Refused(Exception):
    """What to print as the one line before exiting."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AlertSettings:
    host: str
    flow_name: str = FLOW_NAME
    silence: dt.timedelta = dt.timedelta(hours=26)
    prefix: str = "undercloud-backup"  # automation names: "<prefix>: backup failed"


def node_name(fqdn: str, hostname: str) -> str:
    """The name the messages give this node: its fully qualified name where the resolver
    knows one, else its host name; never ``localhost`` (what ``getfqdn()`` says where
    /etc/hosts maps the host name to a loopback line that lists localhost first)."""
    loopback = {"localhost", "localhost.localdomain", "localhost6", "ip6-localhost"}
    if fqdn and fqdn not in loopback and fqdn.split(".")[0] == hostname.split(".")[0]:
        return fqdn
    return hostname if hostname and hostname not in loopback else (fqdn or hostname)


def failed_message(settings: AlertSettings) -> tuple[str, str]:
    """Subject and body (Jinja, rendered by the server with the failed run in context)."""
    subject = (f"[undercloud-backup] {settings.host}: backup {{{{ flow_run.name }}}} "
               "{{ flow_run.state.name }}")
    body = "\n".join([
        f"Host: {settings.host}",
        "Flow run: {{ flow_run.name }} ({{ flow_run.state.name }})",
        "Error: {{ flow_run.state.message }}",
        "Started: {{ flow_run.start_time }}",
        "Run in the UI: {{ flow_run|ui_url }}",
        "Nothing of this run counts as a backup unless its manifest.json exists.",
    ])
    return subject, body


def silent_message(settings: AlertSettings) -> tuple[str, str]:
    hours = settings.silence.total_seconds() / 3600
    span = f"{hours:g} h" if hours >= 1 else f"{settings.silence.total_seconds():g} s"
    subject = f"[undercloud-backup] {settings.host}: no backup completed in the last {span}"
    body = "\n".join([
        f"Host: {settings.host}",
        f"No run of the flow {settings.flow_name} completed in the last {span}.",
        "Check the worker (systemctl status undercloud-backup-worker), the deployment's "
        "schedule and the latest runs in the Prefect UI before the next upgrade.",
    ])
    return subject, body


def automations(settings: AlertSettings, block_id: UUID) -> list:
    """The two automations, as data (pure apart from Prefect's model classes)."""
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    of_flow = ResourceSpecification({"prefect.resource.role": "flow",
                                     "prefect.resource.name": settings.flow_name})
    runs = ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"})
    subject, body = failed_message(settings)
    failed = Automation(
        name=f"{settings.prefix}: backup failed", enabled=True,
        description=f"A run of {settings.flow_name} on {settings.host} failed or crashed. "
                    "Installed by deployments/prefect/alerts.py.",
        trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                             match=runs, match_related=of_flow, posture=Posture.Reactive,
                             threshold=1, within=dt.timedelta(0)),
        actions=[SendNotification(block_document_id=block_id, subject=subject, body=body)])
    subject, body = silent_message(settings)
    silent = Automation(
        name=f"{settings.prefix}: no backup completed", enabled=True,
        description=f"No run of {settings.flow_name} completed within {settings.silence}. "
                    "Installed by deployments/prefect/alerts.py.",
        trigger=EventTrigger(expect={"prefect.flow-run.Completed"}, match=runs,
                             match_related=of_flow, posture=Posture.Proactive, threshold=1,
                             within=settings.silence),
        actions=[SendNotification(block_document_id=block_id, subject=subject, body=body)])
    return [failed, silent]


def apply(wanted) -> str:
    """Create the automation, or update the one of the same name in place."""
    from prefect.automations import Automation

    try:
        existing = Automation.read(name=wanted.name)
    except ValueError:
        return f"automation created: {wanted.create().id} ({wanted.name})"
    wanted.id = existing.id
    wanted.update()
    return f"automation updated: {existing.id} ({wanted.name})"


def read_url(url_file: str | None) -> str:
    if url_file:
        try:
            url = Path(url_file).read_text().strip()
        except OSError as error:
            raise Refused(f"cannot read the webhook URL file {url_file}: "
                          f"{error.strerror}") from None
    else:
        url = os.environ.get(URL_ENV, "").strip()
    if not url:
        raise Refused(f"no notification target: give --url-file FILE, set {URL_ENV}, "
                      "or name an existing block with --block TYPE/NAME")
    if not url.startswith(("https://", "http://")):
        raise Refused("the webhook URL must start with https:// or http://")
    return url


def save_block(kind: str, url: str, host: str, name: str = BLOCK_NAME) -> UUID:
    """Create or overwrite the notification block; the URL only in its secret fields."""
    from prefect.blocks.notifications import (
        CustomWebhookNotificationBlock,
        MicrosoftTeamsWebhook,
        SlackWebhook,
    )

    if kind == "webhook":
        block = CustomWebhookNotificationBlock(
            name=name, url="{{webhook_url}}", method="POST", secrets={"webhook_url": url},
            json_data={"subject": "{{subject}}", "body": "{{body}}", "host": host,
                       "source": "undercloud-backup"})
    else:
        block = {"slack": SlackWebhook, "teams": MicrosoftTeamsWebhook}[kind](url=url)
    return block.save(name, overwrite=True)


def existing_block(spec: str) -> UUID:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    slug, _, name = spec.partition("/")
    if not slug or not name:
        raise Refused(f"--block takes TYPE-SLUG/NAME (e.g. sendgrid-email/ops), not {spec!r}")
    with get_client(sync_client=True) as client:
        try:
            return client.read_block_document_by_name(name, slug).id
        except ObjectNotFound:
            raise Refused(f"no block {spec} on the Prefect server") from None


def send_test(block_id: UUID, host: str) -> None:
    from prefect.blocks.core import Block

    block = Block.load_from_ref(block_id)
    block.notify(f"Alerts for undercloud-backup on {host} are set up; this is a test.",
                 subject=f"[undercloud-backup] {host}: test notification")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--block", metavar="TYPE/NAME",
                        help="use this existing notification block instead of making one")
    target.add_argument("--kind", choices=sorted(KINDS), default="webhook",
                        help="the block to make from the URL (default: webhook)")
    parser.add_argument("--url-file", help=f"file holding the webhook URL (else ${URL_ENV})")
    parser.add_argument("--host", default=node_name(socket.getfqdn(), socket.gethostname()),
                        help="host name the messages give (default: this node's)")
    parser.add_argument("--flow-name", default=FLOW_NAME)
    parser.add_argument("--silence-hours", type=float, default=26.0,
                        help="alert when no backup completed for this long (default: 26)")
    parser.add_argument("--name-prefix", default="undercloud-backup",
                        help="automation and block names start with this")
    parser.add_argument("--send-test", action="store_true",
                        help="send one test message through the block now")
    args = parser.parse_args(argv)
    if args.silence_hours * 3600 < 10:
        parser.error("--silence-hours must be at least 10 seconds (Prefect's minimum)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    settings = AlertSettings(host=args.host, flow_name=args.flow_name,
                             silence=dt.timedelta(hours=args.silence_hours),
                             prefix=args.name_prefix)
    url = ""
    try:
        if args.block:
            block_id = existing_block(args.block)
        else:
            url = read_url(args.url_file)
            block_id = save_block(args.kind, url, settings.host,
                                  name=f"{args.name_prefix}-alerts")
        for automation in automations(settings, block_id):
            print(apply(automation))
        if args.send_test:
            send_test(block_id, settings.host)
            print("test notification sent")
    except Refused as error:
        print(f"alerts.py: {error}", file=sys.stderr)
        return error.code
    except Exception as error:  # noqa: BLE001 - one line for the installer's log
        line = (str(error) or type(error).__name__).splitlines()[0]
        if url:  # an HTTP error quotes the URL, and the URL holds the webhook's token
            line = line.replace(url, "<webhook URL>")
        drain_events()
        print(f"alerts.py: {type(error).__name__}: {line}", file=sys.stderr)
        return 1
    return 0


def drain_events() -> None:
    """Send Prefect's queued events now, so that its exit-time notes come before our line."""
    try:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=10)
    except Exception:  # noqa: BLE001 - best effort: only the order of stderr lines is at stake
        pass


if __name__ == "__main__":
    sys.exit(main())
