#!/usr/bin/env bash
# The main job on the embedded default (SQLite files, local processes, nothing to set
# up): installs fedlog into .venv (once), runs the federated-statistics job with a
# server and three client sites, then runs it again with the server SIGKILLed
# mid-round (twice) and checks that the result is the same.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tools/setup-venv.sh "$root/.venv" ""
fedlog="$root/.venv/bin/fedlog"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== 1. federated statistics, 3 sites, no crash"
"$fedlog" simulate fedstats --clients 3 --json "$@" > "$out/clean.json"
"$root/.venv/bin/python" -m engine.sim_report "$out/clean.json"

echo
echo "== 2. the same job; the server is SIGKILLed after recording a result of round 0 and while aggregating round 1"
"$fedlog" simulate fedstats --clients 3 --json --kill-server-at 0.result --kill-server-at 1.aggregate "$@" \
    > "$out/crashed.json"
"$root/.venv/bin/python" -m engine.sim_report "$out/crashed.json" --compare "$out/clean.json"
echo "(the fedlog command used here is $fedlog)"
