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


@pytest.mark.parametrize("m, want", [(1, 1), (3, 4), (16, 16), (17, 32), (64, 64), (65, 128), (200, 256), (256, 256),
                                     (300, 320)])
def test_rows_are_padded_to_a_few_counts(m, want):
    assert linear.padded_rows(m) == want


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")
def test_padded_rows_give_the_unpadded_product_and_memory_stays_bounded(kernel):
    """Every row count from 1 to 256 through one weight: the products are F.linear's, and the heap
    oneDNN keeps per row count stays bounded (without padding: ~0.6 MiB for each of the 256 counts)."""
    assert kernel("onednn") == "onednn"
    import psutil
    w, b = torch.randn(384, 96), torch.randn(384)
    linear.matmul(torch.randn(1, 96), w, b)
    before = psutil.Process().memory_info().rss
    for m in range(1, 257):
        x = torch.randn(m, 96)
        y = linear.matmul(x, w, b)
        assert y.shape == (m, 384)
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=2e-5)
    grew = (psutil.Process().memory_info().rss - before) / 2**20
    assert grew < 40, f"{grew:.0f} MiB for 256 row counts"


def test_a_shard_goes_to_its_device_a_tensor_at_a_time(tmp_path, monkeypatch):
    """A GPU rank's shard never sits whole in host memory: read_shard puts each tensor on the device as
    it reads it (the planner budgets a GPU board's host memory for one tensor, splitter/boards.py). The
    meta device stands in for a GPU; every allocation is watched: on the host only the transposed head
    (one tensor, moved on at once), never the rest of the shard."""
    from safetensors.torch import save_file
    embed, down = "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"
    t = {embed: torch.randn(100, 8), down: torch.randn(64, 128), "model.norm.weight": torch.ones(8)}
    save_file(t, str(tmp_path / "stage_0.safetensors"))
    host, head_host = linear.read_shard(tmp_path / "stage_0.safetensors", True, embed, "lm_head.weight", True)
    allocated, empty = [], torch.empty

    def watched(*shape, **kw):
        out = empty(*shape, **kw)
        allocated.append((out.device.type, out.numel() * out.element_size()))
        return out
    monkeypatch.setattr(torch, "empty", watched)
    meta, head_meta = linear.read_shard(tmp_path / "stage_0.safetensors", True, embed, "lm_head.weight", True,
                                        device="meta")
    monkeypatch.undo()
    assert sorted(host) == sorted(meta) == sorted(set(t) - {embed})          # the tied head is read transposed
    assert all(v.device.type == "cpu" for v in host.values()) and torch.equal(head_host, t[embed].t())
    assert all(v.device.type == "meta" and v.shape == host[n].shape for n, v in meta.items())
    assert head_meta.device.type == "meta" and head_meta.shape == (8, 100)
    on_host = [b for dev, b in allocated if dev == "cpu"]
    assert on_host == [t[embed].numel() * 4], allocated                       # the head alone, once
