#!/usr/bin/env bash
# The main job end to end on local defaults: install what is missing, start a local Redis
# and a local Orthanc seeded with a generated study, start the API and a worker, submit a
# retrieve through the API and show the result. Everything stops when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pacsfetch.sandbox.demo "$@"
