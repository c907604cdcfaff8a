#!/usr/bin/env bash
# Run a command (a test shard) on a MariaDB of its own that looks like the machine's: in a
# network and mount namespace of its own, 127.0.0.1:3306 and /run/mysqld/mysqld.sock are a
# fresh server with the machine's configuration and the test bed's backup account, while the
# other loopback services the tests use (Swift, Keystone, PostgreSQL, memcached) are the
# machine's, reached through forwarders. /etc/undercloud-backup is private and empty, as for
# every shard that does not install. Tests written against the machine's MariaDB (its port,
# its socket, the whole server's list of databases and locks) run here unchanged, beside a
# shard using the real one.
#   netns.sh WORKDIR COMMAND [ARGS...]     (root; WORKDIR: an empty directory of root's)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${UCB_DEV_STATE:-/var/lib/undercloud-backup-dev}
# Swift's proxy, Keystone, PostgreSQL, memcached: what a test or its children dial on loopback.
FORWARDED_PORTS=(8080 5000 5432 11211)

if [ "${1:-}" = --inside ]; then
  shift
  work=$1; shift
  ip link set lo up
  mount -t tmpfs -o mode=755,size=16m ucb-etc /etc/undercloud-backup
  mount -t tmpfs -o mode=755,size=16m ucb-run-mysqld /run/mysqld
  chown mysql:mysql /run/mysqld
  inner=()
  for port in "${FORWARDED_PORTS[@]}"; do
    socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$work/fwd/$port.sock" &
    inner+=($!)
  done
  # The server's files where its own user can reach them (WORKDIR is root's alone).
  db=$(mktemp -d /var/tmp/ucb-netns-mariadb.XXXXXX)
  server=""
  # Nothing of this namespace outlives the command, an interrupted one too: its forwarders,
  # its server (before its files go), then its files.
  trap 'kill "${inner[@]}" 2>/dev/null || true
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" || true; fi
    rm -rf "$db"' EXIT
  install -d -o mysql -g mysql -m 700 "$db/tmp"
  chown mysql:mysql "$db"
  if ! mariadb-install-db --no-defaults --datadir="$db/data" --user=mysql \
      --auth-root-authentication-method=socket --skip-test-db --skip-name-resolve \
      --tmpdir="$db/tmp" >"$work/mariadb-install.log" 2>&1; then
    tail -5 "$work/mariadb-install.log" >&2
    exit 1
  fi
  # The machine's own configuration (Debian's my.cnf), then where this one keeps its data: the
  # command line wins over the files.
  mariadbd --defaults-file=/etc/mysql/my.cnf --user=mysql --datadir="$db/data" \
    --tmpdir="$db/tmp" --log-error="$db/error.log" \
    --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
    --port=3306 --bind-address=127.0.0.1 --skip-log-bin 2>>"$db/error.log" &
  server=$!
  for _ in $(seq 300); do
    mariadb-admin ping >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { tail -5 "$db/error.log" >&2; exit 1; }
    sleep 0.1
  done
  mariadb-admin ping >/dev/null
  # The backup account of services.sh, with the same password (its option file is shared).
  user=$(awk -F= '$1 == "user" { print $2 }' "$STATE/mariadb-backup.cnf")
  pass=$(awk -F= '$1 == "password" { print substr($0, index($0, "=") + 1) }' \
    "$STATE/mariadb-backup.cnf")
  mariadb <<SQL
CREATE USER '$user'@'localhost' IDENTIFIED BY '$pass';
CREATE USER '$user'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT SELECT, SHOW VIEW, TRIGGER, LOCK TABLES, EVENT, RELOAD, PROCESS, SHOW DATABASES, BINLOG MONITOR
  ON *.* TO '$user'@'localhost', '$user'@'127.0.0.1';
SQL
  status=0
  "$@" || status=$?
  mariadb-admin shutdown >/dev/null 2>&1 || kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  server=""
  exit "$status"
fi

work=$1; shift
mkdir -p "$work/fwd"
forwarders=()
for port in "${FORWARDED_PORTS[@]}"; do
  socat "UNIX-LISTEN:$work/fwd/$port.sock,fork,mode=600" "TCP:127.0.0.1:$port" &
  forwarders+=($!)
done
trap 'kill "${forwarders[@]}" 2>/dev/null || true' EXIT
for port in "${FORWARDED_PORTS[@]}"; do
  for _ in $(seq 50); do [ -S "$work/fwd/$port.sock" ] && break; sleep 0.05; done
done
status=0
unshare --net --mount --propagation private -- bash "$HERE/netns.sh" --inside "$work" "$@" \
  || status=$?
exit "$status"
