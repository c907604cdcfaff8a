"""Turn the ``binlog-ship`` deployment's schedule on or off.

Shipping the binary log every 15 minutes only makes sense where MariaDB keeps one: elsewhere
each run would be refused (exit 83) and alert. install.sh asks the server as root (``ucb-mariadb
binlog status``) and calls this with the answer; prefect.yaml leaves the schedule off.

    python deployments/prefect/binlog_schedule.py --active 1|0

Idempotent. Uses PREFECT_API_URL.
"""

from __future__ import annotations

import argparse
import asyncio

from prefect.client.orchestration import get_client

DEPLOYMENT = "undercloud_backup/binlog-ship"


async def set_active(active: bool) -> int:
    async with get_client() as client:
        deployment = await client.read_deployment_by_name(DEPLOYMENT)
        for schedule in deployment.schedules:
            await client.update_deployment_schedule(deployment.id, schedule.id, active=active)
        return len(deployment.schedules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--active", choices=("0", "1"), required=True)
    active = parser.parse_args().active == "1"
    count = asyncio.run(set_active(active))
    print(f"{DEPLOYMENT}: {count} schedule(s) {'active' if active else 'paused'}")


if __name__ == "__main__":
    main()
