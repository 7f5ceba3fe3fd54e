"""The matmul floor of one request: how fast a split could decode if its matrix products were all it did.

    python -m bench.floor bench/out/model-smollm2-135m/parts            # one split
    python -m bench.floor PARTS --threads 2 --repeats 7 --json floor.json

One generated token multiplies one row by every weight matrix of every stage, and stage 0's LM head:
on a CPU that is reading every weight once, so it is bounded by memory bandwidth and each kernel's
fixed cost per call. This loads each stage as its rank does (`load_stage`: the same layout, the same
kernel, fp32 through oneDNN or aten, int8/int4 through QLinear), one stage at a time so that the whole
model is never in memory, and times exactly those products with one row: every matmul of its blocks,
in order, then the head. The median of `repeats` passes per stage, summed over the stages, is the time
per token before any norm, rotation, attention, hop, sampling or HTTP. Its inverse bounds what one
request can reach on this machine with these kernels, which `python -m bench` reports next to the
pipeline's measured tok/s and transformers' (the table's "matmuls alone" row).

Every stage's weights are larger than the last-level cache of the machines this runs on (a
SmolLM2-135M stage is 160 MB), so each pass reads them from memory, as decoding does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def stage_matmuls(stage) -> list:
    """Every matmul callable of a stage's blocks, in the order of the block's attributes (the order
    the forward pass uses them is not needed: each reads its own weight once)."""
    out = []
    for blk in stage.blocks:
        out += [v for v in vars(blk).values() if callable(v) and hasattr(v, "out_features")]
    return out


def time_stage(stage, repeats: int) -> dict:
    """Median seconds of one pass over the stage's matmuls (one row each) and of its head (stage 0)."""
    lins = stage_matmuls(stage)
    xs = {n: torch.randn(1, n) for n in {lin.in_features for lin in lins}}
    head = getattr(stage, "ends", None)
    h = torch.randn(1, stage.d) if head is not None else None

    @torch.inference_mode()
    def blocks():
        for lin in lins:
            lin(xs[lin.in_features])

    @torch.inference_mode()
    def logits():
        head.logits(h)

    def median(fn) -> float:
        fn()                                              # first call: kernel set-up, not streaming
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return {"matmuls": len(lins), "blocks_s": median(blocks) if lins else 0.0,
            "head_s": median(logits) if head is not None else 0.0}


def matmul_floor(parts: Path, threads: int | None = None, repeats: int = 5) -> dict:
    """Per stage and in total: the matmul time of one token, loading one stage at a time."""
    import gc

    from shardline.manifest import load_manifest, verify_shard
    from shardline.models.linear import fp32_matmul
    from shardline.stage import load_stage
    if threads:
        torch.set_num_threads(threads)
    man = load_manifest(parts)
    stages = []
    for k in range(man.num_stages):
        stage = load_stage(man, k, verify_shard(man, k), 1, 64, "cpu")
        row = time_stage(stage, repeats)
        row.update(stage=k, layers=list(man.stage(k)["layers"]))
        stages.append(row)
        del stage
        gc.collect()
    total = sum(s["blocks_s"] + s["head_s"] for s in stages)
    q = man.data.get("quantization")
    return {"parts": str(parts), "scheme": q["scheme"] if q else "fp32", "fp32_kernel": fp32_matmul(),
            "threads": torch.get_num_threads(), "repeats": repeats,
            "stages": [{"stage": s["stage"], "layers": s["layers"], "matmuls": s["matmuls"],
                        "blocks_ms": round(s["blocks_s"] * 1e3, 4), "head_ms": round(s["head_s"] * 1e3, 4)}
                       for s in stages],
            "ms_per_token": round(total * 1e3, 4), "max_tok_s": round(1.0 / total, 2) if total else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", type=Path, help="a split's directory (manifest.json and its stage shards)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. the cores)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per stage (the median is kept)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args(argv)
    r = matmul_floor(a.parts, a.threads, a.repeats)
    for s in r["stages"]:
        lo, hi = s["layers"]
        print(f"stage {s['stage']} layers {f'{lo}..{hi - 1}' if hi > lo else 'none'}: {s['matmuls']} matmuls "
              f"{s['blocks_ms']:.2f} ms" + (f", LM head {s['head_ms']:.2f} ms" if s["head_ms"] else ""))
    print(f"{r['scheme']} ({r['fp32_kernel']} for float weights, {r['threads']} threads): {r['ms_per_token']:.2f} ms "
          f"of matmuls per token, so one request decodes at most {r['max_tok_s']} tok/s here")
    if a.json:
        a.json.write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
