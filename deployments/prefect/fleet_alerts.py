"""Create, update or remove one fleet node's alerts on the fleet's server.

Three automations per node, each message naming the node (as its host):

* "undercloud-backup <node>: backup failed": a backup run of the node's pool
  ``undercloud-<node>`` ends FAILED or CRASHED (a killed worker's run is CRASHED by the zombie
  automation);
* "undercloud-backup <node>: no backup completed": no backup run of the node's pool COMPLETED
  within ``--silence-hours`` (default 26);
* "undercloud-backup <node>: worker offline": the node's pool turned NOT_READY (no worker of it
  sent a heartbeat lately) and not READY again within ``--offline-hours`` (default 1).

They send through the notification block the server's install configured (alerts.py's
``undercloud-backup-alerts`` webhook block), or through ``--block TYPE/NAME``. The first two are
alerts.py's own automations, narrowed to the node's pool.

    python fleet_alerts.py --node NAME [--block TYPE/NAME] [--silence-hours H] [--offline-hours H]
    python fleet_alerts.py --node NAME --remove

Idempotent. Uses PREFECT_API_URL and PREFECT_API_AUTH_STRING (the operator's).
Exit status: 0 done, 2 bad arguments or no such block, 1 the server refused.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from uuid import UUID

import alerts

DEFAULT_BLOCK = f"custom-webhook/{alerts.BLOCK_NAME}"


def pool_name(node: str) -> str:
    return f"undercloud-{node}"


def offline_message(node: str, offline: dt.timedelta) -> tuple[str, str]:
    hours = offline.total_seconds() / 3600
    span = f"{hours:g} h" if hours >= 1 else f"{offline.total_seconds():g} s"
    subject = f"[undercloud-backup] {node}: worker offline for {span}"
    body = "\n".join([
        f"Host: {node}",
        f"No worker of the work pool {pool_name(node)} sent a heartbeat in the last {span}: "
        "the node runs no backup, verify or prune until its worker is back.",
        "Check the node (systemctl status undercloud-backup-worker) and its network path to "
        "the Prefect server.",
    ])
    return subject, body


def node_automations(node: str, block_id: UUID, silence: dt.timedelta,
                     offline: dt.timedelta) -> list:
    """The node's three automations, as data."""
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    settings = alerts.AlertSettings(host=node, silence=silence, prefix=f"undercloud-backup {node}")
    of_pool = ResourceSpecification({"prefect.resource.role": "work-pool",
                                     "prefect.resource.name": pool_name(node)})
    wanted = alerts.automations(settings, block_id)
    for automation in wanted:
        automation.description = (automation.description or "").replace(
            f"on {node}", f"on node {node} (pool {pool_name(node)})")
        related = automation.trigger.match_related
        automation.trigger.match_related = [*(related if isinstance(related, list)
                                              else [related]), of_pool]
    subject, body = offline_message(node, offline)
    wanted.append(Automation(
        name=f"undercloud-backup {node}: worker offline", enabled=True,
        description=f"The work pool {pool_name(node)} had no online worker for {offline}. "
                    "Installed by deployments/prefect/fleet_alerts.py.",
        trigger=EventTrigger(
            after={"prefect.work-pool.not-ready"}, expect={"prefect.work-pool.ready"},
            match=ResourceSpecification({"prefect.resource.id": "prefect.work-pool.*",
                                         "prefect.resource.name": pool_name(node)}),
            # Buckets only from a not-ready event: one alert per time the pool went offline
            # (without it the server keeps a bucket open and alerts every window).
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=offline),
        actions=[SendNotification(block_document_id=block_id, subject=subject, body=body)]))
    return wanted


def remove(node: str) -> list[str]:
    from prefect.automations import Automation

    removed = []
    for suffix in ("backup failed", "no backup completed", "worker offline"):
        name = f"undercloud-backup {node}: {suffix}"
        try:
            if Automation.read(name=name).delete():
                removed.append(f"automation removed: {name}")
        except ValueError:  # none of that name
            pass
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", required=True, help="the node's name (its pool: undercloud-NODE)")
    parser.add_argument("--block", default=DEFAULT_BLOCK, metavar="TYPE/NAME",
                        help=f"the notification block to send through (default: {DEFAULT_BLOCK})")
    parser.add_argument("--silence-hours", type=float, default=26.0)
    parser.add_argument("--offline-hours", type=float, default=1.0)
    parser.add_argument("--remove", action="store_true", help="remove the node's automations")
    args = parser.parse_args(argv)
    if min(args.silence_hours, args.offline_hours) * 3600 < 10:
        parser.error("windows must be at least 10 seconds (Prefect's minimum)")
    try:
        if args.remove:
            for line in remove(args.node):
                print(line)
            return 0
        block_id = alerts.existing_block(args.block)
        for automation in node_automations(args.node, block_id,
                                           dt.timedelta(hours=args.silence_hours),
                                           dt.timedelta(hours=args.offline_hours)):
            print(alerts.apply(automation))
    except alerts.Refused as error:
        print(f"fleet_alerts.py: {error}", file=sys.stderr)
        return error.code
    except Exception as error:  # noqa: BLE001 - one line for the operator
        line = (str(error) or type(error).__name__).splitlines()[0]
        print(f"fleet_alerts.py: {type(error).__name__}: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
