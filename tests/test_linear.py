"""The float matmul kernel (shardline/models/linear.py): oneDNN or aten, chosen once per process.

Both kernels give the same products on every layout a stage uses (an [out, in] weight, a transposed
view of an [in, out] one, the transposed head), a bad SHARDLINE_FP32_MATMUL stops a rank at start with
a message naming it, and /health names the kernel each rank uses. The families' tests (tests/
test_families.py: logits within 1e-4 of transformers, greedy tokens equal) run on whichever kernel
"auto" picks here: oneDNN on x86-64.
"""
from __future__ import annotations

import os
import platform
import subprocess

import pytest
import torch
import torch.nn.functional as F

from shardline.models import linear
from tests.helpers import PY, ROOT, serving, split


@pytest.fixture
def kernel(monkeypatch):
    def use(name: str) -> str:
        monkeypatch.setenv(linear.FP32_MATMUL_ENV, name)
        linear.fp32_matmul.cache_clear()
        return linear.fp32_matmul()
    yield use
    linear.fp32_matmul.cache_clear()


def test_auto_picks_onednn_on_x86_when_pytorch_has_it(kernel):
    want = "onednn" if platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available() else "aten"
    assert kernel("auto") == want
    assert kernel("aten") == "aten"


def test_a_bad_kernel_name_is_refused_naming_the_variable(kernel):
    with pytest.raises(ValueError, match=r"SHARDLINE_FP32_MATMUL='fast': use auto, onednn or aten"):
        kernel("fast")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_both_kernels_give_the_same_products_on_every_layout(kernel, rows):
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, 96), torch.randn(160, 96), torch.randn(160)
    want = F.linear(x.double(), w.double(), b.double()).float()
    got = {}
    for name in ("aten", "onednn"):
        assert kernel(name) == name
        got[name] = [linear.Dense(w, b)(x),                                     # [out, in]
                     linear.Dense(w.t().contiguous(), b, conv1d=True)(x),        # [in, out] (GPT-2, read_shard)
                     linear.Dense(w, b)(x.t().contiguous().t()),                 # a non-contiguous input
                     linear.Ends({"wte": w}, "wte", "head", tied=True).logits(x) + b]   # the transposed head
        for y in got[name]:
            assert y.shape == (rows, 160)
            torch.testing.assert_close(y, want, rtol=1e-5, atol=2e-5)


def test_a_bad_kernel_stops_the_rank_at_start_and_health_names_the_kernel(tiny_model_dir, tmp_path):
    parts = split(tiny_model_dir, 1, tmp_path / "parts")
    env = {**os.environ, linear.FP32_MATMUL_ENV: "fastest"}
    run = subprocess.run([PY, "main.py", "--model-dir", str(parts), "--port", "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "SHARDLINE_FP32_MATMUL='fastest': use auto, onednn or aten" in run.stderr, run.stderr
    with serving(parts, 1, tmp_path) as s:
        import httpx
        stages = httpx.get(s.url + "/health").json()["stages"]
        assert [st["fp32_matmul"] for st in stages] == [linear.fp32_matmul()]
