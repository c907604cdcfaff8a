#!/usr/bin/env bash
# deployments/dev/services.sh — install and run, on loopback only, the real services that
# undercloud-backup is developed and tested against, on Debian 12 (bookworm), as root, with or
# without systemd:
#
#   MariaDB 10.11  127.0.0.1:3306   user backup/backuppass (backup grants), over TCP and socket
#   memcached      127.0.0.1:11211  needed by Swift tempauth and by Keystone's cache
#   Keystone 22    127.0.0.1:5000   v3, uwsgi, SQLite (WAL), fernet tokens
#   Swift 2.30     127.0.0.1:8080   proxy (1 device, 1 replica, part power 10) in front of
#                  127.0.0.1:6200/6201/6202  object/container/account servers
#                  auth: keystone (accounts AUTH_<project_id>) AND tempauth (TEMPAUTH_<acct>)
#
# Usage:  services.sh [start|stop|status|env]                          (default: start)
#   start   install missing packages, start whatever does not answer yet, create users,
#           write env files, then run a smoke test. Idempotent; a few seconds when all is up.
#   stop    stop Swift, Keystone and memcached. MariaDB is left alone (it may be shared with
#           other things on the machine) unless STOP_MARIADB=1.
#   status  show what runs and what listens.
#   env     print the path of keystone.env:   . "$(deployments/dev/services.sh env)"
#
# Environment:
#   UCB_DEV_STATE  state dir (default /var/lib/undercloud-backup-dev): logs, pidfiles, Swift's
#                  device, Keystone's db and keys, env files. Must be traversable by the users
#                  swift and keystone (so not under /root).
#   SKIP_APT=1     do not touch apt (packages are already installed)
#   STOP_MARIADB=1 'stop' also stops MariaDB
#
# Files written by 'start' (all under the state dir):
#   keystone.env         OS_* for user backup / project backup (member)
#   keystone-other.env   OS_* for user backup-other / project backup-other (isolation tests)
#   keystone-admin.env   OS_* for admin / project admin
#   tempauth.env         ST_* for Swift tempauth user test:tester (account TEMPAUTH_test)
#   mariadb-backup.cnf   [client] option file for user backup over TCP (mode 0600):
#                        mariadb --defaults-extra-file=$STATE/mariadb-backup.cnf ...
#
# Swift's swift.conf is read from the hard-coded /etc/swift, so Swift's configs and rings live
# there (Debian's sample configs are overwritten). Its device lives under $STATE/swift/node,
# never under /srv/node (undercloud-backup backs /srv/node up).
#
# 'start' only starts what does not answer: after changing settings here, run 'stop' first so
# the servers re-read their configs.
set -euo pipefail

CMD=${1:-start}
# The daemons started here must not inherit the caller's descriptors: under
# `flock /tmp/ucb-pytest.lock ...` (a test session whose `services` fixture starts them) every
# daemon would keep the lock held after the caller is gone. (255: bash reads this script there.)
for fd in /proc/$$/fd/*; do
  fd=${fd##*/}
  if [ "$fd" -gt 2 ] && [ "$fd" != 255 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done
STATE=${UCB_DEV_STATE:-/var/lib/undercloud-backup-dev}
KS_URL=http://127.0.0.1:5000/v3
PROXY=http://127.0.0.1:8080
REGION=RegionOne
ADMIN_PASS=adminpass
SWIFT_SVC_PASS=swiftpass
BACKUP_USER=backup; BACKUP_PASS=backuppass; BACKUP_PROJECT=backup
OTHER_USER=backup-other; OTHER_PASS=otherpass; OTHER_PROJECT=backup-other
DB_USER=backup; DB_PASS=backuppass

RUN=$STATE/run; LOG=$STATE/log
SWIFT_DEVICES=$STATE/swift/node            # NOT /srv/node: the flow under test backs /srv/node up
KS_DIR=$STATE/keystone; KS_CONF=$KS_DIR/keystone.conf

# Run with Debian's tools and python, whatever the caller's environment: a project venv on PATH
# or OS_*/ST_* variables in the caller's shell must not leak into keystone-manage, the
# resource setup or the smoke test.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
for _v in $(compgen -e | grep -E '^(OS|ST)_' || true); do unset "$_v"; done

ts() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(ts)" 'BEGIN{printf "%.1f", b-a}'; }
say() { echo "[services] $*"; }
die() { echo "[services] ERROR: $*" >&2; exit 1; }

# pid_running PID: true if PID exists and is not a zombie. PID 1 here does not reap orphans, so
# a dead server can linger as a zombie, and 'kill -0' still succeeds on a zombie.
pid_running() {
  local st
  st=$(sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}
# alive NAME: the pid in $RUN/NAME.pid runs and its command line still looks like ours (guards
# against a stale pidfile whose pid was reused, e.g. after a reboot).
declare -A PATTERN=(
  [swift-account]=swift-account-server [swift-container]=swift-container-server
  [swift-object]=swift-object-server [swift-proxy]=swift-proxy-server
  [keystone]="uwsgi --ini $KS_DIR/uwsgi.ini" [memcached]="memcached -l 127.0.0.1 -p 11211 -U 0"
)
alive() {
  local pid
  [ -f "$RUN/$1.pid" ] || return 1
  pid=$(cat "$RUN/$1.pid" 2>/dev/null) && [[ $pid =~ ^[0-9]+$ ]] || return 1
  pid_running "$pid" || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "${PATTERN[$1]}"
}
# stop_one NAME: SIGTERM the pid from the pidfile (Swift parents and the uwsgi master take their
# workers down), wait up to 10 s, then SIGKILL.
stop_one() {
  local n=$1 pid
  if alive "$n"; then
    pid=$(cat "$RUN/$n.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do pid_running "$pid" || break; sleep 0.1; done
    if pid_running "$pid"; then kill -9 "$pid" 2>/dev/null || true; sleep 0.2; fi
    say "stopped $n ($pid)"
  fi
  rm -f "$RUN/$n.pid"
}
# start_bg NAME CMD... : start in its own session, log to $LOG/NAME.log, pid in $RUN/NAME.pid.
# A running-but-not-answering leftover of ours is stopped first (it would hold the port).
start_bg() {
  local name=$1; shift
  stop_one "$name"
  setsid "$@" >>"$LOG/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
}
# wait_for NAME TIMEOUT_S CMD... : poll CMD every 0.2 s; fail early if our process NAME died.
wait_for() {
  local name=$1 t=$2; shift 2; local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $end ] || { [ -f "$RUN/$name.pid" ] && ! alive "$name"; }; then
      echo "--- $name did not become ready; end of $LOG/$name.log:" >&2
      tail -n 40 "$LOG/$name.log" >&2 2>/dev/null || true
      die "$name not ready (waited $((t - end + SECONDS)) s)"
    fi
    sleep 0.2
  done
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# write_file PATH [MODE]: stdin -> PATH, only rewritten when the content changed
write_file() {
  local tmp; tmp=$(mktemp "$1.XXXXXX")
  cat > "$tmp"
  chmod "${2:-644}" "$tmp"
  if [ -f "$1" ] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; chmod "${2:-644}" "$1"; else mv -f "$tmp" "$1"; fi
}

# ---------------------------------------------------------------------------------------- apt
# age, openssh-client: encrypted backups and signed manifests (age -r/-d, ssh-keygen -Y).
# chromium: the test suite drives the Prefect UI in a real headless browser (tests/test_ui.py).
PKGS="mariadb-server mariadb-client memcached swift swift-proxy swift-account swift-container
      swift-object python3-swiftclient python3-keystonemiddleware python3-keystoneclient keystone
      sqlite3 uwsgi uwsgi-plugin-python3 zstd tar acl attr sudo curl chromium age openssh-client"

install_packages() {
  local missing="" p
  for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
  done
  [ -z "$missing" ] && { say "packages already installed"; return; }
  local t0; t0=$(ts)
  # GOTCHA: dpkg must not start services. Without systemd, postinst's invoke-rc.d fails to; WITH
  # systemd the packages would start Debian's own keystone (uwsgi :5000) and swift units
  # (:8080, 6200-6202) with stock configs and steal our ports. A policy-rc.d exiting 101 makes
  # dpkg skip every start; this script starts everything itself.
  local own_policy=0 rc=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive   # keystone's debconf questions: keep defaults
  for p in $missing; do
    if [[ $(apt-cache policy "$p" 2>/dev/null) != *"Candidate: "[0-9]* ]]; then
      apt-get update -q || rc=$?; break
    fi
  done
  [ "$rc" = 0 ] && { apt-get install -y -q -o Dpkg::Options::=--force-confold $missing || rc=$?; }
  [ $own_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || die "apt failed (rc=$rc) installing:$missing"
  say "apt install of:$missing took $(since "$t0") s"
}

# ------------------------------------------------------------------------------------ MariaDB
start_mariadb() {
  local t0; t0=$(ts)
  if ! mariadb-admin ping >/dev/null 2>&1; then
    # Debian's SysV script works without systemd (mysqld_safe -> mariadbd). bind-address is
    # already 127.0.0.1 in /etc/mysql/mariadb.conf.d/50-server.cnf; root logs in via unix_socket.
    if ! { [ -x /etc/init.d/mariadb ] && /etc/init.d/mariadb start; }; then
      say "init script failed; starting mariadbd with start-stop-daemon"
      install -d -o mysql -g mysql /run/mysqld
      start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    fi
    wait_for mariadb 60 mariadb-admin ping
    say "mariadb started ($(since "$t0") s)"
  fi
  # A password user over TCP (and socket) for the flow under test. These grants are enough for
  # mariadb-dump --single-transaction --all-databases --routines --events --triggers.
  # ALTER USER resets the password in case the user existed with another one.
  mariadb <<SQL
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT SELECT, SHOW VIEW, TRIGGER, LOCK TABLES, EVENT, RELOAD, PROCESS, SHOW DATABASES, BINLOG MONITOR
  ON *.* TO '$DB_USER'@'localhost', '$DB_USER'@'127.0.0.1';
SQL
  write_file "$STATE/mariadb-backup.cnf" 600 <<EOF
[client]
host=127.0.0.1
port=3306
user=$DB_USER
password=$DB_PASS
EOF
  say "mariadb ready, user $DB_USER ok"
}

# ---------------------------------------------------------------------------------- memcached
start_memcached() {
  # GOTCHA: Swift's tempauth keeps its tokens ONLY in memcache; without memcached every
  # tempauth request after /auth/v1.0 is a 401. Keystone's cache and authtoken use it too.
  # Started directly (not via /etc/memcached.conf) so that it surely binds 127.0.0.1 only.
  if ! port_open 11211; then
    start_bg memcached memcached -l 127.0.0.1 -p 11211 -U 0 -m 64 -c 1024 -u memcache
    wait_for memcached 20 port_open 11211
  fi
  say "memcached ready"
}

# ----------------------------------------------------------------------------------- Keystone
keystone_manage() {
  local out rc=0
  out=$(runuser -u keystone -- keystone-manage --config-file "$KS_CONF" "$@" 2>&1) || rc=$?
  # drop the harmless eventlet noise printed at interpreter exit ('Exception ignored in:
  # <function _removeHandlerRef ...> ... 'NoneType' object has no attribute 'getcurrent'')
  grep -vE "^Exception ignored in|^Traceback|^  File|^    |getcurrent|^$" <<<"$out" || true
  [ "$rc" = 0 ] || die "keystone-manage $1 failed (rc=$rc); see $KS_DIR/log/keystone.log"
}

setup_keystone() {
  local t0; t0=$(ts)
  install -d -o keystone -g keystone "$KS_DIR" "$KS_DIR/log"
  install -d -o keystone -g keystone -m 700 "$KS_DIR/fernet-keys" "$KS_DIR/credential-keys"  # else a 'world readable' warning per request
  write_file "$KS_CONF" 640 <<EOF
[DEFAULT]
log_dir = $KS_DIR/log
log_file = keystone.log
[database]
connection = sqlite:///$KS_DIR/keystone.db
[token]
provider = fernet
expiration = 86400
[fernet_tokens]
key_repository = $KS_DIR/fernet-keys
[credential]
key_repository = $KS_DIR/credential-keys
[identity]
# GOTCHA: default bcrypt cost 12 = ~0.2-0.35 s CPU per password auth; on 2 cores a parallel
# 'swift upload' (10 threads, each authenticating) made Keystone the bottleneck. Must be set
# BEFORE bootstrap/user creation (the cost is stored in each hash).
password_hash_rounds = 4
[cache]
# GOTCHA: without a cache every token validation took ~0.5 s; with memcache ~15 ms. memcache
# (not dogpile.cache.memory) keeps the 2 uwsgi workers' caches coherent.
enabled = true
backend = oslo_cache.memcache_pool
memcache_servers = 127.0.0.1:11211
EOF
  chown root:keystone "$KS_CONF"

  if [ ! -f "$KS_DIR/.bootstrapped" ]; then
    # GOTCHA: run keystone-manage as the keystone user: as root it creates a root-owned log file
    # and keystone.db, and the uwsgi workers (uid keystone) then fail with PermissionError /
    # 'attempt to write a readonly database'.
    # The key setups do not touch the db: run them alongside db_sync (each keystone-manage run
    # spends ~2 s importing keystone).
    local p1 p2 rc=0
    keystone_manage fernet_setup --keystone-user keystone --keystone-group keystone & p1=$!
    keystone_manage credential_setup --keystone-user keystone --keystone-group keystone & p2=$!
    keystone_manage db_sync || rc=$?
    wait "$p1" || rc=$?
    wait "$p2" || rc=$?
    [ "$rc" = 0 ] || die "keystone setup failed"
    # GOTCHA: SQLite in its default rollback-journal mode deadlocks keystone's own nested
    # sessions: POST /v3/services and /v3/endpoints hang 5 s and fail 500 'database is locked'
    # (even with ONE uwsgi process). WAL mode (persistent in the db file) fixes it.
    runuser -u keystone -- sqlite3 "$KS_DIR/keystone.db" 'PRAGMA journal_mode=WAL;' >/dev/null
    # The password in the environment (keystone-manage reads OS_BOOTSTRAP_PASSWORD), never on
    # an argv that every local user can read in /proc/*/cmdline.
    OS_BOOTSTRAP_PASSWORD="$ADMIN_PASS" keystone_manage bootstrap \
      --bootstrap-username admin --bootstrap-project-name admin --bootstrap-role-name admin \
      --bootstrap-admin-url "$KS_URL/" --bootstrap-internal-url "$KS_URL/" \
      --bootstrap-public-url "$KS_URL/" --bootstrap-region-id "$REGION"
    touch "$KS_DIR/.bootstrapped"
    say "keystone db_sync+fernet+credential+bootstrap took $(since "$t0") s"
  fi

  # (Debian's /etc/keystone/keystone-uwsgi.ini wants the apparmor plugin and 8x32 workers: not used.)
  write_file "$KS_DIR/uwsgi.ini" <<EOF
[uwsgi]
plugins = python3
http-socket = 127.0.0.1:5000
# GOTCHA: uwsgi's http-socket answers HTTP/1.1 without 'Connection: close' and then closes the
# socket; keep-alive clients (requests/keystoneauth, the openstack CLI) reuse it and get
# 'Connection reset by peer' / 'RemoteDisconnected' on random POSTs. (http11-socket would keep
# the connection but pins a worker per idle client.) Tell clients to reconnect:
add-header = Connection: close
wsgi-file = /usr/bin/keystone-wsgi-public
env = OS_KEYSTONE_CONFIG_FILES=$KS_CONF
master = true
processes = 2
threads = 1
lazy-apps = true
need-app = true
die-on-term = true
buffer-size = 65535
uid = keystone
gid = keystone
chdir = $KS_DIR
pidfile = $RUN/keystone.pid
EOF
  if ! curl -sf -o /dev/null "$KS_URL"; then
    local t1; t1=$(ts)
    start_bg keystone uwsgi --ini "$KS_DIR/uwsgi.ini"
    wait_for keystone 60 curl -sf -o /dev/null "$KS_URL"
    say "keystone (uwsgi) ready ($(since "$t1") s)"
  fi

  # Service user for Swift's authtoken, the object-store service and endpoints, and two
  # non-admin users in their own projects. Idempotent; one python process is ~10x faster than a
  # dozen 'openstack' CLI calls.
  # Passwords travel in the environment, not on argv (tests watch /proc/*/cmdline for them).
  P_ADMIN=$ADMIN_PASS P_SWIFT=$SWIFT_SVC_PASS P_BACKUP=$BACKUP_PASS P_OTHER=$OTHER_PASS \
  /usr/bin/python3 - "$KS_URL" "$REGION" "$PROXY" \
      "$BACKUP_USER" "$BACKUP_PROJECT" "$OTHER_USER" "$OTHER_PROJECT" <<'PY'
import os, sys
from keystoneauth1 import session
from keystoneauth1.identity import v3
from keystoneclient.v3 import client
url, region, proxy = sys.argv[1:4]
admin_pw, swift_pw = os.environ["P_ADMIN"], os.environ["P_SWIFT"]
members = [(sys.argv[4], os.environ["P_BACKUP"], sys.argv[5]),
           (sys.argv[6], os.environ["P_OTHER"], sys.argv[7])]
ks = client.Client(session=session.Session(auth=v3.Password(
    auth_url=url, username="admin", password=admin_pw, project_name="admin",
    user_domain_id="default", project_domain_id="default")))
def project(name):
    found = ks.projects.list(name=name, domain="default")
    return found[0] if found else ks.projects.create(name=name, domain="default")
def user(name, pw, proj):
    found = ks.users.list(name=name, domain="default")
    return found[0] if found else ks.users.create(name=name, domain="default", password=pw, default_project=proj)
role = {r.name: r for r in ks.roles.list()}          # bootstrap made admin, member, reader
service = project("service")
ks.roles.grant(role["admin"], user=user("swift", swift_pw, service), project=service)
for u, pw, p in members:
    proj = project(p)
    ks.roles.grant(role["member"], user=user(u, pw, proj), project=proj)
svc = ks.services.list(type="object-store")
svc = svc[0] if svc else ks.services.create(name="swift", type="object-store", description="Object Storage")
have = {e.interface for e in ks.endpoints.list(service=svc, region_id=region)}
for iface in ("public", "internal", "admin"):
    if iface not in have:
        ks.endpoints.create(service=svc, url=proxy + "/v1/AUTH_%(project_id)s", interface=iface, region=region)
print("[services] keystone resources ok")
PY
  local spec name u pw p
  for spec in "keystone:$BACKUP_USER:$BACKUP_PASS:$BACKUP_PROJECT" \
              "keystone-other:$OTHER_USER:$OTHER_PASS:$OTHER_PROJECT" \
              "keystone-admin:admin:$ADMIN_PASS:admin"; do
    IFS=: read -r name u pw p <<<"$spec"
    write_file "$STATE/$name.env" <<EOF
export OS_AUTH_URL=$KS_URL OS_IDENTITY_API_VERSION=3 OS_REGION_NAME=$REGION OS_INTERFACE=public
export OS_USERNAME=$u OS_PASSWORD=$pw OS_PROJECT_NAME=$p
export OS_USER_DOMAIN_NAME=Default OS_PROJECT_DOMAIN_NAME=Default
EOF
  done
}

# -------------------------------------------------------------------------------------- Swift
xattr_ok() { /usr/bin/python3 -c "import os,sys; p=sys.argv[1]+'/.xattr-probe'; open(p,'w').close(); os.setxattr(p,'user.swift.probe',b'x'*200); os.remove(p)" "$1" 2>/dev/null; }

prepare_swift_devices() {
  install -d -o swift -g swift "$STATE/swift" "$SWIFT_DEVICES" "$SWIFT_DEVICES/d1" "$STATE/swift/cache"
  if ! mountpoint -q "$SWIFT_DEVICES/d1" && ! xattr_ok "$SWIFT_DEVICES/d1"; then
    # Swift stores object metadata in user.* xattrs. ext4, XFS and tmpfs on kernel >= 6.6 have
    # them; if the state dir's filesystem does not (old overlayfs/tmpfs), put the device on a
    # loop-mounted ext4 image (needs a loop device).
    say "no user xattrs under $SWIFT_DEVICES: using a loop-mounted ext4 image"
    [ -f "$STATE/swift-disk.img" ] || { truncate -s "${SWIFT_DISK_SIZE:-8G}" "$STATE/swift-disk.img"; mkfs.ext4 -q -F "$STATE/swift-disk.img"; }
    mount -o loop,user_xattr "$STATE/swift-disk.img" "$SWIFT_DEVICES/d1"
    chown swift:swift "$SWIFT_DEVICES/d1"
    xattr_ok "$SWIFT_DEVICES/d1" || die "still no xattrs on $SWIFT_DEVICES/d1"
  fi
  # Note: ext4 caps all xattrs of one inode at ~4 KB (one block). Fine for Swift's default
  # 4 KB user-metadata limit; XFS has no such cap.
  install -d -o swift -g swift /var/cache/swift
}

write_swift_conf() {
  # swift.conf is read from the hard-coded /etc/swift; we overwrite Debian's sample configs
  # there (its swift.conf ships hash prefix/suffix = 'changeme').
  mkdir -p /etc/swift
  write_file /etc/swift/swift.conf <<'EOF'
[swift-hash]
swift_hash_path_suffix = undercloud-backup-dev-suffix
swift_hash_path_prefix = undercloud-backup-dev-prefix

[storage-policy:0]
name = Policy-0
default = yes

[swift-constraints]
EOF
  local spec
  for spec in "object 6200" "container 6201" "account 6202"; do
    set -- $spec
    write_file "/etc/swift/$1-server.conf" <<EOF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $2
# 1 worker each: on 2 cores, 2 object workers were not faster
workers = 1
user = swift
swift_dir = /etc/swift
devices = $SWIFT_DEVICES
# the device dir is a plain directory, not a mount point
mount_check = false
disable_fallocate = true
recon_cache_path = $STATE/swift/cache

[pipeline:main]
pipeline = healthcheck recon $1-server

[app:$1-server]
use = egg:swift#$1

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:recon]
use = egg:swift#recon
EOF
  done

  # ORDER MATTERS: keystoneauth always sets swift.authorize (anonymous -> deny for prefixes it
  # does not own), so tempauth must come AFTER it to claim its own TEMPAUTH_ tokens/accounts;
  # tempauth leaves swift.authorize alone for keystone requests.
  write_file /etc/swift/proxy-server.conf <<EOF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = 8080
workers = 2
user = swift
swift_dir = /etc/swift
log_name = proxy-server

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats container_sync bulk tempurl ratelimit authtoken keystoneauth tempauth copy container-quotas account-quotas slo dlo versioned_writes symlink proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
# keystone projects get their AUTH_<project_id> account created on first write
account_autocreate = true

[filter:tempauth]
use = egg:swift#tempauth
# Distinct prefix so tempauth and keystoneauth (AUTH_) do not both claim the same accounts.
# Storage URL for test:tester is $PROXY/v1/TEMPAUTH_test
reseller_prefix = TEMPAUTH
user_admin_admin = admin .admin .reseller_admin
user_test_tester = testing .admin
user_test2_tester2 = testing2 .admin

[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
www_authenticate_uri = http://127.0.0.1:5000
auth_url = http://127.0.0.1:5000
auth_type = password
project_domain_id = default
user_domain_id = default
project_name = service
username = swift
password = $SWIFT_SVC_PASS
# let tempauth requests through (their tokens are not keystone tokens). authtoken still asks
# Keystone about each new tempauth token first: expect 'Could not recognize Fernet token' (404)
# in the proxy log and a Keystone ERROR traceback per tempauth token. Harmless.
delay_auth_decision = True
memcached_servers = 127.0.0.1:11211
service_token_roles_required = True

[filter:keystoneauth]
use = egg:swift#keystoneauth
reseller_prefix = AUTH_
operator_roles = admin, member

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:11211
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:ratelimit]
use = egg:swift#ratelimit
[filter:catch_errors]
use = egg:swift#catch_errors
[filter:tempurl]
use = egg:swift#tempurl
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:bulk]
use = egg:swift#bulk
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
[filter:container-quotas]
use = egg:swift#container_quotas
[filter:account-quotas]
use = egg:swift#account_quotas
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:container_sync]
use = egg:swift#container_sync
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:copy]
use = egg:swift#copy
[filter:versioned_writes]
use = egg:swift#versioned_writes
[filter:symlink]
use = egg:swift#symlink
EOF

  # Rings: part power 10, 1 replica, 1 device 'd1' per ring. Built once.
  local kind port
  for spec in "object 6200" "container 6201" "account 6202"; do
    set -- $spec; kind=$1; port=$2
    if [ ! -f "/etc/swift/$kind.ring.gz" ]; then
      rm -f "/etc/swift/$kind.builder"
      swift-ring-builder "/etc/swift/$kind.builder" create 10 1 1 >/dev/null
      swift-ring-builder "/etc/swift/$kind.builder" add --region 1 --zone 1 --ip 127.0.0.1 \
        --port "$port" --device d1 --weight 100 >/dev/null
      swift-ring-builder "/etc/swift/$kind.builder" rebalance >/dev/null
    fi
  done
  write_file "$STATE/tempauth.env" <<EOF
# GOTCHA: the swift CLI otherwise prefers OS_IDENTITY_API_VERSION=3 (from keystone.env) and
# 'swift -A .../auth/v1.0' fails 'Method Not Allowed (HTTP 405)'; ST_AUTH_VERSION wins over it.
export ST_AUTH=$PROXY/auth/v1.0 ST_USER=test:tester ST_KEY=testing ST_AUTH_VERSION=1.0
EOF
}

# launch_swift: start the servers that do not answer, without waiting (they come up while
# Keystone bootstraps); wait_swift waits for all of them.
launch_swift() {
  prepare_swift_devices
  write_swift_conf
  # Run the eventlet servers directly (no swift-init / uwsgi / systemd). '-v' copies the log to
  # stderr: without it they log to syslog, and with no /dev/log here that silently goes to UDP 514.
  # No replicators/auditors/updaters: not needed for 1 replica in tests.
  local s port
  for s in account:6202 container:6201 object:6200 proxy:8080; do
    port=${s#*:}; s=${s%:*}
    if ! curl -sf -o /dev/null "http://127.0.0.1:$port/healthcheck"; then
      start_bg "swift-$s" "swift-$s-server" "/etc/swift/$s-server.conf" -v
    fi
  done
}
wait_swift() {
  local s port t0; t0=$(ts)
  for s in account:6202 container:6201 object:6200 proxy:8080; do
    port=${s#*:}; s=${s%:*}
    wait_for "swift-$s" 60 curl -sf -o /dev/null "http://127.0.0.1:$port/healthcheck"
  done
  say "swift ready (waited $(since "$t0") s)"
}

smoke_test() {
  local t0; t0=$(ts)
  [ "$(mariadb --defaults-extra-file="$STATE/mariadb-backup.cnf" -N -B -e 'SELECT CURRENT_USER()')" = "$DB_USER@127.0.0.1" ] \
    || die "smoke: mariadb login as $DB_USER over TCP failed"
  # tempauth: token, PUT, GET, DELETE
  local hdr tok url
  hdr=$(curl -sf -D - -o /dev/null -H 'X-Auth-User: test:tester' -H 'X-Auth-Key: testing' "$PROXY/auth/v1.0" | tr -d '\r') \
    || die "smoke: tempauth login failed"
  tok=$(awk 'tolower($1)=="x-auth-token:"{print $2}' <<<"$hdr"); url=$(awk 'tolower($1)=="x-storage-url:"{print $2}' <<<"$hdr")
  curl -sf -X PUT -H "X-Auth-Token: $tok" "$url/services-smoke" -o /dev/null || die "smoke: tempauth PUT container"
  echo hello | curl -sf -X PUT -T - -H "X-Auth-Token: $tok" "$url/services-smoke/o" -o /dev/null || die "smoke: tempauth PUT object"
  [ "$(curl -sf -H "X-Auth-Token: $tok" "$url/services-smoke/o")" = hello ] || die "smoke: tempauth GET"
  curl -sf -X DELETE -H "X-Auth-Token: $tok" "$url/services-smoke/o" -o /dev/null || die "smoke: tempauth DELETE"
  # keystone v3 session -> swiftclient (Debian's python3 has both libraries); and the other
  # project's user must not see this project's account.
  P_BACKUP=$BACKUP_PASS P_OTHER=$OTHER_PASS \
  /usr/bin/python3 - "$KS_URL" "$REGION" "$BACKUP_USER" "$BACKUP_PROJECT" \
      "$OTHER_USER" "$OTHER_PROJECT" <<'PY' || die "smoke: keystone -> swift round trip failed"
import os, sys
from keystoneauth1 import session
from keystoneauth1.identity import v3
from swiftclient import client
from swiftclient.exceptions import ClientException
url, region = sys.argv[1:3]
def conn(user, pw, proj):
    sess = session.Session(auth=v3.Password(auth_url=url, username=user, password=pw, project_name=proj,
                                            user_domain_name="Default", project_domain_name="Default"))
    return client.Connection(session=sess, os_options={"region_name": region}, retries=0)
c = conn(sys.argv[3], os.environ["P_BACKUP"], sys.argv[4])
c.put_container("services-smoke"); c.put_object("services-smoke", "o", b"hello")
assert c.get_object("services-smoke", "o")[1] == b"hello"
storage_url = c.get_auth()[0]
other = conn(sys.argv[5], os.environ["P_OTHER"], sys.argv[6])
other_url = other.get_auth()[0]
assert other_url != storage_url, "both projects map to the same account"
try:
    client.get_object(storage_url, other.get_auth()[1], "services-smoke", "o")
    raise SystemExit("isolation broken: %s read %s" % (sys.argv[5], storage_url))
except ClientException as e:
    assert e.http_status in (401, 403), e
c.delete_object("services-smoke", "o")
print("[services] smoke: keystone v3 session -> swift PUT/GET ok (%s); other project denied" % storage_url)
PY
  say "smoke: mariadb TCP login ok, tempauth PUT/GET ok ($url) ($(since "$t0") s)"
}

# --------------------------------------------------------------------------------- stop/status
# stop_leftovers NAME PORT: processes that still listen on PORT and look like ours (e.g. a Swift
# worker orphaned when its parent was SIGKILLed) are stopped by pid.
stop_leftovers() {
  local n=$1 port=$2 pid
  for pid in $(ss -ltnpH "sport = :$port" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
    if pid_running "$pid" && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "${PATTERN[$n]}"; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do pid_running "$pid" || break; sleep 0.1; done
      pid_running "$pid" && kill -9 "$pid" 2>/dev/null || true
      say "stopped leftover $n process $pid on port $port"
    fi
  done
}

stop_all() {
  local s
  for s in swift-proxy:8080 swift-object:6200 swift-container:6201 swift-account:6202 keystone:5000 memcached:11211; do
    stop_one "${s%:*}"
    stop_leftovers "${s%:*}" "${s#*:}"
  done
  # a memcached started by Debian's init script (not by us) still holds the port
  if port_open 11211 && [ -f /run/memcached/memcached.pid ] && [ -x /etc/init.d/memcached ]; then
    /etc/init.d/memcached stop || true
  fi
  if [ "${STOP_MARIADB:-0}" = 1 ]; then
    /etc/init.d/mariadb stop || mariadb-admin shutdown || true
  else
    say "mariadb left running (STOP_MARIADB=1 stops it)"
  fi
}

status_all() {
  local n
  for n in memcached keystone swift-account swift-container swift-object swift-proxy; do
    if alive "$n"; then echo "$n: running (pid $(cat "$RUN/$n.pid"))"; else echo "$n: not running"; fi
  done
  mariadb-admin ping 2>/dev/null || echo "mariadb: not running"
  ss -ltnp 2>/dev/null | grep -E '127\.0\.0\.1:(3306|11211|5000|8080|6200|6201|6202) ' || true
  echo "state: $STATE"
}

case "$CMD" in
  start)
    T0=$(ts)
    [ "$(id -u)" = 0 ] || die "run as root"
    [ "${SKIP_APT:-0}" = 1 ] || install_packages
    mkdir -p "$STATE"; chmod 755 "$STATE"
    mkdir -p "$RUN" "$LOG"
    start_mariadb
    start_memcached
    launch_swift
    setup_keystone
    wait_swift
    smoke_test
    say "all services up in $(since "$T0") s; state in $STATE; . $STATE/keystone.env"
    ;;
  stop) [ "$(id -u)" = 0 ] || die "run as root"; stop_all ;;
  status) status_all ;;
  env)
    echo "$STATE/keystone.env"
    [ -f "$STATE/keystone.env" ] || { echo "[services] $STATE/keystone.env does not exist yet: run '$0 start'" >&2; exit 1; }
    ;;
  *) die "usage: $0 [start|stop|status|env]" ;;
esac
