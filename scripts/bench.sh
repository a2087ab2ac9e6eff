#!/usr/bin/env bash
# Runs the benchmark suite and writes docs/benchmarks.md: bootstraps first (packages, .venv), so this one
# command works on a fresh machine. Arguments go to bench/run.py, e.g. `scripts/bench.sh --quick` or
# `scripts/bench.sh --only hash,clone-ext4`. Needs root for the XFS loop mount (skipped otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m bench.run "$@"
