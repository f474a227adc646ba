#!/usr/bin/env bash
# The test command: sets up (idempotent) and runs the whole suite with real VMs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
npx vitest run "$@"
