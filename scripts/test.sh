#!/usr/bin/env bash
# Install what the tests need and run them. The README's test command; .ci/run calls it.
# Needs root (or sudo) for the Debian packages: dcmtk (the modality), orthanc (the PACS),
# dicom3tools (dciodvfy, IOD validation); prometheus (promtool, alert rules); orthanc-dicomweb (a
# STOW-RS client); Node 20 + npm for the loopback FHIR server;
# PostgreSQL 15 binaries (initdb/pg_ctl) for the PostgreSQL half of the suite; chromium and
# chromium-driver for the console's browser tests (selenium); the loopback OpenID provider
# (oidc-provider) and axe-core come from npm.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
need=()
for pair in storescu:dcmtk Orthanc:orthanc dciodvfy:dicom3tools shellcheck:shellcheck promtool:prometheus \
            chromium:chromium chromedriver:chromium-driver; do
  cmd=${pair%%:*}; pkg=${pair##*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
# the Orthanc DICOMweb plugin: Orthanc as an independent STOW-RS client
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'

for dir in tests/integration/fhir/server tests/deploy/tools tests/peers/oidc_provider; do
  if [ -f "$dir/package-lock.json" ]; then
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
  fi
done

# Gates before the tests: what is clean today stays clean (configured in pyproject.toml).
.venv/bin/ruff check .
.venv/bin/mypy

exec .venv/bin/python -m pytest -q "$@"
