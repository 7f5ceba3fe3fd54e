"""Every family's stage equals transformers on the same weights: in one process for every RoPE type and
switch, and through the real pipeline on 1-4 ranks with uneven stages (engine, wire, KV caches)."""
import subprocess
import sys

import pytest
import torch

from tests.families import FAMILIES, make_family_model, reference_run, tiny_config
from tests.helpers import PY, ROOT, mpi_env, run_mpi_check, split, splitter_cli

MAX_NEW = 20
# Uneven stages over 1-4 ranks (inclusive layer ranges; `none`: rank 0 holds only the embeddings and head)
LAYERS = {5: {1: None, 2: "0,1-4", 3: "0-2,3,4", 4: "none,0,1-3,4"},
          6: {1: None, 2: "0-3,4-5", 3: "0,1-4,5", 4: "0,1,2-4,5"}}


@pytest.fixture(scope="module", params=list(FAMILIES))
def fitted(request, tmp_path_factory):
    """(family, model dir, reference logits, reference greedy continuations) of a tiny fitted model."""
    name = request.param
    d = make_family_model(name, tmp_path_factory.mktemp(name) / "model")
    score, logits, prompts, greedy = reference_run(d, MAX_NEW)
    return name, d, score, logits, prompts, greedy


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_pipeline_matches_transformers(ranks, fitted, tmp_path):
    name, d, score, ref_logits, prompts, ref_greedy = fitted
    n = tiny_config(name).num_hidden_layers
    layers = LAYERS[n][ranks]
    parts = split(d, ranks, tmp_path / "parts", *(["--layers", layers] if layers else []))
    got = run_mpi_check(parts, ranks, tmp_path, score=score, greedy=prompts, max_new_tokens=MAX_NEW, max_batch_tokens=16)
    diff = (torch.tensor(got["logits"]) - ref_logits).abs().max().item()
    assert diff < 1e-4, f"{name} on {ranks} ranks: teacher-forced logits differ by {diff}"
    assert got["greedy"] == ref_greedy, f"{name} on {ranks} ranks"


# In one process: each RoPE type and switch, prefill in chunks then batched decode of several sequences.
VARIANTS = [
    ("llama", {}),                                                                    # llama3 scaling, tied
    ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)),
    ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    ("llama", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                    "original_max_position_embeddings": 64})),
    ("llama", dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4)),      # biases, no GQA
    ("mistral", {}), ("qwen2", {}), ("qwen3", {}),
    ("qwen2", dict(use_sliding_window=True, sliding_window=64, max_window_layers=2)),  # windowed layers
]


@pytest.mark.parametrize("name, override", VARIANTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VARIANTS)])
def test_stage_matches_transformers_in_one_process(name, override, tmp_path):
    from transformers import AutoModelForCausalLM

    from shardline.manifest import load_manifest
    from shardline.stage import Seq, load_stage
    from splitter.random_model import build_tokenizer
    cfg = tiny_config(name, initializer_range=0.2, **override)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "m")
    build_tokenizer(cfg.vocab_size).save_pretrained(tmp_path / "m")
    parts = split(tmp_path / "m", 1, tmp_path / "parts")
    stage = load_stage(load_manifest(parts), 0, parts / "stage_0.safetensors", 8, None)
    if name == "mistral" or override.get("use_sliding_window"):
        assert stage.max_context == cfg.sliding_window       # longer requests are refused by the engine
    seqs = {3: torch.randint(0, cfg.vocab_size, (45,)).tolist(), 0: [5, 6, 7], 6: [9]}
    fed = {s: 0 for s in seqs}

    def step(batch):   # [(slot, n tokens to feed)] -> {slot: logits of its last token}
        ids, plan = [], []
        for slot, n in batch:
            plan.append(Seq(slot, fed[slot], n))
            ids += seqs[slot][fed[slot]:fed[slot] + n]
            fed[slot] += n
        with torch.inference_mode():
            x = stage.forward(stage.embed(torch.tensor(ids), plan), plan)
            last = torch.tensor([sum(s.n for s in plan[:i + 1]) - 1 for i in range(len(plan))])
            return dict(zip([s for s, _ in batch], stage.head(x[last])))

    got = step([(3, 20), (0, 3)])
    got.update(step([(3, 25), (6, 1)]))             # a later chunk beside a one-token prompt
    for _ in range(5):                               # batched decode of all three
        for slot, logits in got.items():
            seqs[slot].append(int(logits.argmax()))
        got = step([(slot, 1) for slot in seqs])
        for slot, logits in got.items():
            with torch.no_grad():
                want = model(torch.tensor([seqs[slot]])).logits[0, -1]
            assert (logits - want).abs().max().item() < 1e-4, (name, override, slot)


@pytest.mark.parametrize("override, message", [
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                           "long_factor": [1.0] * 8, "original_max_position_embeddings": 64}), "RoPE type 'longrope'"),
    (dict(hidden_act="gelu"), "activation 'gelu'"),
])
def test_unsupported_variants_are_refused_by_name(override, message, tmp_path):
    from transformers import AutoModelForCausalLM

    from splitter.random_model import build_tokenizer
    cfg = tiny_config("llama", **override)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    build_tokenizer(cfg.vocab_size).save_pretrained(tmp_path / "m")
    proc = splitter_cli("--model", str(tmp_path / "m"), "--stages", "2", "--out", str(tmp_path / "parts"))
    assert proc.returncode == 2 and message in proc.stderr and "supported" in proc.stderr, proc.stderr
    assert not (tmp_path / "parts").exists()


def test_unsupported_architecture_is_refused_with_the_list(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from splitter.random_model import build_tokenizer
    cfg = AutoConfig.for_model("gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, vocab_size=300)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    build_tokenizer(300).save_pretrained(tmp_path / "m")
    proc = splitter_cli("--model", str(tmp_path / "m"), "--stages", "1", "--out", str(tmp_path / "parts"))
    assert proc.returncode == 2, proc.stderr
    assert "'gpt_neox' is not supported" in proc.stderr
    for fam in ("gpt2", "llama", "mistral", "qwen2", "qwen3"):
        assert fam in proc.stderr


def test_bin_only_repository_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    tiny_config("llama").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not loaded")
    proc = splitter_cli("--model", str(tmp_path / "m"), "--stages", "1", "--out", str(tmp_path / "parts"))
    assert proc.returncode == 2 and "only pickled weights (pytorch_model.bin)" in proc.stderr, proc.stderr


def test_sharded_safetensors_with_an_index_split_like_one_file(tmp_path):
    """A hub-style checkpoint in several files named by model.safetensors.index.json gives the same
    shards (tensor for tensor) as the same model saved in one file."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from splitter.random_model import build_tokenizer
    cfg = tiny_config("qwen2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "many", max_shard_size="60KB")
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    for d in ("one", "many"):
        build_tokenizer(cfg.vocab_size).save_pretrained(tmp_path / d)
        split(tmp_path / d, 2, tmp_path / f"parts-{d}")
    for k in range(2):
        with safe_open(tmp_path / f"parts-one/stage_{k}.safetensors", "pt") as a, \
                safe_open(tmp_path / f"parts-many/stage_{k}.safetensors", "pt") as b:
            assert set(a.keys()) == set(b.keys())
            for n in a.keys():
                assert torch.equal(a.get_tensor(n), b.get_tensor(n)), n


def test_plan_only_prints_the_plan_and_writes_nothing(tmp_path):
    proc = subprocess.run([PY, "-m", "splitter", "--model", "TinyLlama-1.1B-Chat-v1.0", "--random-weights",
                           "--stages", "4", "--plan-only"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**mpi_env(), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "22 layers" in proc.stdout and "untied" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    total = sum(float(r[2]) for r in rows)
    assert 4190 < total < 4200        # 1.1B float32 parameters, in MiB (4.40 GB)
    assert not any(tmp_path.iterdir())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
