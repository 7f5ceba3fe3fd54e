"""One pipeline stage of GPT-2: its blocks with a preallocated KV cache, plus (stage 0) embeddings and head.

A lean re-implementation of transformers' GPT2 forward (same maths, checked against it in the tests):
weights are used as stored (Conv1D is x @ W + b, so addmm with no transpose), the KV cache is allocated
once, and a micro-batch is a packed [T, hidden] tensor of several sequences' tokens, so the matmuls of
all sequences run as one and only attention is per sequence.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
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


def read_transposed(path: Path, name: str, block: int = 2048) -> torch.Tensor:
    """A [rows, cols] tensor of a safetensors file as a contiguous [cols, rows] one, read a block of
    rows at a time. The file is opened per block: safetensors maps it, and the pages read stay in the
    process's RSS until it is closed, so this keeps one copy of the matrix in memory, not two."""
    from safetensors import safe_open
    out = None
    for a in itertools.count(0, block):
        with safe_open(str(path), framework="pt") as f:
            sl = f.get_slice(name)
            rows, cols = sl.get_shape()
            part = sl[a:min(rows, a + block)]
            if out is None:
                out = torch.empty(cols, rows, dtype=part.dtype)
            out[:, a:a + part.shape[0]] = part.t()
            del part
        if a + block >= rows:
            return out


class Stage:
    HEAD, WTE = "lm_head.weight", "transformer.wte.weight"

    def __init__(self, config, tensors: dict[str, torch.Tensor], layers: tuple[int, int], first: bool,
                 slots: int, max_context: int, head_t: torch.Tensor | None = None):
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
            # The LM head is kept transposed ([d, vocab]): x @ W^T with W^T contiguous is 10-50% faster
            # than F.linear on W (measured on the dev VM, 1-16 rows). GPT-2 ties it to wte, so then this
            # one matrix also serves the embedding lookups and wte itself is not kept.
            if head_t is None:       # from a plain dict of tensors: tied unless lm_head.weight is there
                tied = self.HEAD not in tensors
                head_t = tensors[self.WTE if tied else self.HEAD].t().contiguous()
                self.wte = None if tied else tensors[self.WTE]
            else:                    # Stage.load read the head matrix as head_t; wte is left only if untied
                self.wte = tensors.get(self.WTE)
            self.head_t = head_t
            self.wpe = tensors["transformer.wpe.weight"]
            self.ln_f = (tensors["transformer.ln_f.weight"], tensors["transformer.ln_f.bias"])
        # KV cache, allocated once: [layers, slots, heads, context, head_dim]. torch.empty leaves pages
        # untouched until a sequence writes them; positions past a sequence's length are never read.
        shape = (len(self.blocks), slots, self.n_head, self.max_context, self.head_dim)
        self.k_cache = torch.empty(shape)
        self.v_cache = torch.empty(shape)

    @classmethod
    def load(cls, path: Path, config, layers, first: bool, slots: int, max_context: int) -> "Stage":
        """Read this stage's shard; stage 0's head matrix is read straight into its transposed form."""
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            head = cls.HEAD if cls.HEAD in names else cls.WTE
            tensors = {name: f.get_tensor(name) for name in names if not (first and name == head)}
        head_t = read_transposed(path, head) if first else None
        return cls(config, tensors, tuple(layers), first, slots, max_context, head_t=head_t)

    # ---- stage 0's ends of the ring ----
    def embed(self, ids: torch.Tensor, seqs: list[Seq]) -> torch.Tensor:
        pos = torch.cat([torch.arange(s.start, s.start + s.n) for s in seqs])
        tok = self.wte[ids] if self.wte is not None else self.head_t.index_select(1, ids).t()
        return tok + self.wpe[pos]                                               # [T, d]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.d,), *self.ln_f, self.eps) @ self.head_t    # [B, vocab]

    # ---- the blocks ----
    @torch.inference_mode()
    def forward(self, x: torch.Tensor, seqs: list[Seq]) -> torch.Tensor:
        """x: [T, d], the packed tokens of seqs in order; returns [T, d] after this stage's blocks."""
        plan = self._plan(seqs)
        for li, blk in enumerate(self.blocks):
            x = x + self._attention(li, blk, F.layer_norm(x, (self.d,), *blk.ln1, self.eps), plan)
            h = F.gelu(torch.addmm(blk.fc_b, F.layer_norm(x, (self.d,), *blk.ln2, self.eps), blk.fc_w),
                       approximate="tanh")                                       # [T, 4d]
            x = torch.addmm(blk.out_b, h, blk.out_w).add_(x)                     # [T, d]
        return x

    def _plan(self, seqs: list[Seq]) -> "_Plan":
        """Where each sequence's rows are, and (for two or more one-token sequences) the batched
        decode attention's indices and mask, built once for all of this stage's layers."""
        plan, off = _Plan(), 0
        for s in seqs:
            end = s.start + s.n
            if end > self.max_context:
                raise ValueError(f"sequence in slot {s.slot} reaches position {end} > context {self.max_context}")
            (plan.decode if s.n == 1 else plan.chunks).append((off, s))
            off += s.n
        if len(plan.decode) < 2:
            plan.chunks += plan.decode
            plan.decode = []
            return plan
        rows, slots, pos = (torch.tensor(v) for v in zip(*[(o, s.slot, s.start) for o, s in plan.decode]))
        # Attention over the contiguous range of cache rows lo..hi (a view, no copy), up to the longest
        # sequence: each query sees only its own row's first start+1 positions, the rest is masked out.
        # Masked positions hold finite values (earlier sequences' keys, or the zero pages of the
        # never-written cache), so their zero weights contribute exactly nothing.
        lo, hi, width = int(slots.min()), int(slots.max()) + 1, int(pos.max()) + 1
        mask = torch.zeros(hi - lo, 1, 1, width, dtype=torch.bool)
        mask[..., 0] = True                     # rows of the range not in this batch: any finite answer
        mask[slots - lo] = (torch.arange(width) <= pos[:, None]).view(-1, 1, 1, width)
        plan.rows, plan.slots, plan.pos, plan.idx = rows, slots, pos, slots - lo
        plan.range, plan.width, plan.mask = (lo, hi), width, mask
        return plan

    def _attention(self, li: int, blk: Block, h: torch.Tensor, plan: "_Plan") -> torch.Tensor:
        H, hd = self.n_head, self.head_dim
        qkv = torch.addmm(blk.qkv_b, h, blk.qkv_w)                               # [T, 3d]
        out = torch.empty_like(h)                                                # [T, d]
        kcache, vcache = self.k_cache[li], self.v_cache[li]                      # [slots, H, ctx, hd]
        if plan.decode:
            q, k, v = qkv[plan.rows].view(-1, 3, H, hd).unbind(1)                 # each [B, H, hd]
            kcache[plan.slots, :, plan.pos] = k
            vcache[plan.slots, :, plan.pos] = v
            (lo, hi), w = plan.range, plan.width
            qs = torch.zeros(hi - lo, H, 1, hd)
            qs[plan.idx] = q.unsqueeze(2)
            o = F.scaled_dot_product_attention(qs, kcache[lo:hi, :, :w], vcache[lo:hi, :, :w],
                                               attn_mask=plan.mask)              # [hi-lo, H, 1, hd]
            out[plan.rows] = o[plan.idx].view(-1, self.d)
        for off, s in plan.chunks:
            end = s.start + s.n
            q, k, v = qkv[off:off + s.n].view(s.n, 3, H, hd).permute(1, 2, 0, 3)  # each [H, n, hd]
            kc, vc = kcache[s.slot], vcache[s.slot]                               # [H, ctx, hd]
            kc[:, s.start:end] = k
            vc[:, s.start:end] = v
            mask = None
            if s.n > 1 and s.start > 0:  # a later prompt chunk: causal, offset by what is cached
                mask = torch.ones(s.n, end, dtype=torch.bool).tril(diagonal=s.start)
            o = F.scaled_dot_product_attention(q, kc[:, :end], vc[:, :end], attn_mask=mask,
                                               is_causal=s.n > 1 and s.start == 0)  # [H, n, hd]
            out[off:off + s.n] = o.transpose(0, 1).reshape(s.n, self.d)
        return torch.addmm(blk.proj_b, out, blk.proj_w)                          # [T, d]


@dataclass
class _Plan:
    chunks: list = field(default_factory=list)   # (row offset, Seq): attention one sequence at a time
    decode: list = field(default_factory=list)   # (row offset, Seq): one token each, attention batched
    rows: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    range: tuple[int, int] = (0, 0)
    width: int = 0
    mask: torch.Tensor | None = None
