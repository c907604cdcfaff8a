#!/usr/bin/env bash
# deployments/install.sh: install undercloud-backup on an undercloud, as root. Idempotent: run
# it again after an update of the checkout.
#
#   deployments/install.sh [STEP...]        (default: all steps below, in this order)
#
#   user        group undercloud-backup, system user $UCB_USER in it, state dir $UCB_STATE
#   app         copy this checkout to $UCB_APP (root-owned: the worker cannot change its code)
#   venv        $UCB_VENV from /usr/bin/python3 (readable by the worker), project installed
#   privileged  wrappers -> /usr/local/libexec/undercloud-backup (root, 0755),
#               /etc/undercloud-backup/privileged.conf (once), sudoers checked with visudo -cf
#               and installed as /etc/sudoers.d/undercloud-backup (0440)
#   config      /etc/undercloud-backup/{server,worker}.env (once; then they are yours)
#   services    systemd units (enabled, started) or, without systemd, start-stop-daemon
#   prefect     work pool "undercloud", queue "backups" (limit 1), `prefect deploy --all`,
#               the automation that crashes runs without heartbeats
#   stop        (not part of the default) stop the worker and server started without systemd
#
# Environment (defaults in brackets):
#   UCB_USER [undercloud-backup]  UCB_PREFIX [/opt/undercloud-backup]  UCB_APP [$UCB_PREFIX/app]
#   UCB_VENV [$UCB_PREFIX/venv]   UCB_STATE [/var/lib/undercloud-backup]
#   UCB_LOCAL_SERVER [1]  run a Prefect server here; 0: use the one at PREFECT_API_URL
#   UCB_PORT [4200]       the local server's port
#   PREFECT_API_URL [http://127.0.0.1:$UCB_PORT/api]  (PREFECT_API_AUTH_STRING if it needs one)
#   UCB_ZOMBIE_AFTER [90] seconds without a heartbeat before a run is marked CRASHED
set -euo pipefail
umask 022

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GROUP=undercloud-backup
UCB_USER=${UCB_USER:-undercloud-backup}
UCB_PREFIX=${UCB_PREFIX:-/opt/undercloud-backup}
UCB_APP=${UCB_APP:-$UCB_PREFIX/app}
UCB_VENV=${UCB_VENV:-$UCB_PREFIX/venv}
UCB_STATE=${UCB_STATE:-/var/lib/undercloud-backup}
UCB_LOCAL_SERVER=${UCB_LOCAL_SERVER:-1}
UCB_PORT=${UCB_PORT:-4200}
UCB_ZOMBIE_AFTER=${UCB_ZOMBIE_AFTER:-90}
UCB_PYTHON=${UCB_PYTHON:-/usr/bin/python3}
ETC=/etc/undercloud-backup
LIBEXEC=/usr/local/libexec/undercloud-backup
SUDOERS=/etc/sudoers.d/undercloud-backup
RUN=/run/undercloud-backup
LOG=/var/log/undercloud-backup
POOL=undercloud
QUEUE=backups
ENVFILE_API_URL=
if [ -r "$ETC/worker.env" ]; then
  ENVFILE_API_URL=$(sed -n 's/^PREFECT_API_URL=//p' "$ETC/worker.env" | tail -1)
fi
PREFECT_API_URL=${PREFECT_API_URL:-${ENVFILE_API_URL:-http://127.0.0.1:$UCB_PORT/api}}

say() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }
have_systemd() { [ -d /run/systemd/system ]; }

# ------------------------------------------------------------------------------------- steps
step_user() {
  getent group "$GROUP" >/dev/null || groupadd --system "$GROUP"
  if ! id -u "$UCB_USER" >/dev/null 2>&1; then
    useradd --system --gid "$GROUP" --home-dir "$UCB_STATE" --no-create-home \
      --shell /usr/sbin/nologin --comment "undercloud-backup Prefect worker" "$UCB_USER"
    say "user $UCB_USER created"
  elif ! id -nG "$UCB_USER" | tr ' ' '\n' | grep -qx "$GROUP"; then
    usermod -a -G "$GROUP" "$UCB_USER"
    say "user $UCB_USER added to group $GROUP"
  fi
  install -d -o "$UCB_USER" -g "$GROUP" -m 0750 "$UCB_STATE" "$UCB_STATE/worker"
  if [ "$UCB_LOCAL_SERVER" = 1 ]; then
    install -d -o "$UCB_USER" -g "$GROUP" -m 0750 "$UCB_STATE/server"
  fi
}

step_app() {
  if [ "$(realpath -m "$UCB_APP")" = "$SRC" ]; then
    say "app: running from $SRC itself"
    return
  fi
  local new="$UCB_APP.new.$$"
  rm -rf "$new"
  install -d -m 0755 "$new"
  # Tracked content only when this is a git checkout; otherwise everything but build debris.
  if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$SRC" ls-files -z --cached --others --exclude-standard \
      | (cd "$SRC" && tar --null -T - -cf -) | tar -xf - -C "$new" --no-same-owner
  else
    tar -C "$SRC" --exclude=.venv --exclude=.git --exclude=__pycache__ -cf - . \
      | tar -xf - -C "$new" --no-same-owner
  fi
  chown -R root:root "$new"
  chmod -R u+rwX,go+rX,go-w "$new"
  install -d -m 0755 "$(dirname "$UCB_APP")"
  rm -rf "$UCB_APP.old"
  [ -e "$UCB_APP" ] && mv "$UCB_APP" "$UCB_APP.old"
  mv "$new" "$UCB_APP"
  rm -rf "$UCB_APP.old"
  say "app: $SRC copied to $UCB_APP"
}

step_venv() {
  # A venv of a system python: a pyenv interpreter under /root is unreadable by the worker.
  if [ ! -x "$UCB_VENV/bin/python" ]; then
    "$UCB_PYTHON" -m venv "$UCB_VENV"
    say "venv created: $UCB_VENV"
  fi
  "$UCB_VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade "$UCB_APP"
  chmod -R go+rX,go-w "$UCB_VENV"
  say "venv: $("$UCB_VENV/bin/python" -c 'import prefect; print("prefect", prefect.__version__)'), project installed"
}

step_privileged() {
  command -v sudo >/dev/null || die "sudo is not installed (apt-get install sudo / dnf install sudo)"
  command -v visudo >/dev/null || die "visudo is missing (it comes with sudo)"
  install -d -o root -g root -m 0755 "$(dirname "$LIBEXEC")" "$LIBEXEC"
  chown root:root "$(dirname "$LIBEXEC")" "$LIBEXEC"
  chmod go-w "$(dirname "$LIBEXEC")" "$LIBEXEC"
  local wrapper
  for wrapper in ucb-archive ucb-mariadb; do
    install -o root -g root -m 0755 "$SRC/deployments/libexec/$wrapper" "$LIBEXEC/$wrapper.new"
    mv -f "$LIBEXEC/$wrapper.new" "$LIBEXEC/$wrapper"
  done
  install -d -o root -g root -m 0755 "$ETC"
  if [ ! -e "$ETC/privileged.conf" ]; then
    install -o root -g root -m 0644 "$SRC/deployments/privileged.conf" "$ETC/privileged.conf"
  fi
  # sudo ignores files in sudoers.d whose name contains a dot: the check copy is inert.
  local staged="$SUDOERS.new"
  install -o root -g root -m 0440 "$SRC/deployments/sudoers/undercloud-backup" "$staged"
  if ! visudo -cqf "$staged"; then
    rm -f "$staged"
    die "deployments/sudoers/undercloud-backup does not pass visudo -cf; nothing installed"
  fi
  mv -f "$staged" "$SUDOERS"
  if ! visudo -cq; then
    rm -f "$SUDOERS"
    die "sudo's configuration fails visudo -c with $SUDOERS; removed it again"
  fi
  say "privileged: wrappers in $LIBEXEC, $SUDOERS installed, policy in $ETC/privileged.conf"
}

render() {  # render TEMPLATE DEST MODE: fill in @...@ once; an existing DEST is kept
  local template=$1 dest=$2 mode=$3 auth_line="" server_auth_line=""
  if [ -e "$dest" ]; then
    say "config: $dest exists, kept"
    return
  fi
  if [ "$UCB_LOCAL_SERVER" = 1 ]; then
    AUTH=${AUTH:-admin:$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')}
    auth_line="PREFECT_API_AUTH_STRING=$AUTH"
    server_auth_line="PREFECT_SERVER_API_AUTH_STRING=$AUTH"
  else
    auth_line="#PREFECT_API_AUTH_STRING=user:password"
  fi
  sed -e "s#@PREFECT_API_URL@#$PREFECT_API_URL#" -e "s#@STATE@#$UCB_STATE#" \
      -e "s#@PORT@#$UCB_PORT#" -e "s#@AUTH_LINE@#$auth_line#" \
      -e "s#@SERVER_AUTH_LINE@#$server_auth_line#" "$template" > "$dest.new"
  chown root:"$GROUP" "$dest.new"
  chmod "$mode" "$dest.new"
  mv -f "$dest.new" "$dest"
  say "config: $dest written"
}

step_config() {
  install -d -o root -g root -m 0755 "$ETC"
  AUTH=
  if [ -r "$ETC/server.env" ]; then  # reuse the server's auth string for a new worker.env
    AUTH=$(sed -n 's/^PREFECT_SERVER_API_AUTH_STRING=//p' "$ETC/server.env" | tail -1)
  fi
  if [ "$UCB_LOCAL_SERVER" = 1 ]; then
    render "$SRC/deployments/env/server.env" "$ETC/server.env" 0640
  fi
  render "$SRC/deployments/env/worker.env" "$ETC/worker.env" 0640
}

unit_text() {  # the unit with this installation's paths and user
  sed -e "s#/opt/undercloud-backup/venv#$UCB_VENV#g" -e "s#/opt/undercloud-backup/app#$UCB_APP#g" \
      -e "s#/var/lib/undercloud-backup#$UCB_STATE#g" -e "s#^User=.*#User=$UCB_USER#" "$1"
}

# Reads a systemd-style env file (KEY=value, # comments) and execs the command with it, with
# SIGINT/SIGTERM reset to default: a worker that inherited an ignored SIGINT (started from a
# script's background job) would otherwise ignore SIGTERM too. The values (secrets) never
# reach an argv.
LAUNCHER='
import os, signal, sys
env = dict(os.environ)
with open(sys.argv[1], encoding="utf-8") as lines:
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\x27\"":
                value = value[1:-1]
            env[key.strip()] = value
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_DFL)
os.execve(sys.argv[2], sys.argv[2:], env)
'

start_daemon() {  # start_daemon NAME ENVFILE DIR COMMAND... (no systemd)
  local name=$1 envfile=$2 dir=$3
  shift 3
  command -v start-stop-daemon >/dev/null \
    || die "no systemd and no start-stop-daemon: start '$*' as $UCB_USER yourself"
  install -d -m 0755 "$RUN" "$LOG"
  start-stop-daemon --start --quiet --oknodo --background --make-pidfile \
    --pidfile "$RUN/$name.pid" --chuid "$UCB_USER:$GROUP" --chdir "$dir" \
    --output "$LOG/$name.log" --startas /usr/bin/env -- -i PATH=/usr/bin:/bin \
    HOME="$UCB_STATE" LANG=C.UTF-8 "$UCB_PYTHON" -c "$LAUNCHER" "$envfile" "$@"
  say "started $name without systemd (pid $(cat "$RUN/$name.pid"), log $LOG/$name.log)"
}

step_services() {
  if have_systemd; then
    local unit units=(undercloud-backup-worker.service)
    [ "$UCB_LOCAL_SERVER" = 1 ] && units=(undercloud-backup-server.service "${units[@]}")
    for unit in "${units[@]}"; do
      unit_text "$SRC/deployments/systemd/$unit" > "/etc/systemd/system/$unit"
    done
    systemctl daemon-reload
    # Started if stopped, not restarted: a restart would kill a backup in progress. Each flow
    # run loads the code from $UCB_APP afresh; restart the worker between backups to update
    # the worker process itself.
    systemctl enable --now "${units[@]}"
    say "systemd: ${units[*]} enabled and running"
  else
    say "no systemd: starting with start-stop-daemon (not restarted on failure or at boot)"
    if [ "$UCB_LOCAL_SERVER" = 1 ]; then
      start_daemon server "$ETC/server.env" "$UCB_STATE/server" \
        "$UCB_VENV/bin/prefect" server start --analytics-off
    fi
    start_daemon worker "$ETC/worker.env" "$UCB_APP" \
      "$UCB_VENV/bin/prefect" worker start --pool "$POOL" --type process --name "$(hostname)"
  fi
}

step_stop() {
  have_systemd && { systemctl stop undercloud-backup-worker undercloud-backup-server || true; return; }
  local name
  for name in worker server; do
    [ -e "$RUN/$name.pid" ] || continue
    start-stop-daemon --stop --quiet --oknodo --pidfile "$RUN/$name.pid" --retry TERM/30/KILL/5
    rm -f "$RUN/$name.pid"
    say "stopped $name"
  done
}

wait_for_api() {
  local i
  for i in $(seq 120); do
    "$UCB_VENV/bin/python" - "$PREFECT_API_URL" <<'PY' && return 0
import base64, os, sys, urllib.request
request = urllib.request.Request(sys.argv[1].rstrip("/") + "/health")
auth = os.environ.get("PREFECT_API_AUTH_STRING")
if auth:
    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
try:
    urllib.request.urlopen(request, timeout=2)
except Exception:
    sys.exit(1)
PY
    sleep 1
  done
  die "the Prefect API at $PREFECT_API_URL did not answer within 120 s"
}

step_prefect() {
  # Every prefect command needs the API (else it starts a throwaway server) and a PREFECT_HOME.
  export PREFECT_API_URL
  if [ -z "${PREFECT_API_AUTH_STRING:-}" ] && [ -r "$ETC/worker.env" ]; then
    PREFECT_API_AUTH_STRING=$(sed -n 's/^PREFECT_API_AUTH_STRING=//p' "$ETC/worker.env" | tail -1)
    [ -n "$PREFECT_API_AUTH_STRING" ] && export PREFECT_API_AUTH_STRING
  fi
  PREFECT_HOME=$(mktemp -d)
  export PREFECT_HOME PREFECT_SERVER_ANALYTICS_ENABLED=false
  trap 'rm -rf "$PREFECT_HOME"' EXIT
  local prefect="$UCB_VENV/bin/prefect"
  wait_for_api
  "$prefect" --no-prompt work-pool create "$POOL" --type process --overwrite >/dev/null
  if ! "$prefect" --no-prompt work-queue create "$QUEUE" --pool "$POOL" --limit 1 >/dev/null 2>&1
  then
    "$prefect" --no-prompt work-queue set-concurrency-limit "$QUEUE" 1 --pool "$POOL" >/dev/null
  fi
  (cd "$UCB_APP" && "$prefect" --no-prompt deploy --all >/dev/null)
  "$UCB_VENV/bin/python" "$SRC/deployments/prefect/zombie_automation.py" --after "$UCB_ZOMBIE_AFTER"
  say "prefect: pool $POOL, queue $QUEUE (limit 1), deployments of $UCB_APP/prefect.yaml at $PREFECT_API_URL"
}

# -------------------------------------------------------------------------------------- main
[ "$(id -u)" = 0 ] || die "run as root"
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(user app venv privileged config services prefect)
for step in "${steps[@]}"; do
  case $step in
    user|app|venv|privileged|config|services|prefect|stop) "step_$step" ;;
    *) die "unknown step '$step' (user app venv privileged config services prefect stop)" ;;
  esac
done
