"""python -m splitter --model distilgpt2 --stages 3 --out model_parts

Reads a model tensor by tensor (hub name, local `save_pretrained` directory, a .gguf file, or
--random-weights), plans the stages, and writes stage_K.safetensors + manifest.json + the tokenizer
into --out. --plan-only prints the plan and writes nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m splitter", description=__doc__.split("\n\n")[1])
    ap.add_argument("--model", default="distilgpt2",
                    help="hub name, local model directory, or .gguf file (default: distilgpt2)")
    ap.add_argument("--stages", type=int, help="number of pipeline stages = MPI ranks")
    ap.add_argument("--out", type=Path, help="output directory (model_parts)")
    ap.add_argument("--random-weights", action="store_true",
                    help="MODEL's architecture with random weights and a locally built tokenizer (no hub needed)")
    ap.add_argument("--layers", help="override the plan: inclusive layer ranges per stage, e.g. 0-1,2-3,4-5")
    ap.add_argument("--quantize", choices=("int8", "int4"),
                    help="store matmul weights as int8 (per output channel) or int4 (per group); default float32")
    ap.add_argument("--group-size", type=int, default=None, help="int4 group size (default: shardline.quant's, 32)")
    ap.add_argument("--head-quantize", choices=("int8", "int4", "float32"), default=None,
                    help="the embedding and LM head's scheme (default: int8 under --quantize int4, else the same)")
    ap.add_argument("--boards", type=Path, help="boards file (YAML, ring order, head first): plan by memory and speed")
    ap.add_argument("--slots", type=int, default=16, help="with --boards: concurrent sequences (main.py --slots)")
    ap.add_argument("--max-context", type=int, default=None,
                    help="with --boards: tokens per sequence (main.py --max-context; default: the model's, at most 4096)")
    ap.add_argument("--plan-json", type=Path, help="also write the plan as JSON to this file")
    ap.add_argument("--previous-plan", type=Path,
                    help="with --boards: the last plan's JSON (--plan-json); kept while it fits the boards and is "
                         "within 10%% of the best plan's time per token, so small changes in measured speed do not "
                         "move layers (a missing file, or a plan for another model, is ignored)")
    ap.add_argument("--plan-only", action="store_true", help="print each stage's layers and bytes; write nothing")
    ap.add_argument("--seed", type=int, default=0, help="seed for --random-weights")
    args = ap.parse_args(argv)
    if args.stages is None and args.layers and args.boards is None:
        args.stages = len(args.layers.split(","))        # the ranges give the stage count
    if args.boards is None and (args.stages is None or args.stages < 1):
        ap.error("--stages N (N >= 1) or --boards FILE is required")
    if args.out is None and not args.plan_only:
        ap.error("--out DIR is required (or --plan-only)")

    from splitter.hub import hub_reachable
    local = Path(args.model).exists()
    m = args.model
    if not local and not args.random_weights and (m.startswith((".", "/", "~")) or m.count("/") > 1
                                                   or m.endswith((".gguf", ".safetensors", ".json"))):
        print(f"splitter: {m}: no such file or folder (a hub model is named like org/name)", file=sys.stderr)
        return 2
    if not local and not hub_reachable():
        # fail fast instead of retrying for half a minute; a hub model downloaded before is read from the
        # local cache (splitter/source.py), any other is refused there with what to do instead
        os.environ["HF_HUB_OFFLINE"] = "1"
    from splitter.split import split
    try:
        split(args.model, args.stages, args.out, random_weights=args.random_weights, layers=args.layers,
              seed=args.seed, quantize=args.quantize, group_size=args.group_size, plan_only=args.plan_only,
              boards=args.boards, slots=args.slots, max_context=args.max_context, plan_json=args.plan_json,
              head_quantize=args.head_quantize, previous_plan=args.previous_plan)
    except ValueError as err:
        print(f"splitter: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
