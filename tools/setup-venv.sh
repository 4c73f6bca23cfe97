#!/usr/bin/env bash
# Create (or refresh) a virtual environment with fedlog installed from this checkout.
# Usage: tools/setup-venv.sh VENV_DIR EXTRAS [--fresh]
#   EXTRAS: pip extras, e.g. "test" or "test,bench" ("" for none)
#   --fresh: delete VENV_DIR first (CI and the test command use it)
# fedlog is installed as a regular (non-editable) package so the shipped data
# (statecharts, migrations) is exercised exactly as users get it. Versions are pinned
# by constraints.txt; pyproject.toml keeps open ranges for users.
set -euo pipefail
venv=${1:?usage: setup-venv.sh VENV_DIR EXTRAS [--fresh]}
extras=${2:-}
fresh=${3:-}
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
if [ "$fresh" = "--fresh" ] && [ -d "$venv" ]; then rm -rf "$venv"; fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
spec="$root"
[ -n "$extras" ] && spec="$root[$extras]"
pip_install() {
  # some machines' pip configuration names package folders that do not exist; pip
  # warns about each one on every install: keep that noise out, keep real errors
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$root/constraints.txt" "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --force-reinstall --no-deps "$root"
pip_install "$spec"
