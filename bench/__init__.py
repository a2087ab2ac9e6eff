"""Benchmark suite: ratios of ours against a baseline measured side by side in one run.

Run with `scripts/bench.sh` (bootstraps first) or `.venv/bin/python -m bench.run`; writes docs/benchmarks.md.
Kept apart from tests/: nothing here asserts on time, it only reports.
"""
