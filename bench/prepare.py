"""The benchmark's weights: one random distilgpt2-shaped model, saved once, then split by the splitter.

    python -m bench.prepare --dir bench/out/model [--stages 3] [--seed 0]

Both sides of the benchmark read the same bytes: the baseline loads DIR/hf with
GPT2LMHeadModel.from_pretrained, the pipeline serves DIR/parts, which `python -m splitter` made from
DIR/hf. The result is cached (DIR/stamp.json records what was built); a half-built directory is never
reused because it is built under a temporary name and renamed at the end.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stamp_of(model: str, stages: int, seed: int) -> dict:
    return {"model": model, "stages": stages, "seed": seed, "version": 1}


def ready(directory: Path, model: str, stages: int, seed: int) -> bool:
    try:
        return json.loads((directory / "stamp.json").read_text()) == stamp_of(model, stages, seed)
    except (OSError, ValueError):
        return False


def build(directory: Path, model: str = "distilgpt2", stages: int = 3, seed: int = 0) -> float:
    """Build DIR/hf (save_pretrained: random weights + tokenizer) and DIR/parts; returns seconds taken."""
    t0 = time.monotonic()
    from transformers import GPT2Config

    from splitter.random_model import KNOWN_CONFIGS, build_tokenizer, random_model
    tmp = directory.with_name(directory.name + f".tmp{int(time.time() * 1e6)}")
    tmp.mkdir(parents=True)
    try:
        cfg = GPT2Config(**KNOWN_CONFIGS[model], bos_token_id=50256, eos_token_id=50256)
        random_model(cfg, seed).save_pretrained(tmp / "hf")
        build_tokenizer(cfg.vocab_size).save_pretrained(tmp / "hf")
        subprocess.run([sys.executable, "-m", "splitter", "--model", str(tmp / "hf"), "--stages", str(stages),
                        "--out", str(tmp / "parts")], cwd=ROOT, check=True, capture_output=True, text=True)
        (tmp / "stamp.json").write_text(json.dumps(stamp_of(model, stages, seed)) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return time.monotonic() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--model", default="distilgpt2", help="a shape splitter.random_model knows (default distilgpt2)")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if the cached one matches")
    args = ap.parse_args(argv)
    if not args.force and ready(args.dir, args.model, args.stages, args.seed):
        print(f"[bench] weights: reusing {args.dir}", flush=True)
        return 0
    print(f"[bench] weights: building random {args.model}-shaped weights in {args.dir} ...", flush=True)
    took = build(args.dir, args.model, args.stages, args.seed)
    print(f"[bench] weights: built in {took:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
