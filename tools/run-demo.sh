#!/usr/bin/env bash
# The main job on the embedded default (SQLite file, no server to set up): installs
# fedlog into .venv (once) and runs `fedlog demo`, which drives a few hundred machines,
# SIGKILLs the driver part-way several times, restarts it, and shows what it recovered.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tools/setup-venv.sh "$root/.venv" ""
status=0
"$root/.venv/bin/fedlog" demo "$@" || status=$?
echo "(the fedlog command used here is $root/.venv/bin/fedlog)"
exit "$status"
