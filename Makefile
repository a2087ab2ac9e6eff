# Developer chores; each target is a thin call to the project's scripts or tools.
.PHONY: setup lint typecheck test test-fast bench demo mutation

setup:
	bash scripts/bootstrap.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports

typecheck: setup
	.venv/bin/mypy

test:
	bash scripts/test.sh

test-fast: setup
	.venv/bin/pytest -m "not slow"

bench:
	bash scripts/bench.sh

# Not part of CI (most of an hour on 2 cores); `bash scripts/mutation.sh --fast worker.core.locks` for a quick look.
mutation:
	bash scripts/mutation.sh

demo:
	bash scripts/demo.sh
