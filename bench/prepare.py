"""The benchmark's weights: one random model of a known shape, saved once, then split by the splitter.

    python -m bench.prepare --dir bench/out/model [--shape distilgpt2|smollm2-135m|tinyllama]
                            [--stages 3] [--seed 0] [--schemes fp32,int8,int4]

Both sides of the benchmark read the same bytes: the baseline loads DIR/hf with
AutoModelForCausalLM.from_pretrained, the pipeline serves DIR/parts (float32) or DIR/parts-int8,
DIR/parts-int4 (`--quantize`), which `python -m splitter` made from DIR/hf. DIR/hf is built with
transformers' AutoModelForCausalLM.from_config on the shape's config (splitter/random_model.py) and a
byte-level tokenizer of the model's vocabulary size. Everything is cached (DIR/stamp.json records the
weights, DIR/parts*.stamp.json each split and a digest of the splitter's code, so a split is made
again when that code changes); a half-built directory is never reused because each is
built under a temporary name and renamed at the end.
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
SCHEMES = ("fp32", "int8", "int4")


def shape_key(shape: str) -> str:
    """--shape name (distilgpt2, smollm2-135m, tinyllama) -> splitter.random_model.KNOWN_CONFIGS key."""
    from splitter.random_model import KNOWN_CONFIGS, SHAPES
    key = SHAPES.get(shape, shape)
    if key not in KNOWN_CONFIGS:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return key


def parts_dir(directory: Path, scheme: str = "fp32") -> Path:
    return directory / ("parts" if scheme == "fp32" else f"parts-{scheme}")


def stamp_of(model: str, seed: int) -> dict:
    return {"model": model, "seed": seed, "version": 2}


def format_digest() -> str:
    """A digest of the code that decides what a split contains (the splitter, the shard format, the
    families' tensor specs, the quantizer): a split made by other code is made again, never served."""
    import hashlib
    h = hashlib.sha256()
    files = sorted([*(ROOT / "splitter").glob("*.py"), *(ROOT / "shardline" / "models").glob("*.py"),
                    ROOT / "shardline" / "manifest.py", ROOT / "shardline" / "quant.py"])
    for f in files:
        if f.is_file():
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + f".tmp{int(time.time() * 1e6)}")


def _swap(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def build_weights(directory: Path, model: str, seed: int) -> None:
    """DIR/hf: save_pretrained of a random model of the shape, and its tokenizer."""
    from splitter.random_model import build_tokenizer, known_config, random_model
    cfg = known_config(shape_key(model))
    tmp = _tmp(directory / "hf")
    try:
        random_model(cfg, seed).save_pretrained(tmp)
        build_tokenizer(cfg.vocab_size).save_pretrained(tmp)
        _swap(tmp, directory / "hf")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_parts(directory: Path, stages: int, scheme: str) -> None:
    """DIR/parts[-SCHEME]: `python -m splitter --model DIR/hf --stages N [--quantize SCHEME]`."""
    final = parts_dir(directory, scheme)
    tmp = _tmp(final)
    cmd = [sys.executable, "-m", "splitter", "--model", str(directory / "hf"), "--stages", str(stages),
           "--out", str(tmp)] + ([] if scheme == "fp32" else ["--quantize", scheme])
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        _swap(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build(directory: Path, model: str = "distilgpt2", stages: int = 3, seed: int = 0,
          schemes: tuple[str, ...] = ("fp32",), force: bool = False) -> float:
    """Build (or reuse) DIR/hf and one split per scheme; returns the seconds taken."""
    t0 = time.monotonic()
    for s in schemes:
        if s not in SCHEMES:
            raise ValueError(f"unknown scheme {s!r}; known: {', '.join(SCHEMES)}")
    directory.mkdir(parents=True, exist_ok=True)
    want = stamp_of(shape_key(model), seed)
    if force or _read(directory / "stamp.json") != want:
        print(f"[bench] weights: building random {model}-shaped weights in {directory / 'hf'} ...", flush=True)
        (directory / "stamp.json").unlink(missing_ok=True)
        for old in directory.glob("parts*.stamp.json"):
            old.unlink()
        build_weights(directory, model, seed)
        (directory / "stamp.json").write_text(json.dumps(want) + "\n")
    for s in schemes:
        part_stamp = directory / f"{parts_dir(directory, s).name}.stamp.json"
        want_part = {**want, "stages": stages, "scheme": s, "code": format_digest()}
        if _read(part_stamp) == want_part and (parts_dir(directory, s) / "manifest.json").exists():
            continue
        print(f"[bench] weights: splitting into {stages} stages ({s}) -> {parts_dir(directory, s)} ...", flush=True)
        part_stamp.unlink(missing_ok=True)
        build_parts(directory, stages, s)
        part_stamp.write_text(json.dumps(want_part) + "\n")
    return time.monotonic() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--shape", "--model", dest="model", default="distilgpt2",
                    help="distilgpt2, smollm2-135m or tinyllama (or a splitter.random_model shape name)")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schemes", default="fp32", help="comma-separated splits to build: fp32,int8,int4")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cached one matches")
    args = ap.parse_args(argv)
    try:
        took = build(args.dir, args.model, args.stages, args.seed,
                     tuple(s.strip() for s in args.schemes.split(",") if s.strip()), args.force)
    except (ValueError, RuntimeError) as err:
        print(f"bench.prepare: {err}", file=sys.stderr)
        return 2
    print(f"[bench] weights ready in {args.dir} ({took:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
