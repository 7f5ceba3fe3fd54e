"""The benchmark (python -m bench) end to end in its quick mode: every figure is there and sane.

No timing thresholds: the machine is shared and timed tests are flaky; the benchmark reports ratios.
"""
import json
import math
import subprocess

import pytest

from bench.run import parse_variant, pct, summarize
from tests.helpers import PY, ROOT

LEVELS = ["1", "4", "8", "16"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([PY, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=580, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), out, proc.stdout


def positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_baseline_figures(bench_run):
    res, _, _ = bench_run
    b = res["baseline"]
    assert b["threads"] >= 1
    for key in ("decode_tok_s", "e2e_tok_s", "ttft_ms_p50", "ttft_ms_p95", "aggregate_tok_s"):
        assert positive(b["single"][key]), key
    assert b["single"]["errors"] == 0 and b["single"]["tokens"] > 0
    assert positive(b["one_after_another"]["aggregate_tok_s"])
    assert b["fifo_ttft"]["ttft_ms_p50"] <= b["fifo_ttft"]["ttft_ms_p95"]
    # fp32 distilgpt2 is ~330 MB of weights: the one process holds all of them
    assert 300 < b["peak_rss_mb"] < 4000
    assert positive(b["batched_reference"]["aggregate_tok_s"])


def test_pipeline_figures(bench_run):
    res, _, _ = bench_run
    cfg = res["config"]
    assert cfg["ranks"] == 3 and cfg["clients"] == [1, 4, 8, 16]
    p = res["pipelines"]["default"]
    assert p["exit_code"] == 0, "the pipeline did not stop cleanly"
    assert [s["rank"] for s in p["stages"]] == [0, 1, 2]
    assert sorted(p["levels"]) == sorted(LEVELS)
    for n in LEVELS:
        lv = p["levels"][n]
        assert lv["errors"] == 0, (n, lv)
        assert 0 < lv["tokens"] <= lv["requests"] * cfg["max_tokens"]
        assert positive(lv["aggregate_tok_s"]) and positive(lv["ttft_ms_p50"])
        assert lv["ttft_ms_p50"] <= lv["ttft_ms_p95"]
        assert lv["metrics_fresh"], f"per-rank /metrics never caught up at {n} clients"
        assert lv["time"]["steps"] > 0 and positive(lv["time"]["round_trip_ms"])
    assert p["levels"]["16"]["requests"] == 16 * cfg["rounds"]
    assert positive(p["single"]["decode_tok_s"]) and positive(p["single"]["ttft_ms_p50"])
    assert positive(p["baseline_paired"]["single"]["decode_tok_s"])
    # the matmul floor of one request (bench/floor.py) was measured on this variant's split
    f = p["matmul_floor"]
    assert f["parts"] == p["parts"] and [s["stage"] for s in f["stages"]] == [0, 1, 2]
    assert sum(s["matmuls"] for s in f["stages"]) == 4 * 6     # distilgpt2: 6 blocks of 4 matmuls
    assert positive(f["ms_per_token"]) and positive(f["max_tok_s"])


def test_bytes_per_token_per_hop_match_the_wire_format(bench_run):
    res, _, _ = bench_run
    hidden = res["config"]["hidden_size"]
    for n in ("1", "16"):
        t = res["pipelines"]["default"]["levels"][n]["traffic"]
        assert list(t["hops"]) == ["0->1", "1->2", "2->0"]
        assert t["analytic_one_sequence"] == hidden * 4 + 36
        for hop in t["hops"].values():
            # one hidden vector per token plus a small header; the 2-second stats message adds a little
            assert 0.97 * t["analytic_at_mean_batch"] <= hop["decode_per_token"] <= 1.25 * t["analytic_at_mean_batch"], hop
            assert hop["measured_per_token"] >= hop["decode_per_token"]


def test_memory_and_ratios(bench_run):
    res, _, _ = bench_run
    p, b = res["pipelines"]["default"], res["baseline"]
    assert sorted(p["peak_rss_mb"]) == ["0", "1", "2"]
    assert all(50 < v < b["peak_rss_mb"] * 2 for v in p["peak_rss_mb"].values())
    r = res["ratios"]["default"]
    for key in ("single_decode", "single_e2e", "aggregate_16_vs_one_after_another", "peak_rss_total_vs_single_process"):
        assert positive(r[key]), key
    assert res["best_variant"] == "default"
    assert set(res["targets_met"]["default"]) == {"single", "aggregate", "peak_rss_within_shard_plus_300mb"}
    # each rank's shard is its stage file; what its RSS holds beyond it is the runtime and the KV cache
    assert p["scheme"] == "fp32" and p["family"] == "gpt2"
    assert sorted(p["shard_bytes"]) == ["0", "1", "2"] and sum(p["shard_bytes"].values()) == p["shard_bytes_total"]
    assert 300e6 < p["shard_bytes_total"] < 400e6          # distilgpt2 float32: 82M parameters, tied head
    for r, over in p["peak_rss_over_shard_mb"].items():
        assert over == pytest.approx(p["peak_rss_mb"][r] - p["shard_bytes"][r] / 2**20, abs=0.11)
    assert res["targets"]["single_decode"] == 0.9 and res["config"]["shape"] == "distilgpt2"


def test_outputs_plot_and_table(bench_run):
    _, out, stdout = bench_run
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "results.md").read_text()
    assert table.startswith("| figure |") and "aggregate tok/s, 16 concurrent clients" in table
    assert "one request's matmuls alone" in table
    assert "| figure |" in stdout


@pytest.mark.parametrize("values, q, want", [([3, 1, 2], 50, 2), ([1, 2, 3, 4], 50, 2.5), ([5], 95, 5),
                                             ([0, 10], 95, 9.5), ([], 50, None)])
def test_percentile(values, q, want):
    assert pct(values, q) == want


def test_summarize_counts_decode_after_the_first_token():
    runs = [{"tokens": 11, "seconds": 2.0, "ttft_s": 1.0, "decode_s": 1.0},
            {"tokens": 5, "seconds": 1.0, "ttft_s": 0.5, "decode_s": 0.5, "error": "HTTP 503"}]
    s = summarize(runs)
    assert (s["requests"], s["errors"], s["tokens"]) == (2, 1, 11)
    assert s["decode_tok_s"] == 10.0 and s["aggregate_tok_s"] == 5.5 and s["ttft_ms_p50"] == 1000.0


@pytest.mark.parametrize("spec, want", [
    ("default=", ("default", [], {})),
    ("t2=--threads 2", ("t2", ["--threads", "2"], {})),
    ("p=OMP_WAIT_POLICY=PASSIVE --threads 2 --slots 8",
     ("p", ["--threads", "2", "--slots", "8"], {"OMP_WAIT_POLICY": "PASSIVE"})),
])
def test_parse_variant(spec, want):
    assert parse_variant(spec) == want


# ---- the splitter's peak memory (issue 10 item 3), scaled down: python -m bench.split_memory ----

def test_splitter_peak_rss_stays_below_half_the_model_plus_400mb(tmp_path):
    """A 350 MB float32 checkpoint in several files with model.safetensors.index.json, split into 4 stages:
    the splitter's peak RSS (the kernel's high-water mark) stays below model/2 + 400 MB, the issue's rule.
    The splitter's floor (Python, torch, transformers, tokenizers) is about 400 MB, so holding the whole
    model, or two stages at once, breaks the bound here; the 1.45 GB figure is bench/README.md's."""
    res_path = tmp_path / "split_memory.json"
    proc = subprocess.run([PY, "-m", "bench.split_memory", "--out", str(tmp_path / "work"), "--json", str(res_path),
                           "--hidden", "768", "--intermediate", "2048", "--layers", "12", "--heads", "12",
                           "--kv-heads", "4", "--vocab", "16384", "--shard-mb", "100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(res_path.read_text())
    model = res["model"]
    assert model["files"] >= 3 and 300e6 < model["file_bytes"] < 400e6
    assert [s["stage"] for s in res["stages"]] == [0, 1, 2, 3]
    assert sum(s["bytes"] for s in res["stages"]) == pytest.approx(model["tensor_bytes"], rel=0.01)
    assert res["bound_bytes"] == model["file_bytes"] // 2 + 400 * 10**6
    # both measurements saw the splitter, not only the interpreter (which alone is ~300 MB)
    assert res["sampled_peak_rss_bytes"] > res["python_torch_transformers_import_rss_bytes"]
    assert res["peak_rss_bytes"] < res["bound_bytes"], (
        f"splitter peak RSS {res['peak_rss_bytes'] / 1e6:.0f} MB on a {model['file_bytes'] / 1e6:.0f} MB model "
        f"breaks the bound {res['bound_bytes'] / 1e6:.0f} MB")
    assert res["within_bound"] and proc.returncode == 0
    assert not (tmp_path / "work" / "model").exists(), "the checkpoint is removed unless --keep"


# ---- --quantize: one pipeline per scheme on the same weights (issue 12 item 6) ----

@pytest.fixture(scope="module")
def quant_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-quant")
    proc = subprocess.run([PY, "-m", "bench", "--quick", "--quantize", "fp32,int8,int4", "--clients", "1,4",
                           "--prompts", "2", "--max-tokens", "8", "--no-batched-reference", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), out


def test_quantize_runs_one_pipeline_per_scheme(quant_run):
    res, out = quant_run
    assert list(res["pipelines"]) == ["fp32", "int8", "int4"] and res["config"]["quantize"] == ["fp32", "int8", "int4"]
    fp32 = res["pipelines"]["fp32"]
    # plausible sizes only; the int4 target (<= 0.2x) is the benchmark's figure, in targets_met
    for scheme, lo, hi in [("fp32", 1.0, 1.0), ("int8", 0.24, 0.30), ("int4", 0.12, 0.25)]:
        p = res["pipelines"][scheme]
        assert p["scheme"] == scheme and p["exit_code"] == 0
        assert p["parts"].endswith("parts" if scheme == "fp32" else f"parts-{scheme}")
        assert all(lv["errors"] == 0 for lv in p["levels"].values())
        ratio = res["quantized_ratios"][scheme]["shard_bytes_vs_fp32"]
        assert lo <= ratio <= hi, (scheme, ratio)
        assert ratio == pytest.approx(p["shard_bytes_total"] / fp32["shard_bytes_total"], abs=1e-3)
        assert positive(res["quantized_ratios"][scheme]["single_decode_vs_fp32_pipeline"])
        assert sorted(p["peak_rss_over_shard_mb"]) == ["0", "1", "2"]
    assert fp32["greedy_text_equal_to_baseline"] == "2/2", "fp32 shards and transformers read the same bytes"
    met = res["targets_met"]
    assert set(met["int8"]) >= {"single_vs_fp32_pipeline"} and set(met["int4"]) >= {"shard_bytes_vs_fp32"}
    assert met["int4"]["shard_bytes_vs_fp32"] == (res["quantized_ratios"]["int4"]["shard_bytes_vs_fp32"] <= 0.2)
    assert met["int8"]["single_vs_fp32_pipeline"] == (
        res["quantized_ratios"]["int8"]["single_decode_vs_fp32_pipeline"] >= 2.0)
    table = (out / "results.md").read_text()
    for row in ("shard bytes, MiB", "peak RSS minus shard", "over the fp32 pipeline's"):
        assert row in table, row
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_quantize_list_is_refused():
    proc = subprocess.run([PY, "-m", "bench", "--quantize", "fp32,int3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and "int3" in proc.stderr and "fp32, int8, int4" in proc.stderr
