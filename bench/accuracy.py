"""How much accuracy int8 / int4 weights and a 16-bit wire cost, on a model fitted to real text.

    python -m bench.accuracy                       # fit (at most 4 minutes on 2 cores), measure, print, write JSON
    python -m bench.accuracy --fit-seconds 60 --json bench/out/accuracy.json
    python -m bench.accuracy --model-dir bench/out/accuracy-model    # reuse (or save) the fitted model

A tiny transformers LlamaForCausalLM (4 layers, hidden 256, grouped-query attention 8/2 heads, tied
embeddings) and a byte-level BPE trained with `tokenizers` are fitted to the public-domain prose in
bench/text/ until its training loss is 2.5 (a real small model's loss on English: margins neither
flat nor memorized). The last 600 tokens are held out of the fit. The whole text (2,880 tokens), the
fitted part and the held-out part are teacher-forced through:

  - fp32: the model as fitted (the reference);
  - fake-quantized: every Linear weight and the (tied) embedding replaced by dequantize(quantize(w)),
    the computation otherwise fp32 (the weight error alone);
  - kernel: the layers running shardline.quant.QLinear (rows() for the embedding lookup), on this
    machine's default activation dtype (bf16 on x86: the activation rounding included) and with fp32
    activations (what the aarch64 NEON path computes);
  - dynamic int8 (torch.ao quantized.linear_dynamic: activations quantized per tensor), a kernel
    candidate measured by bench/kernels.py;
  - wire: the fp32 model with the hidden state sent through shardline.wiredtype.encode/decode (fp16,
    clamped to its range, or bf16) at every hop of the splitter's 3-rank plan for this model: into
    stage 1, into stage 2, and back to rank 0 before the final norm (what `--wire-dtype` does; with
    this model's plan, stage 0 holding the embedding and head only, that is the embedding's output,
    the output of layer 2 of 4 and of layer 4).

For each: top-1 agreement with fp32, mean KL(fp32 || variant) in nats, and perplexity on the text.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shardline.quant import QLinear, dequantize, kernel_info, quantize

TEXT_DIR = Path(__file__).parent / "text"
HELD_OUT = 600  # tokens at the end of the text kept out of the fit
FIT_SEQ = 64  # the fit's window: positions beyond it were never trained


# --------------------------------------------------------------------------------------------------
# data, tokenizer, model


def load_text(text_dir: Path = TEXT_DIR) -> str:
    files = sorted(text_dir.glob("*.txt"))
    if not files:
        raise SystemExit(f"no .txt files in {text_dir}: the accuracy benchmark needs real English prose there")
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([text], trainer)
    return tok


def make_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).float()


def fit(model, ids: torch.Tensor, seconds: float, target_loss: float, seq: int = FIT_SEQ, batch: int = 8,
        lr: float = 3e-3) -> list[float]:
    """AdamW on random windows of ids until the time is up or the loss (mean of the last 10 steps)
    reaches target_loss, a real small model's loss on English (so its margins are realistic, neither
    flat nor memorized); returns the loss curve."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)  # the usual LLM recipe
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    model.train()
    losses, start = [], time.monotonic()
    while time.monotonic() - start < seconds and not (len(losses) >= 10 and sum(losses[-10:]) / 10 < target_loss):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------------
# variants


def _linears(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def fake_quantized(model, scheme: str, group_size: int | None, embed_scheme: str | None = None):
    """A copy with every Linear weight and the embedding replaced by dequantize(quantize(w));
    embed_scheme (default: scheme) for the embedding and the head."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        done = set()
        for name, lin in _linears(m) + [("embed", m.model.embed_tokens)]:
            if id(lin.weight) in done:  # the tied head shares the embedding's tensor
                continue
            done.add(id(lin.weight))
            sch, g = scheme, group_size
            if embed_scheme and name in ("embed", "lm_head"):
                sch, g = embed_scheme, (group_size if embed_scheme == "int4" else None)
            lin.weight.copy_(dequantize(quantize(lin.weight, sch, g), sch))
    return m


class _QLinearModule(torch.nn.Module):
    def __init__(self, ql: QLinear):
        super().__init__()
        self.ql = ql

    def forward(self, x):
        return self.ql(x)


class _QEmbedding(torch.nn.Module):
    def __init__(self, ql: QLinear):
        super().__init__()
        self.ql = ql

    def forward(self, ids):
        return self.ql.rows(ids.reshape(-1)).reshape(*ids.shape, self.ql.in_features)


def kernel_quantized(model, scheme: str, group_size: int | None, act_dtype=None, embed_scheme: str | None = None):
    """A copy whose Linears (and embedding lookup) run on QLinear; the tied head and the embedding
    share one QLinear, as on a stage."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        es = embed_scheme or scheme
        head = QLinear.from_parts(quantize(m.model.embed_tokens.weight, es, group_size if es == "int4" else None),
                                  es, act_dtype=act_dtype)
        for name, lin in _linears(m):
            if name == "lm_head":
                ql = head
            else:
                ql = QLinear.from_parts(quantize(lin.weight, scheme, group_size), scheme, lin.bias, act_dtype=act_dtype)
            parent, _, attr = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, attr, _QLinearModule(ql))
        m.model.embed_tokens = _QEmbedding(head)
    return m


class _DynInt8(torch.nn.Module):
    """torch.ao's dynamic int8 linear (fbgemm on x86, qnnpack on ARM): int8 weights per channel,
    activations quantized per tensor at run time."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        p = quantize(lin.weight, "int8")
        qw = torch._make_per_channel_quantized_tensor(p["qweight"], p["scales"].double(),
                                                      torch.zeros(len(p["scales"]), dtype=torch.long), 0)
        self.packed = torch.ops.quantized.linear_prepack(qw, lin.bias)

    def forward(self, x):
        return torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]), self.packed, True).reshape(*x.shape[:-1], -1)


def dynamic_int8(model):
    m = fake_quantized(model, "int8", None)  # the embedding lookup: int8 rows
    for name, lin in _linears(m):
        parent, _, attr = name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, attr, _DynInt8(lin))
    return m


def three_rank_plan(model, stages: int = 3) -> list[tuple[int, int]]:
    """The layer ranges the splitter's plan gives this model on `stages` ranks (float32 costs: a
    layer's matmul parameters, stage 0 also the LM head), so that the wire variants round where the
    pipeline's hops really are rather than at boundaries picked by hand."""
    from splitter.plan import plan_layers
    layer = sum(m.weight.numel() for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    return plan_layers(len(model.model.layers), stages, layer, model.lm_head.weight.numel())


def wire_rounded(model, dtype: torch.dtype, stages: int = 3):
    """The fp32 model with the hidden state round-tripped through the wire type at every hop of a
    `stages`-rank split: into each worker stage's first layer, and into the final norm (the last
    worker's output travels back to rank 0, which holds the norm and the head). The rounding is
    shardline.wiredtype's own encode/decode, so float16's clamp to +-65504 is included."""
    from shardline import wiredtype
    m = copy.deepcopy(model)
    flags = wiredtype.flags_of({torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype])

    def hop(x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).contiguous()
        return wiredtype.decode(wiredtype.encode(flat, flags), flags).reshape(x.shape)

    def pre_hook(_mod, args, kwargs):
        if args:
            return (hop(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hop(kwargs["hidden_states"])}

    ranges = three_rank_plan(m, stages)
    for a, _ in ranges[1:]:
        m.model.layers[a].register_forward_pre_hook(pre_hook, with_kwargs=True)
    m.model.norm.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return m


# --------------------------------------------------------------------------------------------------
# metrics


@torch.inference_mode()
def logits_of(model, ids: torch.Tensor, window: int = FIT_SEQ) -> torch.Tensor:
    """Teacher-forced logits [n, vocab] in windows of the fit's length, half overlapping: every
    position after the first window is scored with at least window/2 tokens of context and never
    at a position the model was not trained on."""
    half = window // 2
    out = []
    for start in range(0, max(len(ids) - half, 1), half):
        chunk = ids[start:start + window]
        logits = model(input_ids=chunk[None]).logits[0].float()
        out.append(logits if start == 0 else logits[half:])
        if start + window >= len(ids):
            break
    return torch.cat(out)[:len(ids)]


def compare(ref: torch.Tensor, q: torch.Tensor, ids: torch.Tensor, lo: int, hi: int) -> dict:
    """Over the positions [lo, hi) predicting ids[lo+1 .. hi]: agreement, KL, perplexities."""
    r, v = ref[lo:hi], q[lo:hi]
    tgt = ids[lo + 1:hi + 1]
    lr, lv = F.log_softmax(r, -1), F.log_softmax(v, -1)
    kl = (lr.exp() * (lr - lv)).sum(-1)
    ppl_r = float(torch.exp(F.nll_loss(lr, tgt)))
    ppl_v = float(torch.exp(F.nll_loss(lv, tgt)))
    return {"tokens": hi - lo, "top1_agree": float((r.argmax(-1) == v.argmax(-1)).float().mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "ppl_fp32": ppl_r, "ppl": ppl_v,
            "ppl_change": ppl_v / ppl_r - 1}


def variants(model, groups):
    g0, g1 = groups
    yield "int8 fake-quant", "int8 per channel, weights dequantized, fp32 maths", lambda: fake_quantized(model, "int8", None)
    for g in (g0, g1):
        yield f"int4 g{g} fake-quant", f"int4 group {g}, weights dequantized, fp32 maths", lambda g=g: fake_quantized(model, "int4", g)
    yield f"int4 g{g0} + int8 embed/head fake-quant", "int4 layers, int8 embedding and tied head", \
        lambda: fake_quantized(model, "int4", g0, "int8")
    yield "int8 kernel", "QLinear, this machine's activation dtype", lambda: kernel_quantized(model, "int8", None)
    for g in (g0, g1):
        yield f"int4 g{g} kernel", "QLinear, this machine's activation dtype", lambda g=g: kernel_quantized(model, "int4", g)
    yield f"int4 g{g0} + int8 embed/head kernel", "QLinear, this machine's activation dtype", \
        lambda: kernel_quantized(model, "int4", g0, None, "int8")
    yield "int8 kernel fp32-act", "QLinear with fp32 activations (the aarch64 path)", \
        lambda: kernel_quantized(model, "int8", None, torch.float32)
    yield f"int4 g{g0} kernel fp32-act", "QLinear with fp32 activations (the aarch64 path)", \
        lambda: kernel_quantized(model, "int4", g0, torch.float32)
    yield "int8 dynamic (fbgemm/qnnpack)", "quantized.linear_dynamic: int8 activations per tensor", lambda: dynamic_int8(model)
    hops = ", ".join(f"into layers {a}-{b - 1}" for a, b in three_rank_plan(model)[1:]) + ", into the final norm"
    yield "wire fp16", f"fp32 model, hidden state through wiredtype fp16 at each 3-rank hop ({hops})", \
        lambda: wire_rounded(model, torch.float16)
    yield "wire bf16", f"fp32 model, hidden state through wiredtype bf16 at each 3-rank hop ({hops})", \
        lambda: wire_rounded(model, torch.bfloat16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit-seconds", type=float, default=240, help="time budget of the fit")
    ap.add_argument("--target-loss", type=float, default=2.5, help="stop the fit at this training loss")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--groups", default="32,128", help="the two int4 group sizes to compare (default first)")
    ap.add_argument("--model-dir", help="load the fitted model and tokenizer from here if present, else save them here")
    ap.add_argument("--json", default="bench/out/accuracy.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    groups = tuple(int(g) for g in a.groups.split(","))

    text = load_text()
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    md = Path(a.model_dir) if a.model_dir else None
    if md and (md / "config.json").exists():
        model = LlamaForCausalLM.from_pretrained(md).float().eval()
        tok = PreTrainedTokenizerFast.from_pretrained(md)
        ids = torch.tensor(tok(text)["input_ids"])
        losses = json.loads((md / "fit.json").read_text())["losses"]
        print(f"loaded the fitted model from {md}")
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(text, a.vocab), eos_token="<|endoftext|>")
        ids = torch.tensor(tok(text)["input_ids"])
        if len(ids) < HELD_OUT + 1000:
            raise SystemExit(f"the text in {TEXT_DIR} is {len(ids)} tokens: need at least {HELD_OUT + 1000}")
        model = make_model(len(tok))
        print(f"fitting a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter Llama to "
              f"{len(ids) - HELD_OUT} tokens for {a.fit_seconds:.0f} s ...", flush=True)
        losses = fit(model, ids[:-HELD_OUT], a.fit_seconds, a.target_loss)
        if md:
            model.save_pretrained(md)
            tok.save_pretrained(md)
            (md / "fit.json").write_text(json.dumps({"losses": losses}))
    n = len(ids)
    fit_loss = sum(losses[-10:]) / len(losses[-10:])
    if fit_loss > a.target_loss:
        print(f"NOTE: the fit stopped at loss {fit_loss:.2f}, above the target {a.target_loss} (a busy machine?): "
              "an under-fitted model has flatter logits, more near-ties and so lower agreement figures; "
              "give it more --fit-seconds and keep it with --model-dir")
    print(f"text: {n} tokens ({n - HELD_OUT} fitted, {HELD_OUT} held out); fit: {len(losses)} steps, "
          f"loss {losses[0]:.2f} -> {sum(losses[-10:]) / len(losses[-10:]):.2f}")
    print(f"kernels: {kernel_info()}", flush=True)

    ref = logits_of(model, ids)
    spans = {"all": (0, n - 1), "fitted": (0, n - HELD_OUT - 1), "held-out": (n - HELD_OUT - 1, n - 1)}
    rows = []
    for name, what, build in variants(model, groups):
        t0 = time.monotonic()
        q = logits_of(build(), ids)
        row = {"variant": name, "what": what, "seconds": time.monotonic() - t0}
        for span, (lo, hi) in spans.items():
            row[span] = compare(ref, q, ids, lo, hi)
        rows.append(row)
        print(f"  {name}: " + " / ".join(f"{row[s]['top1_agree']:.2%}" for s in spans), flush=True)

    print("\n| variant | top-1 agree (all / fitted / held-out) | mean KL nats (all / fitted / held-out) "
          "| ppl change (all / fitted / held-out) |")
    print("|---|---|---|---|")
    for r in rows:
        cells = [" / ".join(fmt.format(r[s][k]) for s in spans)
                 for k, fmt in (("top1_agree", "{:.2%}"), ("kl_mean", "{:.1e}"), ("ppl_change", "{:+.2%}"))]
        print(f"| {r['variant']} | " + " | ".join(cells) + " |")
    ref_lp = F.log_softmax(ref, -1)
    top2 = ref_lp.topk(2, -1).values
    print("\nfp32: " + ", ".join(f"{s} perplexity {rows[0][s]['ppl_fp32']:.1f} over {hi - lo} tokens"
                                 for s, (lo, hi) in spans.items())
          + f"; median top-1 probability {float(ref_lp.max(-1).values.exp().median()):.2f}, positions "
          f"whose top two are within 0.1 nats: {float((top2[:, 0] - top2[:, 1] < 0.1).float().mean()):.1%}")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"kernels": kernel_info(), "tokens": n, "held_out": HELD_OUT, "fit_steps": len(losses),
                       "fit_loss_last": sum(losses[-10:]) / len(losses[-10:]), "groups": groups, "results": rows}, f, indent=1)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
