#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up, lint, type-check, unit and namespace tests.
# Needs root (network namespaces). Extra arguments go to pytest (e.g. -k vrrp).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The interpreter of the installed environment (scripts/setup.sh); the tests import this
# checkout (the current directory comes first on sys.path).
PY=${INVICTUSD_VENV:-/opt/invictusd}/bin/python
echo "== ruff"; "$PY" -m ruff check invictusd tests benchmarks
echo "== mypy --strict"; "$PY" -m mypy invictusd
echo "== pytest"
exec "$PY" -m pytest -q -p no:cacheprovider "$@" tests
