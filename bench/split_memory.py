"""The splitter's peak memory on a big checkpoint (issue 10 item 3): below half the model's bytes + 400 MB.

    python -m bench.split_memory [--out bench/out/split_memory] [--stages 4]
                                 [--hidden 960 --intermediate 2560 --layers 32 --heads 15 --kv-heads 5 --vocab 49152]

Writes a random float32 Llama-family checkpoint the way the hub ships big ones: several
model-0000K-of-0000N.safetensors files and model.safetensors.index.json, config.json (transformers'
LlamaConfig) and a tokenizer. The default shape is SmolLM2-360M's, 1.45 GB in float32. The writer
holds one file's tensors at a time, so it stays small itself, and runs in a process of its own. Then it runs
`python -m splitter --model DIR --stages 4 --out OUT` in a subprocess and measures that process's peak
RSS: the kernel's own figure (ru_maxrss from wait4, the high-water mark of resident memory, file
pages it mapped included) and psutil samples every 50 ms as a cross-check. Linux carries the spawning
process's high-water mark into a child's ru_maxrss at exec, so the measuring process imports neither
torch nor transformers (its own RSS is recorded beside the figures) and the peak reported is the
larger of the two figures. Prints a summary and writes
DIR/../split_memory.json; exits 1 if the bound is broken.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
MB = 10**6
MiB = 2**20
BOUND_FIXED = 400 * MB       # the runtime allowance of the rule


def llama_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0,
                       bos_token_id=vocab - 1, eos_token_id=vocab - 1, torch_dtype="float32")


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """The checkpoint's tensor names and shapes, as transformers' model for the config has them (built on
    the meta device: no memory); a tied LM head is not stored, as save_pretrained does."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    specs = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
    if config.tie_word_embeddings:
        specs = [(n, s) for n, s in specs if n != "lm_head.weight"]
    return specs


def write_checkpoint(directory: Path, config, shard_bytes: int, seed: int = 0) -> dict:
    """config.json, tokenizer, model-K-of-N.safetensors (each up to shard_bytes, written one at a time) and
    model.safetensors.index.json. Returns the bytes of tensors and the files."""
    import torch
    from safetensors.torch import save_file

    from splitter.random_model import build_tokenizer
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    build_tokenizer(config.vocab_size).save_pretrained(directory)
    groups, cur, cur_bytes = [], [], 0
    for name, shape in tensor_specs(config):
        n = 4
        for d in shape:
            n *= d
        if cur and cur_bytes + n > shard_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += n
    groups.append(cur)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape)
            else:
                tensors[name] = torch.randn(shape, generator=gen).mul_(0.02)
            total += tensors[name].numel() * 4
            weight_map[name] = fname
        save_file(tensors, str(directory / fname), metadata={"format": "pt"})
        del tensors
        print(f"[split_memory] wrote {fname} ({(directory / fname).stat().st_size / MB:.0f} MB)", flush=True)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    files = sorted(directory.glob("model-*.safetensors"))
    return {"tensor_bytes": total, "files": len(files), "file_bytes": sum(f.stat().st_size for f in files)}


def run_measured(cmd: list[str], log: Path, interval: float = 0.05) -> dict:
    """Run cmd; its exit status, wall seconds, the kernel's peak RSS for it (wait4's ru_maxrss, KiB on
    Linux) and the highest RSS psutil saw over it and its children."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        sampled = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                sampled = max(sampled, rss)
            except psutil.Error:
                pass
            time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here, so Popen must not wait for it
    return {"returncode": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "sampled_peak_rss_bytes": sampled}


def measure(out: Path, stages: int, shape: dict, shard_mb: int, keep: bool = False) -> dict:
    model_dir, parts = out / "model", out / "parts"
    for d in (model_dir, parts):
        shutil.rmtree(d, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    writer = [sys.executable, "-m", "bench.split_memory", "--write-only", str(model_dir), "--shard-mb", str(shard_mb),
              *(a for k, v in shape.items() for a in (f"--{k.replace('_', '-')}", str(v)))]
    wrote = subprocess.run(writer, cwd=ROOT, capture_output=True, text=True, check=False)
    if wrote.returncode != 0:
        raise RuntimeError(f"writing the checkpoint failed: {wrote.stderr[-3000:]}")
    print(wrote.stdout, end="", flush=True)
    ckpt = json.loads((model_dir / "checkpoint.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    write_s = time.monotonic() - t0
    floor = run_measured([sys.executable, "-c", "import torch, transformers, safetensors"], out / "floor.log")
    cmd = [sys.executable, "-m", "splitter", "--model", str(model_dir), "--stages", str(stages), "--out", str(parts)]
    print(f"[split_memory] {' '.join(cmd[1:])}", flush=True)
    own_rss = psutil.Process().memory_info().rss
    run = run_measured(cmd, out / "splitter.log")
    if run["returncode"] != 0:
        raise RuntimeError(f"the splitter failed ({run['returncode']}); log {out / 'splitter.log'}:\n"
                           f"{(out / 'splitter.log').read_text()[-3000:]}")
    manifest = json.loads((parts / "manifest.json").read_text())
    model_bytes = ckpt["file_bytes"]
    bound = model_bytes // 2 + BOUND_FIXED
    peak = max(run["peak_rss_bytes"], run["sampled_peak_rss_bytes"])
    res = {
        "model": {"family": config["model_type"], "hidden_size": config["hidden_size"],
                  "intermediate_size": config["intermediate_size"], "layers": config["num_hidden_layers"],
                  "vocab_size": config["vocab_size"], "dtype": "float32", **ckpt, "write_seconds": round(write_s, 1)},
        "command": " ".join(["python", *cmd[1:]]),
        "stages": [{"stage": s["stage"], "layers": s["layers"], "bytes": s["bytes"]} for s in manifest["stages"]],
        "split_seconds": run["seconds"],
        "peak_rss_bytes": peak, "kernel_peak_rss_bytes": run["peak_rss_bytes"],
        "sampled_peak_rss_bytes": run["sampled_peak_rss_bytes"], "measuring_process_rss_bytes": own_rss,
        "python_torch_transformers_import_rss_bytes": floor["peak_rss_bytes"],
        "bound_bytes": bound, "bound_rule": "peak RSS < model bytes / 2 + 400 MB",
        "peak_over_model": round(peak / model_bytes, 3),
        "within_bound": peak < bound,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "cores": os.cpu_count(),
    }
    if not keep:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(parts, ignore_errors=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.split_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "split_memory",
                    help="work directory (the checkpoint and its split are removed afterwards unless --keep)")
    ap.add_argument("--json", type=Path, default=None, help="where to write the result (default OUT/result.json)")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=960)
    ap.add_argument("--intermediate", type=int, default=2560)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=15)
    ap.add_argument("--kv-heads", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--shard-mb", type=int, default=500, help="largest checkpoint file, MB (the hub's default: 5000)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the split")
    ap.add_argument("--write-only", type=Path, metavar="DIR", help=argparse.SUPPRESS)   # the writer process
    a = ap.parse_args(argv)
    shape = dict(hidden=a.hidden, intermediate=a.intermediate, layers=a.layers, heads=a.heads,
                 kv_heads=a.kv_heads, vocab=a.vocab)
    if a.write_only:
        ckpt = write_checkpoint(a.write_only, llama_config(**shape), a.shard_mb * MB)
        (a.write_only / "checkpoint.json").write_text(json.dumps(ckpt) + "\n")
        return 0
    try:
        res = measure(a.out.resolve(), a.stages, shape, a.shard_mb, a.keep)
    except (RuntimeError, ValueError) as err:
        print(f"bench.split_memory: {err}", file=sys.stderr)
        return 2
    path = a.json or a.out / "result.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    m = res["model"]
    print(f"[split_memory] model: {m['file_bytes'] / MB:.0f} MB in {m['files']} files; split into {a.stages} stages "
          f"in {res['split_seconds']}s; splitter peak RSS {res['peak_rss_bytes'] / MB:.0f} MB "
          f"(sampled {res['sampled_peak_rss_bytes'] / MB:.0f} MB; python+torch+transformers alone "
          f"{res['python_torch_transformers_import_rss_bytes'] / MB:.0f} MB); bound {res['bound_bytes'] / MB:.0f} MB "
          f"(model/2 + 400 MB): {'OK' if res['within_bound'] else 'BROKEN'}; wrote {path}", flush=True)
    return 0 if res["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
