#!/usr/bin/env bash
# Static checks, then the whole test suite against real peers (Redis, Orthanc, DCMTK, an S3
# server, Prometheus) that the suite starts itself on private loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Static checks first (undefined names, unused imports, import order): seconds, not minutes.
.venv/bin/ruff check --select F,I,RUF100 api workers plugins pacsfetch sandbox tests scripts benchmarks
exec .venv/bin/python -m pytest "$@"
