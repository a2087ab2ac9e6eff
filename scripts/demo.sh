#!/usr/bin/env bash
# The main job on a fresh machine: installs what it needs, then runs the demo (sample templates in a temp
# dir, a real worker and beat, Redis at CELERY_BROKER_URL or a private one started for the occasion).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m worker.dev.demo "$@"
