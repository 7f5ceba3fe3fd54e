"""bench.floor: one token's matmuls, timed stage by stage on the stages as the ranks load them.

No timing thresholds (the machine is shared): what is checked is that exactly the right products are
timed, for every family and scheme, and that the arithmetic of the report holds."""
import json
import subprocess

import pytest

from bench.floor import matmul_floor, stage_matmuls
from shardline.manifest import load_manifest, verify_shard
from shardline.stage import load_stage
from tests.families import make_family_model
from tests.helpers import PY, ROOT, split


def _stage(parts, k):
    man = load_manifest(parts)
    return load_stage(man, k, verify_shard(man, k), 1, 64, "cpu")


def _check(res, parts, per_layer):
    man = load_manifest(parts)
    assert [s["stage"] for s in res["stages"]] == list(range(man.num_stages))
    for s in res["stages"]:
        a, b = man.stage(s["stage"])["layers"]
        assert s["layers"] == [a, b] and s["matmuls"] == per_layer * (b - a)
        assert s["blocks_ms"] > 0 if b > a else s["blocks_ms"] == 0
        assert (s["head_ms"] > 0) == (s["stage"] == 0), "only stage 0 holds the LM head"
    assert res["ms_per_token"] == pytest.approx(sum(s["blocks_ms"] + s["head_ms"] for s in res["stages"]), abs=0.01)
    assert res["max_tok_s"] == pytest.approx(1e3 / res["ms_per_token"], rel=5e-3)   # both rounded


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_gpt2_every_matmul_and_the_head(tiny_model_dir, tmp_path, scheme):
    parts = split(tiny_model_dir, 3, tmp_path / "parts", *(["--quantize", scheme] if scheme else []))
    res = matmul_floor(parts, threads=1, repeats=3)
    assert res["scheme"] == (scheme or "fp32") and res["threads"] == 1
    _check(res, parts, per_layer=4)                  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    # the timed callables are the stage's own weights, each once
    st = _stage(parts, 1)
    lins = stage_matmuls(st)
    assert [id(x) for x in lins] == [id(getattr(b, n)) for b in st.blocks for n in ("qkv", "proj", "fc", "out")]


def test_llama_family_and_the_cli(tmp_path):
    model = make_family_model("llama", tmp_path / "model", steps=1)
    parts = split(model, 2, tmp_path / "parts", "--layers", "0-0,1-5")
    out = tmp_path / "floor.json"
    proc = subprocess.run([PY, "-m", "bench.floor", str(parts), "--threads", "1", "--repeats", "2", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    _check(res, parts, per_layer=4)                  # qkv_proj, o_proj, gate_up_proj, down_proj (fused by the splitter)
    assert res["stages"][0]["matmuls"] == 4 and res["stages"][1]["matmuls"] == 20
    assert f"{res['ms_per_token']:.2f} ms of matmuls per token" in proc.stdout
