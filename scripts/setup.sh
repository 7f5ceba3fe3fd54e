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
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=.venv/.installed-$(basename "$req")
sum=$(cat requirements*.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
  echo "[setup] installing $req into .venv (torch is pinned to the CPU build)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$req"
  echo "$sum" > "$stamp"
fi
