"""Micro-benchmark of the candidate quantized matmul kernels at the shapes the stages really run.

    python -m bench.kernels                   # 2 threads, shapes 576x1536 and 2048x8192, 1 and 16 rows
    python -m bench.kernels --rows 1,16,128 --threads 2 --json kernels.json

Each candidate computes y = x @ W^T for W [out, in] and x [rows, in] float32, and is timed *including*
whatever conversion of the activations it needs (fp32 -> bf16 and back), because the stage pays it.
The weight is packed once, outside the timing. The error column is the largest |y - y_fp32| relative
to max |y_fp32| (it includes the weight quantization error: a sanity check, not the accuracy study;
that is bench/accuracy.py).

Candidates: fp32 and bf16 F.linear; fp32 oneDNN (the stages' float kernel on x86-64); PyTorch's weight-only kernels (aten._weight_int8pack_mm,
aten._weight_int4pack_mm_for_cpu) with fp32 and bf16 activations; the dynamic int8 kernels of
torch.ao (fbgemm/x86 and qnnpack engines: quantized.linear_dynamic); torchao's configs
(Int8WeightOnly, Int8DynamicActivationInt8Weight, Int4WeightOnly) where they run on CPU; and the
kernel shardline.quant.QLinear picks on this machine.

torchao is not a pinned dependency: its rows need `pip install torchao==0.18.0` by hand (measured
that way on torch 2.13: its CPU int8 weight-only path expands the int8 weight to float on every call
in eager mode, its dynamic int8 path runs torch._int_mm after quantizing activations per row, and its
int4 weight-only config needs the `mslk` GPU kernels; once installed, transformers imports it in
every process, which prints load errors for its CUDA libraries). Without it those rows say so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = ((576, 1536), (2048, 8192))  # [out, in]: SmolLM2-135M's down_proj, TinyLlama-1.1B's down_proj


def _timeit(fn: Callable[[], torch.Tensor], budget_s: float) -> float:
    """Median seconds of fn() over at least 5 calls and about budget_s."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < 500):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- candidates: each takes (w [out,in] fp32, bias None) and returns f(x fp32) -> fp32 ------------


def fp32_linear(w):
    return lambda x: F.linear(x, w)


def fp32_onednn(w):
    """The stages' float kernel on x86-64 (shardline/models/linear.py): oneDNN's matmul on the weight
    read [in, out] (passed as its transposed view)."""
    wt = w.t().contiguous()
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, wt.t(), None, "none", [], "")


def bf16_linear(w):
    wb = w.to(torch.bfloat16)
    return lambda x: F.linear(x.to(torch.bfloat16), wb).float()


def _int8_parts(w):
    from shardline.quant import quantize
    return quantize(w, "int8")


def int8pack(act_dtype):
    def make(w):
        p = _int8_parts(w)
        q, s = p["qweight"], p["scales"].to(act_dtype)
        if act_dtype == torch.float32:
            return lambda x: torch.ops.aten._weight_int8pack_mm(x, q, s)
        return lambda x: torch.ops.aten._weight_int8pack_mm(x.to(act_dtype), q, s).float()
    make.__name__ = f"aten._weight_int8pack_mm, {str(act_dtype)[6:]} act"
    return make


def int4pack(act_dtype, group_size):
    def make(w):
        from shardline.quant import QLinear, quantize
        ql = QLinear.from_parts(quantize(w, "int4", group_size), "int4", act_dtype=act_dtype)
        return ql
    make.__name__ = f"aten._weight_int4pack_mm_for_cpu g{group_size}, {str(act_dtype)[6:]} act"
    return make


def dynamic_int8(engine):
    def make(w):
        torch.backends.quantized.engine = engine
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        if engine == "qnnpack":  # qnnpack's dynamic linear takes per-tensor weights only in older builds
            try:
                packed = torch.ops.quantized.linear_prepack(qw, None)
            except RuntimeError:
                qw = torch.quantize_per_tensor(w, float(scale.max()), 0, torch.qint8)
                packed = torch.ops.quantized.linear_prepack(qw, None)
        else:
            packed = torch.ops.quantized.linear_prepack(qw, None)
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)
    make.__name__ = f"quantized.linear_dynamic ({engine}), int8 act per tensor"
    return make


def torchao_cfg(cfg_name, model_dtype, **kw):
    def make(w):
        import torchao.quantization as tq
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        lin = lin.to(model_dtype)
        tq.quantize_(lin, getattr(tq, cfg_name)(**kw))
        if model_dtype == torch.float32:
            return lambda x: lin(x)
        return lambda x: lin(x.to(model_dtype)).float()
    make.__name__ = f"torchao {cfg_name}{kw or ''}, {str(model_dtype)[6:]}"
    return make


def shardline_qlinear(scheme):
    def make(w):
        from shardline.quant import QLinear, quantize
        return QLinear.from_parts(quantize(w, scheme), scheme)
    make.__name__ = f"shardline.quant.QLinear {scheme} (this machine's pick)"
    return make


def candidates():
    bf, f32 = torch.bfloat16, torch.float32
    return [
        fp32_linear, *([fp32_onednn] if torch.backends.mkldnn.is_available() else []), bf16_linear,
        int8pack(f32), int8pack(bf),
        int4pack(f32, 32), int4pack(bf, 32), int4pack(bf, 64), int4pack(bf, 128),
        dynamic_int8("x86"), dynamic_int8("qnnpack"),
        torchao_cfg("Int8WeightOnlyConfig", f32), torchao_cfg("Int8WeightOnlyConfig", bf),
        torchao_cfg("Int8DynamicActivationInt8WeightConfig", f32),
        torchao_cfg("Int4WeightOnlyConfig", bf, group_size=32),
        shardline_qlinear("int8"), shardline_qlinear("int4"),
    ]


def run(shapes, rows, threads: int, budget_s: float, only: str | None = None, rounds: int = 5) -> list[dict]:
    """Times every candidate at every shape and row count. The machine is shared, so the candidates
    are timed in interleaved rounds and each keeps its fastest round: a burst of someone else's work
    slows one round of every candidate instead of all of one candidate."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    results = []
    engine0 = torch.backends.quantized.engine
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f) * in_f ** -0.5
        xs = {m: torch.randn(m, in_f) for m in rows}
        refs = {m: F.linear(xs[m], w) for m in rows}
        built = []
        for make in candidates():
            name = make.__name__
            if only and name != "fp32_linear" and not any(o in name for o in only.split(",")):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    built.append((name, make(w)))
            except Exception as e:  # noqa: BLE001 - a candidate that does not run here is a finding
                results.append({"shape": f"{out_f}x{in_f}", "kernel": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            torch.backends.quantized.engine = engine0
        for m in rows:
            x = xs[m]
            cells = {}
            for name, f in built:
                try:
                    with torch.inference_mode():
                        y = f(x)
                    cells[name] = {"shape": f"{out_f}x{in_f}", "rows": m, "kernel": name, "ms": float("inf"),
                                   "rel_err": float((y.float() - refs[m]).abs().max() / refs[m].abs().max())}
                except Exception as e:  # noqa: BLE001
                    results.append({"shape": f"{out_f}x{in_f}", "rows": m, "kernel": name,
                                    "error": f"{type(e).__name__}: {str(e)[:120]}"})
            for _ in range(rounds):
                for name, f in built:
                    if name in cells:
                        with torch.inference_mode():
                            sec = _timeit(lambda: f(x), budget_s / rounds)
                        cells[name]["ms"] = min(cells[name]["ms"], sec * 1e3)
            results.extend(cells.values())
    for r in results:  # speed-up against fp32 F.linear at the same shape and rows
        base = next((b for b in results if b["kernel"] == "fp32_linear" and b["shape"] == r["shape"]
                     and b.get("rows") == r.get("rows") and "ms" in b), None)
        if base and "ms" in r:
            r["vs_fp32"] = base["ms"] / r["ms"]
    return results


def table(results) -> str:
    lines = ["| shape [out x in] | rows | kernel | ms | x fp32 | rel. err |", "|---|---|---|---|---|---|"]
    for r in results:
        if "ms" in r:
            lines.append(f"| {r['shape']} | {r['rows']} | {r['kernel']} | {r['ms']:.3f} | {r['vs_fp32']:.2f} | {r['rel_err']:.1e} |")
        else:
            lines.append(f"| {r['shape']} | {r.get('rows', '-')} | {r['kernel']} | - | - | fails: {r['error']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,16", help="comma-separated activation row counts (tokens)")
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="OUTxIN,...")
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timing per cell")
    ap.add_argument("--only", help="comma-separated substrings: run only the kernels whose name has one")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    rows = [int(v) for v in a.rows.split(",")]
    results = run(shapes, rows, a.threads, a.budget, a.only)
    from shardline.quant import kernel_info
    print(f"# {platform.machine()}, torch {torch.__version__}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {a.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; QLinear: {kernel_info()}")
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": platform.machine(), "torch": torch.__version__, "threads": a.threads,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
