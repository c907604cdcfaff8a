"""Create or update the automation that ends dead flow runs: CRASHED after missed heartbeats.

In Prefect 3.9 a flow run whose worker (or machine) dies stays RUNNING forever and keeps its
deployment's concurrency slot, so every later backup would wait behind it. Flow runs of the
backup deployments send a heartbeat every ``--heartbeat`` seconds (job variable
PREFECT_FLOWS_HEARTBEAT_FREQUENCY in prefect.yaml); a run that sends none for ``--after``
seconds and did not finish is set CRASHED, which releases its slot.

    python deployments/prefect/zombie_automation.py [--after 90]

Idempotent: an existing automation of the same name is updated in place. Uses PREFECT_API_URL.
"""

from __future__ import annotations

import argparse
import datetime as dt

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

NAME = "undercloud-backup: crash flow runs without heartbeats"
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY in prefect.yaml


def automation(after_s: int) -> Automation:
    return Automation(
        name=NAME,
        description=(f"A flow run that sent no heartbeat for {after_s} s and did not finish "
                     "lost its process (worker killed, host rebooted): mark it CRASHED so it "
                     "releases the deployment's concurrency slot. Installed by "
                     "deployments/install.sh."),
        enabled=True,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=dt.timedelta(seconds=after_s),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"No heartbeat for {after_s} s: the flow run's process is gone "
                    "(worker stopped or host restarted). Nothing was committed unless a "
                    "manifest exists.")],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", type=int, default=3 * HEARTBEAT_S,
                        help="seconds without heartbeat before a run is crashed (default: "
                             "three heartbeats); must exceed the heartbeat interval")
    args = parser.parse_args()
    if args.after <= HEARTBEAT_S:
        parser.error(f"--after must be longer than the heartbeat interval ({HEARTBEAT_S} s)")
    wanted = automation(args.after)
    try:
        existing = Automation.read(name=NAME)
    except ValueError:
        created = wanted.create()
        print(f"automation created: {created.id} ({NAME})")
        return
    wanted.id = existing.id
    wanted.update()
    print(f"automation updated: {existing.id} ({NAME})")


if __name__ == "__main__":
    main()
