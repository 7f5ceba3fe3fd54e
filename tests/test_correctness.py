"""The pipeline equals the single-process transformers model on the same weights, for 1 to 4 ranks."""

import pytest
import torch

from tests.helpers import hf_greedy_ids, hf_model, run_mpi_check, split

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
    got = run_mpi_check(parts, ranks, tmp_path, score=SCORE, greedy=GREEDY, max_new_tokens=MAX_NEW, max_batch_tokens=16)
    ref_logits, ref_greedy = reference
    diff = (torch.tensor(got["logits"]) - ref_logits).abs().max().item()
    assert diff < 1e-4, f"teacher-forced logits differ by {diff}"
    assert got["greedy"] == ref_greedy


def _stage_of_whole_model(model_dir, tmp_path, slots=8):
    from shardline.manifest import load_manifest
    from shardline.stage import load_stage
    parts = split(model_dir, 1, tmp_path / "parts1")
    return load_stage(load_manifest(parts), 0, parts / "stage_0.safetensors", slots, 128)


@pytest.mark.parametrize("tied", [True, False])
def test_batched_decode_logits_equal_transformers(tied, tiny_model_dir, tmp_path):
    """Several sequences of different lengths in scattered cache rows decode together (the batched
    attention path, with other rows of the range masked out), one also mixed with a prompt chunk:
    every step's logits equal transformers' on each sequence alone. Untied: the head is not wte."""
    from shardline.stage import Seq
    model_dir = tiny_model_dir
    if not tied:
        from transformers import GPT2LMHeadModel
        model = GPT2LMHeadModel.from_pretrained(tiny_model_dir, tie_word_embeddings=False)
        with torch.no_grad():
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone() * 0.5)
        model_dir = tmp_path / "untied"
        model.save_pretrained(model_dir)
        (model_dir / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
        for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
            if (tiny_model_dir / name).exists():
                (model_dir / name).write_bytes((tiny_model_dir / name).read_bytes())
    ref = hf_model(model_dir)
    stage = _stage_of_whole_model(model_dir, tmp_path)
    prompts = {5: [40, 41, 42], 1: list(range(200, 230)), 6: [17], 3: [100, 7, 300, 2, 9]}   # slot: prompt
    seqs = {slot: list(p) for slot, p in prompts.items()}

    def run(batch):   # batch: [(slot, tokens to feed)] -> last-position logits per slot
        ids, plan = [], []
        for slot, toks in batch:
            plan.append(Seq(slot, len(seqs[slot]) - len(toks), len(toks)))
            ids += toks
        with torch.inference_mode():
            x = stage.forward(stage.embed(torch.tensor(ids), plan), plan)
            last = torch.tensor([sum(s.n for s in plan[:i + 1]) - 1 for i in range(len(plan))])
            return dict(zip([s for s, _ in batch], stage.head(x[last])))

    got = run([(slot, p) for slot, p in prompts.items() if slot != 3])     # prefill three of them
    late = [3]                                                              # the fourth joins later
    for step in range(6):
        batch = []
        for slot in seqs:
            if slot in got:
                tok = int(got[slot].argmax())
                seqs[slot].append(tok)
                batch.append((slot, [tok]))
        if step == 2:
            batch.append((3, seqs[3]))                                      # a prompt among decodes
            late = []
        got = {k: v for k, v in run(batch).items()}
        for slot, logits in got.items():
            if slot in late:
                continue
            with torch.no_grad():
                want = ref(torch.tensor([seqs[slot]])).logits[0, -1]
            diff = (logits - want).abs().max().item()
            assert diff < 1e-4, f"slot {slot} step {step}: logits differ by {diff}"
