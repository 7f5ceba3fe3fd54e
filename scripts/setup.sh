#!/usr/bin/env bash
# Create .venv and install the pinned requirements (again only when a requirements file changed).
# Usage: scripts/setup.sh [requirements.txt|requirements-dev.txt]
set -euo pipefail
cd "$(dirname "$0")/.."
req=${1:-requirements.txt}
py=${PYTHON:-python3}
if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then
  echo "shardline needs Python >= 3.11 ($py is $("$py" --version 2>&1))" >&2; exit 1
fi
if [ ! -x .venv/bin/python ] && ! "$py" -m venv .venv; then
  rm -rf .venv
  # Debian and Ubuntu ship venv's ensurepip in a package of its own
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] apt-get install python3-venv (python3 -m venv needs it on Debian)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    "$py" -m venv .venv
  else
    echo "python3 -m venv failed: install python3-venv (sudo apt install python3-venv), then run this again" >&2
    exit 1
  fi
fi
stamp=.venv/.installed-$(basename "$req")
sum=$(cat requirements*.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
  # torch's CPU build: PyPI's torch for x86-64 Linux pulls GBs of CUDA libraries; PyTorch's own CPU
  # index has the same version (2.13.0+cpu, which pip prefers) without them. Asked only when it
  # answers within 3 s: a machine with a local wheel cache (PIP_FIND_LINKS) and no route to it goes on.
  extra=()
  if "$py" -c 'import socket; socket.create_connection(("download.pytorch.org", 443), timeout=3).close()' 2>/dev/null; then
    extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  echo "[setup] installing $req into .venv (the CPU build of torch${extra:+, from the PyTorch CPU index})"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q ${extra[@]+"${extra[@]}"} -r "$req"
  echo "$sum" > "$stamp"
fi
