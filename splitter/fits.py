"""python -m splitter.fits: what fits on 4 GB and 8 GB boards, for the models users ask for.

Computed from each model's config (splitter/random_model.py KNOWN_CONFIGS, copied from the hub) with
the same byte counts as the splitter and the same planner as `--boards`: the fewest equal boards
whose plan fits (shard + KV cache + runtime within each board's memory less the headroom).
"""
from __future__ import annotations

import argparse
import sys

# What a stage may use on a board with 4 / 8 GB of RAM (what the probe reports as available on a
# Raspberry Pi OS Lite board), and the serving settings the table assumes.
BOARD_MB = {"4 GB": 3600, "8 GB": 7500}
MODELS = ["SmolLM2-135M", "SmolLM2-1.7B", "Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-7B", "Qwen3-0.6B",
          "Llama-3.2-1B", "Llama-3.2-3B", "TinyLlama-1.1B-Chat-v1.0", "Mistral-7B-v0.1"]


def boards_needed(m, quant, memory_mb: float, slots: int, context: int, most: int = 32) -> int | None:
    from splitter.boards import Board, DoesNotFit, make_plan
    from splitter.split import model_cost
    cost = model_cost(m, quant)
    for n in range(1, min(most, m.n_layers + 1) + 1):
        boards = [Board(name=f"b{i}", memory_mb=memory_mb) for i in range(n)]
        try:
            plan = make_plan(boards, cost, slots=slots, max_context=context)
        except DoesNotFit:
            continue
        return len(plan.stages)
    return None


def table(slots: int = 4, context: int = 2048) -> str:
    from splitter.split import _group, open_model, shard_bytes
    schemes = [None, "int8", "int4"]
    head = ["model", "family", "params"] + [f"{q or 'fp32'} GB" for q in schemes] + [
        f"{q or 'fp32'} {b}" for q in schemes for b in BOARD_MB]
    rows = []
    for name in MODELS:
        m = open_model(name, random_weights=True)
        row = [name, m.config.model_type]
        sizes, need = [], []
        for q in schemes:
            quant = {"scheme": q, "group_size": _group("int4"), "head": "int8"} if q else None
            sizes.append(f"{shard_bytes(m, quant) / 1e9:.2f}")
            for mb in BOARD_MB.values():
                n = boards_needed(m, quant, mb, slots, context)
                need.append(str(n) if n else "—")
        fam = m.fam.cost(m.config, m.tied)
        params = fam.layer_params * m.n_layers + fam.edge_params
        rows.append(row + [f"{params / 1e9:.2f}B"] + sizes + need)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append(f"\nGB: the shards. Boards needed: the fewest equal boards of each size whose plan fits what each "
                 f"rank holds (int4: 0.75 bytes per weight on an aarch64 board, see split.held_bytes), {slots} slots "
                 f"x {context} tokens of KV cache (float32) and the runtime; — : more than 32 boards or a head too "
                 f"small for the embeddings and LM head")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m splitter.fits", description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--max-context", type=int, default=2048)
    args = ap.parse_args(argv)
    print(table(args.slots, args.max_context))
    return 0


if __name__ == "__main__":
    sys.exit(main())
