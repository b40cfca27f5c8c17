#!/usr/bin/env bash
# .ci/install-chromium.sh — install Debian's chromium, which tests/test_tracking.py drives headless
# to load MLflow's runs page (the test is skipped without it). Idempotent; installs as root.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    # The Debian launcher script prints a harmless shell warning on stderr.
    chromium --version 2>/dev/null
    exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "install-chromium: ERROR: must run as root (apt-get install -y chromium)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
chromium --version 2>/dev/null
