"""python -m splitter --model distilgpt2 --stages 3 --out model_parts

Reads a model once (hub name, local `save_pretrained` directory, or --random-weights), plans the
stages, and writes stage_K.safetensors + manifest.json + the tokenizer into --out.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m splitter", description=__doc__.split("\n\n")[1])
    ap.add_argument("--model", default="distilgpt2", help="hub name or local model directory (default: distilgpt2)")
    ap.add_argument("--stages", type=int, required=True, help="number of pipeline stages = MPI ranks")
    ap.add_argument("--out", type=Path, required=True, help="output directory (model_parts)")
    ap.add_argument("--random-weights", action="store_true",
                    help="MODEL's architecture with random weights and a locally built tokenizer (no hub needed)")
    ap.add_argument("--layers", help="override the plan: inclusive layer ranges per stage, e.g. 0-1,2-3,4-5")
    ap.add_argument("--seed", type=int, default=0, help="seed for --random-weights")
    args = ap.parse_args(argv)

    from splitter.hub import hub_reachable
    local = Path(args.model).is_dir()
    if not local:
        if not hub_reachable():
            os.environ["HF_HUB_OFFLINE"] = "1"  # fail fast instead of retrying for half a minute
            if not args.random_weights:
                print(f"splitter: {args.model!r} is not a local directory and the model hub is unreachable; "
                      "pass a local save_pretrained directory, or --random-weights for a meaningless test model",
                      file=sys.stderr)
                return 2
    from splitter.split import split
    try:
        split(args.model, args.stages, args.out, random_weights=args.random_weights,
              layers=args.layers, seed=args.seed)
    except ValueError as err:
        print(f"splitter: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
