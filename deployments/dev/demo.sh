#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a real backup of a sample undercloud:
# starts MariaDB, memcached, Keystone and Swift on 127.0.0.1, builds the venv, generates a
# sample undercloud (files under $UCB_SAMPLE_ROOT and sample databases) and backs it up into
# the local Swift, encrypted to a demo age key of its own (made once in $UCB_DEV_STATE, beside
# the test bed: a demo only, as an undercloud's identity never stays on the node), printing
# where the backup is.
#   sudo deployments/dev/demo.sh
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
[ "$(id -u)" = 0 ] || { echo "run as root (it installs and starts services)" >&2; exit 2; }
STATE=${UCB_DEV_STATE:-/var/lib/undercloud-backup-dev}
SAMPLE=${UCB_SAMPLE_ROOT:-/var/tmp/undercloud-sample}
bash deployments/dev/services.sh start
VENV=$(bash deployments/dev/venv.sh)
"$VENV/bin/python" tests/sample_undercloud.py "$SAMPLE" --images-mib 40 8 --db >/dev/null
# shellcheck disable=SC1091
. "$STATE/keystone.env"
export PREFECT_HOME=${PREFECT_HOME:-$STATE/prefect} PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=90
# Backups are encrypted by default (install.sh makes a break-glass key); the demo makes a key
# of its own with age-keygen (the key only ever in files, never on an argv).
IDENTITY=$STATE/demo.agekey RECIPIENTS=$STATE/demo-recipients
if [ ! -s "$IDENTITY" ]; then
  rm -f "$IDENTITY"
  (umask 077 && age-keygen -o "$IDENTITY" 2>/dev/null)
fi
age-keygen -y "$IDENTITY" > "$RECIPIENTS"
echo "demo: encrypting to the demo age key $IDENTITY (made by this demo, kept here for the demo's"
echo "demo: restores; on an undercloud the identity stays off the node: docs/encryption.md)"
"$VENV/bin/python" -m flows.backup --root "$SAMPLE" --db-defaults-file "$STATE/mariadb-backup.cnf" \
  --segment-size 16MiB --recipients-file "$RECIPIENTS" --json > "$STATE/last-backup.json"
"$VENV/bin/python" - "$STATE/last-backup.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"backup {s['backup_id']} is complete in Swift container {s['container']}:")
print(f"  manifest  {s['container']}/{s['manifest']}")
for o in s["objects"]:
    kind = f"SLO, {len(o['segments'])} segments" if o["segments"] else "plain object"
    print(f"  object    {s['container']}/{o['name']}  ({o['size']} bytes, {kind}, sha256 {o['sha256'][:12]}...)")
PY
echo "list backups: . $STATE/keystone.env; $VENV/bin/python -m flows.backup --list"
echo "restore one:  . $STATE/keystone.env; $VENV/bin/python -m flows.restore --identity $IDENTITY --backup-id ID --target DIR"
