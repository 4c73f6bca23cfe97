#!/usr/bin/env bash
# The test command: a fresh virtual environment, fedlog installed from this checkout,
# lint + type checks, a smoke run of the installed wheel outside the source tree, then
# the whole test suite. PostgreSQL tests use FEDLOG_TEST_PG_URL (default: the local
# server); with CI=true they fail rather than skip when it is missing. Debian's chromium is
# installed when missing (as root), for the headless test of the HTML replay report.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv="$root/.venv-test"
echo "== set-up: fresh virtualenv in $venv"
tools/setup-venv.sh "$venv" "test,bench" --fresh
export FEDLOG_TEST_PG_URL=${FEDLOG_TEST_PG_URL:-postgresql://postgres@127.0.0.1:5432/test}

# headless Chromium renders the HTML replay report in its test (Debian's package; with CI=true the
# test fails rather than skips without it)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "== set-up: installing Debian's chromium for the report test"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
        || echo "could not install chromium; the report test will say so"
fi

echo "== lint (ruff) and types (mypy --strict on engine)"
"$venv/bin/ruff" check engine tests tools
"$venv/bin/mypy" --no-error-summary engine || { echo "mypy found type errors"; exit 1; }

echo "== smoke: the installed package, outside the source tree"
smoke=$(mktemp -d)
trap 'rm -rf "$smoke"' EXIT
(cd "$smoke" && "$venv/bin/fedlog" charts check >/dev/null && "$venv/bin/fedlog" db upgrade smoke.db && "$venv/bin/fedlog" db check smoke.db)

echo "== tests"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
