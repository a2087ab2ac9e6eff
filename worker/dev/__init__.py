"""Tooling for the demo, the tests and the benchmarks: local processes, sample templates, mounts.

Nothing in `worker/` (outside this package) or `tasks/` imports it; the suite checks that.
"""
