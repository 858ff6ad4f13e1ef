#!/usr/bin/env bash
# The whole check: lint, types (strict), then the test suite with a coverage floor.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
VENV="${TOKENFLEET_VENV:-.venv}"
export PATH="$PWD/$VENV/bin:$PATH"

echo "== ruff"; ruff check .
echo "== ruff format"; ruff format --check .
echo "== mypy"; mypy
echo "== pytest"
set +e
# The 15 slowest tests in the log: a slow test shows up before the suite outgrows its budget.
pytest --durations=15 --cov --cov-report=term --cov-report=xml:build/coverage.xml "$@"
code=$?
set -e
# 5 = no tests collected: that is a failure of the suite, not a pass.
if [[ $code -eq 5 ]]; then echo "pytest collected no tests" >&2; exit 1; fi
exit $code
