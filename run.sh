#!/usr/bin/env bash
# Set up, split distilgpt2 into 3 stages, and serve it from a local 3-rank cluster on hostfiles/localhost.
# Without the model hub, the model has distilgpt2's shapes and RANDOM weights (meaningless text).
# Extra arguments go to main.py (e.g. --port 8001 --verbose). MODEL=dir-or-hub-name to pick another model.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh requirements.txt
. .venv/bin/activate
model=${MODEL:-distilgpt2}
out=${MODEL_DIR:-model_parts}
# Re-split unless $out holds a split of this model into 3 stages that this version can serve, and
# also when that split has random weights (made offline) and the hub is reachable now.
if ! python - "$out" "$model" 2>/dev/null <<'EOF'
import sys
from shardline.manifest import load_manifest
m = load_manifest(sys.argv[1])
stale = m.num_stages != 3 or m.data["source"] != sys.argv[2]
if not stale and m.data.get("random_weights"):
    from splitter.hub import hub_reachable
    stale = hub_reachable()
sys.exit(stale)
EOF
then
  if ! python -m splitter --model "$model" --stages 3 --out "$out"; then
    echo "######################################################################"
    echo "#  No model hub: using $model's shapes with RANDOM weights."
    echo "#  Everything runs for real, but the generated text is MEANINGLESS."
    echo "######################################################################"
    python -m splitter --model "$model" --stages 3 --out "$out" --random-weights
  fi
fi
[ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
echo "[run] starting 3 ranks; then: curl -s localhost:8000/generate -H 'content-type: application/json' -d '{\"prompt\": \"Once upon a time\", \"max_new_tokens\": 32}'"
# Supervised: Ctrl-C stops every rank cleanly; a failed job (a dead or hung rank) is restarted.
# --enable-recovery keeps mpirun from killing rank 0 when a worker dies, so rank 0 can answer the
# waiting clients with an error before the job ends.
exec python -m shardline.supervise --restart -- \
  mpirun -np 3 --hostfile hostfiles/localhost --bind-to none --enable-recovery \
  python -m mpi4py main.py --model-dir "$out" "$@"
