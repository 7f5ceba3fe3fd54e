"""The pipeline equals the single-process transformers model on the same weights, for 1 to 4 ranks."""
import json
import subprocess

import pytest
import torch

from tests.helpers import ROOT, hf_greedy_ids, hf_model, launch_cmd, mpi_env, split

SCORE = [5, 300, 12, 411, 42, 99, 7, 250, 3, 77, 510, 18, 64, 200, 33, 1, 480, 90, 121, 8]
GREEDY = [[40, 41, 42], [100, 7, 300, 2, 9], list(range(200, 240)), [17]]   # the 40-token one is chunked
MAX_NEW = 24


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    model = hf_model(tiny_model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([SCORE])).logits[0]
    greedy = [hf_greedy_ids(tiny_model_dir, p, MAX_NEW) for p in GREEDY]
    # The flat-logits pitfall: token equality only means something if the reference's choices are clear.
    with torch.no_grad():
        for p, g in zip(GREEDY, greedy):
            full = model(torch.tensor([p + g])).logits[0, len(p) - 1:-1]
            top2 = full.topk(2).values
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, "reference logits too flat for a token comparison"
    return logits, greedy


@pytest.mark.parametrize("ranks, layers", [(1, None), (2, "0-2,3-5"), (3, None), (4, "0,1-2,3-4,5")])
def test_pipeline_matches_transformers(ranks, layers, tiny_model_dir, reference, tmp_path):
    parts = split(tiny_model_dir, ranks, tmp_path / "parts", *(["--layers", layers] if layers else []))
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"score": SCORE, "greedy": GREEDY, "max_new_tokens": MAX_NEW, "max_batch_tokens": 16}))
    out = tmp_path / "out.json"
    proc = subprocess.run(launch_cmd(ranks, str(ROOT / "tests" / "mpi_check.py"), "--model-dir", str(parts),
                                     "--cases", str(cases), "--out", str(out)),
                          cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(out.read_text())
    ref_logits, ref_greedy = reference
    diff = (torch.tensor(got["logits"]) - ref_logits).abs().max().item()
    assert diff < 1e-4, f"teacher-forced logits differ by {diff}"
    assert got["greedy"] == ref_greedy
