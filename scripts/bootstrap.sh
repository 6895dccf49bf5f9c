#!/usr/bin/env bash
# Install what pacsfetch needs on a Debian machine with Python 3.11+: the real peers the
# demo and the tests run (Orthanc with its DICOMweb plugin, DCMTK, Redis, Prometheus) and,
# in .venv, the package with its test extras. Safe to run again; it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(orthanc orthanc-dicomweb dcmtk redis-server procps prometheus iproute2 iptables)
python3 -m venv --help >/dev/null 2>&1 && python3 -c "import ensurepip" 2>/dev/null || packages+=(python3-venv)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  # Debian starts packaged services on install where it can; pacsfetch never uses them
  # (the demo and the tests start their own on private ports).
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# Reinstall only when the project's declared dependencies changed since the last install.
stamp=".venv/.pacsfetch-installed"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  if ! .venv/bin/python -m pip install -q -e ".[test]" > .venv/pip.log 2>&1; then
    cat .venv/pip.log; exit 1
  fi
  .venv/bin/python -c "import pacsfetch.cli, pacsfetch.api.app, pacsfetch.plugins.registry"  # fail here, not later
  echo "$wanted" > "$stamp"
fi
