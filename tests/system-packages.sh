#!/usr/bin/env bash
# System packages some tests need (run as root by test.sh): what the cluster test's SSH test hosts
# need (tests/cluster/setup_host.sh: sshd, iproute2, Debian's python3), and Chromium for the chat
# page's browser test. Installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")"
sh cluster/setup_host.sh
if ! dpkg -s chromium >/dev/null 2>&1; then
  echo "[setup] apt-get install chromium (for tests/test_browser.py)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
