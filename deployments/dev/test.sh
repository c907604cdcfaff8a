#!/usr/bin/env bash
# The test command: bring up the loopback services, build the venv, run the whole suite: the
# unit tier first (`pytest -m unit`: seconds, no service, so a broken build fails fast), then
# the rest (`-m "not unit"`), each test once. With pytest args, just what they select, once.
#   sudo deployments/dev/test.sh [pytest args...]
# Without pytest args the rest runs as the shards of tests/shards.txt, one pytest session each,
# side by side (most of the suite waits on services, so two cores take four sessions);
# UCB_TEST_SHARDS=1: as one session instead, one test after the other.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
[ "$(id -u)" = 0 ] || { echo "run as root (it installs and starts services)" >&2; exit 2; }
t0=$SECONDS
# Some tests run commands as unprivileged users (nobody, the worker user), who must read the
# checkout and its venv. A checkout inside a private directory (/root/...) is copied first.
if ! runuser -u nobody -- test -r "$REPO/pyproject.toml" 2>/dev/null; then
  COPY=${UCB_TEST_COPY:-/var/tmp/undercloud-backup-test}
  echo "[test] $REPO is not readable by other users: testing a copy in $COPY" >&2
  mkdir -p "$COPY"; chmod 755 "$COPY"
  find "$COPY" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
  tar -C "$REPO" --exclude=./.venv -cf - . | tar -C "$COPY" -xf -
  exec bash "$COPY/deployments/dev/test.sh" "$@"
fi
# The services (about 40 s from cold, mostly waiting) and the venv (20-45 s from scratch, mostly
# pip) come up side by side. Both may need apt: when venv.sh would install python3-venv, one
# after the other (two apt-get at once fail on dpkg's lock).
if "${UCB_PYTHON:-/usr/bin/python3}" -c 'import venv, ensurepip' 2>/dev/null; then
  bash deployments/dev/services.sh start & services=$!
  VENV=$(bash deployments/dev/venv.sh) || { wait "$services" || true; exit 1; }
  wait "$services" || { echo "[test] services.sh start failed" >&2; exit 1; }
else
  bash deployments/dev/services.sh start
  VENV=$(bash deployments/dev/venv.sh)
fi
echo "[test] services and venv ready in $((SECONDS - t0)) s"
export PATH="$VENV/bin:$PATH"
# mypy's incremental cache (tests/test_types.py) outside the checkout, so that a fresh clone's
# unit tier checks only what changed (it validates each module by its content's hash): a cold
# check takes 7-10 s on 2 cores, a warm one under 1 s.
export MYPY_CACHE_DIR=${MYPY_CACHE_DIR:-/var/tmp/ucb-mypy-cache}
"$VENV/bin/ruff" check .
# The 25 slowest tests of each session in CI's log: where the suite's time goes.
durations=()
[ "${UCB_BENCH_SMOKE:-0}" != 1 ] || durations=(--durations=25)
# The shards of tests/shards.txt side by side, one pytest session each. What each session does
# first with the shared services (start them, drop leftover ucb_* databases) is done here once
# instead (conftest skips it under UCB_SHARD): a session's drop would take databases another
# one is using. Each has its own basetemp and cache; every shard but A runs in a mount
# namespace of its own with an empty /etc/undercloud-backup, where A's installers put keys and
# recipients every backup reads; D also in a network namespace whose MariaDB is one of its own
# (deployments/dev/netns.sh), so that the users of the machine's MariaDB are two shards, not
# one. With UCB_BENCH_SMOKE=1 the benchmark smoke runs beside them once the first has ended.
isolated() {  # a command in a mount namespace with a private, empty /etc/undercloud-backup
  unshare --mount --propagation private -- bash -c \
    'mount -t tmpfs -o mode=755,size=16m ucb-etc /etc/undercloud-backup && exec "$@"' - "$@"
}
run_shards() {
  local work shard status=0 busy idle b i names=() bench_pid=""
  local -A pid=()
  work=$(mktemp -d /tmp/ucb-shards.XXXXXX)  # root's, 0700
  mariadb --batch --skip-column-names -e "SELECT CONCAT('DROP DATABASE \`', schema_name, '\`;')
    FROM information_schema.schemata WHERE schema_name LIKE 'ucb\\_%'" | mariadb
  if [ -e /var/lib/ucb-fleet/fleet.json ]; then  # an interrupted run's fleet
    bash deployments/dev/fleet.sh down >/dev/null
  fi
  mkdir -p -m 755 /etc/undercloud-backup
  mapfile -t names < <(awk '!/^#/ && NF == 2 { print $1 }' tests/shards.txt | sort -u)
  read -r _ busy idle < <(cpu_ticks)
  # Each shard a job of its own (its own process group, SIGINT not ignored as it is for a
  # background command without job control): an interrupt here is passed on to every one.
  set -m
  trap 'for p in "${pid[@]}" $bench_pid; do kill -INT -- "-$p" 2>/dev/null || true; done' INT TERM
  for shard in "${names[@]}"; do
    local modules=() isolate=()
    mapfile -t modules < <(awk -v s="$shard" '$1 == s { print "tests/" $2 }' tests/shards.txt)
    case $shard in
      A) ;;  # the installers: the machine's own paths
      D) isolate=(bash deployments/dev/netns.sh "$work/netns-$shard") ;;  # a MariaDB of its own
      *) isolate=(isolated) ;;
    esac
    (
      start=$SECONDS
      status=0
      UCB_SHARD=$shard "${isolate[@]}" "$VENV/bin/pytest" -q "${durations[@]}" -m "not unit" \
        --basetemp="$work/$shard" -o cache_dir="$work/cache-$shard" "${modules[@]}" \
        >"$work/$shard.log" 2>&1 || status=$?
      # The user and system CPU of the session and of every process it waited for (not in a
      # pipeline: a forked shell has no children's times).
      times >"$work/$shard.times"
      echo "[test] shard $shard: exit $status, $((SECONDS - start)) s wall," \
        "CPU user and system $(tail -1 "$work/$shard.times")"
      exit "$status"
    ) >"$work/$shard.summary" &
    pid[$shard]=$!
  done
  if [ "${UCB_BENCH_SMOKE:-0}" = 1 ]; then
    # Beside the shards once the first has ended (before, it would only slow them all down),
    # on a MariaDB of its own: the benchmark makes its database on the server it backs up.
    until ! all_running "${pid[@]}"; do sleep 1; done
    (
      start=$SECONDS
      bash deployments/dev/netns.sh "$work/netns-bench" bash -c "$(declare -f bench_smoke);
        VENV=$VENV bench_smoke" >"$work/bench.log" 2>&1 && rc=0 || rc=$?
      echo "[test] benchmark smoke: exit $rc, $((SECONDS - start)) s wall" >>"$work/bench.log"
      exit "$rc"
    ) &
    bench_pid=$!
  fi
  for shard in "${names[@]}"; do
    wait "${pid[$shard]}" || status=1
  done
  if [ -n "$bench_pid" ]; then wait "$bench_pid" || status=1; fi
  wait  # after an interrupt, until every one has ended
  trap - INT TERM
  set +m
  read -r _ b i < <(cpu_ticks)
  for shard in "${names[@]}"; do
    echo "[test] ===== shard $shard =====" >&2
    cat "$work/$shard.log"
  done
  if [ -n "$bench_pid" ]; then
    echo "[test] ===== benchmark smoke =====" >&2
    cat "$work/bench.log"
  fi
  for shard in "${names[@]}"; do cat "$work/$shard.summary" >&2; done
  echo "[test] all shards: $(( (b - busy) * 100 / (b - busy + i - idle) ))% of the machine's" \
    "CPU busy meanwhile ($(nproc) CPUs)" >&2
  rm -rf "$work"
  return "$status"
}

# CI only: the benchmark at a tiny size, a smoke check that asserts no time (about a minute).
# (--only: every part but "overhead", Prefect's own start-up cost measured three ways, ~40 s;
# --skip: for the same reason the backup with the ephemeral server, ~13 s of migrations; it
# runs the same code as ours_running_server, only its environment differs; likewise ours_fast,
# the same run with two flags, and the one-by-one streamed reference, whose pipelines the
# parallel one runs too: each ~20 s of both cores the shards beside it need)
bench_smoke() {
  echo "[test] benchmark smoke run: python3 benchmarks/bench.py --scale 0.01 --runs 1" >&2
  "$VENV/bin/python" benchmarks/bench.py --scale 0.01 --runs 1 --only backup,restore,incremental \
    --skip ours_ephemeral_server,ours_fast,reference_streamed \
    --python "$VENV/bin/python" \
    --json "${UCB_BENCH_JSON:-/var/tmp/ucb-bench-smoke.json}"
}

# Whether every one of these processes is still running.
all_running() {
  local p
  for p in "$@"; do kill -0 "$p" 2>/dev/null || return 1; done
}

# Busy and idle ticks of all CPUs since boot (/proc/stat): the machine's load while shards run.
cpu_ticks() {
  awk '$1 == "cpu" { print "cpu", $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat
}

if [ $# -gt 0 ]; then
  "$VENV/bin/pytest" -q "${durations[@]}" "$@"
elif [ "${UCB_TEST_SHARDS:-all}" != 1 ]; then
  echo "[test] unit tier: pytest -m unit" >&2
  "$VENV/bin/pytest" -q -m unit
  echo "[test] the rest, as the shards of tests/shards.txt side by side" >&2
  run_shards
  exit
else
  echo "[test] unit tier: pytest -m unit" >&2
  "$VENV/bin/pytest" -q -m unit
  echo "[test] the rest: pytest -m 'not unit'" >&2
  "$VENV/bin/pytest" -q "${durations[@]}" -m "not unit"
fi
[ "${UCB_BENCH_SMOKE:-0}" = 1 ] || exit 0
bench_smoke
