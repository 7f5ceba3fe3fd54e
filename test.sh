#!/usr/bin/env bash
# Set up (venv, pinned test tools, and as root the system packages the cluster and browser tests use)
# and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh requirements-dev.txt
if [ "$(id -u)" = 0 ] && [ -x tests/system-packages.sh ]; then tests/system-packages.sh; fi
. .venv/bin/activate
exec python -m pytest "$@"
