"""One pipeline stage of GPT-2: its blocks with a preallocated KV cache, plus (stage 0) embeddings and head.

A lean re-implementation of transformers' GPT2 forward (same maths, checked against it in the tests):
weights are used as stored (Conv1D is x @ W + b, so addmm with no transpose), the KV cache is allocated
once, and a micro-batch is a packed [T, hidden] tensor of several sequences' tokens, so the matmuls of
all sequences run as one and only attention is per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Seq:
    """One sequence's share of a micro-batch."""
    slot: int   # KV-cache row this sequence owns on every stage
    start: int  # position of its first token in this micro-batch (= tokens already cached)
    n: int      # tokens it contributes (prompt chunk at prefill, 1 at decode)


class Block:
    """Weights of one transformer block, under short names."""

    def __init__(self, t: dict[str, torch.Tensor], prefix: str):
        g = lambda name: t[prefix + name]  # noqa: E731
        self.ln1 = (g("ln_1.weight"), g("ln_1.bias"))
        self.ln2 = (g("ln_2.weight"), g("ln_2.bias"))
        self.qkv_w, self.qkv_b = g("attn.c_attn.weight"), g("attn.c_attn.bias")    # [d, 3d], [3d]
        self.proj_w, self.proj_b = g("attn.c_proj.weight"), g("attn.c_proj.bias")  # [d, d]
        self.fc_w, self.fc_b = g("mlp.c_fc.weight"), g("mlp.c_fc.bias")            # [d, 4d]
        self.out_w, self.out_b = g("mlp.c_proj.weight"), g("mlp.c_proj.bias")      # [4d, d]


class Stage:
    def __init__(self, config, tensors: dict[str, torch.Tensor], layers: tuple[int, int], first: bool,
                 slots: int, max_context: int):
        if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation {config.activation_function!r} is not supported")
        if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn or not config.scale_attn_weights:
            raise ValueError("this GPT-2 variant's attention scaling is not supported")
        self.d, self.n_head = config.n_embd, config.n_head
        self.head_dim = self.d // self.n_head
        self.eps = config.layer_norm_epsilon
        self.layers, self.first = layers, first
        self.max_context = min(max_context, config.n_positions)
        self.blocks = [Block(tensors, f"transformer.h.{i}.") for i in range(*layers)]
        if first:
            self.wte, self.wpe = tensors["transformer.wte.weight"], tensors["transformer.wpe.weight"]
            self.ln_f = (tensors["transformer.ln_f.weight"], tensors["transformer.ln_f.bias"])
            self.lm_head = tensors.get("lm_head.weight", self.wte)  # tied to wte unless stored apart
        # KV cache, allocated once: [layers, slots, heads, context, head_dim]. torch.empty leaves pages
        # untouched until a sequence writes them; positions past a sequence's length are never read.
        shape = (len(self.blocks), slots, self.n_head, self.max_context, self.head_dim)
        self.k_cache = torch.empty(shape)
        self.v_cache = torch.empty(shape)

    @classmethod
    def load(cls, path: Path, config, layers, first: bool, slots: int, max_context: int) -> "Stage":
        from safetensors.torch import load_file
        return cls(config, load_file(str(path)), tuple(layers), first, slots, max_context)

    # ---- stage 0's ends of the ring ----
    def embed(self, ids: torch.Tensor, seqs: list[Seq]) -> torch.Tensor:
        pos = torch.cat([torch.arange(s.start, s.start + s.n) for s in seqs])
        return self.wte[ids] + self.wpe[pos]                                     # [T, d]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.layer_norm(x, (self.d,), *self.ln_f, self.eps), self.lm_head)  # [B, vocab]

    # ---- the blocks ----
    @torch.inference_mode()
    def forward(self, x: torch.Tensor, seqs: list[Seq]) -> torch.Tensor:
        """x: [T, d], the packed tokens of seqs in order; returns [T, d] after this stage's blocks."""
        for li, blk in enumerate(self.blocks):
            x = x + self._attention(li, blk, F.layer_norm(x, (self.d,), *blk.ln1, self.eps), seqs)
            h = F.gelu(torch.addmm(blk.fc_b, F.layer_norm(x, (self.d,), *blk.ln2, self.eps), blk.fc_w),
                       approximate="tanh")                                       # [T, 4d]
            x = torch.addmm(blk.out_b, h, blk.out_w).add_(x)                     # [T, d]
        return x

    def _attention(self, li: int, blk: Block, h: torch.Tensor, seqs: list[Seq]) -> torch.Tensor:
        H, hd = self.n_head, self.head_dim
        qkv = torch.addmm(blk.qkv_b, h, blk.qkv_w)                               # [T, 3d]
        out = torch.empty_like(h)                                                # [T, d]
        off = 0
        for s in seqs:
            end = s.start + s.n
            if end > self.max_context:
                raise ValueError(f"sequence in slot {s.slot} reaches position {end} > context {self.max_context}")
            q, k, v = qkv[off:off + s.n].view(s.n, 3, H, hd).permute(1, 2, 0, 3)  # each [H, n, hd]
            kc, vc = self.k_cache[li, s.slot], self.v_cache[li, s.slot]           # [H, ctx, hd]
            kc[:, s.start:end] = k
            vc[:, s.start:end] = v
            mask = None
            if s.n > 1 and s.start > 0:  # a later prompt chunk: causal, offset by what is cached
                mask = torch.ones(s.n, end, dtype=torch.bool).tril(diagonal=s.start)
            o = F.scaled_dot_product_attention(q, kc[:, :end], vc[:, :end], attn_mask=mask,
                                               is_causal=s.n > 1 and s.start == 0)  # [H, n, hd]
            out[off:off + s.n] = o.transpose(0, 1).reshape(s.n, self.d)
            off += s.n
        return torch.addmm(blk.proj_b, out, blk.proj_w)                          # [T, d]
