#!/usr/bin/env bash
# deployments/install.sh: install undercloud-backup on an undercloud, as root. Idempotent: run
# it again after an update of the checkout.
#
#   deployments/install.sh [STEP...]        (default: all steps below, in this order)
#
# Three roles (UCB_ROLE; docs/fleet.md):
#   (unset)  one undercloud with its own Prefect server on SQLite: everything below
#   server   a fleet's management host: the Prefect server on the local PostgreSQL (the role
#            and database UCB_DB_NAME made by `config`, the password in server.env only), behind
#            the API password, on UCB_HOST:UCB_PORT (TLS: a reverse proxy in front, docs/fleet.md);
#            a worker of the pool "fleet" (the fleet's own flows, as the server's user); the
#            global limit of UCB_FLEET_UPLOADS [2] nodes uploading at once. No backup worker,
#            no wrappers, no sudo rule. Steps: user app venv config services prefect
#   node     an undercloud of a fleet: no local server; its worker (flows/fleet_worker.py) polls
#            UCB_SERVER_URL (the server's API, required) with PREFECT_API_AUTH_STRING (the API
#            password, from this installer's environment: never an argv) for the pool
#            undercloud-$UCB_NODE [the short hostname], whose deployments (on-demand, nightly,
#            weekly-full, weekly-verify, prune, named <deployment>-$UCB_NODE, tagged
#            node:$UCB_NODE) `prefect` makes; their parameters, with UCB_NODE_PARAMETERS (a JSON
#            file {deployment: parameters}) merged over, are the node's policy in
#            $ETC/policy.json (root's 0644) its worker holds every run to. Always encrypted.
#            Steps: user app venv privileged config prefect services
#
#   user        group undercloud-backup, system user $UCB_USER in it (and no one else), the
#               server's own system user $UCB_API_USER; state dir $UCB_STATE (root's) with one
#               leaf per service: worker/ ($UCB_USER's), server/ ($UCB_API_USER's)
#   app         copy this checkout to $UCB_APP (root-owned: the worker cannot change its code)
#   venv        $UCB_VENV from /usr/bin/python3 (readable by the worker), project installed
#   privileged  wrappers -> /usr/local/libexec/undercloud-backup (root, 0755),
#               /etc/undercloud-backup/privileged.conf (once), sudoers checked with visudo -cf
#               and installed as /etc/sudoers.d/undercloud-backup (0440)
#   config      /etc/undercloud-backup/{server,worker}.env (once; then they are yours), the
#               node's signing key and allowed_signers (once; kept), the recipients if given
#   services    systemd units (enabled, started) or, without systemd, start-stop-daemon
#   prefect     work pool "undercloud", queue "backups" (limit 1), `prefect deploy --name ...` (the undercloud's),
#               the automation that crashes runs without heartbeats, the alerts (a failed or
#               crashed run; no backup completed in 26 h) through the notification target below
#   stop        (not part of the default) stop the worker and server started without systemd
#
#   deployments/install.sh restart [worker|server]...   (default: worker) restart them, with or
#               without systemd (`systemctl restart`, else the pid file's process stopped and
#               started again as `services` starts it): e.g. after worker.env changed. A
#               restarted worker kills the backup it runs: restart between backups
#
# Environment (defaults in brackets):
#   UCB_USER [undercloud-backup]  UCB_API_USER [undercloud-backup-api] (the local server's user)
#   UCB_GROUP [undercloud-backup] the worker's group, which the sudoers file /etc/sudoers.d/$UCB_GROUP
#                         grants the wrappers
#   UCB_ETC [/etc/undercloud-backup] (written $ETC here; the `privileged` step refuses another:
#                         the root wrappers read their policy from the default only)
#   UCB_RUN_DIR [/run/undercloud-backup]
#   UCB_LOG_DIR [/var/log/undercloud-backup] (pid files and logs without systemd)
#   UCB_HOST [127.0.0.1]  the address the local server listens on
#   UCB_PREFIX [/opt/undercloud-backup]  UCB_APP [$UCB_PREFIX/app]
#   UCB_VENV [$UCB_PREFIX/venv]   UCB_STATE [/var/lib/undercloud-backup]
#   UCB_LOCAL_SERVER [1]  run a Prefect server here; 0: use the one at PREFECT_API_URL
#   UCB_PORT [4200]       the local server's port
#   UCB_UI_URL [http://127.0.0.1:$UCB_PORT]  where people open the local server's UI (the alerts'
#                         links to a run start with it): PREFECT_UI_URL of server.env
#   PREFECT_API_URL [http://127.0.0.1:$UCB_PORT/api]  (PREFECT_API_AUTH_STRING if it needs one)
#   UCB_ZOMBIE_AFTER [90] seconds without a heartbeat before a run is marked CRASHED
#   UCB_OSC [0]           1: also install `openstack undercloud backup` (the project's `osc` extra:
#                         python-openstackclient and ~30 packages, ~73 MiB) into $UCB_VENV; run it
#                         as $UCB_VENV/bin/openstack (a system `openstack` does not load a venv's
#                         plugins, and the installer leaves the operator's `openstack` alone)
#   UCB_RECIPIENTS_FILE [] age recipients (public keys) to encrypt every backup to, installed as
#                         $ETC/recipients; a backup in plain text then needs --no-encryption REASON.
#                         Without it (and none installed yet) a break-glass age key pair is made:
#                         its public key becomes the recipient, its identity is shown once on
#                         stdout and left in $ETC/break-glass.agekey (root's, 0600) to be moved
#                         off the node; every backup warns until it is gone
#   UCB_NO_ENCRYPTION []  a REASON instead of recipients: backups are stored in plain text (the
#                         manifest and the artifact record the reason); refused while recipients
#                         are installed
#   UCB_SIGNING_KEY []    an unencrypted SSH private key to sign every backup with, installed as
#                         $ETC/signing-key (root:undercloud-backup 0640); without it a new ed25519
#                         key is made there once and kept. Its public half goes into
#                         $ETC/allowed_signers (0644), which verify and restore check against
#   UCB_ALERT_BLOCK []    alerts through this existing Prefect notification block (TYPE/NAME);
#                         else through a webhook whose URL is in $ETC/alert-webhook-url (root's,
#                         0600: the URL is a secret); else no alerts (one line says how to add them)
#
# Root never creates, changes or removes anything through a path another user can change:
# every directory root writes in is checked to be root's alone (deployments/installfs.py walks
# to it without following symlinks and changes objects through their descriptors), and the only
# user-owned directories are leaves of root-owned ones ($UCB_STATE/worker, $UCB_STATE/server).
# No secret is ever on an argv: the API password travels through pipes and the environment.
set -euo pipefail
umask 022

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UCB_ROLE=${UCB_ROLE:-}
GROUP=${UCB_GROUP:-undercloud-backup}
UCB_USER=${UCB_USER:-undercloud-backup}
UCB_API_USER=${UCB_API_USER:-undercloud-backup-api}
API_GROUP=$UCB_API_USER
UCB_PREFIX=${UCB_PREFIX:-/opt/undercloud-backup}
UCB_APP=${UCB_APP:-$UCB_PREFIX/app}
UCB_VENV=${UCB_VENV:-$UCB_PREFIX/venv}
UCB_STATE=${UCB_STATE:-/var/lib/undercloud-backup}
UCB_LOCAL_SERVER=${UCB_LOCAL_SERVER:-1}
UCB_PORT=${UCB_PORT:-4200}
UCB_HOST=${UCB_HOST:-127.0.0.1}
case $UCB_ROLE in
  '') ;;
  server) UCB_LOCAL_SERVER=1 ;;
  node) UCB_LOCAL_SERVER=0 ;;
  *) printf '[install] ERROR: UCB_ROLE must be server or node (or unset: a single node)\n' >&2
     exit 1 ;;
esac
# The address clients on this host use: a server listening on every address is reached here
# through the loopback.
case $UCB_HOST in 0.0.0.0|::|'[::]') LOCAL_HOST=127.0.0.1 ;; *) LOCAL_HOST=$UCB_HOST ;; esac
UCB_UI_URL=${UCB_UI_URL:-http://$LOCAL_HOST:$UCB_PORT}
UCB_ZOMBIE_AFTER=${UCB_ZOMBIE_AFTER:-90}
UCB_OSC=${UCB_OSC:-0}
UCB_PYTHON=${UCB_PYTHON:-/usr/bin/python3}
ETC=${UCB_ETC:-/etc/undercloud-backup}
BREAK_GLASS=$ETC/break-glass.agekey
UNDERCLOUD_DEPLOYMENTS="on-demand nightly weekly-full weekly-verify prune binlog-ship"
LIBEXEC=/usr/local/libexec/undercloud-backup
# Named after the group it grants (sudo ignores a name with a dot: refused below).
SUDOERS=/etc/sudoers.d/$GROUP
RUN=${UCB_RUN_DIR:-/run/undercloud-backup}
LOG=${UCB_LOG_DIR:-/var/log/undercloud-backup}
POOL=undercloud
UCB_DB_NAME=${UCB_DB_NAME:-undercloud_backup}
UCB_FLEET_UPLOADS=${UCB_FLEET_UPLOADS:-2}
if [ "$UCB_ROLE" = server ]; then
  POOL=fleet  # the fleet's own flows only: no backup runs on the management host
elif [ "$UCB_ROLE" = node ]; then
  UCB_NODE=${UCB_NODE:-$(hostname -s)}
  POOL=undercloud-$UCB_NODE
fi
QUEUE=backups
ENVFILE_API_URL=
if [ -r "$ETC/worker.env" ]; then
  ENVFILE_API_URL=$(sed -n 's/^PREFECT_API_URL=//p' "$ETC/worker.env" | tail -1)
fi
if [ "$UCB_ROLE" = node ]; then
  PREFECT_API_URL=${UCB_SERVER_URL:-$ENVFILE_API_URL}
else
  PREFECT_API_URL=${PREFECT_API_URL:-${ENVFILE_API_URL:-http://$LOCAL_HOST:$UCB_PORT/api}}
fi

say() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }
have_systemd() { [ -d /run/systemd/system ]; }
fs() { "$UCB_PYTHON" -I -S "$SRC/deployments/installfs.py" "$@"; }
root_dir() {  # an existing directory must be root's alone; a missing one is made root's 0755
  if [ -e "$1" ] || [ -L "$1" ]; then fs check "$1"; else fs dir "$1" root root 0755; fi
}

# Every member of $GROUP may run the wrappers as root (sudoers: %undercloud-backup): the group
# must hold the worker user and no one else, whether as a supplementary or a primary group.
check_group() {
  local entry gid others=() name
  entry=$(getent group "$GROUP") || return 0
  gid=$(cut -d: -f3 <<<"$entry")
  for name in $(cut -d: -f4 <<<"$entry" | tr ',' ' ') \
              $(getent passwd | awk -F: -v gid="$gid" '$4 == gid { print $1 }'); do
    [ "$name" = "$UCB_USER" ] || [[ " ${others[*]} " == *" $name "* ]] || others+=("$name")
  done
  [ ${#others[@]} -eq 0 ] || die "group $GROUP has members other than $UCB_USER (${others[*]}),\
 and every member may run the backup wrappers as root: remove them (gpasswd -d USER $GROUP,\
 or give them another primary group), then run the installer again"
  # A group password lets whoever knows it join with newgrp.
  local password
  password=$(getent gshadow "$GROUP" | cut -d: -f2) || true
  case $password in ''|'!'*|'*'*) ;; *)
    die "group $GROUP has a password (newgrp would let anyone who knows it run the wrappers as\
 root): remove it with 'gpasswd -r $GROUP', then run the installer again" ;;
  esac
}

# ------------------------------------------------------------------------------------- steps
step_user() {
  # A management host has no backup worker and no one who may run the wrappers: only the
  # server's user, which also runs the fleet's own flows.
  if [ "$UCB_ROLE" != server ]; then
    getent group "$GROUP" >/dev/null || groupadd --system "$GROUP"
    check_group
    if ! id -u "$UCB_USER" >/dev/null 2>&1; then
      useradd --system --gid "$GROUP" --home-dir "$UCB_STATE/worker" --no-create-home \
        --shell /usr/sbin/nologin --comment "undercloud-backup Prefect worker" "$UCB_USER"
      say "user $UCB_USER created"
    elif ! id -nG "$UCB_USER" | tr ' ' '\n' | grep -qx "$GROUP"; then
      usermod -a -G "$GROUP" "$UCB_USER"
      say "user $UCB_USER added to group $GROUP"
    fi
  fi
  # Root's, so that no service can plant a name root then acts on (an installation from
  # before this layout had the worker own it: taken back here, before anything below it).
  fs dir "$UCB_STATE" root root 0755
  [ "$UCB_ROLE" = server ] || fs dir "$UCB_STATE/worker" "$UCB_USER" "$GROUP" 0700
  [ "$UCB_LOCAL_SERVER" = 1 ] || return 0
  getent group "$API_GROUP" >/dev/null || groupadd --system "$API_GROUP"
  if ! id -u "$UCB_API_USER" >/dev/null 2>&1; then
    useradd --system --gid "$API_GROUP" --home-dir "$UCB_STATE/server" --no-create-home \
      --shell /usr/sbin/nologin --comment "undercloud-backup Prefect server" "$UCB_API_USER"
    say "user $UCB_API_USER created"
  fi
  if [ -d "$UCB_STATE/server" ] && [ ! -L "$UCB_STATE/server" ] \
      && [ "$(stat -c %U "$UCB_STATE/server")" = "$UCB_USER" ]; then
    die "$UCB_STATE/server belongs to $UCB_USER (an older installation): stop both services,\
 then 'chown -R $UCB_API_USER: $UCB_STATE/server' and run the installer again"
  fi
  fs dir "$UCB_STATE/server" "$UCB_API_USER" "$API_GROUP" 0700
  # The worker of the fleet's own flows runs as the server's user, in its own home.
  [ "$UCB_ROLE" != server ] || fs dir "$UCB_STATE/worker" "$UCB_API_USER" "$API_GROUP" 0700
}

step_app() {
  if [ "$(realpath -m "$UCB_APP")" = "$SRC" ]; then
    say "app: running from $SRC itself"
    return
  fi
  root_dir "$(dirname "$UCB_APP")"  # so that the names below are root's alone
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
  rm -rf "$UCB_APP.old"
  [ -e "$UCB_APP" ] && mv "$UCB_APP" "$UCB_APP.old"
  mv "$new" "$UCB_APP"
  rm -rf "$UCB_APP.old"
  say "app: $SRC copied to $UCB_APP"
}

step_venv() {
  # A venv of a system python: a pyenv interpreter under /root is unreadable by the worker.
  root_dir "$(dirname "$UCB_VENV")"
  [ ! -e "$UCB_VENV" ] || fs check "$UCB_VENV"
  if [ ! -x "$UCB_VENV/bin/python" ]; then
    "$UCB_PYTHON" -m venv "$UCB_VENV"
    say "venv created: $UCB_VENV"
  fi
  # pip never removes: a later run without UCB_OSC=1 keeps the plugin an earlier one installed
  local spec=$UCB_APP
  [ "$UCB_OSC" != 1 ] || spec="$UCB_APP[osc]"
  "$UCB_VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade "$spec"
  chmod -R go+rX,go-w "$UCB_VENV"
  say "venv: $("$UCB_VENV/bin/python" -c 'import prefect; print("prefect", prefect.__version__)'), project installed"
}

step_privileged() {
  [ "$UCB_ROLE" != server ] || die "privileged: a fleet's management host runs no backup, so it\
 gets no wrappers and no sudo rule"
  # the wrappers run as root read their policy from this one path, whatever UCB_ETC says
  [ "$ETC" = /etc/undercloud-backup ] || die "privileged: the wrappers read their policy from\
 /etc/undercloud-backup/privileged.conf only; UCB_ETC=$ETC would leave it unread"
  command -v sudo >/dev/null || die "sudo is not installed (apt-get install sudo / dnf install sudo)"
  command -v visudo >/dev/null || die "visudo is missing (it comes with sudo)"
  check_group
  fs dir "$(dirname "$LIBEXEC")" root root 0755
  fs dir "$LIBEXEC" root root 0755
  local wrapper
  for wrapper in ucb-archive ucb-mariadb; do
    fs file "$LIBEXEC/$wrapper" root root 0755 <"$SRC/deployments/libexec/$wrapper" >/dev/null
  done
  fs dir "$ETC" root root 0755
  fs file "$ETC/privileged.conf" root root 0644 --keep <"$SRC/deployments/privileged.conf" >/dev/null
  merge_deny
  # sudo ignores files in sudoers.d whose name contains a dot: the check copy is inert.
  local staged="$SUDOERS.new"
  fs check "$(dirname "$SUDOERS")"
  sed "s/^%undercloud-backup /%$GROUP /" "$SRC/deployments/sudoers/undercloud-backup" \
    | fs file "$staged" root root 0440 >/dev/null
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

deny_values() {  # the `deny =` values of the policy on stdin, one a line
  sed -n 's/^[[:space:]]*deny[[:space:]]*=[[:space:]]*//p' | sed 's/[[:space:]]*$//'
}

# The policy is the operator's once installed, but the deny list only ever grows: a kept policy
# gets the shipped `deny =` lines it lacks (the secrets of later versions, such as this
# installation's own), appended with a comment; no line of it is changed or removed.
merge_deny() {
  local policy=$ETC/privileged.conf have missing=() value
  have=$(deny_values <"$policy")
  while IFS= read -r value; do
    grep -qxF -- "$value" <<<"$have" || missing+=("$value")
  done < <(deny_values <"$SRC/deployments/privileged.conf")
  [ ${#missing[@]} -gt 0 ] || return 0
  { sed -e '$a\' "$policy"
    printf '\n# Added by install.sh: deny lines of the shipped policy this one lacked.\n'
    printf 'deny = %s\n' "${missing[@]}"
  } | fs file "$policy" root root 0644 >/dev/null
  say "privileged: added to $policy: ${missing[*]/#/deny = }"
}

render() {  # render TEMPLATE DEST GROUP: fill in @...@ once (0640 root:GROUP); DEST is kept
  local template=$1 dest=$2 group=$3 auth_line="" server_auth_line="" result
  if [ "$UCB_ROLE" = node ]; then
    # The central server's password, from the installer's environment (never an argv).
    [ -n "$AUTH" ] || AUTH=${PREFECT_API_AUTH_STRING:-}
    [ -n "$AUTH" ] || [ -e "$dest" ] || die "a node needs the server's API password: set\
 PREFECT_API_AUTH_STRING=user:password in the installer's environment (never on its command line)"
    auth_line="PREFECT_API_AUTH_STRING=$AUTH"
  elif [ "$UCB_LOCAL_SERVER" = 1 ]; then
    # Generated and passed on through pipes and the environment only, never an argv.
    [ -n "$AUTH" ] || AUTH=admin:$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
    auth_line="PREFECT_API_AUTH_STRING=$AUTH"
    server_auth_line="PREFECT_SERVER_API_AUTH_STRING=$AUTH"
  else
    auth_line="#PREFECT_API_AUTH_STRING=user:password"
  fi
  result=$(UCB_SUBST_PREFECT_API_URL=$PREFECT_API_URL UCB_SUBST_STATE=$UCB_STATE \
         UCB_SUBST_PORT=$UCB_PORT UCB_SUBST_UI_URL=$UCB_UI_URL UCB_SUBST_AUTH_LINE=$auth_line \
         UCB_SUBST_SERVER_AUTH_LINE=$server_auth_line UCB_SUBST_HOST=$UCB_HOST \
         UCB_SUBST_DATABASE_LINE=$DATABASE_LINE UCB_SUBST_FLEET_LINES=$FLEET_LINES \
         fs render "$template" "$dest" root "$group" 0640)
  # Kept files too: the group is the service's own (older installations: the worker's group).
  fs touch "$dest" root "$group" 0640
  say "config: $dest $result"
}

step_config() {
  fs dir "$ETC" root root 0755
  AUTH=
  if [ -r "$ETC/server.env" ]; then  # reuse the server's auth string for a new worker.env
    AUTH=$(sed -n 's/^PREFECT_SERVER_API_AUTH_STRING=//p' "$ETC/server.env" | tail -1)
  fi
  DATABASE_LINE="#PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect:PASSWORD@127.0.0.1:5432/prefect"
  FLEET_LINES=
  if [ "$UCB_ROLE" = server ] && [ ! -e "$ETC/server.env" ] && [ ! -L "$ETC/server.env" ]; then
    # The role and its database on the local PostgreSQL; the password leaves the helper
    # through a pipe and lives in server.env only (made once: a kept server.env keeps its URL).
    command -v psql >/dev/null || die "PostgreSQL is missing: the fleet's server keeps its\
 database there (apt-get install postgresql / dnf install postgresql-server)"
    DATABASE_LINE=$("$UCB_PYTHON" -I "$SRC/deployments/prefect/fleet_deploy.py" database \
      "$UCB_DB_NAME") || exit 1  # it said why, in one line
    DATABASE_LINE="PREFECT_API_DATABASE_CONNECTION_URL=$DATABASE_LINE"
    say "config: PostgreSQL role and database $UCB_DB_NAME made on the local server"
  elif [ "$UCB_ROLE" = node ]; then
    FLEET_LINES="UCB_NODE=$UCB_NODE
UCB_FLEET_POLICY=$ETC/policy.json"
  fi
  if [ "$UCB_LOCAL_SERVER" = 1 ]; then
    render "$SRC/deployments/env/server.env" "$ETC/server.env" "$API_GROUP"
  fi
  if [ "$UCB_ROLE" = server ]; then  # the fleet's own worker, as the server's user
    render "$SRC/deployments/env/worker.env" "$ETC/worker.env" "$API_GROUP"
    return 0
  fi
  render "$SRC/deployments/env/worker.env" "$ETC/worker.env" "$GROUP"
  install_signing
  install_recipients
}

# The node's signing key (undercloud_backup/trust/signing.py): every backup that names no key is
# signed with it, and verify and restore that name no allowed-signers file check against
# $ETC/allowed_signers. Made once with ssh-keygen in a directory of root's alone and kept on
# every re-run (UCB_SIGNING_KEY=FILE installs that key instead); root:$GROUP 0640, so that the
# worker can sign and no other user can read it. The key only ever travels through files and
# pipes, never an argv.
install_signing() {
  local key=$ETC/signing-key allowed=$ETC/allowed_signers public line tmp
  local principal
  principal="undercloud-backup@$(hostname)"
  command -v ssh-keygen >/dev/null \
    || die "ssh-keygen is missing (apt-get install openssh-client / dnf install openssh)"
  if [ -n "${UCB_SIGNING_KEY:-}" ]; then
    [ -r "$UCB_SIGNING_KEY" ] || die "UCB_SIGNING_KEY $UCB_SIGNING_KEY is not readable"
    public=$(public_key <"$UCB_SIGNING_KEY") && [ -n "$public" ] \
      || die "UCB_SIGNING_KEY $UCB_SIGNING_KEY is not an unencrypted SSH private key"
    fs file "$key" root "$GROUP" 0640 <"$UCB_SIGNING_KEY" >/dev/null
    say "signing: $UCB_SIGNING_KEY installed as $key"
  elif [ ! -e "$key" ] && [ ! -L "$key" ]; then
    tmp=$(umask 077 && mktemp -d "$ETC/.signing-key.XXXXXX")
    if ! ssh-keygen -q -t ed25519 -N '' -C "$principal" -f "$tmp/key" </dev/null >/dev/null \
        || ! fs file "$key" root "$GROUP" 0640 --keep <"$tmp/key" >/dev/null; then
      rm -rf "$tmp"
      die "could not make the signing key $key"
    fi
    rm -rf "$tmp"
    say "signing: new ed25519 signing key $key"
  fi
  fs touch "$key" root "$GROUP" 0640  # a kept key too; a symlink or hard link is refused
  public=$(public_key <"$key") && [ -n "$public" ] || die "$key is not an unencrypted SSH\
 private key: replace it (UCB_SIGNING_KEY=FILE) or remove it to have a new one made"
  # Kept, with the lines of earlier keys (backups they signed stay verifiable); this key's
  # line is added when it is missing.
  if [ ! -e "$allowed" ] || ! grep -qF " $public" "$allowed"; then
    line="$principal namespaces=\"undercloud-backup\" $public"
    { [ ! -e "$allowed" ] || sed -e '$a\' "$allowed"; printf '%s\n' "$line"; } \
      | fs file "$allowed" root root 0644 >/dev/null
  fi
  fs touch "$allowed" root root 0644
  say "signing: every backup is signed with $key; keep a copy of $allowed off this node: verify\
 and restore of these backups need it once the node is lost or reinstalled"
}

# The public half (type and key, no comment) of the private key on stdin. Through a pipe:
# ssh-keygen refuses to read a key file of its own user that the group may read (0640).
public_key() {
  cat | ssh-keygen -y -P '' -f /dev/stdin 2>/dev/null | cut -d' ' -f1,2
}

# Encryption is the default. UCB_RECIPIENTS_FILE: the age recipients (public keys only: an
# operator's and a break-glass key) every backup is encrypted to from now on, unless a run opts
# out with --no-encryption REASON (undercloud_backup/trust/crypto.py); checked before it replaces the
# installed ones. Installed recipients are kept on a re-run. Without either, a break-glass key
# pair is made (make_break_glass). UCB_NO_ENCRYPTION=REASON: no recipients, plain text on
# purpose, the reason recorded in $ETC/no-encryption for every run's manifest and artifact.
install_recipients() {
  local recipients=$ETC/recipients opt_out=$ETC/no-encryption reason
  if [ -n "${UCB_RECIPIENTS_FILE:-}" ]; then
    [ -r "$UCB_RECIPIENTS_FILE" ] || die "UCB_RECIPIENTS_FILE $UCB_RECIPIENTS_FILE is not readable"
    check_recipients "$UCB_RECIPIENTS_FILE" \
      || die "UCB_RECIPIENTS_FILE $UCB_RECIPIENTS_FILE is not an age recipients file"
    fs file "$recipients" root root 0644 <"$UCB_RECIPIENTS_FILE" >/dev/null
  elif [ -n "${UCB_NO_ENCRYPTION:-}" ]; then
    [ "$UCB_ROLE" != node ] || die "UCB_NO_ENCRYPTION: a fleet node's backups are always\
 encrypted (any holder of the API password could otherwise download them)"
    reason=$(tr -s '[:space:]' ' ' <<<"$UCB_NO_ENCRYPTION" | sed 's/^ //; s/ $//')
    [ -n "$reason" ] && [ ${#reason} -le 200 ] \
      || die "UCB_NO_ENCRYPTION must be a reason of 1 to 200 characters"
    if [ -e "$recipients" ] || [ -L "$recipients" ]; then
      die "recipients are installed ($recipients), so UCB_NO_ENCRYPTION changes nothing: remove\
 that file first if every backup is really to be stored in plain text"
    fi
    printf '%s\n' "$reason" | fs file "$opt_out" root root 0644 >/dev/null
    say "encryption: NONE (UCB_NO_ENCRYPTION): every backup is stored in plain text and says\
 why; its download links are never made. Set UCB_RECIPIENTS_FILE to encrypt"
    return 0
  elif [ ! -e "$recipients" ] && [ ! -L "$recipients" ]; then
    make_break_glass
  fi
  fs touch "$recipients" root root 0644  # a kept file too; a symlink or hard link is refused
  rm -f "$opt_out"  # recipients win: an earlier plain-text choice is over
  check_recipients "$recipients" || die "$recipients is not an age recipients file: fix it, or\
 replace it with UCB_RECIPIENTS_FILE=FILE"
  say "encryption: every backup is encrypted to the recipients in $recipients"
  if [ -e "$BREAK_GLASS" ] || [ -L "$BREAK_GLASS" ]; then
    say "encryption: WARNING: the break-glass identity $BREAK_GLASS is still on this node; every\
 backup warns until it is gone: copy it to the safe, then 'shred -u $BREAK_GLASS'"
  fi
}

check_recipients() {  # check_recipients FILE: parses, and age encrypts to it (one line if not)
  (cd "$UCB_APP" && "$UCB_VENV/bin/python" -c \
    'import sys; from undercloud_backup.trust import crypto; crypto.load_recipients(sys.argv[1])' \
    "$1" 2>&1 | tail -1 >&2; exit "${PIPESTATUS[0]}")
}

# A break-glass age key pair for a node given no recipients: made by age-keygen in a directory
# of root's alone, its public key installed as the recipients, its identity kept root's 0600 in
# $BREAK_GLASS and shown once, here, on stdout (never in a log the installer writes, never on
# an argv). It must leave the node: a node that holds it can decrypt every backup.
make_break_glass() {
  local tmp public
  command -v age-keygen >/dev/null && command -v age >/dev/null || die "age is missing\
 (apt-get install age / dnf install age): backups are encrypted by default. Give\
 UCB_RECIPIENTS_FILE (public keys) or UCB_NO_ENCRYPTION=REASON to store them in plain text"
  tmp=$(umask 077 && mktemp -d "$ETC/.break-glass.XXXXXX")
  if ! age-keygen -o "$tmp/identity" 2>/dev/null \
      || ! public=$(age-keygen -y "$tmp/identity") || [ -z "$public" ] \
      || ! fs file "$BREAK_GLASS" root root 0600 <"$tmp/identity" >/dev/null \
      || ! printf '# break-glass key made by install.sh on %s, %s\n%s\n' "$(hostname)" \
             "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$public" \
           | fs file "$ETC/recipients" root root 0644 >/dev/null; then
    rm -rf "$tmp"
    die "could not make the break-glass key pair"
  fi
  rm -rf "$tmp"
  say "encryption: no UCB_RECIPIENTS_FILE given: made a break-glass age key pair; every backup is"
  say "encryption: encrypted to its public key $public. Its identity (the only key that decrypts"
  say "encryption: them) is shown now, once; it is also in $BREAK_GLASS until you remove it:"
  printf -- '----- BEGIN BREAK-GLASS IDENTITY (keep it in the safe, never on this node) -----\n'
  cat "$BREAK_GLASS"
  printf -- '----- END BREAK-GLASS IDENTITY -----\n'
  say "encryption: copy it off this node (to the safe), then 'shred -u $BREAK_GLASS': every backup"
  say "encryption: warns until it is gone. Add an operator's key with UCB_RECIPIENTS_FILE=FILE"
  say "encryption: (both public keys, one a line) and '$0 config'"
}

unit_text() {  # unit_text UNIT USER GROUP [EXECSTART]: the unit with this installation's paths
  local exec=()
  [ -z "${4:-}" ] || exec=(-e "s#^ExecStart=.*#ExecStart=$4#")
  sed -e "s#/opt/undercloud-backup/venv#$UCB_VENV#g" -e "s#/opt/undercloud-backup/app#$UCB_APP#g" \
      -e "s#/var/lib/undercloud-backup#$UCB_STATE#g" -e "s#^User=.*#User=$2#" \
      -e "s#/etc/undercloud-backup/#$ETC/#g" "${exec[@]}" \
      -e "s#^Group=.*#Group=$3#" -e "s#^Environment=PREFECT_UI_URL=.*#Environment=PREFECT_UI_URL=$UCB_UI_URL#" "$1"
}

# The worker of this role: on a node the fleet's own worker (it runs only the installed flows
# of this node's deployments); on the management host Prefect's, for the fleet's own flows,
# as the server's user; on a single node Prefect's, for the undercloud's pool.
worker_command() {
  WORKER_USER=$UCB_USER WORKER_GROUP=$GROUP
  case $UCB_ROLE in
    node) WORKER=("$UCB_VENV/bin/python" -m flows.fleet_worker worker --pool "$POOL" --name "$UCB_NODE") ;;
    server) WORKER=("$UCB_VENV/bin/prefect" worker start --pool "$POOL" --type process --name "fleet-$(hostname -s)")
            WORKER_USER=$UCB_API_USER WORKER_GROUP=$API_GROUP ;;
    *) WORKER=("$UCB_VENV/bin/prefect" worker start --pool "$POOL" --type process --name "$1") ;;
  esac
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

start_daemon() {  # start_daemon NAME USER GROUP ENVFILE DIR HOME COMMAND... (no systemd)
  local name=$1 user=$2 group=$3 envfile=$4 dir=$5 home=$6
  shift 6
  command -v start-stop-daemon >/dev/null \
    || die "no systemd and no start-stop-daemon: start '$*' as $user yourself"
  fs dir "$RUN" root root 0755
  fs dir "$LOG" root root 0755
  # What the units give: umask 0077, a log only root and the service's group can read.
  fs touch "$LOG/$name.log" root "$group" 0640
  start-stop-daemon --start --quiet --oknodo --background --make-pidfile --umask 077 \
    --pidfile "$RUN/$name.pid" --chuid "$user:$group" --chdir "$dir" \
    --output "$LOG/$name.log" --startas /usr/bin/env -- -i PATH=/usr/bin:/bin \
    HOME="$home" LANG=C.UTF-8 "${DAEMON_ENV[@]}" "$UCB_PYTHON" -c "$LAUNCHER" "$envfile" "$@"
  say "started $name without systemd (pid $(cat "$RUN/$name.pid"), log $LOG/$name.log)"
}

step_services() {
  if have_systemd; then
    local units=(undercloud-backup-worker.service) systemd=/etc/systemd/system
    if [ "$UCB_LOCAL_SERVER" = 1 ]; then
      units=(undercloud-backup-server.service "${units[@]}")
      unit_text "$SRC/deployments/systemd/undercloud-backup-server.service" "$UCB_API_USER" \
        "$API_GROUP" | fs file "$systemd/undercloud-backup-server.service" root root 0644 >/dev/null
    fi
    local exec=
    worker_command %H
    [ -z "$UCB_ROLE" ] || exec="${WORKER[*]}"
    unit_text "$SRC/deployments/systemd/undercloud-backup-worker.service" "$WORKER_USER" \
      "$WORKER_GROUP" "$exec" | fs file "$systemd/undercloud-backup-worker.service" root root 0644 >/dev/null
    systemctl daemon-reload
    # Started if stopped, not restarted: a restart would kill a backup in progress. Each flow
    # run loads the code from $UCB_APP afresh; restart the worker between backups to update
    # the worker process itself.
    systemctl enable --now "${units[@]}"
    say "systemd: ${units[*]} enabled and running"
  else
    say "no systemd: starting with start-stop-daemon (not restarted on failure or at boot)"
    if [ "$UCB_LOCAL_SERVER" = 1 ]; then
      start_server
    fi
    start_worker
  fi
}

start_worker() {  # without systemd
  DAEMON_ENV=()
  worker_command "$(hostname)"
  start_daemon worker "$WORKER_USER" "$WORKER_GROUP" "$ETC/worker.env" "$UCB_APP" \
    "$UCB_STATE/worker" "${WORKER[@]}"
}

start_server() {  # without systemd
  # server.env may set them too; these defaults serve older server.env files.
  DAEMON_ENV=("PREFECT_SERVER_UI_STATIC_DIRECTORY=$UCB_STATE/server/ui" "PREFECT_UI_URL=$UCB_UI_URL")
  start_daemon server "$UCB_API_USER" "$API_GROUP" "$ETC/server.env" "$UCB_STATE/server" \
    "$UCB_STATE/server" "$UCB_VENV/bin/prefect" server start --analytics-off
}

stop_daemon() {  # stop_daemon NAME: the process of its pid file (TERM, KILL after 30 s)
  local name=$1
  [ -e "$RUN/$name.pid" ] || return 0
  start-stop-daemon --stop --quiet --oknodo --pidfile "$RUN/$name.pid" --retry TERM/30/KILL/5
  rm -f "$RUN/$name.pid"
  say "stopped $name"
}

restart() {  # restart [worker|server]...: what `systemctl restart` does, with or without systemd
  local names=("$@") name
  [ ${#names[@]} -gt 0 ] || names=(worker)
  for name in "${names[@]}"; do
    case $name in
      worker|server) ;;
      *) die "restart: unknown service '$name' (worker server)" ;;
    esac
  done
  for name in "${names[@]}"; do
    if have_systemd; then
      systemctl restart "undercloud-backup-$name.service"
      say "restarted undercloud-backup-$name.service"
    else
      stop_daemon "$name"
      "start_$name"
    fi
  done
}

step_stop() {
  have_systemd && { systemctl stop undercloud-backup-worker undercloud-backup-server || true; return; }
  local name
  for name in worker server; do
    stop_daemon "$name"
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

setup_alerts() {
  # The webhook URL carries its token: alerts.py reads it from the file, never from argv.
  local alerts="$SRC/deployments/prefect/alerts.py" url_file="$ETC/alert-webhook-url"
  if [ -n "${UCB_ALERT_BLOCK:-}" ]; then
    "$UCB_VENV/bin/python" "$alerts" --block "$UCB_ALERT_BLOCK"
  elif [ -f "$url_file" ] && [ ! -L "$url_file" ] && [ -r "$url_file" ]; then
    [ "$(stat -c %u "$url_file")" = 0 ] && [ $((0$(stat -c %a "$url_file") & 022)) = 0 ] \
      || die "$url_file must be root's and writable by root only"
    "$UCB_VENV/bin/python" "$alerts" --url-file "$url_file"
  else
    say "alerts: not configured; put the webhook URL in $url_file (root's, mode 0600) or set UCB_ALERT_BLOCK=TYPE/NAME, then run: $0 prefect"
  fi
}

binlog_schedule() {  # binlog-ship's schedule on only where MariaDB keeps a binary log (root asks)
  local status on=0
  if status=$("$LIBEXEC/ucb-mariadb" binlog status 2>/dev/null) && [ "$(printf '%s' "$status" |
      "$UCB_PYTHON" -I -S -c 'import json, sys; print(int(json.load(sys.stdin)["log_bin"]))')" = 1 ]
  then
    on=1
  fi
  "$UCB_VENV/bin/python" "$SRC/deployments/prefect/binlog_schedule.py" --active "$on" >/dev/null
  if [ "$on" = 1 ]; then
    say "binlog-ship: MariaDB keeps a binary log; shipping it every 15 minutes"
  else
    say "binlog-ship: paused (MariaDB keeps no binary log, or it could not be asked); turn log_bin on (docs/backup.md), then re-run: install.sh prefect"
  fi
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
  case $UCB_ROLE in
    server) prefect_server; return ;;
    node) prefect_node; return ;;
  esac
  "$prefect" --no-prompt work-pool create "$POOL" --type process --overwrite >/dev/null
  if ! "$prefect" --no-prompt work-queue create "$QUEUE" --pool "$POOL" --limit 1 >/dev/null 2>&1
  then
    "$prefect" --no-prompt work-queue set-concurrency-limit "$QUEUE" 1 --pool "$POOL" >/dev/null
  fi
  # The undercloud's deployments by name: prefect.yaml also holds weekly-verify-decrypted,
  # which belongs on a verify host's own server (docs/restore.md).
  local names=() name
  for name in $UNDERCLOUD_DEPLOYMENTS; do names+=(--name "$name"); done
  (cd "$UCB_APP" && "$prefect" --no-prompt deploy "${names[@]}" >/dev/null)
  "$UCB_VENV/bin/python" "$SRC/deployments/prefect/zombie_automation.py" --after "$UCB_ZOMBIE_AFTER"
  binlog_schedule
  setup_alerts
  say "prefect: pool $POOL, queue $QUEUE (limit 1), deployments of $UCB_APP/prefect.yaml at $PREFECT_API_URL"
}

FLEET_DEPLOY=$SRC/deployments/prefect/fleet_deploy.py

prefect_server() {  # the fleet's pool and own flows, the upload limit, the server's automations
  (cd "$UCB_APP" && "$UCB_VENV/bin/python" "$FLEET_DEPLOY" server --app "$UCB_APP" \
    --uploads "$UCB_FLEET_UPLOADS")
  "$UCB_VENV/bin/python" "$SRC/deployments/prefect/zombie_automation.py" --after "$UCB_ZOMBIE_AFTER"
  setup_alerts
  say "prefect: pool $POOL (fleet_backup/pre-upgrade, fleet_status/hourly), at most\
 $UCB_FLEET_UPLOADS nodes uploading at once, at $PREFECT_API_URL"
}

prefect_node() {  # this node's pool and deployments; the policy its worker holds runs to
  local parameters=() status=0 policy
  if [ -n "${UCB_NODE_PARAMETERS:-}" ]; then
    [ -r "$UCB_NODE_PARAMETERS" ] || die "UCB_NODE_PARAMETERS $UCB_NODE_PARAMETERS is not readable"
    parameters=(--parameters "$UCB_NODE_PARAMETERS")
  fi
  # The policy is what the deployments were made with, written by root through installfs.
  policy=$(cd "$UCB_APP" && "$UCB_VENV/bin/python" "$FLEET_DEPLOY" node --app "$UCB_APP" \
    --node "$UCB_NODE" --etc "$ETC" "${parameters[@]}") \
    || die "the deployments of node $UCB_NODE could not be made"
  printf '%s\n' "$policy" | fs file "$ETC/policy.json" root root 0644 >/dev/null
  "$UCB_VENV/bin/python" "$SRC/deployments/prefect/fleet_alerts.py" --node "$UCB_NODE" \
    >/dev/null 2>&1 || status=$?
  case $status in
    0) say "alerts: node $UCB_NODE's alerts are on the server" ;;
    2) say "alerts: the server has no alert block yet: configure the management host's alerts,\
 then run '$0 prefect' here again" ;;
    *) die "the server refused node $UCB_NODE's alerts" ;;
  esac
  say "prefect: pool $POOL, deployments *-$UCB_NODE tagged node:$UCB_NODE at $PREFECT_API_URL;\
 policy $ETC/policy.json"
}

# -------------------------------------------------------------------------------------- main
[ "$(id -u)" = 0 ] || die "run as root"
if [ "${1:-}" = restart ]; then
  shift
  restart "$@"
  exit 0
fi
case $UCB_ROLE in
  node)
    [[ $UCB_NODE =~ ^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$ ]] || die "UCB_NODE '$UCB_NODE': the\
 node's name, lowercase letters, digits and '-', at most 20 (default: the short hostname)"
    [ -n "$PREFECT_API_URL" ] || die "a node needs UCB_SERVER_URL, the fleet server's API\
 (https://HOST/api)" ;;
  server)
    [[ $UCB_DB_NAME =~ ^[a-z_][a-z0-9_]{0,62}$ ]] || die "UCB_DB_NAME '$UCB_DB_NAME': lowercase\
 letters, digits and '_'" ;;
esac
[[ $GROUP =~ ^[a-z_][a-z0-9_-]*$ ]] || die "UCB_GROUP '$GROUP': lowercase letters, digits, '_'\
 and '-' (sudo ignores a sudoers.d file whose name holds a dot)"
steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then
  case $UCB_ROLE in
    server) steps=(user app venv config services prefect) ;;  # no wrappers, no sudo rule
    # A node's pool and deployments exist before its worker first polls the server.
    node) steps=(user app venv privileged config prefect services) ;;
    *) steps=(user app venv privileged config services prefect) ;;
  esac
fi
for step in "${steps[@]}"; do
  case $step in
    user|app|venv|privileged|config|services|prefect|stop) "step_$step" ;;
    *) die "unknown step '$step' (user app venv privileged config services prefect stop; or: restart [worker|server])" ;;
  esac
done
