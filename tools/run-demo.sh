#!/usr/bin/env bash
# The main job on the embedded default (SQLite files and local chunk stores, local
# processes, nothing to set up): installs fedlog into .venv (once), trains a small
# PyTorch CNN on scikit-learn's handwritten digits with FedAvg over a server and
# three client sites, then runs it again with the server SIGKILLed mid-round (twice)
# and a site killed at random, and checks that the final model hash is the same.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tools/setup-venv.sh "$root/.venv" ""
fedlog="$root/.venv/bin/fedlog"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== 1. FedAvg CNN on handwritten digits, 3 sites, no crash"
"$fedlog" simulate cnn --clients 3 --json "$@" > "$out/clean.json"
"$root/.venv/bin/python" -m engine.sim_report "$out/clean.json"

echo
echo "== 2. the same job; the server is SIGKILLed after recording a result of round 1 and while"
echo "   aggregating round 3, and client sites are SIGKILLed at random instants"
"$fedlog" simulate cnn --clients 3 --json --kill-server-at 1.result --kill-server-at 3.aggregate \
    --kill-client-random 7 "$@" > "$out/crashed.json"
"$root/.venv/bin/python" -m engine.sim_report "$out/crashed.json" --compare "$out/clean.json"
echo "(the fedlog command used here is $fedlog; fedlog simulate fedstats runs the federated-statistics job)"
