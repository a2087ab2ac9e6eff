#!/usr/bin/env bash
# Mutation testing of the filesystem core (worker/core, worker/errors.py) and the task views (tasks/), with
# mutmut 3 (config: [tool.mutmut] in pyproject.toml): `make mutation`. Not part of CI: a full run takes most of
# an hour on 2 cores. Prints the score per module and every surviving mutant as a diff (docs/mutation.md says
# how to read them and lists the equivalent ones).
#
#   scripts/mutation.sh [--fast] [--keep] [MODULE ...]
#     --fast   only the tests not marked slow (minutes instead of an hour; the task views then go untested)
#     --keep   keep ./mutants from the last run: test only the mutants that have no verdict yet
#     MODULE   e.g. worker.core.locks: test only that module's mutants (the others keep their last verdict)
#
# mutmut runs, for each mutant, only the tests that reached the mutated function in a first traced run, the
# fastest first. Tests reach tasks/ only through real `celery worker` processes, which that trace cannot see;
# so the task mutants mutmut finds untested are run against tests/service/test_tasks.py here, each with its
# mutant selected in the workers too (they inherit MUTANT_UNDER_TEST and run from ./mutants).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ ! -x .venv/bin/mutmut ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,mutation]'
fi

fast=0
keep=0
modules=()
for arg in "$@"; do
  case "$arg" in
    --fast) fast=1 ;;
    --keep) keep=1 ;;
    -*) echo "mutation: unknown option $arg" >&2; exit 2 ;;
    *) modules+=("$arg") ;;
  esac
done

export HYPOTHESIS_PROFILE=mutation
# The architecture test reads the core's source, which in ./mutants is mutmut's generated code (it imports
# mutmut's trampoline): it says nothing about a mutant.
export PYTEST_ADDOPTS="--ignore=tests/test_architecture.py"
mode=full
if [ "$fast" = 1 ]; then
  PYTEST_ADDOPTS="$PYTEST_ADDOPTS -m 'not slow'"
  mode=fast
fi
# A different test selection makes the recorded test-to-function map wrong: start over.
if [ "$keep" = 0 ] || [ "$(cat mutants/.mode 2>/dev/null || true)" != "$mode" ]; then
  rm -rf mutants
fi
mkdir -p mutants
echo "$mode" >mutants/.mode

patterns=()
for m in "${modules[@]}"; do patterns+=("$m.*"); done
.venv/bin/mutmut run --max-children "${MUTATION_JOBS:-$(nproc)}" "${patterns[@]}" </dev/null

if [ "$fast" = 0 ]; then
  task_pattern="tasks.*"
  if ((${#modules[@]})); then
    task_pattern=""
    for m in "${modules[@]}"; do [[ "$m" == tasks* ]] && task_pattern="$m.*"; done
  fi
  if [ -n "$task_pattern" ]; then
    .venv/bin/python -m worker.dev.mutation_report --retest-untested "$task_pattern" tests/service/test_tasks.py
  fi
fi
.venv/bin/python -m worker.dev.mutation_report
