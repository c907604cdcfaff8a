#!/usr/bin/env bash
# deployments/dev/fleet.sh: a fleet of simulated underclouds on this machine, for tests and for
# trying it (docs/fleet.md). As root, with deployments/dev/services.sh's Keystone and Swift up
# and PostgreSQL on 127.0.0.1:5432 (installed and started here on Debian when missing).
#
#   fleet.sh up N     the server on PostgreSQL and N nodes; one JSON line per node
#                     {"node","user","pool","root","db_port","db_socket","env"}, then
#                     {"server": "http://127.0.0.1:PORT/api", "env": PATH} (the operator's)
#   fleet.sh down     remove every user, process, database, directory and container it made
#   fleet.sh status   what runs (JSON); exit 1 when something is down
#   fleet.sh worker NODE   start NODE's worker again (after it was killed)
#
# Environment: UCB_FLEET_STATE [/var/lib/ucb-fleet], UCB_FLEET_VENV [the checkout's .venv, made
# from a system python: the node users run it], UCB_FLEET_UPLOADS [2], UCB_DEV_STATE (services.sh's),
# UCB_FLEET_NAMES [node1,...], UCB_ALERT_WEBHOOK_URL [no alerts], UCB_FLEET_SILENCE_HOURS [26],
# UCB_FLEET_OFFLINE_HOURS [1], UCB_FLEET_ZOMBIE_AFTER [90 s], UCB_FLEET_PREFIX [ucbf],
# UCB_FLEET_DATABASE [postgresql; sqlite to compare] (deployments/dev/fleet.py).
set -euo pipefail
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${UCB_FLEET_VENV:-$SRC/.venv}
[ "$(id -u)" = 0 ] || { echo "[fleet] ERROR: run as root" >&2; exit 1; }
if [ "${1:-}" = up ] && ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  if command -v apt-get >/dev/null; then
    apt-get install -y -q postgresql >/dev/null
    (command -v systemctl >/dev/null && systemctl start postgresql) || service postgresql start
  fi
fi
# Workers and servers started here must not inherit the caller's descriptors (a pipe a test
# reads would stay open until `down`).
exec "$VENV/bin/python" -I "$SRC/deployments/dev/fleet.py" "$@" 3>&- 4>&- 5>&-
