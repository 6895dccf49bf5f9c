#!/usr/bin/env bash
# The benchmark of issue #5: pacsfetch against DCMTK and pynetdicom getscu on local Orthancs.
# Installs what is missing first; options go to the harness (--quick, --only PARTS).
# Results: a printed table and .bench/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m benchmarks.run "$@"
