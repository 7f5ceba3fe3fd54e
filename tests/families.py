"""Tiny models of every family, each exercising its family's differences, fitted to a short text so that
greedy tokens have clear margins (random-weight logits are nearly flat; see DESIGN.md's pitfalls)."""
from __future__ import annotations

from pathlib import Path

TEXT = ("Once upon a time there was a little robot who lived in a drawer full of old boards. "
        "Every night the robot woke the boards one by one, and together they told each other long stories "
        "about the sea, the stars and the people who had built them. ")

_COMMON = dict(hidden_size=64, intermediate_size=128, vocab_size=320, max_position_embeddings=256,
               initializer_range=0.05, rms_norm_eps=1e-5, bos_token_id=319, eos_token_id=319)
# What each tiny model exercises: GQA everywhere (kv heads < heads), tied and untied heads, llama3
# RoPE scaling, q/k/v bias (qwen2), q/k norm with an explicit head_dim (qwen3), a sliding window (mistral).
FAMILIES = {
    "llama": dict(model_type="llama", num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=True,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32}),
    "mistral": dict(model_type="mistral", num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=1,
                    sliding_window=128, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, tie_word_embeddings=True),
}


def tiny_config(name: str, **override):
    from transformers import AutoConfig
    spec = {**_COMMON, **FAMILIES[name], **override}
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def fit(model, ids, steps: int = 120, lr: float = 5e-3, seed: int = 0) -> float:
    """A few Adam steps of next-token prediction on ids: the model learns the text by heart (about 5 s;
    one thread is several times faster than two for a model this small)."""
    import torch
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.tensor([ids])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.set_num_threads(threads)
    return float(loss.detach())


def make_family_model(name: str, out: Path, seed: int = 0, steps: int = 120, **override) -> Path:
    """A save_pretrained directory (model + tokenizer) of family `name`, fitted to TEXT."""
    import torch
    from transformers import AutoModelForCausalLM

    from splitter.random_model import build_tokenizer
    cfg = tiny_config(name, **override)
    tok = build_tokenizer(cfg.vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():                      # biases start non-zero, so a bias bug cannot hide
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.05)
    fit(model, tok(TEXT)["input_ids"], steps=steps, seed=seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def reference_run(d: Path, max_new: int, model=None):
    """What transformers computes for the tiny model in d (or `model`, e.g. with its weights replaced by
    quantized ones): (60 ids of TEXT, their teacher-forced logits, 4 prompts, each prompt's greedy
    continuation up to max_new tokens or EOS). The prompts: short ones, one of 40 tokens (prefilled in
    chunks at max_batch_tokens 16) and a single token."""
    import torch
    from transformers import AutoTokenizer

    from tests.helpers import hf_model
    ids = AutoTokenizer.from_pretrained(d)(TEXT)["input_ids"]
    model = hf_model(d) if model is None else model
    prompts = [ids[:5], ids[40:47], ids[90:130], ids[150:151]]
    greedy = []
    with torch.no_grad():
        logits = model(torch.tensor([ids[:60]])).logits[0]
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False,
                                 attention_mask=torch.ones(1, len(p), dtype=torch.long), pad_token_id=0)
            g = out[0, len(p):].tolist()
            eos = model.config.eos_token_id
            g = g[:g.index(eos)] if eos in g else g
            # token equality only means something where the reference's choices are clear
            full = model(torch.tensor([p + g])).logits[0, len(p) - 1:-1].topk(2).values
            assert (full[:, 0] - full[:, 1]).min() > 1e-3, f"{d}: reference logits too flat"
            greedy.append(g)
    return ids[:60], logits, prompts, greedy
