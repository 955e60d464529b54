#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up, lint, type-check, unit and namespace tests.
# Needs root (network namespaces). Extra arguments go to pytest (e.g. -k vrrp).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"; python3 -m ruff check invictusd tests benchmarks
echo "== mypy --strict"; python3 -m mypy invictusd
echo "== pytest"
exec python3 -m pytest -q -p no:cacheprovider "$@" tests
