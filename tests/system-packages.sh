#!/usr/bin/env bash
# System packages some tests need (run as root by test.sh): sshd and iproute2 for the cluster test on
# network-namespace test hosts, Chromium for the chat-page browser test. Skips what is installed.
set -euo pipefail
want=(openssh-server iproute2 chromium)
missing=()
for p in "${want[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
