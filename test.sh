#!/usr/bin/env bash
# Set up (venv, pinned test tools, and as root the system packages the cluster and browser tests use)
# and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh requirements-dev.txt
if [ "$(id -u)" = 0 ] && [ -x tests/system-packages.sh ]; then tests/system-packages.sh; fi
. .venv/bin/activate
# One pytest-xdist worker per CPU; a module's tests stay together (tests/conftest.py). -n 0 runs in one process.
exec python -m pytest -n logical "$@"
