#!/usr/bin/env bash
# The whole test suite against real peers (Redis, Orthanc, DCMTK) the suite starts itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
