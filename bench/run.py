"""python -m bench: the pipeline against single-process transformers, on the same weights, in one run.

Steps: (1) build or reuse random weights of a model shape (--shape distilgpt2|smollm2-135m|tinyllama;
bench/prepare.py): a save_pretrained directory and its 3-stage split (with --quantize, one split per
scheme, fp32/int8/int4, from the same weights); (2) start the baseline worker (bench/baseline.py): transformers
`generate` in its own process, greedy with KV cache, torch threads = all cores; (3) per pipeline
variant: start `mpirun -np 3 main.py` on loopback; the single-request phase sends each prompt to the
baseline and to the pipeline in turn (paired, so both see the same machine), then 4, 8, 16
concurrent streaming clients hit the pipeline, with /metrics read between phases; (4) one batched
generate as a reference; (5) ratios, JSON, PNG plot and a Markdown table.
With --quantize fp32,int8,int4 the pipelines measured are one per scheme (each against transformers
fp32), with each rank's shard bytes and peak RSS beside them.

The machine may be shared: every run records the CPU other processes took meanwhile; a prompt pair
of the single-request phase during which either side's run was noisy is left out of both sides'
medians (unless fewer than half the pairs are quiet: then all are kept and the phase is flagged
noisy), and a noisy concurrency level is run again (bounded).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench.cpu import CpuWatch, self_and_children
from bench.prompts import PROMPTS

ROOT = Path(__file__).resolve().parent.parent
TARGET_SINGLE, TARGET_AGGREGATE = 0.9, 5.0
# single request, pipeline decode tok/s over transformers': per shape (issue 10 item 7)
TARGETS_SINGLE = {"distilgpt2": TARGET_SINGLE, "smollm2-135m": 2.0, "tinyllama": 1.0}
SHAPES = tuple(TARGETS_SINGLE)
# --quantize (issue 12 item 6): int8 single request over the fp32 pipeline's; int4 shard bytes over fp32's;
# every rank's peak RSS over its shard bytes, MB
TARGET_INT8_SPEEDUP, TARGET_INT4_BYTES, TARGET_RSS_OVER_SHARD_MB = 2.0, 0.2, 300
HEADER_INTS_FIXED = 6            # shardline/wire.py: [kind, step, flags, n_seqs, rows, cols] + 3 per sequence


# ---- small statistics ----

def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks."""
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def rnd(x, nd=2):
    return None if x is None else round(x, nd)


def decode_tokens(run: dict) -> int:
    """The tokens a run's decode clock covers: those after the first one that showed text
    (decode_from_first_text), or tokens - 1 where that index is not known (the clock then starts at
    the first token: the concurrency levels' runs whose text differs, bench/boards.py)."""
    return run["decode_tokens"] if "decode_tokens" in run else max(run["tokens"] - 1, 0)


def decode_from_first_text(run: dict, k: int) -> dict:
    """The baseline's rule on a pipeline run: its client starts the decode clock at the first SSE chunk
    with text, which comes with token k (0-based) when tokens 0..k-1 end inside a multi-byte character,
    so the clock covers tokens - 1 - k tokens, not tokens - 1 (which would overstate the rate)."""
    run["first_text_index"] = k
    run["decode_tokens"] = max(run["tokens"] - 1 - k, 0)
    return run


def summarize(runs: list[dict], wall: float | None = None) -> dict:
    """Per-request figures (ttft_s, decode_s, seconds, tokens) -> medians, percentiles and the aggregate."""
    ok = [r for r in runs if not r.get("error")]
    tokens = sum(r["tokens"] for r in ok)
    wall = wall if wall is not None else sum(r["seconds"] for r in ok)
    decode = [decode_tokens(r) / r["decode_s"] for r in ok if decode_tokens(r) > 0 and r["decode_s"] > 0]
    e2e = [r["tokens"] / r["seconds"] for r in ok if r["seconds"] > 0]
    ttft = [r["ttft_s"] * 1e3 for r in ok]
    pooled_decode_s = sum(r["decode_s"] for r in ok if decode_tokens(r) > 0)
    return {"requests": len(runs), "errors": len(runs) - len(ok), "tokens": tokens,
            "prompt_tokens": sum(r.get("prompt_tokens", 0) for r in ok), "wall_s": rnd(wall, 3),
            "aggregate_tok_s": rnd(tokens / wall if wall > 0 else None),
            "decode_tok_s": rnd(statistics.median(decode) if decode else None),
            "decode_tok_s_pooled": rnd(sum(decode_tokens(r) for r in ok) / pooled_decode_s
                                       if pooled_decode_s > 0 else None),
            "e2e_tok_s": rnd(statistics.median(e2e) if e2e else None),
            "ttft_ms_p50": rnd(pct(ttft, 50), 1), "ttft_ms_p95": rnd(pct(ttft, 95), 1),
            "ttft_ms_max": rnd(max(ttft) if ttft else None, 1)}


def quiet_pairs(pairs: list[tuple[dict, dict]], noise_cores: float) -> tuple[list[int], dict]:
    """The indices of the (pipeline run, baseline run) prompt pairs to keep, and the noise counts.

    A pair goes when either run was noisy (other processes took more than noise_cores), from both
    sides at once, so that both medians cover the same prompts. If fewer than half the pairs
    (rounded up) are quiet, all are kept and `noisy` is set: the phase is reported as it was, and the
    counts of noisy runs say how much of it was."""
    def loud(r):
        return r.get("foreign_cores", 0.0) > noise_cores
    quiet = [i for i, (p, b) in enumerate(pairs) if not (loud(p) or loud(b))]
    enough = len(quiet) >= max(1, math.ceil(len(pairs) / 2))
    kept = quiet if enough else list(range(len(pairs)))
    return kept, {"pairs": len(pairs), "noisy_pairs": len(pairs) - len(quiet),
                  "noisy_pipeline_runs": sum(loud(p) for p, _ in pairs),
                  "noisy_baseline_runs": sum(loud(b) for _, b in pairs),
                  "dropped_pairs": len(pairs) - len(kept), "noisy": not enough}


def align_first_text(runs: list[dict], base_runs: list[dict], prompts: list[str], ask) -> tuple[dict, int]:
    """Give each pipeline run the decode count of the baseline's rule (decode_from_first_text). Where
    the greedy texts are equal the ids are the baseline's, so its first-text index holds; else the
    server is asked (ask(prompt): bench.load.first_text_index, an untimed request; None when that
    request failed, and the run then keeps tokens - 1). Returns {prompt: (index, text)} for the
    concurrency levels' runs and how many requests were asked."""
    known, asked = {}, 0
    for run, base, prompt in zip(runs, base_runs, prompts):
        if run.get("error"):
            continue
        if run["text"] == base["text"]:
            k = base["first_text_index"]
        else:
            k, asked = ask(prompt), asked + 1
        if k is None:
            run["first_text_unknown"] = True
            continue
        decode_from_first_text(run, k)
        known[prompt] = (k, run["text"])
    return known, asked


def level_first_text(runs: list[dict], prompts: list[str], known: dict) -> int:
    """The single-request phase's first-text index on a concurrency level's runs of the same prompt
    with the same text (greedy: the same ids); returns how many runs kept tokens - 1 (text differs)."""
    unknown = 0
    for run in runs:
        k, text = known.get(prompts[run["index"] % len(prompts)], (None, None))
        if run.get("error"):
            continue
        if k is not None and run["text"] == text:
            decode_from_first_text(run, k)
        else:
            unknown += 1
    return unknown


SINGLE_FIGURES = ("decode_tok_s", "decode_tok_s_pooled", "e2e_tok_s", "ttft_ms_p50", "ttft_ms_p95", "ttft_ms_max",
                  "aggregate_tok_s", "requests", "errors", "tokens", "prompt_tokens", "wall_s")


def paired_single(phase: dict, runs: list[dict], base_runs: list[dict], noise_cores: float) -> tuple[dict, dict, list[int]]:
    """The single-request figures of both sides over the same quiet prompt pairs (quiet_pairs).

    phase is the summary of every pipeline run (its traffic and timings come from /metrics, which saw
    them all; kept under all_runs); its figures, the level-1 aggregate included, are replaced by the
    kept pairs', and the baseline's come from the same pairs. errors stays the count over every run:
    a failed request is a failure even when its pair was noisy."""
    kept, noise = quiet_pairs(list(zip(runs, base_runs)), noise_cores)
    k_runs, k_base = [runs[i] for i in kept], [base_runs[i] for i in kept]
    single = {**phase, "all_runs": {k: phase[k] for k in SINGLE_FIGURES}}
    single.update(summarize(k_runs))
    single.update(errors=phase["errors"], noise=noise, noisy=noise["noisy"],
                  noisy_runs=noise["noisy_pipeline_runs"], noisy_runs_dropped=noise["dropped_pairs"])
    base = baseline_summary(k_base)
    base.update(noisy=noise["noisy"], noisy_runs=noise["noisy_baseline_runs"], noisy_runs_dropped=noise["dropped_pairs"])
    return single, base, kept


# ---- variants ----

def parse_variant(text: str) -> tuple[str, list[str], dict[str, str]]:
    """'LABEL=[ENV=VALUE ...] [main.py args ...]' -> (label, args, env)."""
    label, sep, spec = text.partition("=")
    if not sep or not re.fullmatch(r"[\w.+-]+", label):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected LABEL=SPEC, e.g. 't2=--threads 2'")
    args, env = [], {}
    for tok in shlex.split(spec):
        m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", tok)
        if m and not args:
            env[m.group(1)] = m.group(2)
        else:
            args.append(tok)
    return label, args, env


PRESET_VARIANTS = [
    "default=",                            # pinned threads, spinning on ranks with blocks, sleeping on rank 0
    "unpinned=OMP_PROC_BIND=false",        # the same, but the OS places the threads
    "spin=OMP_WAIT_POLICY=ACTIVE",         # every rank spins while computing, rank 0 too
    "sleep=OMP_WAIT_POLICY=PASSIVE",       # every rank's threads sleep between operations
    "threads1=--threads 1",                # one thread per rank
]


# ---- the phases ----

def prepare(model_dir: Path, seed: int, shape: str = "distilgpt2", schemes: tuple[str, ...] = ("fp32",)) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "bench.prepare", "--dir", str(model_dir), "--stages", "3",
                    "--seed", str(seed), "--shape", shape, "--schemes", ",".join(schemes)], cwd=ROOT, check=True)
    return time.monotonic() - t0


def default_model_dir(shape: str) -> Path:
    return ROOT / "bench" / "out" / ("model" if shape == "distilgpt2" else f"model-{shape}")


def hidden_size(config: dict) -> int:
    """The width of the vector sent between ranks (gpt2: n_embd; llama and the others: hidden_size)."""
    return int(config.get("hidden_size") or config["n_embd"])


def shard_figures(parts: Path) -> dict:
    """Per rank: the bytes of its stage file (what it holds in memory), from the manifest."""
    m = json.loads((parts / "manifest.json").read_text())
    per = {str(st["stage"]): int(st["bytes"]) for st in m["stages"]}
    return {"scheme": (m.get("quantization") or {}).get("scheme") or "fp32",
            "quantization": m.get("quantization"), "family": m.get("family"),
            "shard_bytes": per, "shard_bytes_total": sum(per.values())}


def baseline_summary(runs: list[dict]) -> dict:
    """Requests served one after another by the single process: single-request figures and the
    aggregate (all tokens over the sum of the request times: no gaps, no HTTP)."""
    single = summarize(runs)
    return {"single": single,
            "one_after_another": {"aggregate_tok_s": single["aggregate_tok_s"], "requests": single["requests"],
                                  "tokens": single["tokens"], "seconds": single["wall_s"]}}


def fifo_ttft(runs_seconds: list[float], runs_ttft: list[float], clients: int) -> dict:
    """Derived: `clients` requests arrive together and one process serves them one after another, so
    client i waits for the i requests before it, then for its own first token."""
    waits, before = [], 0.0
    for i in range(clients):
        j = i % len(runs_seconds)
        waits.append((before + runs_ttft[j]) * 1e3)
        before += runs_seconds[j]
    return {"clients": clients, "ttft_ms_p50": rnd(pct(waits, 50), 1), "ttft_ms_p95": rnd(pct(waits, 95), 1),
            "derived": True}


def proc_cpu(procs: dict) -> dict[int, float]:
    out = {}
    for rank, p in procs.items():
        try:
            t = p.cpu_times()
            out[rank] = t.user + t.system
        except psutil.Error:
            continue
    return out


def traffic(a: dict, b: dict, phase: dict, hidden: int, ranks: int) -> dict:
    """Bytes per generated token per hop between two /metrics snapshots.

    measured: everything rank r sent to r+1 (prefill rows, headers, the 2-second stats message) over
    the tokens generated; decode: the same less the prefill's extra prompt rows (a prefill hop carries
    one row per prompt token into the layers, and only the last one back), i.e. what one decode step
    costs per sequence; analytic: hidden*4 payload + the header (6 + 3 per sequence int32) for one
    sequence alone, and per sequence in the phase's mean micro-batch."""
    tokens = b["generated_tokens"] - a["generated_tokens"]
    steps = b["step_count"] - a["step_count"]
    prompt = phase["prompt_tokens"]
    requests = phase["requests"] - phase["errors"]
    hops = {}
    for r in range(ranks):
        sent = b["ranks"][r]["bytes_sent"] - a["ranks"][r]["bytes_sent"]
        extra = (prompt - requests) * hidden * 4 if r < ranks - 1 else 0
        hops[f"{r}->{(r + 1) % ranks}"] = {
            "bytes": int(sent), "measured_per_token": rnd(sent / tokens if tokens else None, 1),
            "decode_per_token": rnd((sent - extra) / tokens if tokens else None, 1)}
    per_batch = tokens / steps if steps else 1
    return {"tokens": int(tokens), "steps": int(steps), "mean_sequences_per_step": rnd(per_batch),
            "hops": hops,
            "analytic_one_sequence": hidden * 4 + 4 * (HEADER_INTS_FIXED + 3),
            "analytic_at_mean_batch": rnd(hidden * 4 + 4 * (3 + HEADER_INTS_FIXED / max(per_batch, 1)), 1)}


def breakdown(a: dict, b: dict, cpu0: dict, cpu1: dict, wall: float, ranks: int) -> dict:
    """Where a phase's time went, per rank: compute per micro-batch (the engine's and workers' own
    timers), CPU actually burnt (psutil; more than compute = polling/Python/HTTP), and the ring's
    round trip as rank 0 saw it."""
    steps = b["step_count"] - a["step_count"]
    out = {"steps": int(steps), "wall_s": rnd(wall, 3),
           "round_trip_ms": rnd((b["step_sum"] - a["step_sum"]) / steps * 1e3 if steps else None),
           "wall_per_step_ms": rnd(wall / steps * 1e3 if steps else None), "ranks": {}}
    for r in range(ranks):
        ra, rb = a["ranks"][r], b["ranks"][r]
        st = rb["steps"] - ra["steps"]
        comp = rb["compute_seconds"] - ra["compute_seconds"]
        cpu = cpu1.get(r, 0.0) - cpu0.get(r, 0.0)
        out["ranks"][str(r)] = {"compute_ms_per_step": rnd(comp / st * 1e3 if st else None),
                                "cpu_ms_per_step": rnd(cpu / st * 1e3 if st else None),
                                "compute_cores": rnd(comp / wall if wall else None, 3),
                                "cpu_cores": rnd(cpu / wall if wall else None, 3)}
    return out


def pipeline_phase(label: str, args_: list[str], env: dict, model_dir: Path, out: Path, prompts: list[str],
                   cfg: argparse.Namespace, hidden: int, base, parts: Path | None = None) -> dict:
    """One variant: start it, then (a) the single-request phase, paired with the baseline: the same
    prompt to each in turn, alternating who goes first, so both see the same machine; (b) each
    concurrency level, closed-loop clients, `rounds` requests each."""
    from bench.load import first_text_index, run_level
    from bench.server import Pipeline, fresh_metrics
    ranks = 3
    log = out / "logs" / f"pipeline-{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[bench] pipeline {label}: mpirun -np {ranks} main.py {' '.join(args_)}"
          f"{' with ' + ' '.join(f'{k}={v}' for k, v in env.items()) if env else ''}", flush=True)
    t0 = time.monotonic()
    parts = parts or model_dir / "parts"
    if not any(a.split("=")[0] == "--step-timeout" for a in args_):
        # the watchdog that stops a hung ring (8 s) must not fire on a shared machine whose neighbours
        # take the cores for a while, nor on a big model's prefill: it is a failure detector, not speed
        args_ = [*args_, "--step-timeout", str(cfg.step_timeout)]
    srv = Pipeline(parts, ranks, args_, env, log)
    res: dict = {"label": label, "args": args_, "env": env, "log": str(log), "parts": str(parts),
                 **shard_figures(parts)}
    try:
        health = srv.wait_healthy()
        res["startup_s"] = rnd(time.monotonic() - t0)
        res["stages"] = health["stages"]
        procs = srv.rank_processes()
        # warm-up: one request alone, then a burst as wide as the widest level (touches every slot)
        run_level(srv.url, prompts, 1, 1, 8)
        run_level(srv.url, prompts, max(cfg.clients), max(cfg.clients), 4)

        def finish(phase: dict, m0: dict, m1: dict, c0: dict, c1: dict, wall: float, machine: dict, clients: int):
            phase["clients"] = clients
            phase["traffic"] = traffic(m0, m1, phase, hidden, ranks)
            phase["time"] = breakdown(m0, m1, c0, c1, wall, ranks)
            phase["machine"] = machine
            phase["metrics_fresh"] = bool(m0.get("fresh") and m1.get("fresh"))
            print(f"[bench]   {clients:2d} client(s), {phase['requests']:2d} requests: {phase['aggregate_tok_s']} tok/s "
                  f"aggregate, decode {phase['decode_tok_s']} tok/s, TTFT p50 {phase['ttft_ms_p50']} ms "
                  f"p95 {phase['ttft_ms_p95']} ms, foreign CPU {machine['foreign_cores']} cores", flush=True)
            return phase

        # (a) single request, paired with the baseline. Each run is watched for other processes' CPU;
        # prompt pairs during which they took more than --noise-cores on either side are left out of
        # both sides' medians (if enough quiet ones remain): a 2-thread OpenMP baseline loses up to 15x
        # when a neighbour takes a core.
        m0 = fresh_metrics(srv.url, ranks)
        watch = CpuWatch(self_and_children).start()
        runs, base_runs, c1 = [], [], {}
        for i, prompt in enumerate(prompts):
            order = ("base", "pipe") if i % 2 == 0 else ("pipe", "base")
            for who in order:
                w = CpuWatch(self_and_children).start()
                if who == "base":
                    got = base.call(op="run", prompt=prompt, max_tokens=cfg.max_tokens)
                    got["foreign_cores"] = w.stop()["foreign_cores"]
                    base_runs.append(got)
                    continue
                a = proc_cpu(procs)
                got = run_level(srv.url, [prompt], 1, 1, cfg.max_tokens)[0][0]
                got["foreign_cores"] = w.stop()["foreign_cores"]
                b = proc_cpu(procs)
                for r in b:                                  # rank CPU while this request ran, summed
                    c1[r] = c1.get(r, 0.0) + b[r] - a.get(r, b[r])
                runs.append(got)
        machine = watch.stop()
        m1 = fresh_metrics(srv.url, ranks)
        # after the snapshot (its traffic and step figures are the timed runs' alone): where a text
        # differs from the baseline's, the server says which token first showed text (untimed)
        def ask(prompt: str) -> int | None:
            import httpx
            try:
                return first_text_index(srv.url, prompt, cfg.max_tokens)
            except httpx.HTTPError as err:     # an untimed extra: its failure must not lose the timed runs
                print(f"[bench]   could not ask where a text starts ({err}): that run keeps tokens - 1",
                      flush=True)
                return None
        known, asked = align_first_text(runs, base_runs, prompts, ask)
        m_next = fresh_metrics(srv.url, ranks) if asked else m1   # the next phase starts from here
        wall = sum(r["seconds"] for r in runs)
        phase = finish(summarize(runs, wall), m0, m1, {}, c1, wall, machine, 1)
        single, res["baseline_paired"], res["paired_kept"] = paired_single(phase, runs, base_runs, cfg.noise_cores)
        single["first_text_asked"] = asked
        single["first_text_unknown"] = sum(bool(r.get("first_text_unknown")) for r in runs)
        res["single"] = single
        res["single_runs"], res["baseline_paired_runs"] = runs, base_runs   # pair i: the same prompt
        same = sum(r["text"] == b["text"] for r, b in zip(runs, base_runs))
        res["greedy_text_equal_to_baseline"] = f"{same}/{len(runs)}"
        noise = single["noise"]
        print(f"[bench]   paired baseline: decode {res['baseline_paired']['single']['decode_tok_s']} tok/s, "
              f"TTFT p50 {res['baseline_paired']['single']['ttft_ms_p50']} ms; greedy texts equal "
              f"{res['greedy_text_equal_to_baseline']}; noisy runs: pipeline {noise['noisy_pipeline_runs']}, "
              f"baseline {noise['noisy_baseline_runs']}; prompt pairs left out {noise['dropped_pairs']} of "
              f"{noise['pairs']}{' (too few quiet: all kept, flagged noisy)' if noise['noisy'] else ''}", flush=True)
        m1 = m_next

        # (b) concurrency levels (level 1 is the single-request phase: one client, one request at a time);
        # a level during which other processes took more than --noise-cores is run again (bounded)
        res["levels"] = {"1": single}
        for n in cfg.clients:
            if n == 1:
                continue
            tries = []
            for _ in range(1 + cfg.noise_retries):
                m0, c0 = m1, proc_cpu(procs)      # nothing ran since the last snapshot
                watch = CpuWatch(self_and_children).start()
                runs, wall = run_level(srv.url, prompts, n, n * cfg.rounds, cfg.max_tokens)
                machine, c1 = watch.stop(), proc_cpu(procs)
                m1 = fresh_metrics(srv.url, ranks)
                unknown = level_first_text(runs, prompts, known)
                tries.append(finish(summarize(runs, wall), m0, m1, c0, c1, wall, machine, n))
                tries[-1]["runs_first_text_unknown"] = unknown   # their text differs: decode over tokens - 1
                if machine["foreign_cores"] <= cfg.noise_cores:
                    break
            best = min(tries, key=lambda t: t["machine"]["foreign_cores"])
            best["attempts_foreign_cores"] = [t["machine"]["foreign_cores"] for t in tries]
            res["levels"][str(n)] = best

        final = m1
        # the RSS target needs every rank's gauges, caught up with the last phase (fresh_metrics)
        res["final_metrics_fresh"] = bool(final.get("fresh"))
        res["peak_rss_mb"] = {str(r): rnd(v["peak_rss_bytes"] / 2**20, 1) for r, v in sorted(final["ranks"].items())
                              if "peak_rss_bytes" in v}
        res["rss_mb"] = {str(r): rnd(v["rss_bytes"] / 2**20, 1) for r, v in sorted(final["ranks"].items())
                         if "rss_bytes" in v}
        uss = {}
        for r, p in sorted(procs.items()):
            try:
                uss[str(r)] = rnd(p.memory_full_info().uss / 2**20, 1)
            except psutil.Error:
                continue
        res["uss_mb"] = uss   # memory unique to each rank (shared libraries not counted)
        res["peak_rss_total_mb"] = rnd(sum(res["peak_rss_mb"].values()), 1)
        # issue 12's rule: a rank's peak RSS is its shard plus the runtime (at most 300 MB)
        res["peak_rss_over_shard_mb"] = {r: rnd(v - res["shard_bytes"].get(r, 0) / 2**20, 1)
                                         for r, v in res["peak_rss_mb"].items()}
    finally:
        res["exit_code"] = srv.stop()
        res["seconds"] = rnd(time.monotonic() - t0, 1)
    return res


# ---- ratios, table, plot ----

def div(a, b, nd=3):
    """a / b rounded, or None where either figure is missing (or b is 0)."""
    return rnd(a / b, nd) if a is not None and b else None


def ratios(pooled: dict, pipe: dict, top: int) -> dict:
    """The pipeline against the baseline runs paired with it (same minutes, same machine load)."""
    paired = pipe["baseline_paired"]
    lvl = pipe["levels"].get(str(top), {})
    return {"single_decode": rnd(over_paired(pipe), 3),
            "single_e2e": div(pipe["single"]["e2e_tok_s"], paired["single"]["e2e_tok_s"]),
            "single_ttft": div(pipe["single"]["ttft_ms_p50"], paired["single"]["ttft_ms_p50"]),
            f"aggregate_{top}_vs_one_after_another": div(lvl.get("aggregate_tok_s"),
                                                         paired["one_after_another"]["aggregate_tok_s"]),
            f"aggregate_{top}_vs_batched_reference": div(lvl.get("aggregate_tok_s"),
                                                         (pooled.get("batched_reference") or {}).get("aggregate_tok_s")),
            "peak_rss_total_vs_single_process": div(pipe.get("peak_rss_total_mb"), pooled["peak_rss_mb"])}


def over_paired(pipe: dict) -> float | None:
    """A pipeline's single-request decode over that of the baseline runs paired with it: the baseline
    ran in the same minutes, so this factors out the machine's drift between pipelines."""
    a, b = pipe["single"]["decode_tok_s"], pipe["baseline_paired"]["single"]["decode_tok_s"]
    return a / b if a is not None and b else None


def quant_ratios(pipes: dict) -> dict:
    """--quantize: each scheme against the fp32 pipeline of the same run (same weights).

    The pipelines run minutes apart, so the raw ratio of their decode rates carries the machine's
    drift between them; the normalized one divides each by its own paired baseline first,
    (scheme / its baseline) / (fp32 / its baseline), and is the one the target is judged on."""
    ref = pipes.get("fp32")
    if ref is None:
        return {}
    out = {}
    for k, p in pipes.items():
        norm = over_paired(p), over_paired(ref)
        out[k] = {"single_decode_vs_fp32_pipeline": div(p["single"]["decode_tok_s"], ref["single"]["decode_tok_s"]),
                  "single_decode_vs_fp32_pipeline_normalized": div(norm[0], norm[1]),
                  "shard_bytes_vs_fp32": rnd(p["shard_bytes_total"] / ref["shard_bytes_total"], 3)}
    return out


def verdict(value, ok) -> bool | None:
    """ok(value) as a bool, or None where the figure is missing: no figure is no verdict, not a pass
    nor a miss (the run then exits non-zero)."""
    return None if value is None else bool(ok(value))


def rss_verdict(pipe: dict, ranks: int, limit_mb: float) -> bool | None:
    """Every rank's peak RSS over its shard within limit_mb (MB, issue 12), judged only on one figure
    per rank from a final /metrics snapshot that had caught up (fresh): stale or missing gauges give
    no verdict rather than a pass over an empty or old set."""
    over = pipe.get("peak_rss_over_shard_mb") or {}
    if not pipe.get("final_metrics_fresh") or sorted(over) != [str(r) for r in range(ranks)] \
            or any(v is None for v in over.values()):
        return None
    return all(v <= limit_mb * 1e6 / 2**20 for v in over.values())


def targets_met(rat: dict, qrat: dict, pipes: dict, top: int, target_single: float, ranks: int = 3) -> dict:
    """Per pipeline, each target's verdict (True, False, or None where its figure is missing)."""
    met = {k: {"single": verdict(r["single_decode"], lambda v: v >= target_single),
               "aggregate": verdict(r[f"aggregate_{top}_vs_one_after_another"], lambda v: v >= TARGET_AGGREGATE),
               "peak_rss_within_shard_plus_300mb": rss_verdict(pipes[k], ranks, TARGET_RSS_OVER_SHARD_MB)}
           for k, r in rat.items()}
    if "int8" in qrat:
        met["int8"]["single_vs_fp32_pipeline"] = verdict(qrat["int8"]["single_decode_vs_fp32_pipeline_normalized"],
                                                         lambda v: v >= TARGET_INT8_SPEEDUP)
    if "int4" in qrat:
        met["int4"]["shard_bytes_vs_fp32"] = verdict(qrat["int4"]["shard_bytes_vs_fp32"], lambda v: v <= TARGET_INT4_BYTES)
    return met


def best_variant(rat: dict, top: int, target_single: float) -> str:
    """The variant with the highest min(single ratio / its target, aggregate ratio / its target): the
    one closest to meeting both (a missing figure counts as 0)."""
    def score(k):
        r = rat[k]
        s, g = r["single_decode"] or 0, r[f"aggregate_{top}_vs_one_after_another"] or 0
        return min(s / target_single, g / TARGET_AGGREGATE)
    return max(rat, key=score)


def show(v, spec: str = "") -> str:
    """A figure for the table, "—" where it is missing (None)."""
    return "—" if v is None else format(v, spec)


def markdown(results: dict) -> str:
    base, pipes, cfg, rat = results["baseline"], results["pipelines"], results["config"], results["ratios"]
    top = max(cfg["clients"])
    target_single = results["targets"]["single_decode"]
    qrat = results.get("quantized_ratios") or {}
    labels = list(pipes)
    # the transformers column pools the paired runs of every pipeline (their kept pairs); each × is
    # against the runs paired with that pipeline alone (the "paired baseline runs" row)
    rows = ["| figure | transformers, one process (all pipelines' paired runs) | " + " | ".join(f"pipeline `{k}`" for k in labels) + " | target |",
            "|" + "---|" * (len(labels) + 3)]

    def row(name, b, cells, target=""):
        rows.append(f"| {name} | {b} | " + " | ".join(str(c) for c in cells) + f" | {target} |")

    def x(v, r):
        return "—" if v is None else f"{v} ({r}×)" if r is not None else f"{v}"
    row("single request, decode tok/s", show(base["single"]["decode_tok_s"]),
        [x(pipes[k]["single"]["decode_tok_s"], rat[k]["single_decode"]) for k in labels], f"≥ {target_single}×")
    if qrat:
        row("  single request decode over the fp32 pipeline's (raw: pipelines measured minutes apart)", "",
            [f"{show(qrat[k]['single_decode_vs_fp32_pipeline'])}×" for k in labels])
        row("  the same, each over its paired baseline first (the target's figure)", "",
            [f"{show(qrat[k]['single_decode_vs_fp32_pipeline_normalized'])}×" for k in labels],
            f"int8 ≥ {TARGET_INT8_SPEEDUP}×")
    row("  the paired baseline runs (denominator of ×)", "", [show(pipes[k]["baseline_paired"]["single"]["decode_tok_s"])
                                                          for k in labels])
    floors = [pipes[k].get("matmul_floor") for k in labels]
    if all(floors):
        cells = []
        for k, f in zip(labels, floors):
            ceiling = div(f["max_tok_s"], pipes[k]["baseline_paired"]["single"]["decode_tok_s"], 2)
            dec = pipes[k]["single"]["decode_tok_s"]
            reached = div(100 * dec, f["max_tok_s"], 0) if dec is not None else None
            cells.append(f"{f['ms_per_token']:.1f} ms: ≤ {f['max_tok_s']:.0f} tok/s (≤ {show(ceiling)}×; "
                         f"{show(reached, '.0f')} % reached)")
        row("  one request's matmuls alone (`python -m bench.floor`): ms per token, the most tok/s", "", cells)
    row(f"single request, end-to-end tok/s (prompt + {cfg['max_tokens']} tokens)", show(base["single"]["e2e_tok_s"]),
        [x(pipes[k]["single"]["e2e_tok_s"], rat[k]["single_e2e"]) for k in labels])
    row("single request, time to first text p50, ms", show(base["single"]["ttft_ms_p50"]),
        [x(pipes[k]["single"]["ttft_ms_p50"], rat[k]["single_ttft"]) for k in labels])
    seq = base["one_after_another"]["aggregate_tok_s"]
    for n in cfg["clients"]:
        cells = []
        for k in labels:
            v = pipes[k]["levels"].get(str(n), {}).get("aggregate_tok_s")
            ps = pipes[k]["baseline_paired"]["one_after_another"]["aggregate_tok_s"]
            cells.append(x(v, rnd(v / ps, 2) if v and ps else None))
        row(f"aggregate tok/s, {n} concurrent client{'s' if n > 1 else ''}", f"{show(seq)} (one after another)", cells,
            f"≥ {TARGET_AGGREGATE}×" if n == top else "")
    f = base["fifo_ttft"]
    row(f"time to first token p50 / p95 at {top} clients, ms",
        f"{show(f['ttft_ms_p50'])} / {show(f['ttft_ms_p95'])} (one after another, derived)",
        [f"{show(pipes[k]['levels'][str(top)]['ttft_ms_p50'])} / {show(pipes[k]['levels'][str(top)]['ttft_ms_p95'])}"
         for k in labels],
        "report")
    for name, lv in (("single request", "1"), (f"{top} clients", str(top))):
        hop_names = " / ".join(next(iter(pipes.values()))["levels"][lv]["traffic"]["hops"])
        cells = []
        for k in labels:
            t = pipes[k]["levels"][lv]["traffic"]
            hops = " / ".join(show(h["decode_per_token"], ".0f") for h in t["hops"].values())
            cells.append(f"{hops} (analytic {t['analytic_at_mean_batch']:.0f})")
        row(f"bytes per token per hop, {name} (hops {hop_names})", "—", cells)
    row("peak RSS, MiB (per rank; sum)", f"{base['peak_rss_mb']} (one process)",
        [" / ".join(f"{v:.0f}" for v in pipes[k]["peak_rss_mb"].values()) + f"; {pipes[k]['peak_rss_total_mb']:.0f}"
         for k in labels])
    row("shard bytes, MiB (per rank; sum)", f"{results['meta'].get('hf_bytes', 0) / 2**20:.0f} (the model's files)",
        [" / ".join(f"{v / 2**20:.1f}" for v in pipes[k]["shard_bytes"].values())
         + f"; {pipes[k]['shard_bytes_total'] / 2**20:.1f}"
         + (f" ({qrat[k]['shard_bytes_vs_fp32']}× fp32)" if qrat else "") for k in labels],
        f"int4 ≤ {TARGET_INT4_BYTES}× fp32" if qrat else "")
    row("peak RSS minus shard, MiB (per rank)", "",
        [" / ".join(f"{v:.0f}" for v in pipes[k]["peak_rss_over_shard_mb"].values()) for k in labels],
        f"≤ {TARGET_RSS_OVER_SHARD_MB} MB")
    if base.get("batched_reference"):
        br = base["batched_reference"]
        row(f"reference: transformers, one generate over {br['batch']} prompts, tok/s", br["aggregate_tok_s"],
            [x(pipes[k]["levels"].get(str(top), {}).get("aggregate_tok_s"),
               rat[k][f"aggregate_{top}_vs_batched_reference"]) for k in labels])
    row(f"other processes' CPU, cores: single-request phase / {top} clients", "",
        [f"{pipes[k]['single']['machine']['foreign_cores']} / {pipes[k]['levels'][str(top)]['machine']['foreign_cores']}"
         for k in labels])
    row(f"single-request prompt pairs left out of both sides (either run > {cfg['noise_cores']} cores of others) / "
        "noisy runs, pipeline / baseline", noise_cell(base.get("noisy_runs_dropped", 0), None, base.get("noisy_runs", 0),
                                                      base.get("noisy")),
        [noise_cell(pipes[k]["single"]["noisy_runs_dropped"], pipes[k]["single"]["noisy_runs"],
                    pipes[k]["baseline_paired"]["noisy_runs"], pipes[k]["single"]["noisy"]) for k in labels])
    return "\n".join(rows)


def noise_cell(dropped: int, noisy_pipe: int | None, noisy_base: int, flagged: bool) -> str:
    """Pairs dropped / noisy runs per side; flagged when too few pairs were quiet and all were kept."""
    runs = f"{noisy_base}" if noisy_pipe is None else f"{noisy_pipe} / {noisy_base}"
    return f"{dropped}; noisy {runs}" + (" (too few quiet: all kept, NOISY)" if flagged else "")


def nan_if_none(v) -> float:
    """A missing figure as a gap in a line plot."""
    return float("nan") if v is None else v


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    base, pipes, cfg = results["baseline"], results["pipelines"], results["config"]
    clients = cfg["clients"]
    target_single = results["targets"]["single_decode"]
    fig, (ax, bx, mx) = plt.subplots(1, 3, figsize=(17, 6), gridspec_kw={"width_ratios": [3, 2, 2]})
    seq = base["one_after_another"]["aggregate_tok_s"]
    for k, p in pipes.items():
        ax.plot(clients, [nan_if_none(p["levels"][str(n)]["aggregate_tok_s"]) for n in clients], "o-",
                label=f"pipeline, 3 ranks ({k})")
    if seq is not None:
        ax.plot(clients, [seq] * len(clients), "s--", color="gray", label="transformers, one after another")
        ax.plot(clients, [seq * TARGET_AGGREGATE] * len(clients), ":", color="red",
                label=f"target at {max(clients)}: {TARGET_AGGREGATE}× one after another")
    if base.get("batched_reference"):
        br = base["batched_reference"]
        ax.plot([br["batch"]], [br["aggregate_tok_s"]], "*", ms=12, color="black",
                label=f"reference: transformers, batch of {br['batch']} in one generate")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_xticks(clients)
    ax.set_title(f"Aggregate throughput ({cfg['max_tokens']} new tokens per request, greedy)")
    ax.grid(alpha=.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    names = ["transformers"] + [f"pipeline\n{k}" for k in pipes]
    vals = [base["single"]["decode_tok_s"]] + [p["single"]["decode_tok_s"] for p in pipes.values()]
    bars = bx.bar(names, [v or 0 for v in vals], color=["gray"] + [f"C{i}" for i in range(len(pipes))])
    if base["single"]["decode_tok_s"] is not None:
        bx.axhline(base["single"]["decode_tok_s"] * target_single, color="red", ls=":",
                   label=f"target {target_single}× baseline")
    for b_, v in zip(bars, vals):
        bx.text(b_.get_x() + b_.get_width() / 2, v or 0, show(v, ".1f"), ha="center", va="bottom", fontsize=8)
    bx.set_ylabel("decode tokens/s")
    bx.set_title("Single request")
    if bx.get_legend_handles_labels()[0]:
        bx.legend(fontsize=8)
    # memory: per pipeline, each rank's shard bytes and what its peak RSS adds on top
    import numpy as np
    width = 0.8 / max(len(pipes), 1)
    for i, (k, p) in enumerate(pipes.items()):
        ranks = list(p["shard_bytes"])
        xs = np.arange(len(ranks)) + i * width
        shard = [p["shard_bytes"][r] / 2**20 for r in ranks]
        over = [max(p["peak_rss_mb"].get(r, 0) - s_, 0) for r, s_ in zip(ranks, shard)]
        mx.bar(xs, shard, width, color=f"C{i}", label=f"{k}: shard")
        mx.bar(xs, over, width, bottom=shard, color=f"C{i}", alpha=0.35, label=f"{k}: peak RSS above it")
    mx.set_xticks(np.arange(3) + width * (len(pipes) - 1) / 2)
    mx.set_xticklabels([f"rank {r}" for r in range(3)])
    mx.set_ylabel("MiB")
    mx.set_title(f"Memory per rank (target: peak RSS ≤ shard + {TARGET_RSS_OVER_SHARD_MB} MB)", fontsize=9)
    mx.legend(fontsize=7)
    fig.suptitle(f"shardline vs transformers, {results['meta']['model']}, {results['meta']['cores']} cores",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the command ----

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run (about a minute): 4 prompts, 16 tokens, 1 round")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="results.json, plot.png, logs (bench/out)")
    ap.add_argument("--model-dir", type=Path, default=None, help="weights cache, reused across runs (default bench/out/model)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="new tokens per request, at least 2: decode is timed between tokens (64; quick 16)")
    ap.add_argument("--prompts", type=int, default=None, help="requests in the single-request phase (16; quick 4)")
    ap.add_argument("--clients", default="1,4,8,16", help="concurrency levels (default 1,4,8,16)")
    ap.add_argument("--rounds", type=int, default=None, help="requests per client at each level above 1 (2; quick 1)")
    ap.add_argument("--baseline-threads", type=int, default=os.cpu_count() or 1, help="torch threads (all cores)")
    ap.add_argument("--no-batched-reference", action="store_true", help="skip the batched transformers reference")
    ap.add_argument("--variant", action="append", type=parse_variant, default=[], metavar="LABEL=SPEC",
                    help="a pipeline to measure: env assignments then main.py args, e.g. "
                         "'t2=OMP_WAIT_POLICY=PASSIVE --threads 2' (repeatable; default: 'default=')")
    ap.add_argument("--try-variants", action="store_true", help="measure the preset variants: " + ", ".join(PRESET_VARIANTS))
    ap.add_argument("--noise-cores", type=float, default=0.2,
                    help="other processes' CPU (cores) above which a run is noisy: single-request runs are left out "
                         "of the medians, a concurrency level is run again (default 0.2)")
    ap.add_argument("--noise-retries", type=int, default=1, help="reruns of a noisy concurrency level (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="weights seed")
    ap.add_argument("--step-timeout", type=float, default=120.0,
                    help="main.py --step-timeout for every pipeline unless a variant sets it (default 120 s)")
    ap.add_argument("--shape", choices=SHAPES, default="distilgpt2",
                    help="model shape, random weights, the same bytes on both sides (default distilgpt2)")
    ap.add_argument("--quantize", default=None, metavar="fp32,int8,int4",
                    help="one pipeline per scheme (splitter --quantize) from the same weights, each against "
                         "transformers fp32; shard bytes and peak RSS per rank beside them. Must include fp32: "
                         "the int8/int4 targets are ratios to the fp32 pipeline")
    ap.add_argument("--boards", type=int, metavar="N", help="instead: one emulated board against N over TCP "
                    "(root; bench/boards.py, its options: python -m bench --boards N --help)")
    a = ap.parse_args(argv)
    a.max_tokens = a.max_tokens if a.max_tokens is not None else (16 if a.quick else 64)
    a.prompts = a.prompts if a.prompts is not None else (4 if a.quick else 16)
    a.rounds = a.rounds if a.rounds is not None else (1 if a.quick else 2)
    if a.max_tokens < 2:
        ap.error(f"--max-tokens {a.max_tokens}: at least 2 (the decode rate is timed from the first token to the last)")
    if a.prompts < 1 or a.rounds < 1:
        ap.error("--prompts and --rounds: at least 1")
    a.clients = sorted({int(c) for c in a.clients.split(",") if c.strip()})
    if not a.clients or min(a.clients) < 1:
        ap.error("--clients: positive integers")
    if 1 not in a.clients:
        a.clients = [1, *a.clients]
    if a.try_variants:
        a.variant = [parse_variant(v) for v in PRESET_VARIANTS] + a.variant
    a.variant = a.variant or [parse_variant("default=")]
    a.schemes = ("fp32",)
    if a.quantize is not None:
        a.schemes = tuple(dict.fromkeys(s.strip() for s in a.quantize.split(",") if s.strip()))
        bad = [s for s in a.schemes if s not in ("fp32", "int8", "int4")]
        if bad or not a.schemes:
            ap.error(f"--quantize {a.quantize!r}: a comma-separated list of fp32, int8, int4 (unknown: {bad})")
        if "fp32" not in a.schemes:
            # refused rather than added: the int8/int4 targets are ratios to the fp32 pipeline, and a run
            # that silently measured one more pipeline than asked would take minutes more
            ap.error(f"--quantize {a.quantize!r}: include fp32 (the int8 and int4 targets are ratios to the "
                     "fp32 pipeline of the same run)")
        if len(a.variant) > 1:
            ap.error("--quantize measures one pipeline per scheme: give at most one --variant (its args apply to each)")
        _, v_args, v_env = a.variant[0]
        a.variant = [(s, v_args, v_env) for s in a.schemes]
    if len({v[0] for v in a.variant}) != len(a.variant):
        ap.error("--variant labels must differ")
    if a.prompts > len(PROMPTS):
        a.prompts_list = [PROMPTS[i % len(PROMPTS)] for i in range(a.prompts)]
    else:
        a.prompts_list = PROMPTS[:a.prompts]
    return a


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> int:
    if any(a.split("=")[0] == "--boards" for a in (sys.argv[1:] if argv is None else argv)):
        from bench.boards import main as boards_main
        return boards_main(argv)
    from bench.baseline import Worker
    cfg = parse_args(argv)
    t_run = time.monotonic()
    out = cfg.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    model_dir = (cfg.model_dir or default_model_dir(cfg.shape)).resolve()
    durations = {"weights_s": rnd(prepare(model_dir, cfg.seed, cfg.shape, cfg.schemes), 1)}
    from bench.prepare import parts_dir
    parts = {label: parts_dir(model_dir, label if cfg.quantize is not None else "fp32") for label, _, _ in cfg.variant}
    hidden = hidden_size(json.loads((next(iter(parts.values())) / "manifest.json").read_text())["config"])
    target_single = TARGETS_SINGLE[cfg.shape]
    top = max(cfg.clients)
    prompts = cfg.prompts_list

    from bench.floor import matmul_floor
    t0 = time.monotonic()
    print(f"[bench] baseline: transformers generate in its own process, {cfg.baseline_threads} threads, greedy, "
          f"KV cache; its requests alternate with the pipeline's in the single-request phase", flush=True)
    worker = Worker(model_dir / "hf", cfg.baseline_threads, out / "logs" / "baseline.log")
    durations["baseline_start_s"] = rnd(time.monotonic() - t0, 1)
    pipes = {}
    try:
        for label, args_, env in cfg.variant:
            # The matmul floor of one request on this variant's split, measured just before its pipeline
            # starts, while nothing else runs: this VM's memory bandwidth drifts between runs and within
            # one (distilgpt2's floor was 8.1 ms in one run, 12.9 in another), so it is paired in time.
            t0 = time.monotonic()
            floor = matmul_floor(parts[label], repeats=5)
            durations[f"matmul_floor_{label}_s"] = rnd(time.monotonic() - t0, 1)
            print(f"[bench] matmuls alone ({parts[label].name}): {floor['ms_per_token']} ms per token, at most "
                  f"{floor['max_tok_s']} tok/s for one request", flush=True)
            pipes[label] = pipeline_phase(label, args_, env, model_dir, out, prompts, cfg, hidden, worker,
                                          parts[label])
            durations[f"pipeline_{label}_s"] = pipes[label]["seconds"]
            pipes[label]["matmul_floor"] = floor
        t0 = time.monotonic()
        before_batched = worker.call(op="stats")
        batched = None
        if not cfg.no_batched_reference:
            for _ in range(1 + cfg.noise_retries):
                watch = CpuWatch(self_and_children).start()
                got = worker.call(op="batched", prompts=[prompts[i % len(prompts)] for i in range(top)],
                                  max_tokens=cfg.max_tokens)
                got["cpu"] = watch.stop()
                if batched is None or got["cpu"]["foreign_cores"] < batched["cpu"]["foreign_cores"]:
                    batched = got
                if got["cpu"]["foreign_cores"] <= cfg.noise_cores:
                    break
        after = worker.call(op="stats")
        durations["baseline_batched_s"] = rnd(time.monotonic() - t0, 1)
    finally:
        worker.close()

    # the transformers column: every pipeline's paired baseline runs, less the pairs each left out
    runs = [p["baseline_paired_runs"][i] for p in pipes.values() for i in p["paired_kept"]]
    base = {"threads": cfg.baseline_threads, "load_seconds": rnd(worker.ready["load_seconds"]),
            **baseline_summary(runs),
            "noisy_runs": sum(p["baseline_paired"]["noisy_runs"] for p in pipes.values()),
            "noisy_runs_dropped": sum(p["baseline_paired"]["noisy_runs_dropped"] for p in pipes.values()),
            "noisy": any(p["baseline_paired"]["noisy"] for p in pipes.values()),
            "fifo_ttft": fifo_ttft([r["seconds"] for r in runs], [r["ttft_s"] for r in runs], top),
            "rss_after_load_mb": rnd(worker.ready["rss_after_load_bytes"] / 2**20, 1),
            "peak_rss_mb": rnd(before_batched["peak_rss_bytes"] / 2**20, 1),
            "peak_rss_after_batched_mb": rnd(after["peak_rss_bytes"] / 2**20, 1)}
    if batched:
        base["batched_reference"] = {"batch": batched["batch"], "tokens": batched["tokens"],
                                     "seconds": rnd(batched["seconds"], 3),
                                     "aggregate_tok_s": rnd(batched["tokens"] / batched["seconds"]),
                                     "ttft_ms": rnd(batched["ttft_s"] * 1e3, 1), "machine": batched["cpu"]}
    print(f"[bench] baseline, all pipelines' kept paired runs: decode {base['single']['decode_tok_s']} tok/s, TTFT p50 "
          f"{base['single']['ttft_ms_p50']} ms; one after another {base['one_after_another']['aggregate_tok_s']} tok/s; "
          f"batched reference {(base.get('batched_reference') or {}).get('aggregate_tok_s')} tok/s", flush=True)
    durations["total_s"] = rnd(time.monotonic() - t_run, 1)

    rat = {k: ratios(base, p, top) for k, p in pipes.items()}
    best = best_variant(rat, top, target_single)
    qrat = quant_ratios(pipes) if cfg.quantize is not None else {}
    met = targets_met(rat, qrat, pipes, top, target_single)
    hf_bytes = sum(f.stat().st_size for f in (model_dir / "hf").glob("*.safetensors"))
    results = {
        "meta": {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(), "host": platform.node(),
                 "cores": os.cpu_count(), "python": platform.python_version(), "durations": durations,
                 "weights": str(model_dir), "model": f"random {cfg.shape}-shaped weights (seed {cfg.seed})",
                 "shape": cfg.shape, "hf_bytes": hf_bytes},
        "config": {"quick": cfg.quick, "max_tokens": cfg.max_tokens, "prompts": len(prompts), "clients": cfg.clients,
                   "rounds": cfg.rounds, "baseline_threads": cfg.baseline_threads, "greedy": True,
                   "noise_cores": cfg.noise_cores, "noise_retries": cfg.noise_retries,
                   "hidden_size": hidden, "ranks": 3, "shape": cfg.shape,
                   "quantize": list(cfg.schemes) if cfg.quantize is not None else None},
        "targets": {"single_decode": target_single, f"aggregate_{top}_vs_one_after_another": TARGET_AGGREGATE,
                    "peak_rss_over_shard_mb": TARGET_RSS_OVER_SHARD_MB,
                    **({"int8_single_vs_fp32_pipeline": TARGET_INT8_SPEEDUP,
                        "int4_shard_bytes_vs_fp32": TARGET_INT4_BYTES} if cfg.quantize is not None else {})},
        "baseline": base,
        "pipelines": pipes,
        "ratios": rat,
        "quantized_ratios": qrat,
        "best_variant": best,
        "targets_met": met,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (out / "results.md").write_text(table + "\n")
    plot(results, out / "plot.png")
    print()
    print(table)
    print()
    print(f"[bench] best variant: {best}; wrote {out / 'results.json'}, {out / 'plot.png'}, {out / 'results.md'} "
          f"in {durations['total_s']}s", flush=True)
    return failures(pipes, met, out / "logs")


def failures(pipes: dict, met: dict, logs: Path) -> int:
    """The run's exit status: 1 when a request failed, a pipeline did not stop cleanly (its exit code,
    0 for the clean SIGTERM to rank 0), or a target has no verdict (its figure is missing, e.g. stale
    or incomplete per-rank memory gauges), each said on stderr; else 0."""
    problems = []
    for k, p in pipes.items():
        if any(lv["errors"] for lv in p["levels"].values()):
            problems.append(f"{k}: requests failed")
        if p.get("exit_code") != 0:
            problems.append(f"{k}: the pipeline exited with {p.get('exit_code')}")
        problems += [f"{k}: no figure for the {t} target" for t, v in met.get(k, {}).items() if v is None]
    for line in problems:
        print(f"[bench] {line} (see the logs in {logs})", file=sys.stderr)
    return 1 if problems else 0
