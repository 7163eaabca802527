#!/usr/bin/env bash
# GPU acceptance in one command (see tools/gpu_acceptance.py for the steps, their caps and the outputs):
#   bash tools/gpu_acceptance.sh OUT_DIR            on a bare H100/H200 machine: install offline, build, test, bench
#   bash tools/gpu_acceptance.sh OUT_DIR --dry-run  on any machine: check the plan without a GPU (CI runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python3 tools/gpu_acceptance.py "$@"
