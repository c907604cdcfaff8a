#!/usr/bin/env bash
# The test command: bring up the loopback services, build the venv, run the whole suite.
#   sudo deployments/dev/test.sh [pytest args...]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
[ "$(id -u)" = 0 ] || { echo "run as root (it installs and starts services)" >&2; exit 2; }
t0=$SECONDS
bash deployments/dev/services.sh start
VENV=$(bash deployments/dev/venv.sh)
echo "[test] services and venv ready in $((SECONDS - t0)) s"
export PATH="$VENV/bin:$PATH"
"$VENV/bin/ruff" check .
exec "$VENV/bin/pytest" -q "$@"
