#!/usr/bin/env bash
# The test command: bring up the loopback services, build the venv, run the whole suite: the
# unit tier first (`pytest -m unit`: seconds, no service, so a broken build fails fast), then
# the rest (`-m "not unit"`), each test once. With pytest args, just what they select, once.
#   sudo deployments/dev/test.sh [pytest args...]
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
# The 25 slowest tests in CI's log: where the suite's time goes (it is near its 20-minute budget).
durations=()
[ "${UCB_BENCH_SMOKE:-0}" != 1 ] || durations=(--durations=25)
if [ $# -gt 0 ]; then
  "$VENV/bin/pytest" -q "${durations[@]}" "$@"
else
  echo "[test] unit tier: pytest -m unit" >&2
  "$VENV/bin/pytest" -q -m unit
  echo "[test] the rest: pytest -m 'not unit'" >&2
  "$VENV/bin/pytest" -q "${durations[@]}" -m "not unit"
fi
[ "${UCB_BENCH_SMOKE:-0}" = 1 ] || exit 0
# CI only: the benchmark at a tiny size, a smoke check that asserts no time (about a minute).
# (--only: every part but "overhead", Prefect's own start-up cost measured three ways, ~40 s;
# --skip: for the same reason the backup with the ephemeral server, ~13 s of migrations; it
# runs the same code as ours_running_server, only its environment differs)
echo "[test] benchmark smoke run: python3 benchmarks/bench.py --scale 0.01 --runs 1" >&2
python3 benchmarks/bench.py --scale 0.01 --runs 1 --only backup,restore,incremental \
  --skip ours_ephemeral_server \
  --python "$VENV/bin/python" \
  --json "${UCB_BENCH_JSON:-/var/tmp/ucb-bench-smoke.json}"
