"""The baseline: single-process transformers `generate`, one request after another (what hobby servers do).

    python -m bench.baseline --hf DIR --threads 2      # then JSON lines on stdin, one answer per line

A worker in its own process, so its peak RSS is the model's alone and the benchmark can interleave
its requests with the pipeline's (both then see the same noise on a shared machine). Greedy, KV cache
on. A streamer stamps the time of every token, so time to first token and the decode rate come from
the same generate call. Both are counted from the first token that adds text (first_text_index), the
moment the pipeline's client sees its first text chunk, so both sides time the same tokens. Commands, one JSON object per line:

    {"op": "run", "prompt": "...", "max_tokens": 64}    -> tokens, seconds, ttft_s, decode_s, text, ids, ...
    {"op": "batched", "prompts": [...], "max_tokens": 64} -> one generate over all prompts (a reference)
    {"op": "stats"}                                      -> peak RSS, CPU seconds, load time
The first line it writes is {"ready": true, ...} once the model is loaded and warm. Any family
transformers' AutoModelForCausalLM loads (gpt2, llama, ...), in float32 like the pipeline's fp32 shards.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import psutil


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


class Stamps:
    """A generate() streamer that records when each new token was produced (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.puts = 0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts > 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def count_tokens(row: list[int], eos: int) -> int:
    """Generated tokens before EOS (the server counts the same way: EOS ends the text and is not in it)."""
    return row.index(eos) if eos in row else len(row)


def first_text_index(backend, prompt_ids: list[int], ids: list[int]) -> int:
    """The index of the first generated id that adds text after the prompt, by the server's own rule
    (shardline.detok.TextStream seeded with the prompt): a lone byte of a multi-byte character adds
    none, so the pipeline's client sees its first text chunk only with a later token. len(ids) when
    none adds text."""
    from shardline.detok import TextStream
    stream = TextStream(backend, prompt_ids)
    return next((i for i, t in enumerate(ids) if stream.step(t)), len(ids))


def text_timing(times: list[float], t_start: float, t_end: float, n: int, k: int) -> dict:
    """TTFT and decode from the streamer's stamps, counted from token k (the first that adds text):
    decode_tokens = n - 1 - k over the time from token k to token n - 1, the rule the pipeline's
    client follows with SSE chunks. ttft_token_s keeps the time to the first token itself."""
    last = times[n - 1] if 0 < n <= len(times) else t_end
    first = times[k] if k < n and k < len(times) else last
    return {"ttft_s": first - t_start, "ttft_token_s": (times[0] if times else t_end) - t_start,
            "decode_s": last - first, "decode_tokens": max(n - 1 - k, 0), "first_text_index": k}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.baseline")
    ap.add_argument("--hf", type=Path, required=True, help="save_pretrained directory (model + tokenizer)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    args = ap.parse_args(argv)
    answer = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr            # whatever a library prints must not corrupt the answers

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.hf)
    load_s = time.perf_counter() - t0
    rss_loaded = psutil.Process().memory_info().rss
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos     # the random shapes have one EOS id (the last id)

    def generate(enc, n: int, streamer=None) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=n,
                                  do_sample=False, num_beams=1, use_cache=True, pad_token_id=eos,
                                  eos_token_id=eos, streamer=streamer)

    def run(prompt: str, max_tokens: int) -> dict:
        enc = tok(prompt, return_tensors="pt")
        stamps = Stamps()
        t_start = time.perf_counter()
        out = generate(enc, max_tokens, stamps)
        t_end = time.perf_counter()
        prompt_ids = enc["input_ids"][0].tolist()
        new = out[0, len(prompt_ids):].tolist()
        n = count_tokens(new, eos)
        k = first_text_index(tok.backend_tokenizer, prompt_ids, new[:n])
        return {"prompt_tokens": len(prompt_ids), "tokens": n, "seconds": t_end - t_start,
                **text_timing(stamps.times, t_start, t_end, n, k),
                "text": tok.decode(new[:n], skip_special_tokens=True), "ids": new[:n]}

    def batched(prompts: list[str], max_tokens: int) -> dict:
        tok.pad_token, tok.padding_side = tok.eos_token, "left"
        enc = tok(prompts, return_tensors="pt", padding=True)
        stamps = Stamps()
        t_start = time.perf_counter()
        out = generate(enc, max_tokens, stamps)
        t_end = time.perf_counter()
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        return {"batch": len(prompts), "tokens": sum(count_tokens(r, eos) for r in new), "seconds": t_end - t_start,
                "ttft_s": (stamps.times[0] if stamps.times else t_end) - t_start}

    def stats() -> dict:
        t = psutil.Process().cpu_times()
        return {"threads": args.threads, "torch": torch.__version__, "load_seconds": load_s,
                "rss_after_load_bytes": rss_loaded, "rss_bytes": psutil.Process().memory_info().rss,
                "peak_rss_bytes": peak_rss(), "cpu_seconds": t.user + t.system}

    generate(tok("warm up", return_tensors="pt"), 4)
    answer.write(json.dumps({"ready": True, **stats()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        try:
            if cmd["op"] == "run":
                res = run(cmd["prompt"], cmd["max_tokens"])
            elif cmd["op"] == "batched":
                res = batched(cmd["prompts"], cmd["max_tokens"])
            elif cmd["op"] == "stats":
                res = stats()
            else:
                res = {"error": f"unknown op {cmd['op']!r}"}
        except Exception as err:  # report, keep serving: the benchmark decides what to do
            res = {"error": f"{type(err).__name__}: {err}"}
        answer.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


class Worker:
    """The benchmark's handle on `python -m bench.baseline`: one JSON command, one JSON answer."""

    def __init__(self, hf: Path, threads: int, log: Path, timeout: float = 300):
        import subprocess
        self.log = open(log, "w")
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.baseline", "--hf", str(hf), "--threads", str(threads)],
                                     cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1)
        self.ready = self._read(timeout)
        if not self.ready.get("ready"):
            raise RuntimeError(f"the baseline did not start: {self.ready}")

    def _read(self, timeout: float) -> dict:
        import select
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if r else ""
        if not line:
            self.close()
            raise RuntimeError(f"the baseline process gave no answer within {timeout}s "
                               f"(exit {self.proc.returncode}); see {self.log.name}")
        return json.loads(line)

    def call(self, timeout: float = 300, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        res = self._read(timeout)
        if "error" in res:
            raise RuntimeError(f"baseline {cmd.get('op')}: {res['error']}")
        return res

    def close(self) -> None:
        import subprocess
        try:
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()
            self.proc.wait(15)
        except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()
