#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, then lint, type check and every test.
# Extra arguments go to pytest (e.g. `scripts/test.sh -k registry`). Any failure fails the run, and so does
# a run that collects no test (pytest's exit status 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The original Rust seed, for the compatibility tests (Debian's crates; exit 3: no cargo, tests skip).
bash tests/compat/build_seed.sh >/dev/null || { rc=$?; [ "$rc" -eq 3 ] || exit "$rc"; }
echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== import contracts"; .venv/bin/lint-imports --no-cache
echo "== mypy --strict"; .venv/bin/mypy
echo "== pytest"; exec .venv/bin/pytest "$@"
