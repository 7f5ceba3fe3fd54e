"""Write one safetensors shard per stage, the tokenizer, and the manifest, from a single loaded model."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from shardline.manifest import (FORMAT, FORMAT_VERSION, MANIFEST, TOKENIZER_DIR, sha256_file,
                                stage_tensor_names)
from splitter.plan import parse_layers, plan_layers


def _load(model: str, random_weights: bool, seed: int):
    from transformers import AutoTokenizer, GPT2LMHeadModel
    if random_weights:
        from splitter.random_model import build_tokenizer, config_for, random_model
        config = config_for(model)
        print(f"[splitter] {model}: RANDOM WEIGHTS ({config.n_layer} layers, hidden {config.n_embd}); "
              "generated text will be meaningless", flush=True)
        return random_model(config, seed), build_tokenizer(config.vocab_size)
    print(f"[splitter] loading {model} ...", flush=True)
    return GPT2LMHeadModel.from_pretrained(model).eval(), AutoTokenizer.from_pretrained(model)


def split(model: str, n_stages: int, out: Path, random_weights: bool = False, layers: str | None = None,
          seed: int = 0) -> dict:
    t0 = time.time()
    lm, tokenizer = _load(model, random_weights, seed)
    config = lm.config
    if config.model_type != "gpt2":
        raise ValueError(f"{model}: architecture {config.model_type!r} is not supported yet (gpt2 family only)")
    params = dict(lm.named_parameters(remove_duplicate=False))
    tied = params["lm_head.weight"].data_ptr() == params["transformer.wte.weight"].data_ptr()
    layer_cost = sum(p.numel() for n, p in params.items() if n.startswith("transformer.h.0."))
    head_cost = params["lm_head.weight"].numel()
    ranges = parse_layers(layers, config.n_layer) if layers else plan_layers(config.n_layer, n_stages, layer_cost, head_cost)
    if len(ranges) != n_stages:
        raise ValueError(f"--layers gives {len(ranges)} stages but --stages is {n_stages}")

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("stage_*.safetensors"):
        stale.unlink()
    from safetensors.torch import save_file
    split_id = uuid.uuid4().hex
    stages = []
    for k, (a, b) in enumerate(ranges):
        names = stage_tensor_names(k == 0, (a, b), tied)
        tensors = {n: params[n].detach().contiguous() for n in names}
        path = out / f"stage_{k}.safetensors"
        save_file(tensors, str(path), metadata={"split_id": split_id, "stage": str(k), "format": FORMAT})
        size = path.stat().st_size
        stages.append({"stage": k, "layers": [a, b], "file": path.name, "bytes": size,
                       "sha256": sha256_file(path), "tensors": names,
                       "extras": [n for n in names if not n.startswith("transformer.h.")]})
        print(f"[splitter] stage {k + 1}/{n_stages}: {f'layers {a}..{b - 1}' if b > a else 'no layers'}"
              f"{' + embeddings, ln_f, lm_head (tied to wte)' if k == 0 else ''}: {size / 2**20:.1f} MiB "
              f"({time.time() - t0:.1f}s)", flush=True)

    tdir = out / TOKENIZER_DIR
    tokenizer.save_pretrained(tdir)
    tok_files = {p.name: sha256_file(p) for p in sorted(tdir.iterdir()) if p.is_file()}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "architecture": "gpt2",
        "source": model, "random_weights": random_weights, "split_id": split_id,
        "config": config.to_dict(), "tied_lm_head": tied,
        "tokenizer": {"dir": TOKENIZER_DIR, "files": tok_files},
        "num_stages": n_stages, "stages": stages,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"[splitter] wrote {out / MANIFEST} ({n_stages} stages, {time.time() - t0:.1f}s)", flush=True)
    return manifest
