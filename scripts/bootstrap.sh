#!/usr/bin/env bash
# Installs everything the project needs on a fresh machine, and nothing twice: Debian packages when missing,
# a virtual environment in .venv, the package with its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v mkfs.xfs >/dev/null 2>&1 || need_apt+=(xfsprogs)
command -v losetup >/dev/null 2>&1 || need_apt+=(mount)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v strace >/dev/null 2>&1 || need_apt+=(strace)  # the fault sweep (tests/core/test_fault_sweep.py)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# Node.js only for the foreign-client test (tests/service/test_foreign_clients.py runs celery-node from npm).
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if ((${#need_apt[@]})); then
  if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
  echo "bootstrap: installing ${need_apt[*]} from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

stamp=.venv/.installed
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
