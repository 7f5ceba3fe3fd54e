"""`--wire-dtype`: hidden states cross each hop in float32, float16 or bfloat16 (ranks compute in float32).

Three ranks per type on the tiny model: the bytes each rank sends for the same prompt-heavy work (the
per-rank byte counters in /metrics) halve in 16 bits, greedy tokens stay those of transformers, and the
prompt's log probabilities stay within a bound of the float32 pipeline's.
"""
from __future__ import annotations

import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import hf_greedy, hf_model, serving

DTYPES = ["float32", "float16", "bfloat16"]
GREEDY = [("Once upon a time", 24), ("the cat sat on", 40), ("a b c", 16)]
# Max |log p| difference from transformers' fp32 over the scored prompts; measured on this model: 1.1e-5,
# 6.6e-3 (float16) and 3.8e-2 (bfloat16), so about a third of each bound.
LOGPROB_TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
web = httpx.Client(timeout=60)
ITEM = {"float32": 4, "float16": 2, "bfloat16": 2}     # bytes per number on the wire


@pytest.fixture(scope="module", params=DTYPES)
def server(request, parts3, tmp_path_factory):
    with serving(parts3, 3, tmp_path_factory.mktemp("log"), "--wire-dtype", request.param) as s:
        yield request.param, s


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    """Four 120-token prompts (token ids) to score: the hops carry 120 rows each way."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "the cat sat on the mat and then it ran far away from the big dog in the park " * 8
    ids = tok(text)["input_ids"]
    return [ids[i:i + 120] for i in (0, 7, 13, 21)]


def bytes_sent(url: str) -> list[float]:
    r = web.get(url + "/metrics")
    rows = {int(s.labels["rank"]): s.value for fam in text_string_to_metric_families(r.text)
            for s in fam.samples if s.name == "shardline_rank_bytes_sent"}
    return [rows[k] for k in sorted(rows)]


@pytest.mark.parametrize("name", DTYPES)
def test_a_hop_keeps_large_activations_finite(name):
    """A residual stream's outliers past float16's 65504 cross a float16 hop clamped, not as inf (which
    the next norm would make NaN); bfloat16 and float32 carry them as they are."""
    from shardline import wiredtype
    x = torch.tensor([[70000.0, -1e5, 3e38, 1.5, -0.25, 65504.0]])
    flags = wiredtype.flags_of(name)
    y = wiredtype.decode(wiredtype.encode(x, flags).copy(), flags)
    assert y.dtype == torch.float32 and y.shape == x.shape and torch.isfinite(y).all(), y
    if name == "float16":
        assert y.tolist() == [[65504.0, -65504.0, 65504.0, 1.5, -0.25, 65504.0]]
    else:
        assert torch.allclose(y, x, rtol=1e-2 if name == "bfloat16" else 0.0, atol=0.0), y


def test_health_names_the_wire_dtype(server):
    dtype, s = server
    assert web.get(s.url + "/health").json()["wire_dtype"] == dtype


@pytest.mark.parametrize("prompt, n", GREEDY)
def test_greedy_tokens_equal_transformers(server, tiny_model_dir, prompt, n):
    _, s = server
    r = web.post(s.url + "/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == hf_greedy(tiny_model_dir, prompt, n)


def test_prompt_logprobs_stay_close_and_bytes_per_hop_halve(server, prompts, tiny_model_dir):
    dtype, s = server
    # The per-rank counters come with the 2 s heartbeat, late on a busy host: start from a quiet ring
    # (two readings 2.5 s apart within the heartbeat's own bytes), and read after until every rank's
    # count has taken the request in (it is at least the payload), then once more.
    before, deadline = bytes_sent(s.url), time.monotonic() + 30
    while True:
        time.sleep(2.5)
        now = bytes_sent(s.url)
        if all(b - a < 1024 for a, b in zip(before, now)) or time.monotonic() > deadline:
            before = now
            break
        before = now
    r = web.post(s.url + "/v1/completions", json={"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    payload = 4 * 120 * 64 * ITEM[dtype]
    deadline = time.monotonic() + 30
    while any(b - a < payload for a, b in zip(before, bytes_sent(s.url))) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2.5)
    sent = [b - a for a, b in zip(before, bytes_sent(s.url))]
    model = hf_model(tiny_model_dir)
    worst = 0.0
    for ids, choice in zip(prompts, r.json()["choices"]):
        with torch.no_grad():
            want = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)[torch.arange(len(ids) - 1), ids[1:]]
        got = torch.tensor(choice["logprobs"]["token_logprobs"][1:])
        worst = max(worst, (got - want).abs().max().item())
    print(f"wire {dtype}: bytes sent per rank {sent}, max |log p - fp32 transformers| {worst:.2e}")
    assert worst <= LOGPROB_TOL[dtype]
    # Every hop carries every prompt row (the last stage returns them all to be scored): 4 x 120 rows of
    # 64 numbers, plus headers and the heartbeat (under 200 bytes a rank every 2 s).
    for rank, b in enumerate(sent):
        assert payload <= b <= payload + 4096, (rank, b, payload)
