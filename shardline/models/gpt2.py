"""GPT-2 (distilgpt2, gpt2, ...): one pipeline stage, checked against transformers' GPT2LMHeadModel.

Learned position embeddings, LayerNorm with bias, fused q/k/v (c_attn), GELU (tanh) MLP, and an LM
head tied to the token embedding unless the checkpoint unties it. Conv1D weights are [in, out], so
each projection is one addmm with no transpose.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from shardline.models import Cost, Spec, default_context
from shardline.models.linear import Ends, linear, on_device, read_shard
from shardline.stage import KVCache, Seq, positions

MODEL_TYPES = ("gpt2",)
WTE, WPE, HEAD = "transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"
LN_F = ("transformer.ln_f.weight", "transformer.ln_f.bias")
MATMULS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")   # Conv1D: weight [in, out] + bias
NORMS = ("ln_1", "ln_2")


def check(config) -> None:
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"gpt2: activation {config.activation_function!r} is not supported "
                         "(supported: gelu_new, gelu_pytorch_tanh)")
    if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn or not config.scale_attn_weights:
        raise ValueError("gpt2: this variant's attention scaling (scale_attn_by_inverse_layer_idx, "
                         "reorder_and_upcast_attn, or no scaling) is not supported")


def extras(config) -> dict:
    return {}


def context(config) -> int:
    return config.n_positions


def n_layers(config) -> int:
    return config.n_layer


def specs(config, first: bool, layers: tuple[int, int], tied: bool) -> list[Spec]:
    out = []
    if first:
        # the position table is an embedding too: quantized as the token embedding is (1 % of distilgpt2's
        # weights, a third of what its int4 shards would otherwise keep in float)
        out += [Spec(WTE, (WTE,), matmul=True), Spec(WPE, (WPE,), matmul=True)] + [Spec(n, (n,)) for n in LN_F]
        if not tied:
            out.append(Spec(HEAD, (HEAD,), matmul=True))
    for i in range(*layers):
        p = f"transformer.h.{i}."
        for m in MATMULS:
            out += [Spec(p + m + ".weight", (p + m + ".weight",), matmul=True, conv1d=True),
                    Spec(p + m + ".bias", (p + m + ".bias",))]
        out += [Spec(p + f"{n}.{w}", (p + f"{n}.{w}",)) for n in NORMS for w in ("weight", "bias")]
    return out


def cost(config, tied: bool) -> Cost:
    d, v = config.n_embd, config.vocab_size
    inner = config.n_inner or 4 * d
    layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d) + 4 * d
    edge = v * d * (1 if tied else 2) + config.n_positions * d + 2 * d
    return Cost(layer_params=layer, head_params=v * d, edge_params=edge, kv_per_token=2 * d, hidden=d)


class Block:
    """One transformer block's weights, under short names."""

    def __init__(self, t: dict[str, torch.Tensor], prefix: str, quant):
        lin = lambda m: linear(t, prefix + m + ".weight", prefix + m + ".bias", conv1d=True, quant=quant)  # noqa: E731
        self.ln1 = (t[prefix + "ln_1.weight"], t[prefix + "ln_1.bias"])
        self.ln2 = (t[prefix + "ln_2.weight"], t[prefix + "ln_2.bias"])
        self.qkv, self.proj = lin("attn.c_attn"), lin("attn.c_proj")    # [d] -> [3d], [d] -> [d]
        self.fc, self.out = lin("mlp.c_fc"), lin("mlp.c_proj")          # [d] -> [4d], [4d] -> [d]


class Stage:
    HEAD = HEAD

    def __init__(self, config, tensors: dict[str, torch.Tensor], layers: tuple[int, int], first: bool,
                 slots: int, max_context: int | None = None, head_t: torch.Tensor | None = None, quant=None,
                 device: torch.device | None = None,
                 tied: bool | None = None):
        tied = (HEAD not in tensors and HEAD + ".qweight" not in tensors) if tied is None else tied
        check(config)
        self.device, tensors, head_t = on_device(tensors, head_t, device)
        self.d, self.n_head = config.n_embd, config.n_head
        self.head_dim = self.d // self.n_head
        self.eps = config.layer_norm_epsilon
        self.layers, self.first = layers, first
        self.max_context = min(max_context or default_context(context(config)), context(config))
        self.blocks = [Block(tensors, f"transformer.h.{i}.", quant) for i in range(*layers)]
        if first:
            self.ends = Ends(tensors, WTE, HEAD, tied, quant, head_t)
            self.wpe = tensors[WPE] if WPE in tensors else linear(tensors, WPE, quant=quant, edge=True)   # [n_positions, d]
            self.ln_f = (tensors[LN_F[0]], tensors[LN_F[1]])
        self.cache = KVCache(len(self.blocks), slots, self.n_head, self.max_context, self.head_dim, self.device)

    @classmethod
    def load(cls, path: Path, config, layers, first: bool, slots: int, max_context: int | None,
             quant=None, tied: bool = True, device: torch.device | None = None) -> "Stage":
        tensors, head_t = read_shard(path, first, WTE, HEAD, tied, device=device)
        return cls(config, tensors, tuple(layers), first, slots, max_context, head_t=head_t, quant=quant, tied=tied,
                   device=device)

    # ---- stage 0's ends of the ring ----
    def embed(self, ids: torch.Tensor, seqs: list[Seq]) -> torch.Tensor:
        dev = self.device
        pos = positions(seqs).to(dev)
        wpe = self.wpe[pos] if isinstance(self.wpe, torch.Tensor) else self.wpe.rows(pos)
        return (self.ends.embed(ids.to(dev)) + wpe).cpu()   # [T, d]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        return self.ends.logits(F.layer_norm(x, (self.d,), *self.ln_f, self.eps)).cpu()  # [B, vocab]

    # ---- the blocks ----
    @torch.inference_mode()
    def forward(self, x: torch.Tensor, seqs: list[Seq]) -> torch.Tensor:
        """x: [T, d], the packed tokens of seqs in order; returns [T, d] after this stage's blocks."""
        plan = self.cache.plan(seqs)
        x = x.to(self.device)
        T, H, hd = x.shape[0], self.n_head, self.head_dim
        for li, blk in enumerate(self.blocks):
            q, k, v = blk.qkv(F.layer_norm(x, (self.d,), *blk.ln1, self.eps)).view(T, 3, H, hd).unbind(1)
            x = x + blk.proj(self.cache.attend(li, q, k, v, plan))                # [T, d]
            h = F.gelu(blk.fc(F.layer_norm(x, (self.d,), *blk.ln2, self.eps)), approximate="tanh")  # [T, 4d]
            x = blk.out(h).add_(x)                                                # [T, d]
        return x.cpu()
